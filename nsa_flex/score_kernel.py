"""Selection scores (NSA §3.3.2, eqs. 8–10) in one Triton kernel, for CUDA.

The torch route (selection.py) materialises the per-head compressed probabilities
[positions·Hq, Tc] in float32 chunk by chunk. Here one program takes BT positions of one KV head
(BT·G packed query rows) and walks the selection blocks BJ at a time:

    s      = q·k̃ᵀ over the r·BJ compressed blocks of those selection blocks, and a halo of HB
             blocks before them (a compressed block may overlap the previous selection block)
    p      = exp(scale·s − lse) where the compressed block lies wholly in the past, else 0  (eq. 8)
    pooled = p·W, W the overlap weights as a banded [r·BJ, BJ] matrix (and [HB, BJ])       (eq. 9)
    p_slc  = the sum of pooled over the G query heads of the group                          (eq. 10)

and writes only p_slc [B, Hkv, T, Ts]. Same values as the torch route up to float32 rounding
(the scores stay float32 here; the torch route rounds q·k̃ᵀ to the input dtype first). Used when
tuning.SCORE_KERNEL is set; needs G a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import NSAConfig


@triton.jit
def _overlap_weight(idx, A: tl.constexpr, R: tl.constexpr):
    """Weight of compressed block m = idx in its selection block (selection.overlap_weights)."""
    w = tl.minimum(tl.minimum(idx + 1, A), tl.minimum(R, R + A - 1 - idx))
    return tl.where((idx >= 0) & (idx < R + A - 1), w, 0).to(tl.float32)


@triton.jit
def _probs(q, k_ptr, i, sk_i, rd, Tc, t, lse, row_ok, scale, DP: tl.constexpr, L: tl.constexpr,
           S: tl.constexpr, D: tl.constexpr):
    """Eq. 8 for compressed blocks i: exp(scale·q·k̃_i − lse), 0 unless block i is in the past."""
    k = tl.load(k_ptr + i[:, None] * sk_i + rd[None, :],
                mask=((i >= 0) & (i < Tc))[:, None] & (rd < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    seen = (i[None, :] >= 0) & (i[None, :] < Tc) & (i[None, :] * S + L - 1 <= t[:, None]) & row_ok[:, None]
    # .to: a float argument reaches the kernel as fp64 when Inductor launches it
    return tl.where(seen, tl.exp(s * scale - lse[:, None]), 0.0).to(tl.float32)


@triton.jit
def _scores_kernel(q_ptr, k_ptr, lse_ptr, out_ptr,
                   sq_b, sq_h, sq_r, sk_b, sk_h, sk_i, sl_b, sl_h, so_b, so_h, so_t,
                   H, T, Tc, Ts, scale,
                   D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
                   BJ: tl.constexpr, R: tl.constexpr, A: tl.constexpr, HB: tl.constexpr,
                   L: tl.constexpr, S: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    BM: tl.constexpr = BT * G
    rr = tl.arange(0, BM)
    t = pid_t * BT + rr // G                                           # position of each row
    row_ok = t < T
    row = pid_t * BM + rr
    rd = tl.arange(0, DP)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + row[:, None] * sq_r + rd[None, :],
                mask=row_ok[:, None] & (rd < D)[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + row, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)                     # rows that see no block
    k_base = k_ptr + b * sk_b + h * sk_h
    x = tl.arange(0, BJ * R)
    xh = tl.arange(0, HB)
    y = tl.arange(0, BJ)
    w_main = _overlap_weight(x[:, None] - y[None, :] * R + A - 1, A, R)     # [BJ·R, BJ]
    w_halo = _overlap_weight(xh[:, None] - HB - y[None, :] * R + A - 1, A, R)  # [HB, BJ]
    tt = pid_t * BT + tl.arange(0, BT)
    # causality: the tile's last position sees compressed blocks i <= i_max, which reach selection
    # blocks j <= (i_max + A − 1) // R; later columns stay 0 (the output starts zeroed)
    seen_end = tl.minimum(pid_t * BT + BT - 1, T - 1) - L + 1           # i_max = seen_end // S
    j_end = tl.where(seen_end >= 0, (seen_end // S + A - 1) // R + 1, 0)
    j_end = tl.minimum(j_end, Ts)
    for j0 in range(0, j_end, BJ):
        p = _probs(q, k_base, j0 * R + x, sk_i, rd, Tc, t, lse, row_ok, scale, DP, L, S, D)
        pooled = tl.dot(p, w_main, input_precision="ieee")
        if A > 1:   # compressed blocks that start in the previous selection block
            p_h = _probs(q, k_base, j0 * R - HB + xh, sk_i, rd, Tc, t, lse, row_ok, scale, DP, L, S, D)
            pooled += tl.dot(p_h, w_halo, input_precision="ieee")
        grouped = tl.sum(tl.reshape(pooled, (BT, G, BJ)), axis=1)      # eq. 10
        jj = j0 + y
        tl.store(out_ptr + b * so_b + h * so_h + tt[:, None] * so_t + jj[None, :], grouped,
                 mask=(tt < T)[:, None] & (jj < Ts)[None, :])


def check(cfg: NSAConfig, group: int) -> None:
    """Refuse what the kernel's power-of-two tiles cannot take, naming the fix."""
    r = cfg.sel_block // cfg.cmp_stride
    if group & (group - 1) or r & (r - 1):
        raise ValueError(f"tuning.SCORE_KERNEL needs G and l'/d powers of two, got G={group}, "
                         f"l'/d={r}; set tuning.SCORE_KERNEL = 0 for this model")


def launch(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, cmp_block: int,
           cmp_stride: int, sel_block: int, scale: float, group: int, seq_len: int,
           out: torch.Tensor, launcher=None) -> torch.Tensor:
    """Fill ``out`` [B, Hkv, T, Ts] float32 with p_slc. q_packed [B, Hkv, T·G, Dk], k_cmp
    [B, Hkv, Tc, Dk], lse_cmp [B, Hkv, T·G] (natural log). ``launcher`` wraps the kernel (e.g.
    torch.library.wrap_triton under torch.compile)."""
    B, H, _, D = q_packed.shape
    Tc, Ts = k_cmp.shape[2], out.shape[-1]
    a, r = cmp_block // cmp_stride, sel_block // cmp_stride
    BT = max(1, 128 // group)                       # BT·G = 128 query rows per program
    BJ = max(16, 64 // r)                           # selection blocks per step (a dot needs N >= 16)
    HB = max(16, triton.next_power_of_2(a - 1))     # halo: compressed blocks before the step's first
    q_packed, k_cmp, lse_cmp = q_packed.contiguous(), k_cmp.contiguous(), lse_cmp.contiguous()
    out.zero_()                                     # blocks past a tile's causal reach stay 0
    kernel = launcher(_scores_kernel) if launcher is not None else _scores_kernel
    grid = (triton.cdiv(seq_len, BT), B * H)
    kernel[grid](q_packed, k_cmp, lse_cmp, out,
                 q_packed.stride(0), q_packed.stride(1), q_packed.stride(2),
                 k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
                 lse_cmp.stride(0), lse_cmp.stride(1), out.stride(0), out.stride(1), out.stride(2),
                 H, seq_len, Tc, Ts, scale,
                 D=D, DP=max(16, triton.next_power_of_2(D)), G=group, BT=BT, BJ=BJ, R=r, A=a, HB=HB,
                 L=cmp_block, S=cmp_stride)
    return out


@torch.library.triton_op("nsa_flex::selection_scores", mutates_args=())
def selection_scores(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                     cmp_block: int, cmp_stride: int, sel_block: int, scale: float, group: int,
                     seq_len: int, num_sel: int) -> torch.Tensor:
    """The kernel as a torch operator (traceable by torch.compile): p_slc [B, Hkv, T, Ts]."""
    out = torch.empty(q_packed.shape[0], q_packed.shape[1], seq_len, num_sel,
                      device=q_packed.device, dtype=torch.float32)
    return launch(q_packed, k_cmp, lse_cmp, cmp_block, cmp_stride, sel_block, scale, group,
                  seq_len, out, launcher=torch.library.wrap_triton)
