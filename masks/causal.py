"""Causal mask: a query sees keys at or before its own position (inclusive).

    q\\kv 0 1 2 3
     0    # . . .
     1    # # . .
     2    # # # .
     3    # # # #

``group`` is the packed-GQA factor (position = q_idx // group; see packing.py).
"""

from __future__ import annotations



def causal_mask(group: int = 1):
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx // group

    return causal


def causal_tiles(q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (query tile, KV tile) from inclusive position bounds (broadcast [M,1]x[1,N])."""
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    return k_lo <= q_hi, k_hi <= q_lo
