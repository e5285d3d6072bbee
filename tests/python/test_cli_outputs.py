"""The output-path guard every writing command shares (halo._output), tried as a hostile user
would: outputs that are or hold an input (symlinked Hugging Face blobs included), device
nodes and FIFOs as targets, --force over files halo did not write, and SIGTERM / SIGHUP /
SIGINT / SIGKILL in the middle of a write (issue 22). Every case runs the real command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import gguf_fixtures as fx
import halo
import numpy as np
import pytest

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "halo.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def _one_line_error(r: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"halo {command}: error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(*roots: Path) -> dict[str, tuple[str, bytes]]:
    """Every path below `roots`: its kind and (files) bytes."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p).encode())
            elif p.is_file():
                out[str(p)] = ("file", p.read_bytes())
            else:
                out[str(p)] = ("folder", b"")
    return out


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".halo-" in p.name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer LLaMA folder and its f32 GGUF (made by halo, so it carries the mark)."""
    root = tmp_path_factory.mktemp("cli-outputs")
    model = fx.tiny_model(root / "m", n_layer=2)
    halo.export_gguf(model, root / "m.gguf", type="f32", progress=False)
    return model, root / "m.gguf"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------- inputs as outputs


def test_import_force_into_the_folder_holding_the_input_deletes_nothing(tiny, tmp_path):
    _, gguf = tiny
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(gguf.read_bytes())
    (folder / "neighbour.txt").write_text("keep")
    before = _snapshot(tmp_path)
    r = _cli("import-gguf", str(folder / "m.gguf"), "--out", str(folder), "--force", "--quiet")
    _one_line_error(r, "import-gguf", "contains the input file")
    r = _cli("import-gguf", str(folder / "m.gguf"), "--out", str(folder / "m.gguf"), "--force", "--quiet")
    _one_line_error(r, "import-gguf", "is the input file")
    r = _cli("import-gguf", str(folder / "m.gguf"), "--out", str(tmp_path), "--force", "--quiet")
    _one_line_error(r, "import-gguf", "contains the input")
    assert _snapshot(tmp_path) == before


def test_edge_store_never_writes_over_the_model(tiny, tmp_path, capsys):
    def _cli(*args: str) -> subprocess.CompletedProcess:  # in-process: the subprocesses cost 15 s
        from halo.cli import main

        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    model0, _ = tiny
    model = _copy(model0, tmp_path / "m")
    before = _snapshot(model)
    for out in (model / "model.safetensors", model / "new.halogrp", model):
        for extra in ([], ["--force"]):
            r = _cli("edge", "store", "--model", str(model), "--out", str(out), "--group-size", "64", *extra)
            assert r.returncode == 1, r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "halo edge store: error:" in lines[0] and str(model) in lines[0], (
                r.stderr
            )
    assert _snapshot(model) == before
    # Anything else that exists needs --force, and --force replaces only a group store.
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    r = _cli("edge", "store", "--model", str(model), "--out", str(other), "--group-size", "64")
    assert r.returncode == 1 and "exists (use --force" in r.stderr, r.stderr
    r = _cli("edge", "store", "--model", str(model), "--out", str(other), "--group-size", "64", "--force")
    assert r.returncode == 1 and "does not carry halo's output mark" in r.stderr, r.stderr
    assert other.read_text() == "mine"
    store = tmp_path / "g.halogrp"
    for extra in ([], ["--force"]):
        r = _cli("edge", "store", "--model", str(model), "--out", str(store), "--group-size", "64", *extra)
        assert r.returncode == 0, r.stderr
    assert _temps(tmp_path) == []


def test_export_force_onto_a_hugging_face_blob_is_refused(tiny, tmp_path):
    """Hugging Face cache layout: snapshots/REV/model.safetensors is a link to blobs/SHA."""
    model0, _ = tiny
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in model0.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"sha-{f.name}")
    before = _snapshot(tmp_path)
    blob = blobs / "sha-model.safetensors"
    link = tmp_path / "out.gguf"
    link.symlink_to(blob)
    for out, message in (
        (blob, "is the model file"),
        (link, "is the model file"),
        (blobs, "contains the model file"),
    ):
        r = _cli(
            "export-gguf", "--model", str(snap), "--out", str(out), "--force", "--type", "f32", "--quiet"
        )
        _one_line_error(r, "export-gguf", message)
    link.unlink()
    assert _snapshot(tmp_path) == before
    r = _cli("merge", "--base", str(snap), "--adapter", str(snap), "--out", str(blobs), "--force", "--quiet")
    _one_line_error(r, "merge", "contains the base file")
    assert _snapshot(tmp_path) == before


def test_hwq_refuses_an_output_inside_its_model_before_loading_it(tiny, tmp_path):
    model0, _ = tiny
    model = _copy(model0, tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    before = _snapshot(tmp_path)
    for out, message in (
        (model / "q", "lies inside the model folder"),
        (tmp_path, "contains the model folder"),
    ):
        r = _cli("hwq", "--model", str(model), "--calib", str(calib), "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------- non-regular targets


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_force_never_replaces_a_device_fifo_or_socket(tiny, tmp_path, kind):
    model, _ = tiny
    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    elif kind == "socket":
        target = tmp_path / "sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
    else:  # a node of our own (never /dev/null: a regression here must not break the machine)
        target = tmp_path / "null"
        try:
            os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    name = {"fifo": "FIFO", "device": "character device", "socket": "socket"}[kind]
    try:
        r = _cli(
            "export-gguf", "--model", str(model), "--out", str(target), "--force", "--type", "f32", "--quiet"
        )
        _one_line_error(r, "export-gguf", f"is a {name}")
        r = _cli(
            "edge", "store", "--model", str(model), "--out", str(target), "--force", "--group-size", "64"
        )
        assert r.returncode == 1 and f"is a {name}" in r.stderr, r.stderr
    finally:
        if kind == "socket":
            server.close()
    assert target.exists() and not target.is_file()
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------- --force replaces only halo's


def test_force_replaces_only_what_halo_wrote(tiny, tmp_path):
    model, gguf = tiny
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my own notes")
    r = _cli("export-gguf", "--model", str(model), "--out", str(mine), "--force", "--type", "q8_0", "--quiet")
    _one_line_error(r, "export-gguf", "only an output halo wrote", "does not carry halo's output mark")
    assert mine.read_bytes() == b"my own notes"
    out = tmp_path / "ok.gguf"
    for extra in ([], ["--force"]):  # halo's own GGUF (key halo.output) is replaced
        r = _cli("export-gguf", "--model", str(model), "--out", str(out), "--type", "q8_0", "--quiet", *extra)
        assert r.returncode == 0, r.stderr
    assert halo.gguf.read(out).metadata["halo.output"] == "halo export-gguf"

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    r = _cli("import-gguf", str(gguf), "--out", str(folder), "--force", "--quiet")
    _one_line_error(r, "import-gguf", "has no valid .halo-output.json")
    hf = tmp_path / "hf"
    r = _cli("import-gguf", str(gguf), "--out", str(hf), "--quiet")
    assert r.returncode == 0, r.stderr
    marker = json.loads((hf / ".halo-output.json").read_text())
    assert marker["writer"] == "halo import-gguf"
    assert sorted(marker["files"]) == sorted(p.name for p in hf.iterdir() if p.name != ".halo-output.json")
    (hf / "my-adapter").mkdir()
    (hf / "my-adapter" / "adapter_model.safetensors").write_bytes(b"trained for a week")
    r = _cli("import-gguf", str(gguf), "--out", str(hf), "--force", "--quiet")
    _one_line_error(
        r, "import-gguf", "holds 'my-adapter/adapter_model.safetensors', which halo did not write"
    )
    assert (hf / "my-adapter" / "adapter_model.safetensors").read_bytes() == b"trained for a week"
    (hf / "my-adapter" / "adapter_model.safetensors").unlink()
    (hf / "my-adapter").rmdir()
    r = _cli("import-gguf", str(gguf), "--out", str(hf), "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert _temps(tmp_path) == []


# ------------------------------------------------------------------------- signals mid-write

# The child slows its writes (a sleep per tensor or slab) so that it is reliably mid-write when
# the test, from outside, sends the signal; everything else is the real command.
_SLOW = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # what an interactive shell gives
import halo.edge.store, halo.gguf, halo.gguf.export
from halo.cli import main

def slow(fn):
    def wrapped(*a, **k):
        time.sleep(0.05)
        return fn(*a, **k)
    return wrapped

halo.gguf.export._encode = slow(halo.gguf.export._encode)
halo.gguf.GGUFFile.numpy = slow(halo.gguf.GGUFFile.numpy)
halo.edge.store.WeightStore._load = slow(halo.edge.store.WeightStore._load)
sys.exit(main(sys.argv[1:]))
"""


def _signal_mid_write(signum: int, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs the command, waits (at most 120 s) until a temp output exists in `folder`, then
    sends `signum` from outside and waits (at most 60 s) for the process to end."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.name != "out" for p in folder.iterdir()):  # a temp output (any name)
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "no temp output appeared"
            time.sleep(0.02)
        time.sleep(0.2)  # well inside the write
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _commands(model: Path, gguf: Path, out: Path) -> dict[str, list[str]]:
    return {
        "export-gguf": ["export-gguf", "--model", str(model), "--out", str(out), "--type", "q8_0", "--quiet"],
        "import-gguf": ["import-gguf", str(gguf), "--out", str(out), "--quiet"],
        "edge store": ["edge", "store", "--model", str(model), "--out", str(out), "--group-size", "64"],
    }


@pytest.mark.parametrize(
    ("command", "signum"),
    [
        ("export-gguf", signal.SIGTERM),
        ("export-gguf", signal.SIGHUP),
        ("export-gguf", signal.SIGINT),
        ("import-gguf", signal.SIGTERM),
        ("edge store", signal.SIGTERM),
    ],
)
def test_a_signal_mid_write_leaves_no_temp_and_the_old_output(tiny, tmp_path, command, signum):
    model, gguf = tiny
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    argv = _commands(model, gguf, out)[command]
    res = _signal_mid_write(signum, work, *argv)
    assert res.returncode == 128 + signum, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], res.stderr
    assert list(work.iterdir()) == []  # no output, no temp
    # With an old output and --force: the old output, byte for byte, and no temp.
    assert _cli(*argv).returncode == 0
    before = _snapshot(work)
    res = _signal_mid_write(signum, work, *argv, "--force")
    assert res.returncode == 128 + signum, res.stderr
    assert _snapshot(work) == before


@pytest.mark.parametrize("command", ["export-gguf", "import-gguf", "edge store"])
def test_temps_of_killed_runs_are_removed_by_the_next_run(tiny, tmp_path, command):
    model, gguf = tiny
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    argv = _commands(model, gguf, out)[command]
    res = _signal_mid_write(signal.SIGKILL, work, *argv)
    assert res.returncode == -signal.SIGKILL
    stale = _temps(work)
    assert stale  # what SIGKILL leaves behind
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (work / f".out.halo-tmp-{live.pid}").write_bytes(b"a run still writing")
        r = _cli(*argv)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(work)) == [
            f".out.halo-tmp-{live.pid}",
            "out",
        ]  # the dead run's temps are gone
    finally:
        live.kill()
        live.wait()
    assert out.exists()


# ------------------------------------------------------------------------ halo edge local


def test_edge_local_on_a_damaged_store_fails_in_one_line(tiny, tmp_path, capsys):
    """Before: both damaged stores ran to the end, printed text from a model missing groups, exit 0.
    (In-process through halo.cli.main: seven runs of a subprocess importing torch cost a minute.)"""
    import torch
    from halo.cli import main
    from halo.edge.store import build_store

    model, _ = tiny
    store = tmp_path / "g.halogrp"
    assert build_store(model, store, group_size=64) == store
    data = store.read_bytes()
    cut = tmp_path / "cut.halogrp"
    cut.write_bytes(data[: len(data) * 2 // 3])
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        flipped[i] ^= 0xFF
    flip = tmp_path / "flip.halogrp"
    flip.write_bytes(bytes(flipped))
    common = [
        "edge",
        "local",
        "--model",
        str(model),
        "--prompt",
        "hello",
        "--tokens",
        "2",
        "--group-size",
        "64",
    ]
    threads = torch.get_num_threads()

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            code = main([*common, *args])
        finally:
            torch.set_num_threads(threads)  # halo edge local sets 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    for bad, why in ((cut, "truncated"), (flip, "checksum mismatch")):
        r = run("--store", str(bad), "--json", str(tmp_path / "result.json"))
        line = _one_line_error(r, "edge local", f"the group store {bad} is damaged", why)
        assert "Traceback" not in r.stderr and r.stdout == "", line
    assert not (tmp_path / "result.json").exists()
    # The intact store runs; its --json is never written over an input, and replaces only a result.
    _one_line_error(
        run("--store", str(store), "--json", str(model / "config.json")), "edge local", "lies inside"
    )
    _one_line_error(run("--store", str(store), "--json", str(store)), "edge local", "is the group store")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    _one_line_error(run("--store", str(store), "--json", str(notes)), "edge local", "does not carry halo's")
    assert notes.read_text() == '{"mine": 1}'
    for _ in range(2):
        r = run("--store", str(store), "--json", str(tmp_path / "result.json"))
        assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "result.json").read_text())["halo_output"] == "halo edge local"
    assert store.read_bytes() == data and _temps(tmp_path) == []


def test_a_target_that_changes_during_the_write_is_left_alone(tmp_path):
    """The checks hold at the swap too: a file that appears at --out while halo writes is kept."""
    from halo._output import output

    out = tmp_path / "o.txt"
    guard = output("test", out, [], "file", force=True, halo_made=lambda p: True)
    with pytest.raises(ValueError, match="changed while halo was writing"), guard as target:
        target.temp.write_text("new")
        out.write_text("someone else's")
        target.commit()
    assert out.read_text() == "someone else's" and _temps(tmp_path) == []


# ------------------------------------------------- halo edge plan, edge run --json, demo --out


def _in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    from halo.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_edge_plan_never_writes_over_an_input(tiny, tmp_path, capsys):
    """Before: `halo edge plan --out MODEL/config.json` replaced the model's config with a plan
    (and --out the --devices file replaced it), any file was overwritten without a word."""
    model = _copy(tiny[0], tmp_path / "m")
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"speed": 1e9, "bandwidth": 1e7}, {"speed": 2e9, "bandwidth": 1e7}]))
    before = _snapshot(tmp_path)
    plan = ["edge", "plan", "--model", str(model), "--calibration-tokens", "0", "--group-size", "128"]
    for who in (["--workers", "2"], ["--devices", str(devices)]):
        for out, message in (
            (model / "config.json", "lies inside the model folder"),
            (model / "plan.json", "lies inside the model folder"),
            (tmp_path, "contains the model folder"),
        ):
            _one_line_error(_in_process(capsys, *plan, *who, "--out", str(out)), "edge plan", message)
    r = _in_process(capsys, *plan, "--devices", str(devices), "--out", str(devices))
    _one_line_error(r, "edge plan", "is the devices file")
    assert _snapshot(tmp_path) == before
    # A file halo did not write is kept; a plan halo wrote is replaced (a results file: no --force).
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    r = _in_process(capsys, *plan, "--workers", "2", "--out", str(notes))
    _one_line_error(r, "edge plan", "does not carry halo's output mark")
    assert notes.read_text() == '{"mine": 1}'
    out = tmp_path / "plan.json"
    for workers in ("2", "3"):
        r = _in_process(capsys, *plan, "--workers", workers, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert len(json.loads(out.read_text())["devices"]) == int(workers)
    # The predictor file beside the plan is guarded too, before any calibration work.
    mine = tmp_path / "p.json.predictor.npz"
    mine.write_bytes(b"my own archive")
    r = _in_process(
        capsys, "edge", "plan", "--model", str(model), "--workers", "2", "--out", str(tmp_path / "p.json")
    )
    _one_line_error(r, "edge plan", "p.json.predictor.npz", "does not carry halo's output mark")
    assert mine.read_bytes() == b"my own archive" and not (tmp_path / "p.json").exists()
    os.mkfifo(tmp_path / "fifo2")
    r = _in_process(capsys, *plan, "--workers", "2", "--out", str(tmp_path / "fifo2"))
    _one_line_error(r, "edge plan", "is a FIFO")
    assert _temps(tmp_path) == []


def test_edge_plan_predictor_files_halo_wrote_are_recognised(tmp_path):
    from halo.edge.plan import _is_predictor_file, save_predictors
    from halo.edge.predictor import PartPredictor

    fields = {name: np.zeros(2, np.float32) for name in PartPredictor.__dataclass_fields__}
    path = tmp_path / "p.npz"
    save_predictors(path, {(0, 0): PartPredictor(**fields), (0, 1): PartPredictor(**fields)})
    assert _is_predictor_file(path)
    save_predictors(path, {(1, 0): PartPredictor(**fields)})  # replaces its own
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    assert not _is_predictor_file(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="does not carry halo's output mark"):
        save_predictors(tmp_path / "other.npz", {(0, 0): PartPredictor(**fields)})


def test_edge_run_json_never_writes_over_an_input(tiny, tmp_path, capsys):
    """--json is checked before any worker is contacted. Before: written (temp + rename) over
    whatever it named: the plan, the key file, a file of the model."""
    from halo.edge.link import write_key
    from halo.edge.plan import make_plan

    model = _copy(tiny[0], tmp_path / "m")
    plan = tmp_path / "plan.json"
    make_plan(model, 1, calibration_tokens=0, out=plan)
    key = tmp_path / "edge.key"
    write_key(key)
    os.mkfifo(tmp_path / "fifo")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    before = _snapshot(tmp_path)
    run = ["edge", "run", "--model", str(model), "--workers", "127.0.0.1:9", "--plan", str(plan)]
    run += ["--prompt", "hi", "--connect-timeout", "0.5"]
    for security in (["--insecure"], ["--key-file", str(key)]):
        for out, message in (
            (plan, "is the plan"),
            (model / "config.json", "lies inside the model folder"),
            (tmp_path, "contains the model folder"),
            (tmp_path / "fifo", "is a FIFO"),
            (notes, "does not carry halo's output mark"),
        ):
            r = _in_process(capsys, *run, *security, "--json", str(out))
            _one_line_error(r, "edge run", str(out), message)
    r = _in_process(capsys, *run, "--key-file", str(key), "--json", str(key))
    _one_line_error(r, "edge run", "is the key file")
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "halo.demo", "--finetune-steps", "0", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_demo_out_never_replaces_its_input(tmp_path):
    """Before: `python -m halo.demo --model M --out M` replaced the model with its NF4 copy."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model.safetensors"
    rng = np.random.default_rng(0)
    save_file({"layer.0.dense.weight": rng.standard_normal((64, 64)).astype(np.float32)}, str(model))
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"mine")
    before = _snapshot(tmp_path)
    for out, message in (
        (model, "is the model file"),
        (tmp_path, "contains the model file"),
        (notes, "does not carry halo's output mark"),
    ):
        r = _demo("--model", str(model), "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("halo.demo: error:") and message in lines[0], r.stderr
    assert _snapshot(tmp_path) == before
    out = tmp_path / "out" / "nf4.safetensors"
    for _ in range(2):  # its own output is replaced (make demo reruns), through a temp file
        r = _demo("--model", str(model), "--out", str(out))
        assert r.returncode == 0, r.stderr
    assert "layer.0.dense.weight" in load_file(str(out)) and _temps(out.parent) == []
