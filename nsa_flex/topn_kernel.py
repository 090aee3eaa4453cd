"""Top-n (NSA §3.3.2, eqs. 11–12) in one Triton kernel, for CUDA.

One program holds BR rows (one position of one KV head each) and walks their scores p_slc in
chunks of BS selection blocks, keeping each row's best n (value, block) in registers:

    v = +inf for forced blocks, max(p, 0) for the other candidates (j·l' ≤ t), −1 for the rest
    per chunk, n times:  the larger of (the chunk's largest v, lowest j among equals)
                                     and (the kept list's largest v, lowest j among equals)
                         joins the new list and leaves its source
    out = the kept blocks whose v ≥ 0, −1 in the other slots (fewer than n candidates)

Blocks of an earlier chunk have lower numbers, so a tie between the chunk and the kept list goes
to the list: ties go to the lower j, the rule of eqs. 11–12 as selection.top_n states it. A row
of Ts ≤ BS blocks is one chunk; rows of any length run. With documents, t and the candidates
are counted from the position's document start. The order within a row is free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rank_values(p, j, inside, cur, n_init, n_local):
    """The values ranked for blocks j of rows whose own block is cur (broadcastable): +inf for
    forced blocks, max(p, 0) for the other candidates (j ≤ cur), −1 for the rest, −2.5 outside
    the row (eqs. 11–12)."""
    cand = inside & (j <= cur)
    forced = cand & ((j < n_init) | (j > cur - n_local))
    v = tl.where(forced, float("inf"), tl.where(cand, tl.maximum(p, 0.0), -1.0))
    return tl.where(inside, v, -2.5)


@triton.jit
def merge_top_n(best_v, best_j, v, j, slot, N: tl.constexpr):
    """One chunk into the kept lists: best_v, best_j [BR, NP] (value, block; −3: empty slot),
    v [BR, BS] the chunk's values at blocks j [BS] (numbers above the kept ones), slot
    tl.arange(0, NP). Returns the new kept lists, the best N of both, ties to the lower j."""
    new_v = tl.zeros_like(best_v) - 3.0
    new_j = tl.zeros_like(best_j) + 2147483647
    for i in range(N):
        mc = tl.max(v, axis=1)
        jc = tl.min(tl.where(v == mc[:, None], j[None, :], 2147483647), axis=1)
        mb = tl.max(best_v, axis=1)
        jb = tl.min(tl.where(best_v == mb[:, None], best_j, 2147483647), axis=1)
        from_chunk = (mc > mb) | ((mc == mb) & (jc < jb))
        m = tl.where(from_chunk, mc, mb)
        pick = tl.where(from_chunk, jc, jb)
        keep = (slot[None, :] == i) & (m >= 0)[:, None]
        new_v = tl.where(keep, m[:, None], new_v)
        new_j = tl.where(keep, pick[:, None], new_j)
        v = tl.where(from_chunk[:, None] & (j[None, :] == jc[:, None]), -2.0, v)
        best_v = tl.where(~from_chunk[:, None] & (best_j == jb[:, None]), -3.0, best_v)
    return new_v, new_j


@triton.jit
def _top_n_kernel(p_ptr, out_ptr, start_ptr, rows, t0, P, H, Ts, n_init, n_local, ss_b,
                  SEL_BLOCK: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  BR: tl.constexpr, BS: tl.constexpr, DOCS: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)         # row = (b·Hkv + h)·P + p
    row_ok = r < rows
    t = t0 + r % P
    if DOCS:
        s0 = tl.load(start_ptr + (r // (H * P)) * ss_b + t, mask=row_ok, other=0)
        t = t - s0
    cur = t // SEL_BLOCK                                 # the query's own selection block
    slot = tl.arange(0, NP)
    best_v = tl.full([BR, NP], -3.0, tl.float32)         # −3: an empty slot
    best_j = tl.full([BR, NP], 2147483647, tl.int32)
    for c0 in range(0, Ts, BS):
        j = c0 + tl.arange(0, BS)
        inside = row_ok[:, None] & (j < Ts)[None, :]
        p = tl.load(p_ptr + r[:, None].to(tl.int64) * Ts + j[None, :], mask=inside, other=0.0)
        v = rank_values(p, j[None, :], inside, cur[:, None], n_init, n_local)
        best_v, best_j = merge_top_n(best_v, best_j, v, j, slot, N)
    out = tl.where(best_v >= 0, best_j, -1)
    tl.store(out_ptr + r[:, None].to(tl.int64) * N + slot[None, :], out,
             mask=row_ok[:, None] & (slot < N)[None, :])


def _warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values: 1 below 256, up to 4. Triton 3.6 hangs
    compiling the merge of a one-row [1, 32] or [1, 64] chunk with 4 warps."""
    return min(4, max(1, elements // 256))


def launch(p_slc: torch.Tensor, t0: int, sel_block: int, n_init: int, n_local: int, n: int,
           tile: int, doc_start=None, launcher=None) -> torch.Tensor:
    """[B, Hkv, P, Ts'] float32 scores of positions t0 … t0 + P − 1 -> [B, Hkv, P, n] int32 block
    numbers, −1 in unused slots. ``tile``: KernelConfig.topn_tile (row elements a program holds);
    ``doc_start`` [B, T] with documents. ``launcher`` wraps the kernel (e.g.
    torch.library.wrap_triton under torch.compile)."""
    B, H, P, Ts = p_slc.shape
    p_slc = p_slc.contiguous()
    out = torch.empty(B, H, P, n, dtype=torch.int32, device=p_slc.device)
    rows = B * H * P
    if rows == 0:
        return out
    bs = min(max(16, triton.next_power_of_2(Ts)), tile)
    fit = max(1, tile // bs)
    br = min(1 << (fit.bit_length() - 1), triton.next_power_of_2(rows))   # powers of two
    docs = doc_start is not None
    if docs:
        doc_start = doc_start.contiguous()
    kernel = launcher(_top_n_kernel) if launcher is not None else _top_n_kernel
    # NP: at least 16 kept slots (Triton 3.6 hung compiling the merge with fewer)
    kernel[(triton.cdiv(rows, br),)](p_slc, out, doc_start if docs else out, rows, t0, P, H, Ts,
                                     n_init, n_local, doc_start.stride(0) if docs else 0,
                                     SEL_BLOCK=sel_block, N=n, NP=max(16, triton.next_power_of_2(n)),
                                     BR=br, BS=bs, DOCS=docs, num_warps=_warps(br * bs))
    return out


@torch.library.triton_op("nsa_flex::top_n", mutates_args=())
def top_n(p_slc: torch.Tensor, t0: int, sel_block: int, n_init: int, n_local: int, n: int,
          tile: int, doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel as a torch operator (traceable by torch.compile)."""
    return launch(p_slc, t0, sel_block, n_init, n_local, n, tile, doc_start,
                  launcher=torch.library.wrap_triton)
