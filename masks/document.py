"""Packed documents: where each position's document starts, and where its compressed blocks go.

Documents are contiguous runs of positions with the same ``doc_ids`` value ([B, T], any ints; a
new document starts wherever the value changes). Every NSA branch treats a document as if it
were alone: a query at t sees keys s with ``start[t] <= s <= t`` only. With documents 0,0,1,1,1
and a causal mask:

    q\\kv 0 1 2 3 4          start = 0 0 2 2 2
     0    # . . . .
     1    # # . . .
     2    . . # . .
     3    . . # # .
     4    . . # # #

Compressed blocks are laid out by position (:func:`compressed_block_ends`): block i of a document
starting at s0 covers [s0 + i·d, s0 + i·d + l) and goes to slot ⌊s0/d⌋ + i, the slot c whose
stride [c·d, c·d + d) holds its first token. Slots are distinct (a document's last block ends
at least l ≥ d tokens before the next one starts), so T // d slots hold every document's blocks.
"""

from __future__ import annotations

import torch


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] first position of each position's document (int32)."""
    T = doc_ids.shape[-1]
    t = torch.arange(T, device=doc_ids.device, dtype=torch.int32)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return torch.where(new, t, 0).cummax(-1).values


def document_ends(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] last position of each position's document (int32)."""
    T = doc_ids.shape[-1]
    t = torch.arange(T, device=doc_ids.device, dtype=torch.int32)
    last = torch.ones_like(doc_ids, dtype=torch.bool)
    last[..., :-1] = doc_ids[..., 1:] != doc_ids[..., :-1]
    ends = torch.where(last, t, T - 1).flip(-1).cummin(-1).values.flip(-1)
    return ends


def doc_ids_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] document numbers of packed token sequences: a token after an EOS starts a new
    document, the EOS belongs to the one it ends (torchtitan's convention)."""
    eos = (tokens == eos_id).to(torch.int32)
    ids = torch.zeros_like(eos)
    ids[..., 1:] = eos[..., :-1].cumsum(-1, dtype=torch.int32)
    return ids


def compressed_block_ends(doc_ids: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """[B, T // d] last position of the compressed block in each slot, −1 where a slot holds
    none. Slot c belongs to the document of position c·d + d − 1, whose block i = c − ⌊s0/d⌋
    starts at s0 + i·d and exists where it ends inside that document."""
    T = doc_ids.shape[-1]
    slots = T // stride
    if slots == 0:
        return doc_ids.new_zeros(*doc_ids.shape[:-1], 0, dtype=torch.int32)
    p = torch.arange(slots, device=doc_ids.device) * stride + stride - 1
    s0 = document_starts(doc_ids)[..., p]
    end = document_ends(doc_ids)[..., p]
    c = torch.arange(slots, device=doc_ids.device, dtype=torch.int32)
    last = s0 + (c - s0 // stride) * stride + block - 1
    return torch.where(last <= end, last, -1).to(torch.int32)


def document_tiles(q_start_lo, q_start_hi, k_lo, k_hi):
    """(any, all) per (batch, query tile, KV tile) of the document constraint start[t] <= s,
    given each query tile's first and last position's document start [B, Mq] (non-decreasing
    in t) and the tiles' key bounds [Nkv]: [B, 1, Mq, Nkv] each."""
    lo, hi = q_start_lo[:, None, :, None], q_start_hi[:, None, :, None]
    return k_hi[None, None, None, :] >= lo, k_lo[None, None, None, :] >= hi
