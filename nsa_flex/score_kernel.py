"""Selection scores (NSA §3.3.2, eqs. 8–10) in one Triton kernel, for CUDA.

The torch route (selection.selection_scores) materialises the per-head compressed probabilities
[positions·Hq, Tc]. Here one program takes BT positions of one KV head (BT·G packed query rows)
and walks the compressed blocks of their document, BJ selection blocks (r = l'/d compressed
blocks each) at a time:

    s     = q·k̃ᵀ                                    [rows, BJ·r]   on tensor cores
    p     = exp(scale·s − lse) where the compressed block lies wholly in the past, else 0  (eq. 8)
    g     = the sum of p over the G query heads of each position        [BT, BJ·r]  (eq. 10)
    p_slc = g pooled into the BJ selection blocks by the overlap weights [BT, BJ]    (eq. 9)

Compressed block i = j·r + m (0 ≤ m < r) starts in selection block j and weighs w[m + a − 1]
there (a = l/d); with a > 1 its last a − 1 blocks also reach into block j + 1 with weight
w[m − r + a − 1], carried to the next column (and across steps) by a shift. G and r are padded
to powers of two (the padding rows and columns are masked), so any group and any l'/d run.

With documents the blocks are slots laid out by position (masks/document.py): the rows of one
document read block i at slot ⌊s0/d⌋ + i and see it where start ≤ its end ≤ t. A program loops
over the documents its positions belong to (usually one). Only p_slc [B, Hkv, P, Ts'] is written,
for P positions from t0 and the first Ts' selection blocks of each position's document; the same
values as the torch route up to float32 rounding (the scores stay float32 here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _overlap_weight(m, A: tl.constexpr, R: tl.constexpr):
    """w[m] of selection.overlap_weights: the weight of the m-th compressed block reaching into a
    selection block (m = 0 is the earliest, starting a − 1 blocks before it); 0 outside."""
    w = tl.minimum(tl.minimum(m + 1, A), tl.minimum(R, R + A - 1 - m))
    return tl.where((m >= 0) & (m < R + A - 1), w, 0).to(tl.float32)


@triton.jit
def _score_document(q, lse, t, tt, mine, mine_pos, s0, k_base, ends_row, out_rows, sk_i, Tc, Ts,
                    SCALE_LOG2: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                    GP: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr,
                    RP: tl.constexpr, A: tl.constexpr, L: tl.constexpr, S: tl.constexpr,
                    DOCS: tl.constexpr, IEEE: tl.constexpr):
    """Scores of the rows ``mine`` (positions ``mine_pos``), all of the document starting at s0."""
    BN: tl.constexpr = BJ * RP
    rd = tl.arange(0, DP)
    x = tl.arange(0, BN)
    y = tl.arange(0, BJ)
    m = tl.arange(0, RP)
    col_ok = (x % RP) < R
    i_of_x = (x // RP) * R + x % RP                   # compressed block (of the document) per column
    w_in = _overlap_weight(m + A - 1, A, R)           # block j·r + m in its own selection block j
    w_next = tl.where(m < R, _overlap_weight(m - R + A - 1, A, R), 0.0)   # ... and in j + 1
    # [BJ, BJ]: column y -> y + 1. Applied by a select and a sum, not a product: Triton may turn
    # a sum of broadcast products into a dot (TF32 for float32), which rounded the carried scores.
    shift = y[:, None] + 1 == y[None, :]
    base = s0 // S                                    # the document's first slot
    # causality: the document's last position here sees blocks i <= i_max, which reach
    # selection blocks j <= (i_max + a − 1) // r; later columns are written as 0
    t_last = tl.max(tl.where(mine_pos, tt, -1))
    seen_end = t_last - s0 - L + 1                    # i_max = seen_end // S
    j_end = tl.where(seen_end >= 0, (seen_end // S + A - 1) // R + 1, 0)
    j_end = tl.minimum(j_end, Ts)
    carry = tl.zeros([BT], dtype=tl.float32)
    for j0 in range(0, j_end, BJ):
        slot = base + j0 * R + i_of_x
        live = col_ok & (slot < Tc)
        k = tl.load(k_base + slot[:, None] * sk_i + rd[None, :],
                    mask=live[:, None] & (rd < D)[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if DOCS:
            e = tl.load(ends_row + slot, mask=live, other=-1)
            seen = live[None, :] & (e[None, :] <= t[:, None]) & (e[None, :] >= s0)
        else:
            seen = live[None, :] & ((j0 * R + i_of_x)[None, :] * S + L - 1 <= t[:, None])
        seen = seen & mine[:, None]
        p = tl.where(seen, tl.exp2(s * SCALE_LOG2 - lse[:, None]), 0.0)       # eq. 8
        g = tl.sum(tl.reshape(p, (BT, GP, BN)), axis=1)                       # eq. 10
        g3 = tl.reshape(g, (BT, BJ, RP))
        pooled = tl.sum(g3 * w_in[None, None, :], axis=2)                     # eq. 9
        if A > 1:
            nxt = tl.sum(g3 * w_next[None, None, :], axis=2)                  # [BT, BJ]
            pooled += tl.sum(tl.where(shift[None, :, :], nxt[:, :, None], 0.0), axis=1)
            pooled += tl.where(y[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(y[None, :] == BJ - 1, nxt, 0.0), axis=1)
        jj = j0 + y
        tl.store(out_rows + jj[None, :], pooled, mask=mine_pos[:, None] & (jj < Ts)[None, :])
    # selection blocks that no visible compressed block reaches score 0 (still candidates)
    j_zero = tl.cdiv(j_end, BJ) * BJ
    for j0 in range(j_zero, Ts, BJ):
        jj = j0 + y
        tl.store(out_rows + jj[None, :], tl.zeros([BT, BJ], dtype=tl.float32),
                 mask=mine_pos[:, None] & (jj < Ts)[None, :])


@triton.jit
def _scores_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, start_ptr, ends_ptr,
                   sq_b, sq_h, sq_r, sk_b, sk_h, sk_i, sl_b, sl_h, so_b, so_h, so_t, ss_b, se_b,
                   H, t0, P, Tc, Ts,
                   SCALE_LOG2: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr,
                   RP: tl.constexpr, A: tl.constexpr, L: tl.constexpr, S: tl.constexpr,
                   DOCS: tl.constexpr, IEEE: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    BM: tl.constexpr = BT * GP
    rr = tl.arange(0, BM)
    t = t0 + pid_t * BT + rr // GP                                 # position of each query row
    row_ok = (t < t0 + P) & (rr % GP < G)
    row = t * G + rr % GP                                          # packed row: t·G + g
    rd = tl.arange(0, DP)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + row[:, None] * sq_r + rd[None, :],
                mask=row_ok[:, None] & (rd < D)[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + row, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634   # log2 units
    k_base = k_ptr + b * sk_b + h * sk_h
    tt = t0 + pid_t * BT + tl.arange(0, BT)                       # the program's positions
    pos_ok = tt < t0 + P
    out_rows = out_ptr + b * so_b + h * so_h + (tt - t0)[:, None] * so_t
    if DOCS:   # one pass per document among these positions (usually one)
        s0_row = tl.load(start_ptr + b * ss_b + t, mask=row_ok, other=0)
        s0_pos = tl.load(start_ptr + b * ss_b + tt, mask=pos_ok, other=0)
        left = pos_ok
        todo = tl.sum(left.to(tl.int32))
        while todo > 0:
            s0 = tl.min(tl.where(left, s0_pos, 2147483647))
            mine_pos = left & (s0_pos == s0)
            left = left & ~mine_pos
            todo = tl.sum(left.to(tl.int32))
            _score_document(q, lse, t, tt, row_ok & (s0_row == s0), mine_pos, s0, k_base,
                            ends_ptr + b * se_b, out_rows, sk_i, Tc, Ts, SCALE_LOG2, D, DP, GP,
                            BT, BJ, R, RP, A, L, S, DOCS, IEEE)
    else:
        _score_document(q, lse, t, tt, row_ok, pos_ok, 0, k_base, ends_ptr, out_rows, sk_i, Tc,
                        Ts, SCALE_LOG2, D, DP, GP, BT, BJ, R, RP, A, L, S, DOCS, IEEE)


def launch(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, cmp_block: int,
           cmp_stride: int, sel_block: int, scale: float, group: int, t0: int, t1: int,
           out: torch.Tensor, tiles: tuple[int, int, int, int], doc_start=None, cmp_ends=None,
           launcher=None) -> torch.Tensor:
    """Fill ``out`` [B, Hkv, t1 − t0, Ts'] float32 with p_slc of positions t0 … t1 − 1 and the
    first Ts' selection blocks of their documents. q_packed [B, Hkv, T·G, Dk], k_cmp [B, Hkv, Tc,
    Dk] (its first Tc blocks are scored: pass fewer when later ones are invisible to these
    positions), lse_cmp [B, Hkv, T·G] (natural log); with documents doc_start [B, T] and cmp_ends
    [B, ≥ Tc] (masks/document.py). ``tiles``: KernelConfig.score_tiles (rows, blocks, warps,
    stages). ``launcher`` wraps the kernel (torch.library.wrap_triton under torch.compile)."""
    B, H, _, D = q_packed.shape
    Tc, Ts = k_cmp.shape[2], out.shape[-1]
    a, r = cmp_block // cmp_stride, sel_block // cmp_stride
    rows, blocks, warps, stages = tiles
    gp, rp = triton.next_power_of_2(group), triton.next_power_of_2(r)
    bt, bj = max(1, rows // gp), max(1, blocks // rp)
    # rows and blocks are addressed by strides; only the head dimension must be dense
    q_packed, k_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_packed, k_cmp))
    lse_cmp = lse_cmp if lse_cmp.stride(-1) == 1 else lse_cmp.contiguous()
    docs = doc_start is not None
    if docs:
        doc_start, cmp_ends = doc_start.contiguous(), cmp_ends.contiguous()
    kernel = launcher(_scores_kernel) if launcher is not None else _scores_kernel
    grid = (triton.cdiv(t1 - t0, bt), B * H)
    kernel[grid](q_packed, k_cmp, lse_cmp, out, doc_start if docs else out,
                 cmp_ends if docs else out,
                 q_packed.stride(0), q_packed.stride(1), q_packed.stride(2),
                 k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
                 lse_cmp.stride(0), lse_cmp.stride(1), out.stride(0), out.stride(1), out.stride(2),
                 doc_start.stride(0) if docs else 0, cmp_ends.stride(0) if docs else 0,
                 H, t0, t1 - t0, Tc, Ts,
                 # a constant, as FlexAttention bakes its scale (a float argument would reach the
                 # kernel as fp64 when Inductor launches it)
                 SCALE_LOG2=scale * LOG2E, D=D, DP=max(16, triton.next_power_of_2(D)), G=group,
                 GP=gp, BT=bt, BJ=bj, R=r, RP=rp, A=a, L=cmp_block, S=cmp_stride, DOCS=docs,
                 IEEE=q_packed.dtype == torch.float32,
                 num_warps=warps, num_stages=1 if q_packed.dtype == torch.float32 else stages)
    return out


@torch.library.triton_op("nsa_flex::selection_scores", mutates_args=())
def selection_scores(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                     cmp_block: int, cmp_stride: int, sel_block: int, scale: float, group: int,
                     t0: int, t1: int, num_sel: int, tiles: list[int],
                     doc_start: torch.Tensor | None = None,
                     cmp_ends: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel as a torch operator (traceable by torch.compile): p_slc [B, Hkv, t1 − t0,
    num_sel] of positions t0 … t1 − 1."""
    out = torch.empty(q_packed.shape[0], q_packed.shape[1], t1 - t0, num_sel,
                      device=q_packed.device, dtype=torch.float32)
    return launch(q_packed, k_cmp, lse_cmp, cmp_block, cmp_stride, sel_block, scale, group,
                  t0, t1, out, tuple(tiles), doc_start, cmp_ends, launcher=torch.library.wrap_triton)
