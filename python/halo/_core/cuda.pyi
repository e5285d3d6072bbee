# Entry points on device pointers (torch CUDA tensors' data_ptr()) and a CUDA stream handle.

def compiled() -> bool: ...
def quantize_4bit(
    input: int, dtype: str, n: int, quant_type: str, blocksize: int, packed: int, absmax: int, stream: int
) -> None: ...
def dequantize_4bit(
    packed: int, absmax: int, n: int, quant_type: str, blocksize: int, output: int, dtype: str, stream: int
) -> None: ...
def adamw8bit_step(
    param: int,
    grad: int,
    dtype: str,
    n: int,
    state1: int,
    state2: int,
    absmax1: int,
    absmax2: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    gnorm_scale: float,
    stream: int,
) -> None: ...
