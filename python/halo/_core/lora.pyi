import numpy as np
import numpy.typing as npt

def forward(
    x: npt.NDArray[np.floating],
    lora_a: npt.NDArray[np.floating],
    lora_b: npt.NDArray[np.floating],
    bias: npt.NDArray[np.floating] | None,
    base: npt.ArrayLike,
    base_dtype: str,
    out_features: int,
    in_features: int,
    fan_in_fan_out: bool,
    scaling: float,
    dropout: float,
    seed: int,
    absmax: npt.ArrayLike | None = None,
    blocksize: int = 64,
    backend: str = "auto",
) -> npt.NDArray[np.floating]: ...
def backward(
    grad_y: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    lora_a: npt.NDArray[np.floating],
    lora_b: npt.NDArray[np.floating],
    with_bias: bool,
    base: npt.ArrayLike,
    base_dtype: str,
    out_features: int,
    in_features: int,
    fan_in_fan_out: bool,
    scaling: float,
    dropout: float,
    seed: int,
    absmax: npt.ArrayLike | None = None,
    blocksize: int = 64,
    backend: str = "auto",
) -> tuple[
    npt.NDArray[np.floating],
    npt.NDArray[np.floating],
    npt.NDArray[np.floating],
    npt.NDArray[np.floating] | None,
]: ...
def dropout_mask(seed: int, count: int, p: float) -> npt.NDArray[np.float32]: ...
def merge(
    weight: npt.ArrayLike,
    dtype: str,
    out_features: int,
    in_features: int,
    lora_a: npt.NDArray[np.float32],
    lora_b: npt.NDArray[np.float32],
    scaling: float,
    fan_in_fan_out: bool,
    subtract: bool,
) -> npt.NDArray[np.generic]: ...
