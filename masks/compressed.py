"""Compressed-block visibility of NSA's compressed branch (eq. 7).

Key i of the compressed branch summarises tokens [i·d, i·d + l). It is visible to the query at
position t iff the whole block is in the past: i·d + l − 1 ≤ t. For l = 4, d = 2
(blocks cover 0-3, 2-5, 4-7, ...):

    t\\i  0 1 2
     0..2 . . .      (no block complete yet: this query attends nothing, o_cmp = 0)
     3,4  # . .
     5,6  # # .
     7    # # #

With documents the keys are slots laid out by position (masks/document.py), each holding the
block that ends at ``ends[c]`` (−1: none); the query at t sees slot c iff its block ends in t's
own document and no later than t: start[t] ≤ ends[c] ≤ t.
"""

from __future__ import annotations

import torch


def compressed_mask(block: int, stride: int, group: int = 1):
    def compressed_visible(b, h, q_idx, kv_idx):
        return kv_idx * stride + (block - 1) <= q_idx // group

    return compressed_visible


def compressed_tiles(block: int, stride: int, q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (query tile, compressed-key tile)."""
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    return k_lo * stride + (block - 1) <= q_hi, k_hi * stride + (block - 1) <= q_lo


def compressed_document_mask(ends: torch.Tensor, doc_start: torch.Tensor, group: int = 1):
    """``ends`` [B, T // d] (masks.document.compressed_block_ends), ``doc_start`` [B, T]."""
    def compressed_visible_in_document(b, h, q_idx, kv_idx):
        t = q_idx // group
        e = ends[b, kv_idx]
        return (e <= t) & (e >= doc_start[b, t])

    return compressed_visible_in_document


def compressed_document_tiles(ends: torch.Tensor, q_lo, q_hi, q_start_lo, q_start_hi, kv_block: int):
    """(any, all) [B, 1, Mq, Nkv] of :func:`compressed_document_mask`: from each slot tile's
    earliest and latest block end (empty slots left out) against the query tile's positions and
    document starts (q_start_lo/hi [B, Mq], at its first and last position)."""
    B, S = ends.shape
    Nkv = -(-S // kv_block)
    pad = Nkv * kv_block - S
    e = torch.nn.functional.pad(ends, (0, pad), value=-1).view(B, Nkv, kv_block)
    used = e >= 0
    big = torch.iinfo(torch.int32).max
    e_min = torch.where(used, e, big).amin(-1)[:, None, None, :]
    e_max = e.amax(-1)[:, None, None, :]                      # −1 where the tile holds no block
    full = used.all(-1)[:, None, None, :]
    lo, hi = q_lo[None, None, :, None], q_hi[None, None, :, None]
    s_lo, s_hi = q_start_lo[:, None, :, None], q_start_hi[:, None, :, None]
    any_ = (e_min <= hi) & (e_max >= s_lo)
    all_ = full & (e_max <= lo) & (e_min >= s_hi)
    return any_, all_
