"""What both kernel families share: where the Triton kernels run, split-K sizing, exact rounding."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when our kernels are decorated, so read it the same way once.
INTERPRETING = bool(triton.knobs.runtime.interpret)


def _fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int(array of shape (1,)), which numpy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream by #9172): squeeze first. Harmless where already fixed."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETING:
    _fix_interpreter_for_numpy_2_4()


def use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels run on a GPU, or on the CPU through the interpreter (tests)."""
    return x.is_cuda or INTERPRETING


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bfloat16 tiles as raw 16-bit integers: give it float32 there."""
    return INTERPRETING and dtype == torch.bfloat16


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_k(device: torch.device, tiles_mn: int, k_tiles: int, per_sm: int = 2) -> int:
    """Split K until there are about `per_sm` programs per multiprocessor (memory-bound small-M products)."""
    wanted = triton.cdiv(per_sm * _multiprocessors(device), tiles_mn)
    return max(1, min(wanted, k_tiles))


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def round_half_even(x):
    """torch.round (ties to even), exactly, without libdevice (which the interpreter lacks)."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
