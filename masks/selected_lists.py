"""The selected branch's BlockMask, built from the selected block numbers.

A query tile's KV list is the union of the KV tiles that its positions' selected blocks touch,
computed directly from the block numbers (no [query tile, KV tile] classification of the whole
sequence): at most W = P·n·R tiles, P positions per tile, n blocks each, R KV tiles per block
(l'/kv_block where blocks start on tile boundaries; one more where they may not, with documents
or when kv_block does not divide l'). Every listed tile is partial (its mask_mod decides each key),
so there are no full-tile lists. The backward's query-side lists come from the tile map those KV
lists imply.

    positions 8..11 of a 4-position tile, l' = kv_block = 4, blocks (−1 unused):
      t=8: 0 2 -1     t=9: 0 2 1     t=10: 0 2 -1     t=11: 0 2 -1
    KV list: 0, 1 (t = 9 only), 2 (the diagonal)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .block_mask import ordered_lists
from .packing import split_rows, tile_positions


def positions_per_tile(q_block: int, group: int) -> int:
    """Most positions that one tile of ``q_block`` packed rows can touch."""
    if q_block % group == 0:
        return q_block // group
    if group % q_block == 0:
        return 1
    return (q_block - 1) // group + 2


def tiles_per_block(sel_block: int, kv_block: int, aligned: bool) -> int:
    """KV tiles one selected block can touch."""
    return -(-sel_block // kv_block) + (0 if aligned and sel_block % kv_block == 0 else 1)


def selected_block_mask(indices: torch.Tensor, sel_block: int, group: int, q_block: int,
                        kv_block: int, mask_mod, doc_start=None, full_width: bool = False,
                        q_splits: int = 1) -> BlockMask:
    """BlockMask of the selected branch from ``indices`` [B, Hkv, T, n] (block numbers of each
    position's document, −1 unused; a position's blocks distinct, as top-n gives them), in the
    packed-GQA layout (T·G query rows, T keys). ``doc_start`` [B, T] with documents.
    ``full_width`` pads the KV lists to all ⌈T/kv_block⌉ columns (Inductor's CPU FlexAttention
    kernel requires that width). ``q_splits`` = S > 1: S consecutive chunks of query tiles as
    batch entries s·B + b (masks.packing.split_rows' layout), each over all T keys, with
    query-side lists numbered within the chunk; ``mask_mod`` must already take that layout."""
    B, H, T, n = indices.shape
    device = indices.device
    q_len = T * group
    Nkv = -(-T // kv_block)
    q_lo, q_hi = tile_positions(q_len, q_block, group, device)
    Mq, P = q_lo.numel(), positions_per_tile(q_block, group)
    S = q_splits
    if S < 1 or (S > 1 and q_len % (S * q_block)):
        raise ValueError(f"q_splits={S}: the {q_len} query rows must split into chunks of whole "
                         f"{q_block}-row tiles; choose a divisor of {Mq} (query tiles)")
    R = tiles_per_block(sel_block, kv_block, aligned=doc_start is None)
    pos = q_lo[:, None] + torch.arange(P, device=device)                 # [Mq, P]
    real = (pos <= q_hi[:, None])[:, :, None, None]
    pos = pos.clamp(max=T - 1)
    blocks = indices[:, :, pos].long()                                   # [B, H, Mq, P, n]
    start = 0 if doc_start is None else doc_start[:, None, pos, None].long()
    first = start + blocks * sel_block                                   # first key of a block
    last = torch.minimum(first + sel_block - 1, pos[:, :, None])         # its last key <= t
    tiles = (first // kv_block)[..., None] + torch.arange(R, device=device)   # [.., n, R]
    used = real & (blocks[..., None] >= 0) & (tiles * kv_block <= last[..., None])
    tiles = torch.where(used, tiles, Nkv).flatten(3)                     # Nkv: none (sorts last)
    s = torch.sort(tiles, dim=-1).values
    listed = (s < Nkv) & torch.cat([torch.ones_like(s[..., :1], dtype=torch.bool),
                                    s[..., 1:] != s[..., :-1]], -1)
    cols = s.clamp(max=Nkv - 1).to(torch.int32)      # entries past a list's count stay in range
    num, order = ordered_lists(listed)
    width = min(s.shape[-1], Nkv)
    kv_idx = cols.gather(-1, order.long())[..., :width]
    if full_width and width < Nkv:
        kv_idx = F.pad(kv_idx, (0, Nkv - width))
    flags = torch.zeros(B, H, Mq, Nkv + 1, dtype=torch.bool, device=device)
    flags.scatter_(-1, torch.where(listed, s, Nkv), True)
    flags = flags[..., :Nkv]
    if S > 1:
        num, kv_idx, flags = (split_rows(x, S) for x in (num, kv_idx, flags))
    q_num, q_idx = ordered_lists(flags.transpose(-1, -2))              # the backward's lists
    return BlockMask(seq_lengths=(q_len // S, T), kv_num_blocks=num, kv_indices=kv_idx,
                     full_kv_num_blocks=None, full_kv_indices=None, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=None, full_q_indices=None,
                     BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)
