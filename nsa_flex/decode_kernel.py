"""NSA's attention over the KV cache for one new token per sequence, in four Triton launches
(docs/spec.md, eqs. 5–12): what ``decode._attention_step`` computes with torch ops, for CUDA.

Per KV head its G query heads are the rows of every tile (padded to GP ≥ 16). The query at
position t sees the compressed blocks i·d + l − 1 ≤ t, the selection blocks j·l' ≤ t and the
window t − W < s ≤ t. Each branch is a softmax; programs write partials (m = max score,
l = Σ exp(s − m), acc = Σ exp(s − m)·v) that the last launch merges:

    1. partials  grid (S + NW, B·Hkv)  programs s < S: the compressed branch over one span of
                 slots (eq. 7); programs S + i: one span of the window (sliding branch)
    2. scores    grid (Ts/BJ, B·Hkv)   lse_g of the compressed softmax from the partials, then
                 p_slc[j] = Σ_k w_k Σ_g exp(scale·q_g·k̃_{j·r−(a−1)+k} − lse_g)   (eqs. 8–10,
                 the overlap form of selection.pool_to_selection_blocks; r = l'/d, a = l/d)
    3. selected  grid (n, B·Hkv)       each program ranks p_slc (eqs. 11–12: the forced blocks,
                 then by score, ties to the lower j; the merge of topn_kernel) and attends to the
                 i-th chosen block's keys s ≤ t; program 0 writes the choice
    4. combine   grid (B·Hq,)          o_branch = Σ_s e^{m_s − m}·acc_s / Σ_s e^{m_s − m}·l_s,
                 each rounded to the model's dtype, then o = g_cmp·o_cmp + g_slc·o_slc +
                 g_swa·o_swa in float32 (eq. 5)

Scores and p·v are float32 (IEEE) for float32 models; for 16-bit models q·k and p·v run on the
tensor cores (p rounded to the model's dtype, as FlashAttention does) with float32 sums.

Before them, :func:`launch_compress` (two launches) writes k̃, ṽ of a compression block that
completes at t (eq. 7: φ's MLP over the block's l keys plus the position embedding); its
programs return at once where no row completes one, so φ's weights are read on 1 step in d.
Measurements: docs/performance.md, "Decoding".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topn_kernel import merge_top_n, rank_values

BLOCK_ROWS = 64     # keys per tile in every branch's loop
MAX_SPLITS = 32     # programs per KV head for the compressed branch (and for the window)
BLOCK_SEL = 64      # selection blocks per scoring program
TOPN_CHUNK = 1024   # selection blocks ranked per chunk


@triton.jit
def _tile_partial(q, k, v, ok, scale, LOWP: tl.constexpr):
    """One tile of keys: q [GP, DKP], k [BT, DKP], v [BT, DVP], ok [BT] -> (m, l, acc) of
    softmax(scale·q·kᵀ) over the ok keys, relative to the tile's own max m (−inf: none)."""
    if LOWP:
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(ok[None, :], s * scale, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
    if LOWP:
        acc = tl.dot(p.to(v.dtype), v)
    else:
        acc = tl.dot(p, v, input_precision="ieee")
    return m, tl.sum(p, 1), acc


@triton.jit
def _merge_into(m_i, l_i, acc_i, m, l, acc):
    """Two partials of one softmax -> one (relative to the larger max)."""
    m_new = tl.maximum(m_i, m)
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - ms)
    beta = tl.exp(m - ms)
    return m_new, l_i * alpha + l * beta, acc_i * alpha[:, None] + acc * beta[:, None]


@triton.jit
def _store_partial(m_ptr, l_ptr, a_ptr, bh, part, NPART, m, l, acc, GP: tl.constexpr, DVP: tl.constexpr):
    g = tl.arange(0, GP)
    dv = tl.arange(0, DVP)
    base = (bh * NPART + part) * GP
    tl.store(m_ptr + base + g, m)
    tl.store(l_ptr + base + g, l)
    tl.store(a_ptr + (base + g[:, None]) * DVP + dv[None, :], acc)


@triton.jit
def _load_q(q_ptr, bh, G, DK, GP: tl.constexpr, DKP: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, DKP)
    return tl.load(q_ptr + (bh * G + g[:, None]) * DK + dk[None, :],
                   mask=(g < G)[:, None] & (dk < DK)[None, :], other=0.0)


@triton.jit
def _rows(ptr, bh, length, rows, ok, D, DP: tl.constexpr):
    """[BT, DP] rows ``rows`` of the [B·Hkv, length, D] tensor at ``ptr`` (0 where not ok)."""
    d = tl.arange(0, DP)
    return tl.load(ptr + (bh.to(tl.int64) * length + rows[:, None]) * D + d[None, :],
                   mask=ok[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _partials_kernel(q_ptr, kc_ptr, vc_ptr, kw_ptr, vw_ptr, t_ptr, m_ptr, l_ptr, a_ptr,
                     Hkv, G, DK, DV, Tc, W, win_len, NSPLIT, NPART, span_c, span_w, cmp_block, cmp_stride,
                     SCALE: tl.constexpr, RING: tl.constexpr, GP: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
                     BT: tl.constexpr, LOWP: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.load(t_ptr + bh // Hkv).to(tl.int32)      # positions < 2³¹
    q = _load_q(q_ptr, bh, G, DK, GP, DKP)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc_i = tl.zeros([GP, DVP], tl.float32)
    if pid < NSPLIT:   # compressed branch: slots [lo, hi) of the visible ones
        visible = tl.where(t >= cmp_block - 1, (t - cmp_block + 1) // cmp_stride + 1, 0)
        lo = pid * span_c
        hi = tl.minimum(lo + span_c, visible)
        for x0 in range(lo, hi, BT):
            x = x0 + tl.arange(0, BT)
            ok = x < hi
            k = _rows(kc_ptr, bh, Tc, x, ok, DK, DKP)
            v = _rows(vc_ptr, bh, Tc, x, ok, DV, DVP)
            m, l, acc = _tile_partial(q, k, v, ok, SCALE, LOWP)
            m_i, l_i, acc_i = _merge_into(m_i, l_i, acc_i, m, l, acc)
    else:              # window: positions t − W + 1 + x for x in [lo, hi)
        lo = (pid - NSPLIT) * span_w
        hi = tl.minimum(lo + span_w, W)
        for x0 in range(lo, hi, BT):
            x = x0 + tl.arange(0, BT)
            p = t - W + 1 + x
            ok = (x < hi) & (p >= 0)
            p = tl.maximum(p, 0)
            if RING:
                p = p % W
            k = _rows(kw_ptr, bh, win_len, p, ok, DK, DKP)
            v = _rows(vw_ptr, bh, win_len, p, ok, DV, DVP)
            m, l, acc = _tile_partial(q, k, v, ok, SCALE, LOWP)
            m_i, l_i, acc_i = _merge_into(m_i, l_i, acc_i, m, l, acc)
    _store_partial(m_ptr, l_ptr, a_ptr, bh, pid, NPART, m_i, l_i, acc_i, GP, DVP)


@triton.jit
def _scores_kernel(q_ptr, kc_ptr, t_ptr, m_ptr, l_ptr, ps_ptr, Hkv, G, DK, Tc, Ts, NSPLIT, NPART,
                   cmp_block, cmp_stride, sel_block, SCALE: tl.constexpr, R: tl.constexpr, A: tl.constexpr,
                   GP: tl.constexpr, DKP: tl.constexpr, NSP: tl.constexpr, BJ: tl.constexpr,
                   LOWP: tl.constexpr):
    jb = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.load(t_ptr + bh // Hkv).to(tl.int32)      # positions < 2³¹
    if jb * BJ > t // sel_block:   # no candidate here (eq. 11 ranks only j·l' ≤ t)
        return
    g = tl.arange(0, GP)
    s = tl.arange(0, NSP)
    # lse_g of the compressed softmax (eq. 7) from the partials of launch 1
    part = (bh * NPART + s[:, None]) * GP + g[None, :]
    has = (s < NSPLIT)[:, None] & (g < G)[None, :]
    M = tl.load(m_ptr + part, mask=has, other=float("-inf"))
    L = tl.load(l_ptr + part, mask=has, other=0.0)
    m = tl.max(M, 0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    # (1e-30, not 1e-38: Triton 3.6 types a constant below float32's least normal as float64)
    lse = ms + tl.log(tl.maximum(tl.sum(L * tl.exp(M - ms[None, :]), 0), 1e-30))
    visible = tl.where(t >= cmp_block - 1, (t - cmp_block + 1) // cmp_stride + 1, 0)
    q = _load_q(q_ptr, bh, G, DK, GP, DKP)
    j = jb * BJ + tl.arange(0, BJ)
    out = tl.zeros([BJ], tl.float32)
    for kk in tl.static_range(R + A - 1):   # eq. 9: weight of slot j·r − (a − 1) + kk
        w = tl.minimum(tl.minimum(tl.full([BJ], kk + 1, tl.int32), A),
                       tl.minimum(tl.full([BJ], R + A - 1 - kk, tl.int32), R)).to(tl.float32)
        c = j * R - (A - 1) + kk
        ok = (c >= 0) & (c < visible)
        k = _rows(kc_ptr, bh, Tc, tl.maximum(c, 0), ok, DK, DKP)
        if LOWP:
            sc = tl.dot(q, tl.trans(k))
        else:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        p = tl.where((g < G)[:, None] & ok[None, :], tl.exp(sc * SCALE - lse[:, None]), 0.0)   # eq. 8
        out += w * tl.sum(p, 0)                                                               # eq. 10
    tl.store(ps_ptr + bh * Ts + j, out, mask=j < Ts)


@triton.jit
def _selected_kernel(q_ptr, k_ptr, v_ptr, t_ptr, ps_ptr, idx_ptr, m_ptr, l_ptr, a_ptr,
                     Hkv, G, DK, DV, C, Ts, n_init, n_local, PART0, NPART, sel_block,
                     SCALE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr,
                     GP: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, LOWP: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.load(t_ptr + bh // Hkv).to(tl.int32)      # positions < 2³¹
    cur = t // sel_block
    # eqs. 11–12 over the candidates j ≤ cur, chunk by chunk
    slot = tl.arange(0, NP)
    best_v = tl.full([1, NP], -3.0, tl.float32)
    best_j = tl.full([1, NP], 2147483647, tl.int32)
    for c0 in range(0, cur + 1, BS):
        j = c0 + tl.arange(0, BS)
        inside = j < Ts
        p = tl.load(ps_ptr + bh * Ts + j, mask=inside, other=0.0)
        v = rank_values(p, j, inside, cur, n_init, n_local)
        best_v, best_j = merge_top_n(best_v, best_j, v[None, :], j, slot, N)
    chosen = tl.where(best_v >= 0, best_j, -1)                      # [1, NP]
    if i == 0:
        tl.store(idx_ptr + bh * N + slot[None, :], chosen, mask=(slot < N)[None, :])
    blk = tl.sum(tl.where(slot[None, :] == i, chosen, 0))
    # the selected branch over block ``blk``: keys blk·l' … blk·l' + l' − 1, s ≤ t (none for
    # blk = −1: its positions are negative)
    x = tl.arange(0, BL)
    pos = blk * sel_block + x
    ok = (x < sel_block) & (pos >= 0) & (pos <= t)
    pos = tl.maximum(pos, 0)
    q = _load_q(q_ptr, bh, G, DK, GP, DKP)
    k = _rows(k_ptr, bh, C, pos, ok, DK, DKP)
    v = _rows(v_ptr, bh, C, pos, ok, DV, DVP)
    m, l, acc = _tile_partial(q, k, v, ok, SCALE, LOWP)
    _store_partial(m_ptr, l_ptr, a_ptr, bh, PART0 + i, NPART, m, l, acc, GP, DVP)


@triton.jit
def _branch(m_ptr, l_ptr, a_ptr, bh, g, lo, hi, NPART, GP: tl.constexpr, DVP: tl.constexpr,
            NSP: tl.constexpr):
    """Partials lo … hi − 1 of query row g merged: the branch output [DVP] (0 if no key)."""
    s = lo + tl.arange(0, NSP)
    ok = s < hi
    base = (bh * NPART + s) * GP + g
    M = tl.load(m_ptr + base, mask=ok, other=float("-inf"))
    L = tl.load(l_ptr + base, mask=ok, other=0.0)
    acc = tl.load(a_ptr + base[:, None] * DVP + tl.arange(0, DVP)[None, :], mask=ok[:, None], other=0.0)
    m = tl.max(M, 0)
    w = tl.exp(M - tl.where(m == float("-inf"), 0.0, m))
    den = tl.sum(w * L, 0)
    return tl.sum(w[:, None] * acc, 0) / tl.where(den > 0, den, 1.0)


@triton.jit
def _combine_kernel(gates_ptr, out_ptr, m_ptr, l_ptr, a_ptr, G, DV, NSPLIT, NWIN, NPART,
                    GP: tl.constexpr, DVP: tl.constexpr, NSP: tl.constexpr):
    row = tl.program_id(0)             # (b·Hkv + h)·G + g
    bh = row // G
    g = row % G
    dtype = out_ptr.dtype.element_ty
    o_cmp = _branch(m_ptr, l_ptr, a_ptr, bh, g, 0, NSPLIT, NPART, GP, DVP, NSP).to(dtype).to(tl.float32)
    o_swa = _branch(m_ptr, l_ptr, a_ptr, bh, g, NSPLIT, NSPLIT + NWIN, NPART, GP, DVP, NSP).to(dtype).to(tl.float32)
    o_slc = _branch(m_ptr, l_ptr, a_ptr, bh, g, NSPLIT + NWIN, NPART, NPART, GP, DVP, NSP).to(dtype).to(tl.float32)
    g_cmp = tl.load(gates_ptr + row * 3)
    g_slc = tl.load(gates_ptr + row * 3 + 1)
    g_swa = tl.load(gates_ptr + row * 3 + 2)
    o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa
    dv = tl.arange(0, DVP)
    tl.store(out_ptr + row * DV + dv, o.to(dtype), mask=dv < DV)


@triton.jit
def _ready_rows(t_ptr, r, R, Hkv, cmp_block, cmp_stride):
    """Rows r = b·Hkv + h whose sequence completes a compression block at its position t, and
    that block's first position t − l + 1."""
    row_ok = r < R
    start = tl.load(t_ptr + r // Hkv, mask=row_ok, other=0).to(tl.int32) - cmp_block + 1
    return row_ok & (start >= 0) & (start % cmp_stride == 0), tl.maximum(start, 0)


@triton.jit
def _phi_hidden(t_ptr, ring_ptr, pe_ptr, w_ptr, b_ptr, h_ptr, R, Hkv, D, H1, cmp_block, cmp_stride,
                BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, LOWP: tl.constexpr):
    """h = gelu((ring block + position embedding)·W1ᵀ + b1) for one [BR, BN] tile."""
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    ready, start = _ready_rows(t_ptr, r, R, Hkv, cmp_block, cmp_stride)
    if tl.max(ready.to(tl.int32), 0) == 0:     # no block completes in these rows: nothing to do
        return
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    K = cmp_block * D
    acc = tl.zeros([BR, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)             # flattened (i, d) of the block's [l, D]
        slot = (start[:, None] + kk[None, :] // D) % cmp_block
        m = ready[:, None] & (kk < K)[None, :]
        x = tl.load(ring_ptr + (r[:, None].to(tl.int64) * cmp_block + slot) * D + kk[None, :] % D, mask=m, other=0.0)
        pe = tl.load(pe_ptr + kk, mask=kk < K, other=0.0)
        x = (x.to(tl.float32) + pe.to(tl.float32)[None, :]).to(x.dtype)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=(n < H1)[:, None] & (kk < K)[None, :], other=0.0)
        if LOWP:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    b = tl.load(b_ptr + n, mask=n < H1, other=0.0).to(tl.float32)
    h = (acc + b[None, :]).to(h_ptr.dtype.element_ty).to(tl.float32)
    h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))          # nn.GELU()
    tl.store(h_ptr + r[:, None] * H1 + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=ready[:, None] & (n < H1)[None, :])


@triton.jit
def _phi_out(t_ptr, h_ptr, w_ptr, b_ptr, out_ptr, R, Hkv, H1, Dout, Tc, cmp_block, cmp_stride,
             BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, LOWP: tl.constexpr):
    """k̃ = h·W2ᵀ + b2 for one [BR, BN] tile, written to the block's slot (t − l + 1)/d."""
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    ready, start = _ready_rows(t_ptr, r, R, Hkv, cmp_block, cmp_stride)
    if tl.max(ready.to(tl.int32), 0) == 0:
        return
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros([BR, BN], tl.float32)
    for k0 in range(0, H1, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(h_ptr + r[:, None] * H1 + kk[None, :], mask=ready[:, None] & (kk < H1)[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * H1 + kk[None, :], mask=(n < Dout)[:, None] & (kk < H1)[None, :],
                    other=0.0)
        if LOWP:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    b = tl.load(b_ptr + n, mask=n < Dout, other=0.0).to(tl.float32)
    slot = start // cmp_stride
    tl.store(out_ptr + (r[:, None].to(tl.int64) * Tc + slot[:, None]) * Dout + n[None, :],
             (acc + b[None, :]).to(out_ptr.dtype.element_ty), mask=ready[:, None] & (n < Dout)[None, :])


@triton.jit
def _phi_hidden_kernel(t_ptr, ring_k, pe_k, w_k, b_k, h_k, ring_v, pe_v, w_v, b_v, h_v, R, Hkv, Dk, Dv,
                       H1, cmp_block, cmp_stride, BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       LOWP: tl.constexpr):
    if tl.program_id(2) == 0:
        _phi_hidden(t_ptr, ring_k, pe_k, w_k, b_k, h_k, R, Hkv, Dk, H1, cmp_block, cmp_stride, BR, BN, BK, LOWP)
    else:
        _phi_hidden(t_ptr, ring_v, pe_v, w_v, b_v, h_v, R, Hkv, Dv, H1, cmp_block, cmp_stride, BR, BN, BK, LOWP)


@triton.jit
def _phi_out_kernel(t_ptr, h_k, w_k, b_k, out_k, h_v, w_v, b_v, out_v, R, Hkv, H1, Dk, Dv, Tc,
                    cmp_block, cmp_stride, BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    LOWP: tl.constexpr):
    if tl.program_id(2) == 0:
        _phi_out(t_ptr, h_k, w_k, b_k, out_k, R, Hkv, H1, Dk, Tc, cmp_block, cmp_stride, BR, BN, BK, LOWP)
    else:
        _phi_out(t_ptr, h_v, w_v, b_v, out_v, R, Hkv, H1, Dv, Tc, cmp_block, cmp_stride, BR, BN, BK, LOWP)


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def launch(q, k, v, k_cmp, v_cmp, k_win, v_win, t, gates, cmp_block: int, cmp_stride: int,
           sel_block: int, sel_topn: int, n_init: int, n_local: int, window: int, scale: float,
           ring: bool, launcher=None):
    """q [B, Hkv, G, Dk]; k, v [B, Hkv, C, D] (selected branch, by position); k_cmp, v_cmp
    [B, Hkv, Tc, D]; k_win, v_win the sliding branch's keys: a ring [B, Hkv, W, D] (position p
    in slot p mod W, ``ring``) or k, v themselves; t [B] positions; gates [B, Hkv, G, 3]
    float32. Returns (o [B, Hkv, G, Dv] in q's dtype, selected blocks [B, Hkv, n] int32, −1
    unused)."""
    B, Hkv, G, Dk = q.shape
    C, Dv = k.shape[2], v.shape[3]
    Tc = k_cmp.shape[2]
    W = k_win.shape[2] if ring else min(window, C)
    BH = B * Hkv
    Ts = -(-C // sel_block)
    GP, DKP, DVP = _pow2(G), _pow2(Dk), _pow2(Dv)
    nsplit = min(MAX_SPLITS, triton.cdiv(Tc, BLOCK_ROWS))
    span_c = triton.cdiv(triton.cdiv(Tc, max(nsplit, 1)), BLOCK_ROWS) * BLOCK_ROWS
    nwin = min(MAX_SPLITS, triton.cdiv(W, BLOCK_ROWS))
    span_w = triton.cdiv(triton.cdiv(W, nwin), BLOCK_ROWS) * BLOCK_ROWS
    npart = nsplit + nwin + sel_topn
    nsp = _pow2(max(nsplit, nwin, sel_topn), 2)
    lowp = q.dtype in (torch.bfloat16, torch.float16)
    stages = (3 if DKP <= 128 else 2) if lowp else 1     # float32 tiles: one stage fits shared memory
    dev = q.device
    m = torch.empty(BH, npart, GP, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(BH, npart, GP, DVP, device=dev, dtype=torch.float32)
    p_slc = torch.empty(BH, Ts, device=dev, dtype=torch.float32)
    idx = torch.empty(B, Hkv, sel_topn, device=dev, dtype=torch.int32)
    out = torch.empty(B, Hkv, G, Dv, device=dev, dtype=q.dtype)
    wrap = launcher or (lambda f: f)
    wrap(_partials_kernel)[(nsplit + nwin, BH)](
        q, k_cmp, v_cmp, k_win, v_win, t, m, l, acc, Hkv, G, Dk, Dv, Tc, W, k_win.shape[2],
        nsplit, npart, span_c, span_w, cmp_block, cmp_stride, SCALE=scale, RING=ring, GP=GP, DKP=DKP, DVP=DVP,
        BT=BLOCK_ROWS, LOWP=lowp, num_warps=4, num_stages=stages)
    wrap(_scores_kernel)[(triton.cdiv(Ts, BLOCK_SEL), BH)](
        q, k_cmp, t, m, l, p_slc, Hkv, G, Dk, Tc, Ts, nsplit, npart, cmp_block, cmp_stride,
        sel_block, SCALE=scale, R=sel_block // cmp_stride, A=cmp_block // cmp_stride, GP=GP, DKP=DKP, NSP=nsp,
        BJ=BLOCK_SEL, LOWP=lowp, num_warps=4, num_stages=stages)
    # chunks of at least 128 (up to TOPN_CHUNK): Triton 3.6 hangs compiling the merge of [1, 32] or [1, 64]
    wrap(_selected_kernel)[(sel_topn, BH)](
        q, k, v, t, p_slc, idx, m, l, acc, Hkv, G, Dk, Dv, C, Ts, n_init, n_local,
        nsplit + nwin, npart, sel_block, SCALE=scale, N=sel_topn, NP=_pow2(sel_topn),
        BS=min(TOPN_CHUNK, _pow2(Ts, 128)), BL=_pow2(sel_block), GP=GP, DKP=DKP, DVP=DVP, LOWP=lowp,
        num_warps=4, num_stages=stages)
    wrap(_combine_kernel)[(BH * G,)](gates, out, m, l, acc, G, Dv, nsplit, nwin, npart,
                                    GP=GP, DVP=DVP, NSP=nsp, num_warps=4)
    return out, idx


@torch.library.triton_op("nsa_flex::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor,
                     v_cmp: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, t: torch.Tensor,
                     gates: torch.Tensor, cmp_block: int, cmp_stride: int, sel_block: int,
                     sel_topn: int, n_init: int, n_local: int, window: int, scale: float,
                     ring: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The four launches as a torch operator (traceable by torch.compile, CUDA-graph safe)."""
    return launch(q.contiguous(), k, v, k_cmp, v_cmp, k_win, v_win, t, gates.contiguous(),
                  cmp_block, cmp_stride, sel_block, sel_topn, n_init, n_local, window, scale, ring,
                  launcher=torch.library.wrap_triton)


PHI_ROWS = 16       # (sequence, KV head) rows per φ program
PHI_COLS = 32       # output features per φ program
PHI_DEPTH = 128     # reduction step of φ's matmuls


def launch_compress(t, kc, vc, phi_k, phi_v, k_cmp, v_cmp, cmp_block: int, cmp_stride: int,
                    launcher=None) -> None:
    """Eq. 7 for the block that ends at each sequence's position t, where one does: k̃ = φ_k(kc
    ring), ṽ = φ_v(vc ring) written to slot (t − l + 1)/d of k_cmp, v_cmp; ``phi_k``/``phi_v``
    the tuples (pos_emb, fc1.weight, fc1.bias, fc2.weight, fc2.bias) of each Compression. Rows
    without a completed block are left as they are, and programs that hold none return at once
    (no weight is read on the steps between blocks)."""
    B, Hkv, l, Dk = kc.shape
    Dv, Tc = vc.shape[3], k_cmp.shape[2]
    H1 = phi_k[1].shape[0]
    if phi_v[1].shape[0] != H1:
        raise ValueError(f"φ_k and φ_v hidden sizes differ ({H1} vs {phi_v[1].shape[0]})")
    R = B * Hkv
    lowp = kc.dtype in (torch.bfloat16, torch.float16)
    h_k = torch.empty(R, H1, device=kc.device, dtype=kc.dtype)
    h_v = torch.empty_like(h_k)
    wrap = launcher or (lambda f: f)
    rows = triton.cdiv(R, PHI_ROWS)
    wrap(_phi_hidden_kernel)[(triton.cdiv(H1, PHI_COLS), rows, 2)](
        t, kc, phi_k[0], phi_k[1], phi_k[2], h_k, vc, phi_v[0], phi_v[1], phi_v[2], h_v, R, Hkv, Dk, Dv,
        H1, cmp_block, cmp_stride, BR=PHI_ROWS, BN=PHI_COLS, BK=PHI_DEPTH, LOWP=lowp, num_warps=4)
    wrap(_phi_out_kernel)[(triton.cdiv(max(Dk, Dv), PHI_COLS // 2), rows, 2)](
        t, h_k, phi_k[3], phi_k[4], k_cmp, h_v, phi_v[3], phi_v[4], v_cmp, R, Hkv, H1, Dk, Dv, Tc,
        cmp_block, cmp_stride, BR=PHI_ROWS, BN=PHI_COLS // 2, BK=PHI_DEPTH, LOWP=lowp, num_warps=4)


@torch.library.triton_op("nsa_flex::decode_compress", mutates_args=("k_cmp", "v_cmp"))
def decode_compress(t: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, phi_k: list[torch.Tensor],
                    phi_v: list[torch.Tensor], k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                    cmp_block: int, cmp_stride: int) -> None:
    """:func:`launch_compress` as a torch operator."""
    launch_compress(t, kc, vc, phi_k, phi_v, k_cmp, v_cmp, cmp_block, cmp_stride,
                    launcher=torch.library.wrap_triton)
