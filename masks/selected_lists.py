"""The selected branch's BlockMask built from the block numbers, with narrow KV lists.

The generic route (``selected_tiles`` + ``block_mask_from_tiles``) classifies every (query tile,
KV tile) pair and lists rows of all Nkv KV tiles: at 64k with 64-key tiles that is 1024 columns
per query tile, of which a tile can use at most W = P·n·R (P positions per tile, n blocks each,
R = l' / kv_block KV tiles per block). Here a query tile's KV list is the union of its
positions' blocks, computed directly and stored W wide; the query-side lists of the backward
come from the tile map those lists imply, as wide as the query tiles — except the partial ones
when a tile holds one position (G divisible by q_block) and ``narrow_q`` is set: then only
diagonal tiles are partial, and KV tile j's partial list is the kv_block·G/q_block tiles of its
own positions at most. The tiles and their full/partial states are the same as the generic
route's, so FlexAttention computes the same pairs:

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
from .packing import split_rows, tile_positions
from .selected import positions_per_tile


def selected_block_mask(indices: torch.Tensor, sel_block: int, group: int, q_block: int,
                        kv_block: int, mask_mod, full_width: bool = False,
                        narrow_q: bool = False, q_splits: int = 1,
                        full_tiles: bool = True) -> BlockMask:
    """BlockMask of the selected branch from ``indices`` [B, Hkv, T, n] (−1 unused; a position's
    blocks distinct, as top-n gives them), in the packed-GQA layout (T·G query rows, T keys);
    ``kv_block`` must divide l' = ``sel_block``. ``full_width`` pads the KV lists to all T/kv_block
    columns (Inductor's CPU FlexAttention kernel requires that width). ``narrow_q``: the partial
    query-side lists kv_block·G/q_block wide where a tile holds one position (G divisible by
    q_block; else, or with ``full_width`` or without full tiles, as wide as the query tiles).
    ``full_tiles=False``: no tile is marked full (every listed tile is partial, its mask_mod
    evaluated) and the mask has no full lists — the same pairs attended, without the full
    query-side lists [B, Hkv, Nkv, Mq].

    ``q_splits`` = S > 1: the mask of S consecutive chunks of query tiles as batch entries
    s·B + b (chunk-major, as :func:`masks.packing.split_rows` lays out the queries), each over all
    T keys, with query-side lists numbered within the chunk; ``mask_mod`` must already take the
    split layout. The query tiles must divide evenly into S chunks."""
    if sel_block % kv_block:
        raise ValueError(f"kv_block={kv_block} must divide the selection block l'={sel_block}")
    B, H, T, n = indices.shape
    device = indices.device
    R, q_len = sel_block // kv_block, T * group
    Nkv = -(-T // kv_block)
    q_lo, q_hi = tile_positions(q_len, q_block, group, device)
    Mq, P = q_lo.numel(), positions_per_tile(q_block, group)
    S = q_splits
    if S < 1 or (S > 1 and q_len % (S * q_block)):
        raise ValueError(f"q_splits={S}: the {q_len} query rows must split into chunks of whole "
                         f"{q_block}-row tiles; choose a divisor of {Mq} (query tiles)")
    rows = Mq // S                                                       # query tiles per chunk
    pos = q_lo[:, None] + torch.arange(P, device=device)                 # [Mq, P]
    real = pos <= q_hi[:, None]
    blocks = indices[:, :, pos.clamp(max=T - 1)].long()                  # [B, H, Mq, P, n]
    blocks = torch.where(real[:, :, None] & (blocks >= 0), blocks, -1)
    tiles = blocks[..., None] * R + torch.arange(R, device=device)      # [B, H, Mq, P, n, R]
    tiles = torch.where(blocks[..., None] >= 0, tiles, Nkv).flatten(3)  # Nkv: none (sorts last)
    s = torch.sort(tiles, dim=-1).values
    first = (s < Nkv) & torch.cat([torch.ones_like(s[..., :1], dtype=torch.bool),
                                   s[..., 1:] != s[..., :-1]], -1)
    lo, hi = q_lo[:, None], q_hi[:, None]
    used = first & (s * kv_block <= hi)                                  # some causal pair
    partial = used
    if full_tiles:
        if P == 1:   # one position (or part of one) per tile: it uses every tile it lists
            npos = torch.ones_like(s)
        else:
            npos = torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s)  # users of s
        k_hi = torch.clamp((s + 1) * kv_block, max=T) - 1
        full = (used & (npos == (hi - lo + 1)) & (k_hi <= lo) & ((s + 1) * kv_block <= T)
                & ((torch.arange(Mq, device=device)[:, None] + 1) * q_block <= q_len))
        partial = used & ~full
    cols = s.clamp(max=Nkv - 1).to(torch.int32)      # entries past a list's count stay in range

    def by_chunk(x):                                 # [B, H, Mq, ...] -> [S·B, H, Mq / S, ...]
        return split_rows(x, S) if S > 1 else x

    def kv_lists(flag):                              # the listed KV tiles first, ascending
        num, order = ordered_lists(flag)
        idx = cols.gather(-1, order.long())
        idx = F.pad(idx, (0, Nkv - idx.shape[-1])) if full_width and idx.shape[-1] < Nkv else idx
        return by_chunk(num), by_chunk(idx)

    def q_lists(flag):                               # per KV tile, the query tiles listing it
        tiles = torch.zeros(B, H, Mq, Nkv + 1, dtype=torch.bool, device=device)
        tiles.scatter_(-1, torch.where(flag, s, Nkv), True)
        return ordered_lists(by_chunk(tiles[..., :Nkv]).transpose(-1, -2))

    def diagonal_q_lists(flag):
        # One position per tile: a tile's only partial KV tile is its diagonal one (the keys
        # around its position; the ragged last tile is diagonal too), so KV tile j's partial
        # query tiles are among the Wq = kv_block·G/q_block tiles m = j·Wq + w of its own
        # positions; the lists are Wq wide instead of Mq (the full ones stay Mq wide: the first
        # block serves all). With chunks, chunk c lists those of its own tiles, numbered in it.
        Wq = kv_block * group // q_block
        m = torch.arange(Nkv * Wq, device=device).view(Nkv, Wq)
        has = F.pad(flag.any(-1), (0, Nkv * Wq - Mq)).view(B, H, Nkv, Wq)
        chunk = torch.arange(S, device=device)[:, None, None]
        mine = (m // rows)[None] == chunk                                # [S, Nkv, Wq]
        num, order = ordered_lists((has[None] & mine[:, None, None]).flatten(0, 1))
        first = (torch.arange(Nkv, device=device)[:, None] * Wq
                 - torch.arange(S, device=device).repeat_interleave(B)[:, None, None, None] * rows)
        idx = torch.clamp(first + order, 0, rows - 1).to(torch.int32)   # past a count: in range
        return num, (F.pad(idx, (0, rows - Wq)) if full_width and Wq < rows else idx)

    kv_num, kv_idx = kv_lists(partial)
    q_num, q_idx = (diagonal_q_lists(partial) if narrow_q and full_tiles and group % q_block == 0
                    else q_lists(partial))
    full_num = full_idx = full_q_num = full_q_idx = None
    if full_tiles:
        full_num, full_idx = kv_lists(full)
        full_q_num, full_q_idx = q_lists(full)
    return BlockMask(seq_lengths=(q_len // S, T), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                     BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)
