"""Document mask: a query sees only keys of its own document (packed sequences).

``doc_ids`` [B, T] gives each position's document number, non-decreasing along T. Composed with
any other mask by :func:`and_document`. With documents 0,0,1,1,1 and a causal mask:

    q\\kv 0 1 2 3 4
     0    # . . . .
     1    # # . . .
     2    . . # . .
     3    . . # # .
     4    . . # # #
"""

from __future__ import annotations

import torch


def document_mask(doc_ids: torch.Tensor, group: int = 1):
    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx // group] == doc_ids[b, kv_idx]

    return same_document


def and_document(mask_mod, doc_ids: torch.Tensor, group: int = 1):
    same = document_mask(doc_ids, group)

    def document_and(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & same(b, h, q_idx, kv_idx)

    return document_and


def document_tiles(doc_ids: torch.Tensor, q_lo, q_hi, k_lo, k_hi):
    """(any, all) per (batch, 1, query tile, KV tile), using that documents are contiguous.

    any: the tile's query and key document ranges overlap; all: one document spans the tile.
    """
    dq_lo, dq_hi = doc_ids[:, q_lo][:, None, :, None], doc_ids[:, q_hi][:, None, :, None]
    dk_lo, dk_hi = doc_ids[:, k_lo][:, None, None, :], doc_ids[:, k_hi][:, None, None, :]
    any_ = (dq_lo <= dk_hi) & (dk_lo <= dq_hi)
    all_ = (dq_lo == dq_hi) & (dk_lo == dk_hi) & (dq_lo == dk_lo)
    return any_, all_
