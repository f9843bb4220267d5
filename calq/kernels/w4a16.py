"""W4A16: int4 weights with group-wise scales and zero points, 16-bit activations.

Checkpoint layout (compressed-tensors 0.19 `pack-quantized`, one nn.Linear of N outputs and K inputs):
  weight_packed      int32 [N, K/8]   int4 values stored unsigned (q + 8), packed along K: element k sits in
                                      word k // 8 at bits 4 * (k % 8)
  weight_scale       float [N, K/G]   one scale per output row and group of G inputs
  weight_zero_point  int32 [ceil(N/8), K/G]  asymmetric only: zero points (z + 8) packed the same way but
                                      along N (dim 0); absent when symmetric, which means z = 0
  weight_shape       int64 [2]        (N, K)
  dequantized weight w[n, k] = (q[n, k] - z[n, k // G]) * scale[n, k // G], the same with both values unsigned.

Kernel layout, repacked once at load time so that every load is contiguous along N:
  qweight [K/8, N] int32 (the same words, transposed), scales [K/G, N], zeros [K/G, N] uint8 (unsigned, 8 when
  symmetric).

One Triton kernel, two launch configurations: up to DECODE_MAX_M rows it splits K across programs (memory-bound:
every weight byte is read once, and there must be enough programs to keep the memory system busy); above that it
runs large tensor-core tiles without split-K.
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
DECODE = {"BN": 128, "warps": 4, "stages": 4, "per_sm": 4}
PREFILL = {"BM": 128, "BN": 128, "warps": 8, "stages": 3}


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Unsigned nibbles (uint8, 0..15) from int32 words packed along the last dim, 8 per word, low bits first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.flatten(-2)[..., :count].to(torch.uint8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int32 words from unsigned nibbles (0..15) along the last dim: the inverse of unpack_int4, zero-padded."""
    nibbles = torch.nn.functional.pad(values.to(torch.int64), (0, -values.shape[-1] % 8)).unflatten(-1, (-1, 8))
    words = (nibbles << torch.arange(0, 32, 4, device=values.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """float32 [N, K] weight from the checkpoint tensors (plain torch)."""
    n, groups = weight_scale.shape
    q = unpack_int4(weight_packed, groups * group_size).float()
    if weight_zero_point is None:
        zero = torch.full((n, groups), 8.0, device=weight_packed.device)
    else:
        zero = unpack_int4(weight_zero_point.t(), n).t().float()
    return (q - zero.repeat_interleave(group_size, dim=1)) * weight_scale.float().repeat_interleave(group_size, dim=1)


def w4a16_reference(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    weight_zero_point: torch.Tensor | None, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 result of x @ W.T (+ bias) on the checkpoint tensors: dequantize, then one float32 matmul."""
    out = x.float() @ dequantize(weight_packed, weight_scale, weight_zero_point, group_size).t()
    return out if bias is None else out + bias.float()


def repack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
           group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight [K/8, N], scales [K/G, N] in `dtype`, zeros [K/G, N] uint8) from the checkpoint tensors."""
    n, groups = weight_scale.shape
    k = groups * group_size
    if weight_packed.shape != (n, k // 8) or k % 8:
        raise ValueError(f"weight_packed has shape {tuple(weight_packed.shape)}; expected ({n}, {k // 8}) for "
                         f"{n} outputs, {groups} groups of {group_size}")
    qweight = weight_packed.t().contiguous()
    scales = weight_scale.t().to(dtype).contiguous()
    if weight_zero_point is None:
        zeros = torch.full((groups, n), 8, dtype=torch.uint8, device=weight_packed.device)
    else:
        zeros = unpack_int4(weight_zero_point.t(), n).contiguous()
    return qweight, scales, zeros


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                  tiles_per_split, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    shifts = tl.arange(0, 8) * 4

    # BK divides the group size, so each K tile lies in one group and K is a whole number of tiles.
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, K // BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(first, last):
        offs_k = t * BK + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + (t * (BK // 8) + tl.arange(0, BK // 8))[:, None] * N + offs_n[None, :],
                        mask=mask_n[None, :], other=0)
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BK, BN))
        group = (t * BK) // GROUP
        scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        w = ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(x.dtype)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)

    if HAS_BIAS:  # added by the first K split only
        acc += tl.load(bias_ptr + offs_n, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _k_block(group_size: int, largest: int) -> int:
    for bk in (128, 64, 32, 16):
        if bk <= largest and group_size % bk == 0:
            return bk
    raise ValueError(f"group size {group_size} is not a multiple of 16; the int4 kernels need one")


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in x's dtype, W in the kernel layout of `repack`. split_k=None chooses."""
    if not common.use_triton(x):
        raise ValueError("the W4A16 Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    x2 = common.rows_2d(x)
    m, k = x2.shape
    n = qweight.shape[1]
    if k != qweight.shape[0] * 8 or k % group_size or scales.shape != (k // group_size, n):
        raise ValueError(f"input width {k} does not match qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, group size {group_size}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    decode = m <= DECODE_MAX_M
    cfg = DECODE if decode else PREFILL
    bm, bk = (16, _k_block(group_size, 128)) if decode else (cfg["BM"], _k_block(group_size, 64))
    k_tiles = k // bk
    grid_mn = (triton.cdiv(m, bm), triton.cdiv(n, cfg["BN"]))
    if split_k is None:
        split_k = common.split_k(x.device, grid_mn[0] * grid_mn[1], k_tiles, cfg["per_sm"]) if decode else 1
    per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, per_split)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _w4a16_kernel[(*grid_mn, split_k)](
        x2, qweight, scales, zeros, bias if bias is not None else scales, target, m, n, k,
        x2.stride(0), target.stride(-2), target.stride(0) if split_k > 1 else 0, per_split,
        GROUP=group_size, HAS_BIAS=bias is not None, UPCAST=common.upcast_dot(x.dtype),
        BM=bm, BN=cfg["BN"], BK=bk, num_warps=cfg["warps"], num_stages=cfg["stages"])
    if split_k > 1:
        out.copy_(target.sum(0))
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op("calq::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return w4a16_matmul(x, qweight, scales, zeros, group_size, bias)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
