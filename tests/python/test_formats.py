"""halo's format table (read from the compiled core) against the libraries that
define each spelling: gguf-py's type ids and block sizes, safetensors' dtypes,
torch and NumPy dtype names, and bitsandbytes' code books."""

from __future__ import annotations

import halo
import numpy as np
import pytest
import torch
from halo import formats


def test_ggml_rows_match_gguf_py():
    gguf = pytest.importorskip("gguf")
    ggml_rows = [f for f in formats.FORMATS.values() if f.ggml_type >= 0]
    assert len(ggml_rows) >= 19
    for row in ggml_rows:
        qtype = gguf.GGMLQuantizationType(row.ggml_type)
        assert qtype.name == row.gguf, row.name
        assert gguf.GGML_QUANT_SIZES[qtype] == (row.block_elems, row.block_bytes), row.name


def test_element_rows_match_torch_numpy_and_safetensors():
    import ml_dtypes
    import safetensors.torch

    for row in formats.FORMATS.values():
        if row.block_elems != 1:
            continue
        tdtype = getattr(torch, row.torch)
        assert tdtype.itemsize == row.itemsize, row.name
        npdtype = (
            np.dtype(getattr(ml_dtypes, row.numpy)) if hasattr(ml_dtypes, row.numpy) else np.dtype(row.numpy)
        )
        assert npdtype.itemsize == row.itemsize, row.name
        # safetensors' own name for the torch dtype is the table's.
        assert safetensors.torch._TYPES[row.safetensors] == tdtype, row.name
        assert formats.by_torch(tdtype) is row
        assert formats.by_safetensors(row.safetensors) is row


def test_code_books_are_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    for name in formats.BNB4_TYPES:
        book = np.array(formats.FORMATS[name].code_book, dtype=np.float32)
        assert np.array_equal(book, bnb.functional.get_4bit_type(name, device="cpu").numpy()), name


def test_block_size_rule_and_lookups():
    assert formats.BNB4_BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert formats.BNB4_TYPES == ("nf4", "fp4")
    assert halo.quant.BLOCKSIZES == formats.BNB4_BLOCKSIZES
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F4'"):
        formats.by_safetensors("F4")
    with pytest.raises(ValueError, match="unknown format 'nf5'"):
        formats.by_name("nf5")
    with pytest.raises(TypeError, match="torch.complex64"):
        formats.by_torch(torch.complex64)


def test_kernel_inventory_names_every_backend_choice():
    kernels = halo._core.backend.kernels()
    assert set(kernels["quantize_4bit"]) >= {"scalar"}
    cpu = [b for b in halo.backends() if b != "cuda"]
    for op in ("quantize_4bit", "dequantize_4bit", "lora_tile_gemm"):
        assert set(cpu) <= set(kernels[op]), op
