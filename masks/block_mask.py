"""Turning per-tile (any, all) classifications into a FlexAttention BlockMask.

A tile is *full* when every in-bounds (query, key) pair of it is attended, so FlexAttention can
skip the mask_mod there; *partial* when some pair is, so it evaluates the mask_mod; otherwise it is
skipped. Tiles that reach past the end of the sequence are never marked full (their mask_mod
still runs), so sequence lengths need not be multiples of the block sizes.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = tiles.sum(-1, dtype=torch.int32)
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


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
    kv_num, kv_idx = _ordered(partial.expand(shape))
    full_num, full_idx = _ordered(full.expand(shape))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                    BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))
