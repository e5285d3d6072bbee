"""halo._pages.release_file_pages: the pages of a memory-mapped checkpoint leave the process's RSS
once a tensor read from them is quantized, without changing what the memory holds; and loading
SmolLM2 in 4 bits no longer keeps the float checkpoint resident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from halo._pages import release_file_pages  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (smaps' Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.fixture
def weights_file(tmp_path):
    values = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    return path, values


@pytest.mark.parametrize("mode", ["r", "c"], ids=["read-only", "private-copy-on-write"])
def test_the_pages_of_an_unwritten_file_mapping_leave_rss_and_read_back_the_same(weights_file, mode):
    path, values = weights_file
    mapped = np.memmap(path, dtype=np.float32, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: a read-only array is not writable
        tensor = torch.from_numpy(mapped)
    assert float(tensor.sum()) == float(values.sum())  # every page is now resident
    before = _resident_kib(path)
    assert before >= 4000
    released = release_file_pages(tensor)
    assert released >= (4 << 20) - 2 * os.sysconf("SC_PAGE_SIZE")
    assert _resident_kib(path) <= before - 4000
    np.testing.assert_array_equal(tensor.numpy(), values)  # read back from the file


def test_a_mapping_with_a_written_page_and_anonymous_memory_are_left_alone(weights_file):
    path, values = weights_file
    mapped = np.memmap(path, dtype=np.float32, mode="c")
    mapped[0] = -1.0  # a private copy of the first page: dropping it would lose this write
    tensor = torch.from_numpy(mapped)
    assert release_file_pages(tensor) == 0
    assert float(tensor[0]) == -1.0
    heap = torch.arange(1 << 20, dtype=torch.float32)
    assert release_file_pages(heap) == 0
    assert torch.equal(heap, torch.arange(1 << 20, dtype=torch.float32))
    with pytest.raises(TypeError, match=r"\[release_file_pages\] tensor must be a torch.Tensor, got list"):
        release_file_pages([1.0])


_LOAD = """
import json, sys, torch, transformers
from halo.hf import HaloConfig
model = transformers.AutoModelForCausalLM.from_pretrained(
    sys.argv[1], quantization_config=HaloConfig(compute_dtype=torch.float32)
)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(status[k].split()[0]) for k in ("VmHWM", "RssFile")}))
"""


def test_loading_smollm2_in_4_bits_does_not_keep_the_float_checkpoint_resident(smollm2_dir):
    """The float32 checkpoint is 513 MiB; its 4-bit linears are read, quantized and given back one
    by one, so only the unquantized tensors (the 108 MiB embedding, the norms) stay resident.
    Without the release every page of the file stayed: RssFile 524 MiB, peak 944 MiB."""
    checkpoint = Path(smollm2_dir) / "model.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(smollm2_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    size_kib = checkpoint.stat().st_size // 1024
    assert figures["RssFile"] < 0.4 * size_kib, figures
