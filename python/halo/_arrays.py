"""Moving user arrays (NumPy, torch) in and out of the compiled core.

Tensors cross as NumPy views without a copy where the layout allows: a CPU
torch tensor is viewed through ``.numpy()`` (bfloat16 through its int16 bits),
a NumPy array is used as it is when C-contiguous.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .formats import KERNEL_FLOATS as FLOAT_DTYPES


@dataclass
class Flat:
    """A C-contiguous 1-D view of the user's data and what it came from."""

    data: np.ndarray  # float32 / float16 / uint16 (bfloat16 bits)
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: tuple[int, ...]
    kind: str  # "numpy" | "torch"


def _torch():
    return sys.modules.get("torch")


def is_torch_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def flatten_float(function: str, value: Any) -> Flat:
    """Validates a float tensor (a NumPy array or a CPU torch tensor) and returns a contiguous
    flat view of it; a tensor on another device is refused, never copied to the CPU."""
    if is_torch_tensor(value):
        torch = _torch()
        tensor = value.detach()
        if tensor.layout != torch.strided:
            raise TypeError(
                f"[{function}] expected a dense tensor, got layout {tensor.layout}; call .to_dense() first"
            )
        if tensor.device.type != "cpu":
            # These are halo's CPU kernels: a silent .cpu() would hide a device-to-host copy
            # (and hand back a CPU result for a device input).
            raise ValueError(
                f"[{function}] the tensor is on {tensor.device}, not the CPU: this function runs "
                "halo's CPU kernels; use the torch operators in halo.ops (torch.ops.halo.*) for "
                "device tensors, or pass .cpu() explicitly"
            )
        from .ops import FLOAT_NAMES as names

        if tensor.dtype not in names:
            raise TypeError(
                f"[{function}] expected a float32, float16 or bfloat16 tensor, got {tensor.dtype}"
            )
        tensor = tensor.contiguous()
        dtype = names[tensor.dtype]
        flat = tensor.reshape(-1)
        data = flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()
        return Flat(data, dtype, tuple(tensor.shape), "torch")
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name not in FLOAT_DTYPES:
            raise TypeError(
                f"[{function}] expected a float32, float16 or bfloat16 array, got dtype {value.dtype}"
            )
        # Kernels read native (little-endian) data: a big-endian array is converted, not misread.
        array = np.ascontiguousarray(
            value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
        )
        data = array.reshape(-1)
        if name == "bfloat16":  # ml_dtypes.bfloat16
            data = data.view(np.uint16)
        return Flat(data, name, tuple(array.shape), "numpy")
    raise TypeError(f"[{function}] expected a NumPy array or a torch tensor, got {type(value).__name__}")


def float_dtype_name(function: str, dtype: Any) -> str:
    """ "float32" / "float16" / "bfloat16" from a name, a NumPy dtype or type, or a torch dtype."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name  # np.float32, np.dtype("float16"), ml_dtypes.bfloat16
        except TypeError:
            name = str(dtype).removeprefix("torch.")  # torch.bfloat16
    if name not in FLOAT_DTYPES:
        raise TypeError(f"[{function}] dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name


def restore(flat: np.ndarray, dtype: str, shape: tuple[int, ...], kind: str) -> Any:
    """Turns core output (bfloat16 as uint16 bits) into the kind the user gave."""
    if kind == "torch":
        torch = _torch()
        if torch is None:
            import torch
        if dtype == "bfloat16":
            return torch.from_numpy(flat.view(np.int16)).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(flat).reshape(shape)
    if dtype == "bfloat16":
        try:
            import ml_dtypes

            return flat.view(ml_dtypes.bfloat16).reshape(shape)
        except ImportError as error:
            raise TypeError(
                "bfloat16 NumPy output needs the ml_dtypes package; ask for float32 instead"
            ) from error
    return flat.reshape(shape)
