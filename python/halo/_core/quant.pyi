import numpy as np
import numpy.typing as npt

def quantize_4bit(
    input: npt.ArrayLike, dtype: str, quant_type: str, blocksize: int, backend: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def dequantize_4bit(
    packed: npt.ArrayLike,
    absmax: npt.ArrayLike,
    n: int,
    quant_type: str,
    blocksize: int,
    dtype: str,
    backend: str,
    out: npt.ArrayLike | None = None,
) -> npt.NDArray[np.generic]: ...
def double_quantize(
    absmax: npt.ArrayLike, nested_blocksize: int = 256, offset: float | None = None, mean_threads: int = 1
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]: ...
def double_dequantize(
    codes: npt.ArrayLike, nested_absmax: npt.ArrayLike, offset: float, nested_blocksize: int = 256
) -> npt.NDArray[np.float32]: ...
def code_book(quant_type: str) -> npt.NDArray[np.float32]: ...
def dynamic_map() -> npt.NDArray[np.float32]: ...
def torch_mean_f32(values: npt.ArrayLike, num_threads: int = 1) -> float: ...
def matmul_4bit(
    x: npt.ArrayLike,
    dtype: str,
    rows: int,
    packed: npt.ArrayLike,
    absmax: npt.ArrayLike,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
    bias: npt.ArrayLike | None = None,
    transposed: bool = False,
    backend: str = "auto",
    out: npt.ArrayLike | None = None,
    activations: str = "exact",
) -> npt.NDArray[np.generic]: ...
def matmul_4bit_pointers(
    x: int,
    dtype: str,
    rows: int,
    packed: npt.ArrayLike,
    absmax: npt.ArrayLike,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
    y: int,
    transposed: bool,
    activations: str = "exact",
) -> None: ...
def matmul_4bit_variant(
    dtype: str,
    rows: int,
    out_features: int,
    in_features: int,
    blocksize: int,
    transposed: bool = False,
    backend: str = "auto",
    activations: str = "exact",
) -> str: ...
def matmul_4bit_device(
    x: int,
    dtype: str,
    rows: int,
    packed: int,
    absmax: int,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
    bias: int,
    y: int,
    transposed: bool,
    stream: int,
) -> None: ...
def array_cache_state() -> tuple[int, int]: ...
