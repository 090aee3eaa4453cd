"""Compressed-block visibility of NSA's compressed branch (eq. 7).

Key i of the compressed branch summarises tokens [i·d, i·d + l). It is visible to the query at
position t iff the whole block is in the past: i·d + l − 1 ≤ t. For l = 4, d = 2
(blocks cover 0-3, 2-5, 4-7, ...):

    t\\i  0 1 2
     0..2 . . .      (no block complete yet: this query attends nothing, o_cmp = 0)
     3,4  # . .
     5,6  # # .
     7    # # #
"""

from __future__ import annotations


def compressed_mask(block: int, stride: int, group: int = 1):
    def compressed_visible(b, h, q_idx, kv_idx):
        return kv_idx * stride + (block - 1) <= q_idx // group

    return compressed_visible


def compressed_tiles(block: int, stride: int, q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (query tile, compressed-key tile)."""
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    return k_lo * stride + (block - 1) <= q_hi, k_hi * stride + (block - 1) <= q_lo
