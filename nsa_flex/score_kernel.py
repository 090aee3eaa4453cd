"""Selection scores (NSA §3.3.2, eqs. 8–10) in one Triton kernel, for CUDA.

The torch route (selection.py) materialises the per-head compressed scores [positions·Hq, Tc]
(a matmul's output, then a pointwise pass over it). Here one program takes BT positions of one
KV head (BM = BT·G packed query rows) and walks the compressed blocks BN = BJ·r at a time, where
r = l'/d compressed blocks start in each selection block:

    s     = q·k̃ᵀ                                    [BM, BN]   on tensor cores
    p     = exp(scale·s − lse) where the compressed block lies wholly in the past, else 0  (eq. 8)
    g     = the sum of p over the G query heads of each position          [BT, BN]   (eq. 10)
    p_slc = g pooled into the BJ selection blocks by the overlap weights   [BT, BJ]   (eq. 9)

The pooling is a reshape: compressed block i = j·r + m (0 ≤ m < r) starts in selection block j
and weighs w[m + a − 1] there (a = l/d); with a > 1 its last a − 1 blocks also reach into block
j + 1 with weight w[m − r + a − 1], carried to the next column (and across steps) by a shift.
Every compressed block is scored once. Only p_slc [B, Hkv, P, Ts'] is written, for P positions
starting at t0 and the first Ts' selection blocks (the causal slice that selection.py ranks).
Same values as the torch route up to float32 rounding (the scores stay float32 here; the torch
route rounds q·k̃ᵀ to the input dtype first). Used on CUDA when tuning.SCORE_KERNEL is set and G
and l'/d are powers of two (:func:`unfit`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .config import NSAConfig

LOG2E = 1.4426950408889634


@triton.jit
def _overlap_weight(m, A: tl.constexpr, R: tl.constexpr):
    """w[m] of selection.overlap_weights: the weight of the m-th compressed block reaching into a
    selection block (m = 0 is the earliest, starting a − 1 blocks before it); 0 outside."""
    w = tl.minimum(tl.minimum(m + 1, A), tl.minimum(R, R + A - 1 - m))
    return tl.where((m >= 0) & (m < R + A - 1), w, 0).to(tl.float32)


@triton.jit
def _scores_kernel(q_ptr, k_ptr, lse_ptr, out_ptr,
                   sq_b, sq_h, sq_r, sk_b, sk_h, sk_i, sl_b, sl_h, so_b, so_h, so_t,
                   H, t0, P, Tc, Ts,
                   SCALE_LOG2: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr,
                   BT: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, A: tl.constexpr,
                   L: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    BM: tl.constexpr = BT * G
    BN: tl.constexpr = BJ * R
    rr = tl.arange(0, BM)
    t = t0 + pid_t * BT + rr // G                                  # position of each query row
    row_ok = t < t0 + P
    row = t * G + rr % G                                           # packed row: t·G + g
    rd = tl.arange(0, DP)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + row[:, None] * sq_r + rd[None, :],
                mask=row_ok[:, None] & (rd < D)[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + row, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634   # log2 units
    k_base = k_ptr + b * sk_b + h * sk_h
    x = tl.arange(0, BN)
    y = tl.arange(0, BJ)
    m = tl.arange(0, R)
    w_in = _overlap_weight(m + A - 1, A, R)           # block j·r + m in its own selection block j
    w_next = _overlap_weight(m - R + A - 1, A, R)     # ... and in block j + 1 (last a − 1 only)
    # [BJ, BJ]: column y -> y + 1. Applied by a select and a sum, not a product: Triton may turn
    # a sum of broadcast products into a dot (TF32 for float32 on the GPU's triton 3.6, once
    # BT, BJ >= 16, e.g. at G = 4), which rounded the carried scores.
    shift = y[:, None] + 1 == y[None, :]
    tt = t0 + pid_t * BT + tl.arange(0, BT)
    out_rows = out_ptr + b * so_b + h * so_h + (tt - t0)[:, None] * so_t
    # causality: the tile's last position sees compressed blocks i <= i_max, which reach selection
    # blocks j <= (i_max + a − 1) // r; later columns are written as 0
    seen_end = tl.minimum(t0 + pid_t * BT + BT, t0 + P) - 1 - L + 1  # i_max = seen_end // S
    j_end = tl.where(seen_end >= 0, (seen_end // S + A - 1) // R + 1, 0)
    j_end = tl.minimum(j_end, Ts)
    carry = tl.zeros([BT], dtype=tl.float32)
    for j0 in range(0, j_end, BJ):
        i = j0 * R + x
        k = tl.load(k_base + i[:, None] * sk_i + rd[None, :],
                    mask=(i < Tc)[:, None] & (rd < D)[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        seen = (i[None, :] < Tc) & (i[None, :] * S + L - 1 <= t[:, None]) & row_ok[:, None]
        p = tl.where(seen, tl.exp2(s * SCALE_LOG2 - lse[:, None]), 0.0)   # eq. 8
        g = tl.sum(tl.reshape(p, (BT, G, BN)), axis=1)                          # eq. 10
        g3 = tl.reshape(g, (BT, BJ, R))
        pooled = tl.sum(g3 * w_in[None, None, :], axis=2)                       # eq. 9
        if A > 1:
            nxt = tl.sum(g3 * w_next[None, None, :], axis=2)                    # [BT, BJ]
            pooled += tl.sum(tl.where(shift[None, :, :], nxt[:, :, None], 0.0), axis=1)
            pooled += tl.where(y[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(y[None, :] == BJ - 1, nxt, 0.0), axis=1)
        jj = j0 + y
        tl.store(out_rows + jj[None, :], pooled, mask=(tt < t0 + P)[:, None] & (jj < Ts)[None, :])
    # selection blocks that no visible compressed block reaches score 0 (still candidates)
    j_zero = tl.cdiv(j_end, BJ) * BJ
    for j0 in range(j_zero, Ts, BJ):
        jj = j0 + y
        tl.store(out_rows + jj[None, :], tl.zeros([BT, BJ], dtype=tl.float32),
                 mask=(tt < t0 + P)[:, None] & (jj < Ts)[None, :])


def unfit(cfg: NSAConfig, group: int) -> str | None:
    """Why the kernel's power-of-two tiles cannot take this shape, or None where they can."""
    r = cfg.sel_block // cfg.cmp_stride
    if group & (group - 1) or r & (r - 1):
        return f"the fused scoring kernel needs G and l'/d powers of two, got G={group}, l'/d={r}"
    return None


def tiles(dtype: torch.dtype, head_dim: int, group: int, r: int) -> dict:
    """The kernel's tile and launch sizes from tuning.SCORE_TILES (16-bit inputs at Dk <= 256) or
    tuning.SCORE_TILES_WIDE (float32, or Dk > 256); a program takes at least one position (G
    rows) and one selection block (l'/d compressed blocks); float32 runs one pipeline stage.
    Refuses tiles the kernel cannot run, naming the knob."""
    wide = dtype == torch.float32 or head_dim > 256
    name = "SCORE_TILES_WIDE" if wide else "SCORE_TILES"
    t = getattr(tuning, name)
    for key in ("rows", "blocks"):
        if t[key] < 16 or t[key] & (t[key] - 1):
            raise ValueError(f"tuning.{name}[{key!r}] = {t[key]}: needs a power of two >= 16")
    return dict(BT=max(1, t["rows"] // group), BJ=max(1, t["blocks"] // r), num_warps=t["warps"],
                num_stages=1 if dtype == torch.float32 else t["stages"])


def launch(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, cmp_block: int,
           cmp_stride: int, sel_block: int, scale: float, group: int, t0: int, t1: int,
           out: torch.Tensor, launcher=None) -> torch.Tensor:
    """Fill ``out`` [B, Hkv, t1 − t0, Ts'] float32 with p_slc of positions t0 … t1 − 1 and the
    first Ts' selection blocks. q_packed [B, Hkv, T·G, Dk], k_cmp [B, Hkv, Tc, Dk] (its first
    Tc blocks are scored: pass fewer when later ones are invisible to these positions), lse_cmp
    [B, Hkv, T·G] (natural log). ``launcher`` wraps the kernel (e.g. torch.library.wrap_triton
    under torch.compile)."""
    B, H, _, D = q_packed.shape
    Tc, Ts = k_cmp.shape[2], out.shape[-1]
    a, r = cmp_block // cmp_stride, sel_block // cmp_stride
    opts = tiles(q_packed.dtype, D, group, r)
    # rows and blocks are addressed by strides; only the head dimension must be dense
    q_packed, k_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_packed, k_cmp))
    lse_cmp = lse_cmp if lse_cmp.stride(-1) == 1 else lse_cmp.contiguous()
    kernel = launcher(_scores_kernel) if launcher is not None else _scores_kernel
    grid = (triton.cdiv(t1 - t0, opts["BT"]), B * H)
    kernel[grid](q_packed, k_cmp, lse_cmp, out,
                 q_packed.stride(0), q_packed.stride(1), q_packed.stride(2),
                 k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
                 lse_cmp.stride(0), lse_cmp.stride(1), out.stride(0), out.stride(1), out.stride(2),
                 H, t0, t1 - t0, Tc, Ts,
                 # a constant, as FlexAttention bakes its scale (a float argument would reach the
                 # kernel as fp64 when Inductor launches it)
                 SCALE_LOG2=scale * LOG2E, D=D, DP=max(16, triton.next_power_of_2(D)), G=group,
                 BT=opts["BT"], BJ=opts["BJ"], R=r, A=a, L=cmp_block, S=cmp_stride,
                 IEEE=q_packed.dtype == torch.float32,
                 num_warps=opts["num_warps"], num_stages=opts["num_stages"])
    return out


@torch.library.triton_op("nsa_flex::selection_scores", mutates_args=())
def selection_scores(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                     cmp_block: int, cmp_stride: int, sel_block: int, scale: float, group: int,
                     t0: int, t1: int, num_sel: int) -> torch.Tensor:
    """The kernel as a torch operator (traceable by torch.compile): p_slc [B, Hkv, t1 − t0,
    num_sel] of positions t0 … t1 − 1."""
    out = torch.empty(q_packed.shape[0], q_packed.shape[1], t1 - t0, num_sel,
                      device=q_packed.device, dtype=torch.float32)
    return launch(q_packed, k_cmp, lse_cmp, cmp_block, cmp_stride, sel_block, scale, group,
                  t0, t1, out, launcher=torch.library.wrap_triton)
