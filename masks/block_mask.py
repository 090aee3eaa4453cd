"""Turning per-tile (any, all) classifications into a FlexAttention BlockMask.

A tile is *full* when every in-bounds (query, key) pair of it is attended, so FlexAttention can
skip the mask_mod there; *partial* when some pair is, so it evaluates the mask_mod; otherwise it is
skipped. Tiles that reach past the end of the sequence are never marked full (their mask_mod
still runs), so sequence lengths need not be multiples of the block sizes.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask


def ordered_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, column order) per row of a bool [..., N]: the listed columns ascending, then the
    others ascending — what a stable descending argsort gives, by prefix counts (no sort)."""
    t = tiles.to(torch.int32)
    num = t.sum(-1, dtype=torch.int32)
    col = torch.arange(t.shape[-1], device=t.device, dtype=torch.int32)
    before = t.cumsum(-1, dtype=torch.int32) - t                     # listed columns before col
    dest = torch.where(tiles, before, num[..., None] + col - before)
    # row-major whatever the layout of ``tiles`` (a transposed map for the query-side lists):
    # FlexAttention's kernels step along a list by 1 and address rows from stride(1) alone
    idx = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    idx.scatter_(-1, dest.long(), col.expand_as(t).contiguous())
    return num.contiguous(), idx


def block_mask_from_tiles(any_: torch.Tensor, all_: torch.Tensor, mask_mod, q_len: int,
                          kv_len: int, q_block: int, kv_block: int,
                          batch: int, heads: int) -> BlockMask:
    """BlockMask from (any, all) [..., Mq, Nkv] (broadcast to [batch, heads, Mq, Nkv])."""
    device = any_.device
    Mq, Nkv = (q_len + q_block - 1) // q_block, (kv_len + kv_block - 1) // kv_block
    q_inb = (torch.arange(Mq, device=device) + 1) * q_block <= q_len
    kv_inb = (torch.arange(Nkv, device=device) + 1) * kv_block <= kv_len
    full = any_ & all_ & q_inb[:, None] & kv_inb[None, :]
    partial = any_ & ~full
    shape = (batch, heads, Mq, Nkv)
    partial, full = partial.expand(shape), full.expand(shape)
    kv_num, kv_idx = ordered_lists(partial)
    full_num, full_idx = ordered_lists(full)
    q_num, q_idx = ordered_lists(partial.transpose(-1, -2))               # the backward's lists
    full_q_num, full_q_idx = ordered_lists(full.transpose(-1, -2))
    return BlockMask(seq_lengths=(q_len, kv_len), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                     BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)
