"""The selected branch's BlockMask built from the block numbers, with narrow KV lists.

The generic route (``selected_tiles`` + ``block_mask_from_tiles``) classifies every (query tile,
KV tile) pair and sorts rows of all Nkv KV tiles: at 64k with 64-key tiles that is 1024 columns
per query tile, of which a tile can use at most W = P·n·R (P positions per tile, n blocks each,
R = l' / kv_block KV tiles per block). Here a query tile's KV list is the union of its
positions' blocks, computed directly and stored W wide; the query-side lists of the backward
come from one sort of the (KV tile, query tile) pairs. The tiles and their full/partial states
are the same as the generic route's, so FlexAttention computes the same pairs:

    positions 8..11 of a 4-position tile, l' = kv_block = 4, blocks (−1 unused):
      t=8: 0 2 -1     t=9: 0 2 1     t=10: 0 2 -1     t=11: 0 2 -1
    KV list: 0 (full: all 4 positions, causal), 1 (partial: t=9 only), 2 (partial: key 8.. > t
    for some t, i.e. the diagonal)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .packing import tile_positions
from .selected import positions_per_tile


def _compact(flag: torch.Tensor, values: torch.Tensor):
    """Per row, the values where flag holds, packed to the front (order kept), and their count."""
    W = flag.shape[-1]
    num = flag.sum(-1, dtype=torch.int32)
    dest = torch.where(flag, flag.cumsum(-1) - 1, W)                    # column W: discarded
    out = torch.zeros(*flag.shape[:-1], W + 1, dtype=torch.int32, device=flag.device)
    out.scatter_(-1, dest, values.to(torch.int32))
    return num, out[..., :W].contiguous()


def _transpose(flag: torch.Tensor, cols: torch.Tensor, n_cols: int):
    """Query-side lists from KV-side entries: flag/cols [B, H, Mq, W] -> (num [B, H, n_cols],
    idx [B, H, n_cols, Mq]) listing, per KV tile, the query tiles whose list holds it."""
    B, H, Mq, W = flag.shape
    m = torch.arange(Mq, device=flag.device)[:, None].expand(Mq, W)
    none = n_cols * Mq
    key = torch.where(flag, cols.long() * Mq + m, none).reshape(B, H, Mq * W)
    key = torch.sort(key, dim=-1).values
    valid = key < none
    c = torch.where(valid, key // Mq, n_cols)
    counts = torch.zeros(B, H, n_cols + 1, dtype=torch.int64, device=flag.device)
    counts.scatter_add_(-1, c, torch.ones_like(c))
    start = counts.cumsum(-1) - counts                                   # first slot of each c
    rank = torch.arange(Mq * W, device=flag.device) - start.gather(-1, c)
    dest = torch.where(valid, c * Mq + rank, none)
    idx = torch.zeros(B, H, none + 1, dtype=torch.int32, device=flag.device)
    idx.scatter_(-1, dest, (key % Mq).to(torch.int32))
    return counts[..., :n_cols].to(torch.int32), idx[..., :none].view(B, H, n_cols, Mq)


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
    kv_num, kv_idx = _compact(partial, s)
    full_num, full_idx = _compact(full, s)
    if full_width and kv_idx.shape[-1] < Nkv:
        pad = (0, Nkv - kv_idx.shape[-1])
        kv_idx, full_idx = F.pad(kv_idx, pad), F.pad(full_idx, pad)
    q_num, q_idx = _transpose(partial, s, Nkv)
    full_q_num, full_q_idx = _transpose(full, s, Nkv)
    return BlockMask(seq_lengths=(q_len, T), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                     BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)
