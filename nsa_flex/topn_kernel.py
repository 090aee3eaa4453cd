"""Top-n (NSA §3.3.2, eqs. 11–12) in one Triton kernel, for CUDA.

selection.top_n_by_value ranks a chunk of scores with torch.topk (a radix select: several passes
over p_slc [B, Hkv, P, Ts'] in memory) and then places the winners with cumsums and a scatter.
Here one program holds BR rows (one position of one KV head each) of p_slc in registers:

    v = +inf for forced blocks, max(p, 0) for the other candidates (j·l' ≤ t), −1 for the rest
    n times:  m  = the row's largest v
              j* = the lowest j with v = m            (ties to the lower j)
              out[i] = j* where m ≥ 0, else −1        (fewer than n candidates: −1 fills)
              v[j*] = −2                              (taken)

so the n blocks come out by score with the rule of eqs. 11–12 as selection.top_n states it
(forced blocks first, every candidate when there are fewer than n). The same blocks as the torch
routes; the order within a row is free (the branches read the set). Used on CUDA when
tuning.TOPN_KERNEL is set and a row fits (:func:`unfit`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning


@triton.jit
def _top_n_kernel(p_ptr, out_ptr, rows, t0, P, Ts, n_init, n_local,
                  SEL_BLOCK: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  BR: tl.constexpr, BS: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)         # row = (b·Hkv + h)·P + p
    row_ok = r < rows
    cur = (t0 + r % P) // SEL_BLOCK                      # the query's own selection block
    j = tl.arange(0, BS)
    inside = row_ok[:, None] & (j < Ts)[None, :]
    p = tl.load(p_ptr + r[:, None].to(tl.int64) * Ts + j[None, :], mask=inside, other=0.0)
    cand = inside & (j[None, :] <= cur[:, None])
    forced = cand & ((j[None, :] < n_init) | (j[None, :] > cur[:, None] - n_local))
    v = tl.where(forced, float("inf"), tl.where(cand, tl.maximum(p, 0.0), -1.0))
    slot = tl.arange(0, NP)
    out = tl.full([BR, NP], -1, tl.int32)
    for i in range(N):
        m = tl.max(v, axis=1)
        pick = tl.min(tl.where(v == m[:, None], j[None, :], BS), axis=1)
        out = tl.where((slot[None, :] == i) & (m >= 0)[:, None], pick[:, None], out)
        v = tl.where(j[None, :] == pick[:, None], -2.0, v)
    tl.store(out_ptr + r[:, None].to(tl.int64) * N + slot[None, :], out,
             mask=row_ok[:, None] & (slot < N)[None, :])


def unfit(num_sel: int) -> str | None:
    """Why a row of ``num_sel`` selection blocks does not fit the kernel (None where it does)."""
    if num_sel > tuning.TOPN_KERNEL_MAX_BLOCKS:
        return (f"the top-n kernel holds a row of at most tuning.TOPN_KERNEL_MAX_BLOCKS = "
                f"{tuning.TOPN_KERNEL_MAX_BLOCKS} selection blocks, got {num_sel}")
    return None


def launch(p_slc: torch.Tensor, t0: int, sel_block: int, n_init: int, n_local: int, n: int,
           launcher=None) -> torch.Tensor:
    """[B, Hkv, P, Ts'] float32 scores of positions t0 … t0 + P − 1 -> [B, Hkv, P, n] int32 block
    numbers, −1 in unused slots. ``launcher`` wraps the kernel (e.g. torch.library.wrap_triton
    under torch.compile)."""
    B, H, P, Ts = p_slc.shape
    why = unfit(Ts)
    if why:
        raise ValueError(why)
    p_slc = p_slc.contiguous()
    out = torch.empty(B, H, P, n, dtype=torch.int32, device=p_slc.device)
    rows = B * H * P
    if rows == 0:
        return out
    bs = max(16, triton.next_power_of_2(Ts))
    fit = max(1, tuning.TOPN_KERNEL_TILE // bs)
    br = min(1 << (fit.bit_length() - 1), triton.next_power_of_2(rows))   # powers of two
    kernel = launcher(_top_n_kernel) if launcher is not None else _top_n_kernel
    kernel[(triton.cdiv(rows, br),)](p_slc, out, rows, t0, P, Ts, n_init, n_local,
                                     SEL_BLOCK=sel_block, N=n, NP=max(2, triton.next_power_of_2(n)),
                                     BR=br, BS=bs, num_warps=tuning.TOPN_KERNEL_WARPS)
    return out


@torch.library.triton_op("nsa_flex::top_n", mutates_args=())
def top_n(p_slc: torch.Tensor, t0: int, sel_block: int, n_init: int, n_local: int,
          n: int) -> torch.Tensor:
    """The kernel as a torch operator (traceable by torch.compile)."""
    return launch(p_slc, t0, sel_block, n_init, n_local, n, launcher=torch.library.wrap_triton)
