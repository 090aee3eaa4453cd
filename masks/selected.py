"""Selected-block mask of NSA's selected branch (eqs. 11–12), built from data every step.

``table`` [B, Hkv, T, Ts] bool says which selection blocks j each position t of each KV-head
group selected; block j covers tokens [j·l', (j+1)·l') of t's document (with documents, counted
from the document's first token). The query at t sees key s iff s's block is selected and
s ≤ t (causal inside the current block). For l' = 2, t = 5 selecting blocks {0, 2}:

    kv   0 1 | 2 3 | 4 5 | 6 7
    t=5  # # | . . | # # | . .
"""

from __future__ import annotations

import torch


def selection_table(indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, Hkv, T, n] block numbers (−1 unused) -> [B, Hkv, T, num_blocks] bool."""
    slot = torch.where(indices < 0, num_blocks, indices).long()
    table = torch.zeros(*indices.shape[:-1], num_blocks + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, slot, True)
    return table[..., :num_blocks]


def selected_mask(table: torch.Tensor, sel_block: int, group: int = 1, doc_start=None):
    """The exact per-key mask_mod; ``doc_start`` [B, T] with documents (masks/document.py)."""
    Ts = table.shape[-1]

    def selected_blocks(b, h, q_idx, kv_idx):
        t = q_idx // group
        return table[b, h, t, torch.clamp(kv_idx // sel_block, max=Ts - 1)] & (kv_idx <= t)

    if doc_start is None:
        return selected_blocks

    def selected_blocks_in_document(b, h, q_idx, kv_idx):
        t = q_idx // group
        s0 = doc_start[b, t]
        j = torch.clamp((kv_idx - s0) // sel_block, 0, Ts - 1)
        return table[b, h, t, j] & (kv_idx <= t) & (kv_idx >= s0)

    return selected_blocks_in_document
