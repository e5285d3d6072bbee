"""8-bit AdamW with bitsandbytes' blockwise states, on halo's kernels.

``AdamW8bit`` is a ``torch.optim.Optimizer`` (use it anywhere one is taken, e.g.
``Trainer(optimizers=(opt, scheduler))``). For every parameter of at least
``min_8bit_size`` elements it keeps ``state1`` (first moment, codes of the signed
dynamic map) and ``state2`` (second moment, codes of the unsigned dynamic map) as
uint8 with one float32 ``absmax1`` / ``absmax2`` per 256 elements, as
bitsandbytes' ``AdamW8bit`` does; smaller parameters keep float32 moments. The
update is AdamW with decoupled weight decay:
``p <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

CPU parameters run the C++ kernel (scalar / AVX2 / AVX-512 chosen at run time,
``backend=`` pins one); CUDA parameters run the CUDA kernel on their device
pointers (a build without CUDA raises rather than moving them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable

import torch

from .. import _core
from ..backend import check_backend
from ..ops import FLOAT_NAMES

__all__ = ["AdamW8bit", "PagedAdamW8bit"]

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without torch.distributed
    _DTensor = None

BLOCKSIZE = 256
_DTYPE_NAMES = FLOAT_NAMES


def _numpy_view(t: torch.Tensor):
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy()
    return flat.numpy()


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise states (bitsandbytes' ``AdamW8bit``)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        backend: str = "auto",
    ) -> None:
        fn = type(self).__name__
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"[{fn}] lr must be a finite number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"[{fn}] betas must be two numbers in [0, 1), got {betas!r}")
        if not (isinstance(eps, (int, float)) and eps > 0.0):
            raise ValueError(f"[{fn}] eps must be > 0, got {eps!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
            raise ValueError(f"[{fn}] weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"[{fn}] min_8bit_size must be a positive integer, got {min_8bit_size!r}")
        check_backend(fn, backend)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size
        self.backend = backend

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to a float parameter's dtype; the 8-bit codes (exact as
        # floats 0..255) go back to uint8, their absmax stays float32.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "absmax1" in state:
                for key in ("state1", "state2"):
                    state[key] = state[key].to(torch.uint8)
                for key in ("absmax1", "absmax2"):
                    state[key] = state[key].to(torch.float32)

    def _init_state(self, param: torch.Tensor, p: torch.Tensor) -> dict:
        """The state of `param`, sized for `p`: the parameter itself or its local shard."""
        state = self.state[param]
        state["step"] = 0
        if p.numel() >= self.min_8bit_size:
            blocks = -(-p.numel() // BLOCKSIZE)
            # Zero codes with zero absmax decode to 0: the moments start at zero.
            state["state1"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
            state["state2"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fn = type(self).__name__
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"[{fn}] sparse gradients are not supported")
                if p.dtype not in _DTYPE_NAMES:
                    raise TypeError(f"[{fn}] parameters must be float32, float16 or bfloat16, got {p.dtype}")
                # FSDP2 parameters are DTensors: each rank updates (and keeps state for) its shard.
                local, grad = _local(p), _local(p.grad)
                if local.numel() == 0:
                    continue
                state = self.state[p] if len(self.state[p]) else self._init_state(p, local)
                state["step"] += 1
                args = (
                    float(group["lr"]),
                    float(beta1),
                    float(beta2),
                    float(group["eps"]),
                    float(group["weight_decay"]),
                    int(state["step"]),
                )
                if state["state1"].dtype == torch.uint8:
                    self._step_8bit(local, grad, state, args)
                else:
                    _step_32bit(local, grad, state, args)
        return loss

    def _step_8bit(self, p: torch.Tensor, grad: torch.Tensor, state: dict, args: tuple) -> None:
        target = p if p.is_contiguous() else p.contiguous()
        grad = grad.to(p.dtype).contiguous()
        name = _DTYPE_NAMES[p.dtype]
        hyper = (*args, 1.0)  # lr, beta1, beta2, eps, weight_decay, step; 1.0: no gradient scaling
        if p.device.type == "cpu":
            _core.optim.adamw8bit_step(
                _numpy_view(target.detach()),
                _numpy_view(grad),
                name,
                state["state1"].numpy(),
                state["state2"].numpy(),
                state["absmax1"].numpy(),
                state["absmax2"].numpy(),
                *hyper,
                self.backend,
            )
        elif p.device.type == "cuda":
            _core.cuda.adamw8bit_step(
                target.data_ptr(),
                grad.data_ptr(),
                name,
                p.numel(),
                state["state1"].data_ptr(),
                state["state2"].data_ptr(),
                state["absmax1"].data_ptr(),
                state["absmax2"].data_ptr(),
                *hyper,
                int(torch.cuda.current_stream(p.device).cuda_stream),
            )
        else:
            raise ValueError(f"[{type(self).__name__}] no halo kernel for parameters on {p.device}")
        if target is not p:
            p.copy_(target)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2's sharded parameters and gradients); t itself otherwise."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _step_32bit(p: torch.Tensor, grad: torch.Tensor, state: dict, args: tuple) -> None:
    """float32 moments for small parameters (as bitsandbytes' min_8bit_size), same formula."""
    lr, beta1, beta2, eps, weight_decay, step = args
    m, v = state["state1"], state["state2"]
    g = grad.float()
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    updated = p.float().mul_(1.0 - lr * weight_decay)
    updated.addcdiv_(m, v.sqrt().div_(correction2).add_(eps), value=-lr / correction1)
    p.copy_(updated)


class PagedAdamW8bit(AdamW8bit):
    """``AdamW8bit`` under bitsandbytes' paged name, so recipes that ask for
    ``paged_adamw_8bit`` run unchanged. On the CPU paging has no meaning and this is
    exactly ``AdamW8bit``. On CUDA the states are ordinary device memory too: halo does
    not page optimizer states to host memory under GPU memory pressure."""
