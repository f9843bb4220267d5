"""W8A8: int8 per-channel weights, int8 activations, int32 accumulation, scales applied in the epilogue.

Checkpoint layout (compressed-tensors 0.19 `int-quantized`, one nn.Linear of N outputs and K inputs):
  weight        int8  [N, K]   symmetric: w[n, k] = weight[n, k] * weight_scale[n]
  weight_scale  float [N, 1]
  input_scale   float [1]      only with static per-tensor activations; without it, activations get
                               per-token dynamic scales
Activations are quantized the way compressed-tensors does it: scale = max|x| / 127.5 per token (or the static
input_scale), q = round_half_even(clamp(x / scale, -128, 127)).

The Triton path: one small kernel quantizes the activation rows (and writes per-token scales), then an int8
tl.dot kernel computes sum_k q_x * q_w in int32 and multiplies by scale_x * scale_w once per output. Up to
DECODE_MAX_M rows the product splits K across programs, as in W4A16.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from calq.kernels import common

DECODE_MAX_M = 16
# Launch configurations of the two paths. DECODE is the fastest of benchmarks/sweep_kernels.py's on an H200
# (BENCHMARKS.md, "Kernels and decoding"); PREFILL is not swept yet.
DECODE = {"BN": 32, "BK": 128, "warps": 4, "stages": 4, "per_sm": 2}
PREFILL = {"BM": 128, "BN": 128, "BK": 64, "warps": 8, "stages": 3}


def quantize_activations_reference(x: torch.Tensor,
                                   input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scales [M, 1] or the static [1]) in plain torch, float32 arithmetic."""
    x = x.reshape(-1, x.shape[-1]).float()
    if input_scale is None:
        scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    else:
        scale = input_scale.float().reshape(1)
    return torch.round(torch.clamp(x / scale, -128, 127)).to(torch.int8), scale


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 result of x @ W.T (+ bias): quantize x, dequantize both operands, one float32 matmul."""
    q, scale = quantize_activations_reference(x, input_scale)
    out = (q.float() * scale) @ (weight.float() * weight_scale.float().reshape(-1, 1)).t()
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.float()


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    if STATIC:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        scale = tl.math.div_rn(tl.max(amax, axis=0), 127.5)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        # IEEE division, as torch does: Triton's `/` is approximate on GPUs and would move rounding ties.
        q = common.round_half_even(tl.clamp(tl.math.div_rn(x, scale), -128.0, 127.0))
        tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, K], float32 scales [M], or the static input_scale as float32 [1]) with one Triton kernel."""
    x2 = common.rows_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if input_scale is None:
        scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    else:
        scale = input_scale.to(torch.float32).reshape(1)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _quantize_rows_kernel[(m,)](x2, q, scale, k, x2.stride(0), STATIC=input_scale is not None, BLOCK=block,
                                    num_warps=4 if block <= 1024 else 8)
    return q, scale


@triton.jit
def _w8a8_kernel(q_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_om, stride_os, tiles_per_split,
                 PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BK))
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for t in range(first, last):
        offs_k = t * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(q_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_ptr + cols[None, :] * K + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    if PER_TOKEN:
        x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    else:
        x_scale = tl.load(xs_ptr)
    out = acc.to(tl.float32) * x_scale * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:  # added by the first K split only
        out += tl.load(bias_ptr + offs_n, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    dest = out_ptr + pid_k * stride_os + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in x's dtype. weight int8 [N, K], weight_scale float32 [N]; split_k=None chooses."""
    if not common.use_triton(x):
        raise ValueError("the W8A8 Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    n, k = weight.shape
    if x.shape[-1] != k or weight_scale.numel() != n:
        raise ValueError(f"input width {x.shape[-1]} does not match weight {tuple(weight.shape)} "
                         f"and weight_scale {tuple(weight_scale.shape)}")
    q, x_scale = quantize_activations(x, input_scale)
    m = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    decode = m <= DECODE_MAX_M
    cfg = DECODE if decode else PREFILL
    bm = 16 if decode else cfg["BM"]
    k_tiles = triton.cdiv(k, cfg["BK"])
    grid_mn = (triton.cdiv(m, bm), triton.cdiv(n, cfg["BN"]))
    if split_k is None:
        split_k = common.split_k(x.device, grid_mn[0] * grid_mn[1], k_tiles, cfg["per_sm"]) if decode else 1
    per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, per_split)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _w8a8_kernel[(*grid_mn, split_k)](
        q, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, target, m, n, k,
        target.stride(-2), target.stride(0) if split_k > 1 else 0, per_split,
        PER_TOKEN=input_scale is None, HAS_BIAS=bias is not None, BM=bm, BN=cfg["BN"], BK=cfg["BK"],
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    if split_k > 1:
        out.copy_(target.sum(0))
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op("calq::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return w8a8_matmul(x, weight, weight_scale, input_scale, bias)


@w8a8_linear.register_fake
def _(x, weight, weight_scale, input_scale=None, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
