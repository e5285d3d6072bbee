import numpy as np
import numpy.typing as npt

BLOCKSIZE: int

def adamw8bit_step(
    param: npt.ArrayLike,
    grad: npt.ArrayLike,
    dtype: str,
    state1: npt.ArrayLike,
    state2: npt.ArrayLike,
    absmax1: npt.ArrayLike,
    absmax2: npt.ArrayLike,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    gnorm_scale: float = 1.0,
    backend: str = "auto",
) -> None: ...
def dynamic_map_unsigned() -> npt.NDArray[np.float32]: ...
