"""Forced blocks of NSA's selected branch: the n_init first selection blocks and the n_local
blocks ending at the query's own block, which top-n always keeps (eqs. 11–12 as pinned). They
depend on positions only, so this part of the selected branch is a static mask.

Query t, in block c = t // l', sees key s iff s ≤ t and (s // l' < n_init or s // l' > c − n_local)
(inclusive of t; partial inside block c). For l' = 2, n_init = 1, n_local = 1:

    q\\kv 0 1 2 3 4 5 6 7
     0    # . . . . . . .
     1    # # . . . . . .
     2    # # # . . . . .
     3    # # # # . . . .
     4    # # . . # . . .
     5    # # . . # # . .
     6    # # . . . . # .
     7    # # . . . . # #

The selected branch is this mask plus the data-dependent rest (selected.py, with the forced
blocks taken out of the table); the operator can run the two as separate FlexAttention calls and
merge them through their log-sum-exp.
"""

from __future__ import annotations

import torch


def is_forced(j, cur, n_init: int, n_local: int):
    """Whether selection block j is forced for a query in block cur (given j ≤ cur): one of the
    n_init first blocks or of the n_local blocks ending at cur. The one statement of the rule,
    for top-n, this mask and :func:`without_forced`."""
    return (j < n_init) | (j > cur - n_local)


def forced_blocks_mask(sel_block: int, n_init: int, n_local: int, group: int = 1):
    def forced_blocks(b, h, q_idx, kv_idx):
        t = q_idx // group
        return (kv_idx <= t) & is_forced(kv_idx // sel_block, t // sel_block, n_init, n_local)

    return forced_blocks


def forced_blocks_tiles(sel_block: int, n_init: int, n_local: int, q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (query tile, KV tile) from inclusive position bounds.

    any: a first block key with s ≤ t, or a local pair — the best query for the local part is the
    earliest one that can see the tile, t = max(q_lo, k_lo), with its latest key min(k_hi, t).
    all: every pair causal and either every key in the first blocks or every key local to every
    query of the tile (a tile mixing both counts as partial: correct, only less skipped work)."""
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    first = n_init * sel_block
    t = torch.maximum(q_lo, k_lo)
    s = torch.minimum(k_hi, t)
    local_any = (t <= q_hi) & (s // sel_block > t // sel_block - n_local)
    any_ = (k_lo <= q_hi) & ((k_lo < first) | local_any)
    all_ = (k_hi <= q_lo) & ((k_hi < first) | (k_lo // sel_block > q_hi // sel_block - n_local))
    return any_, all_


def without_forced(indices: torch.Tensor, sel_block: int, n_init: int, n_local: int) -> torch.Tensor:
    """[..., T, n] selected block numbers -> the same with the forced blocks replaced by −1."""
    cur = (torch.arange(indices.shape[-2], device=indices.device) // sel_block)[:, None]
    return torch.where(is_forced(indices, cur, n_init, n_local), -1, indices)   # −1 stays −1
