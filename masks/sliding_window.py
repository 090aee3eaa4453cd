"""Sliding-window mask of NSA's sliding branch (pinned: w tokens including the query).

Query at position t sees keys s with t − w < s ≤ t (and, with documents, s in its own document:
start[t] ≤ s). For w = 3:

    q\\kv 0 1 2 3 4 5
     0    # . . . . .
     1    # # . . . .
     2    # # # . . .
     3    . # # # . .
     4    . . # # # .
     5    . . . # # #
"""

from __future__ import annotations


def sliding_window_mask(window: int, group: int = 1, doc_start=None):
    """``doc_start`` [B, T] (masks.document.document_starts), or None for one document."""
    def sliding_window(b, h, q_idx, kv_idx):
        t = q_idx // group
        return (kv_idx <= t) & (kv_idx > t - window)

    if doc_start is None:
        return sliding_window

    def sliding_window_in_document(b, h, q_idx, kv_idx):
        return sliding_window(b, h, q_idx, kv_idx) & (kv_idx >= doc_start[b, q_idx // group])

    return sliding_window_in_document


def sliding_window_tiles(window: int, q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (query tile, KV tile): some / every (t, s) in the tile is inside the window."""
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    any_ = (k_lo <= q_hi) & (k_hi > q_lo - window)
    all_ = (k_hi <= q_lo) & (k_lo > q_hi - window)
    return any_, all_
