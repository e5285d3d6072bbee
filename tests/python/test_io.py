"""halo.io (C++ safetensors reader/writer) against the reference safetensors package,
plus hypothesis fuzzing: random and mutated headers must give ValueError, never a crash."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from halo import io as hio
from halo._core import io as core_io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as np_save
from safetensors.torch import load_file, save_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        # Every float8 row of halo.formats, the fnuz variants included (read back as themselves).
        "f8_e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "f8_e4m3fnuz": torch.randn(4, generator=g).to(torch.float8_e4m3fnuz),
        "f8_e5m2fnuz": torch.randn(3, generator=g).to(torch.float8_e5m2fnuz),
    }


def test_reads_files_written_by_safetensors(tmp_path):
    ref = _tensors()
    path = tmp_path / "a.safetensors"
    save_file(ref, str(path), metadata={"format": "pt", "x": "y"})
    f = hio.open_safetensors(path)
    assert f.metadata == {"format": "pt", "x": "y"}
    assert sorted(f.names()) == sorted(ref)
    got = hio.load_safetensors(path, framework="torch")
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    np_view = f.get("bf16")
    assert np_view.dtype == np.uint16 and not np_view.flags.writeable
    np.testing.assert_array_equal(np_view, ref["bf16"].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(hio.bf16_bits_to_float32(np_view), ref["bf16"].float().numpy())


def test_view_outlives_file_object(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(10.0)}, str(path))
    view = hio.open_safetensors(path).get("w")
    import gc

    gc.collect()
    np.testing.assert_array_equal(view, np.arange(10.0, dtype=np.float32))


def test_written_files_load_in_safetensors(tmp_path):
    ref = _tensors()
    path = tmp_path / "b.safetensors"
    hio.save_safetensors(path, ref, {"format": "pt"})
    got = load_file(str(path))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(
            got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        ), k
    assert not list(tmp_path.glob("*.tmp*"))


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ref = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(hio.float32_to_bf16_bits(x), ref)


def test_writer_rejects_wrong_order_and_size(tmp_path):
    w = core_io.SafetensorsWriter(str(tmp_path / "c.safetensors"), [("a", "F32", [2]), ("b", "F32", [1])], {})
    with pytest.raises(ValueError, match='expected tensor "a"'):
        w.write("b", np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="needs 8 bytes"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="not written"):
        w.finish()
    assert not (tmp_path / "c.safetensors").exists() and not list(tmp_path.iterdir())


def _raw(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    text = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    return struct.pack("<Q", len(text) if length is None else length) + text + data


BAD = [
    (b"abc", "fewer than the 8-byte"),
    (_raw("{}", length=10**6), "runs past the end"),
    (_raw("{}", length=2**63), "implausibly large"),
    (_raw("[1]"), "not a JSON object"),
    (_raw('{"a": '), "not valid JSON"),
    (_raw({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative integer"),
    (_raw({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4), "overflows"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "need"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "past the data section"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "begin > end"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "belong to no tensor"),
    (
        _raw(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
        ),
        "overlaps",
    ),
    (_raw({"__metadata__": {"k": 1}}), "not a string"),
    (_raw({"a": {"dtype": "F32", "shape": [1]}}), "lacks"),
    (_raw('{"a": 1, "a": 2}'), "duplicate key"),
    # nlohmann_json parses the header now; what the strict parser refused stays refused.
    (_raw('{"__metadata__": ' + "[" * 200 + "]" * 200 + "}"), "nested deeper than 64"),
    (
        _raw(b'{"\xc0\xae": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
        "not valid JSON",
    ),
    (
        _raw('{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
        "not valid JSON",
    ),
    (
        _raw({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
        "non-negative integer",
    ),
    (
        _raw({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}, b"\0" * 4),
        "non-negative integer",
    ),
    # Issue 9, item 10: shapes NumPy and torch cannot hold, named with the file (not a bare NumPy error).
    (_raw({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4), "65 dimensions"),
    (_raw({"a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}), "overflows"),
    (_raw({"a": {"dtype": "U8", "shape": [0, 2**63 - 1, 2], "data_offsets": [0, 0]}}), "overflows"),
]


@pytest.mark.parametrize(("blob", "message"), BAD)
def test_malformed_files_give_clear_errors(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as info:
        hio.open_safetensors(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        hio.open_safetensors(tmp_path / "nope.safetensors")


def _valid_blob() -> bytes:
    return np_save(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64)},
        metadata={"format": "np"},
    )


def _reference_accepts(blob: bytes) -> bool:
    from safetensors.numpy import load

    try:
        load(blob)
        return True
    except Exception:
        return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    try:
        f = hio.open_safetensors(path)
    except ValueError as exc:
        assert "[safetensors]" in str(exc)
        return
    for n in f.names():
        f.get(n)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_valid_file(tmp_path, data):
    blob = bytearray(_valid_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        if kind == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[data.draw(st.integers(0, len(blob))) :]
        else:
            i = data.draw(st.integers(0, len(blob)))
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(blob))
    try:
        f = hio.open_safetensors(path)
    except ValueError as exc:
        assert "[safetensors]" in str(exc)
        return
    # Whatever halo accepts must be a file the reference reader accepts with the same tensors.
    assert _reference_accepts(bytes(blob))
    from safetensors.numpy import load

    ref = load(bytes(blob))
    assert sorted(ref) == sorted(f.names())
    for n, v in ref.items():
        assert f.get(n).tobytes() == v.tobytes()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "X"]),
                "shape": st.lists(st.integers(-2, 5), max_size=3),
                "data_offsets": st.lists(st.integers(-1, 200), min_size=0, max_size=3),
            }
        ),
        max_size=4,
    ),
    st.integers(0, 200),
)
def test_fuzz_structured_headers(header, data_size):
    text = json.dumps(header)
    try:
        tensors, _ = core_io.parse_header(text, data_size, "<fuzz>")
    except ValueError as exc:
        assert "<fuzz>" in str(exc)
        return
    # Accepted: the tensors tile the data exactly and sizes agree, checked independently here.
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F64": 8, "BOOL": 1}
    spans = sorted((b, e) for _, _, _, b, e in tensors)
    cursor = 0
    for b, e in spans:
        assert b == cursor
        cursor = e
    assert cursor == data_size
    for _name, dtype, shape, b, e in tensors:
        assert e - b == sizes[dtype] * int(np.prod(shape, dtype=np.int64))


# -- hostile paths and file types, the writer's checks, fsync, truncation (issue 9) -----------------


def test_fifo_is_refused_without_blocking(tmp_path):
    import threading

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = {}

    def try_open():
        try:
            hio.open_safetensors(fifo)
        except ValueError as exc:
            result["error"] = str(exc)

    worker = threading.Thread(target=try_open, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked waiting for a writer: release it, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        worker.join(10)
        os.close(fd)
        pytest.fail("open_safetensors blocked on a FIFO")
    assert "FIFO" in result["error"] and str(fifo) in result["error"]


@pytest.mark.parametrize(
    ("path", "kind"), [("/dev/zero", "character device"), ("/dev/null", "character device")]
)
def test_devices_are_refused(path, kind):
    for copy in (False, True):
        with pytest.raises(ValueError, match=kind):
            hio.open_safetensors(path, copy=copy)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        hio.open_safetensors(tmp_path)


def test_paths_with_nul_bytes_are_refused(tmp_path):
    target = tmp_path / "a"
    with pytest.raises(ValueError, match="NUL byte"):
        hio.save_safetensors(str(target) + "\0b.safetensors", {"x": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="NUL byte"):
        hio.open_safetensors(str(target) + "\0b.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing written under the name before the NUL


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ([2**62, 4], "F32", "overflows"),
        ([0, 2**63 - 1, 2], "U8", "overflows"),
        ([1] * 65, "F32", "65 dimensions"),
        ([-1], "F32", "negative"),
    ],
)
def test_writer_refuses_unrepresentable_shapes_before_writing(tmp_path, shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        core_io.SafetensorsWriter(str(tmp_path / "w.safetensors"), [("a", dtype, shape)], {})
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_total_size_overflow(tmp_path):
    specs = [("a", "U8", [2**62]), ("b", "U8", [2**62])]
    with pytest.raises(ValueError, match="total size overflows"):
        core_io.SafetensorsWriter(str(tmp_path / "w.safetensors"), specs, {})
    assert list(tmp_path.iterdir()) == []


def test_fsync_flag_changes_nothing_in_the_file(tmp_path):
    ref = _tensors()
    hio.save_safetensors(tmp_path / "a.safetensors", ref, {"format": "pt"})
    hio.save_safetensors(tmp_path / "b.safetensors", ref, {"format": "pt"}, fsync=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_copy_survives_truncation_and_mapping_raises_sigbus(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "t.safetensors"
    data = np.arange(1 << 16, dtype=np.float32)
    save_file({"w": torch.from_numpy(data)}, str(path))
    copied = hio.open_safetensors(path, copy=True)
    assert copied.copied and not hio.open_safetensors(path).copied
    view = copied.get("w")
    # The documented hazard of the mapped default, shown in a child process.
    code = (
        "import os, sys\n"
        "from halo import io\n"
        "f = io.open_safetensors(sys.argv[1])\n"
        "w = f.get('w')\n"
        "os.truncate(sys.argv[1], 4096)\n"
        "print(float(w.sum()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stderr[-500:])
    assert path.stat().st_size == 4096
    copied.release_pages()  # a no-op on a copy: the data must stay
    np.testing.assert_array_equal(view, data)
