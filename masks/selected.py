"""Selected-block mask of NSA's selected branch (eqs. 11–12), built from data every step.

``table`` [B, Hkv, T, Ts] bool says which selection blocks j (tokens [j·l', (j+1)·l')) each
position t of each KV-head group selected. The query at t sees key s iff s's block is selected
and s ≤ t (causal inside the current block). For l' = 2, t = 5 selecting blocks {0, 2}:

    kv   0 1 | 2 3 | 4 5 | 6 7
    t=5  # # | . . | # # | . .

Two views are built from the same table:
- ``selected_mask``: the exact per-token mask_mod, read by FlexAttention inside partial tiles;
- ``selected_tiles``: per (query tile, KV tile), whether any / every (t, s) in the tile is
  selected. In the packed-GQA layout a query tile covers several positions, so its KV list is the
  union of those positions' blocks.
"""

from __future__ import annotations

import torch

from .causal import causal_tiles
from .packing import tile_keys, tile_positions


def selection_table(indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, Hkv, T, n] block numbers (−1 unused) -> [B, Hkv, T, num_blocks] bool."""
    slot = torch.where(indices < 0, num_blocks, indices).long()
    table = torch.zeros(*indices.shape[:-1], num_blocks + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, slot, True)
    return table[..., :num_blocks]


def selected_mask(table: torch.Tensor, sel_block: int, group: int = 1):
    def selected_blocks(b, h, q_idx, kv_idx):
        t = q_idx // group
        return table[b, h, t, kv_idx // sel_block] & (kv_idx <= t)

    return selected_blocks


def positions_per_tile(q_block: int, group: int) -> int:
    """Most positions that one tile of ``q_block`` packed rows can touch."""
    if q_block % group == 0:
        return q_block // group
    if group % q_block == 0:
        return 1
    return (q_block - 1) // group + 2


def selected_tiles(table: torch.Tensor, sel_block: int, group: int, q_block: int, kv_block: int):
    """(any, all) per [B, Hkv, query tile, KV tile] of the selected mask (causality included)."""
    B, H, T, Ts = table.shape
    device = table.device
    q_lo, q_hi = tile_positions(T * group, q_block, group, device)
    k_lo, k_hi = tile_keys(T, kv_block, device)
    P = positions_per_tile(q_block, group)
    pos = torch.minimum(q_lo[:, None] + torch.arange(P, device=device), q_hi[:, None])
    per_pos = table[:, :, pos.flatten()].view(B, H, pos.shape[0], P, Ts)
    # counts of selected blocks over a KV tile's block range [j_lo, j_hi], by prefix sums
    j_lo, j_hi = k_lo // sel_block, k_hi // sel_block
    width = (j_hi - j_lo + 1).to(torch.int32)

    def count(x):
        cs = torch.nn.functional.pad(x.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        return cs[..., j_hi + 1] - cs[..., j_lo]

    any_sel = count(per_pos.any(3)) > 0
    all_sel = count(per_pos.all(3)) == width
    any_c, all_c = causal_tiles(q_lo, q_hi, k_lo, k_hi)
    return any_sel & any_c, all_sel & all_c
