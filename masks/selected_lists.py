"""The selected branch's BlockMask built from the block numbers, with narrow KV lists.

The generic route (``selected_tiles`` + ``block_mask_from_tiles``) classifies every (query tile,
KV tile) pair and lists rows of all Nkv KV tiles: at 64k with 64-key tiles that is 1024 columns
per query tile, of which a tile can use at most W = P·n·R (P positions per tile, n blocks each,
R = l' / kv_block KV tiles per block). Here a query tile's KV list is the union of its
positions' blocks, computed directly and stored W wide; the query-side lists of the backward
(as wide as the query tiles either way) come from the tile map those lists imply. The tiles and
their full/partial states are the same as the generic route's, so FlexAttention computes the
same pairs:

    positions 8..11 of a 4-position tile, l' = kv_block = 4, blocks (−1 unused):
      t=8: 0 2 -1     t=9: 0 2 1     t=10: 0 2 -1     t=11: 0 2 -1
    KV list: 0 (full: all 4 positions, causal), 1 (partial: t=9 only), 2 (partial: key 8.. > t
    for some t, i.e. the diagonal)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .block_mask import ordered_lists
from .packing import tile_positions
from .selected import positions_per_tile


def selected_block_mask(indices: torch.Tensor, sel_block: int, group: int, q_block: int,
                        kv_block: int, mask_mod, full_width: bool = False) -> BlockMask:
    """BlockMask of the selected branch from ``indices`` [B, Hkv, T, n] (−1 unused; a position's
    blocks distinct, as top-n gives them), in the packed-GQA layout (T·G query rows, T keys);
    ``kv_block`` must divide l' = ``sel_block``. ``full_width`` pads the KV lists to all T/kv_block
    columns (Inductor's CPU FlexAttention kernel requires that width)."""
    if sel_block % kv_block:
        raise ValueError(f"kv_block={kv_block} must divide the selection block l'={sel_block}")
    B, H, T, n = indices.shape
    device = indices.device
    R, q_len = sel_block // kv_block, T * group
    Nkv = -(-T // kv_block)
    q_lo, q_hi = tile_positions(q_len, q_block, group, device)
    Mq, P = q_lo.numel(), positions_per_tile(q_block, group)
    pos = q_lo[:, None] + torch.arange(P, device=device)                 # [Mq, P]
    real = pos <= q_hi[:, None]
    blocks = indices[:, :, pos.clamp(max=T - 1)].long()                  # [B, H, Mq, P, n]
    blocks = torch.where(real[:, :, None] & (blocks >= 0), blocks, -1)
    tiles = blocks[..., None] * R + torch.arange(R, device=device)      # [B, H, Mq, P, n, R]
    tiles = torch.where(blocks[..., None] >= 0, tiles, Nkv).flatten(3)  # Nkv: none (sorts last)
    s = torch.sort(tiles, dim=-1).values
    first = (s < Nkv) & torch.cat([torch.ones_like(s[..., :1], dtype=torch.bool),
                                   s[..., 1:] != s[..., :-1]], -1)
    npos = torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s)  # positions using s
    k_lo = s * kv_block
    k_hi = torch.clamp((s + 1) * kv_block, max=T) - 1
    lo, hi = q_lo[:, None], q_hi[:, None]
    used = first & (k_lo <= hi)                                          # some causal pair
    full = (used & (npos == (hi - lo + 1)) & (k_hi <= lo) & ((s + 1) * kv_block <= T)
            & ((torch.arange(Mq, device=device)[:, None] + 1) * q_block <= q_len))
    partial = used & ~full
    cols = s.clamp(max=Nkv - 1).to(torch.int32)      # entries past a list's count stay in range

    def kv_lists(flag):                              # the listed KV tiles first, ascending
        num, order = ordered_lists(flag)
        idx = cols.gather(-1, order.long())
        return num, (F.pad(idx, (0, Nkv - idx.shape[-1])) if full_width and idx.shape[-1] < Nkv else idx)

    def q_lists(flag):                               # per KV tile, the query tiles listing it
        tiles = torch.zeros(B, H, Mq, Nkv + 1, dtype=torch.bool, device=device)
        tiles.scatter_(-1, torch.where(flag, s, Nkv), True)
        return ordered_lists(tiles[..., :Nkv].transpose(-1, -2))

    kv_num, kv_idx = kv_lists(partial)
    full_num, full_idx = kv_lists(full)
    q_num, q_idx = q_lists(partial)
    full_q_num, full_q_idx = q_lists(full)
    return BlockMask(seq_lengths=(q_len, T), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                     BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)
