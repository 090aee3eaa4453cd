"""Packed-GQA query layout.

The G = Hq / Hkv query heads of one KV head are packed into the query axis of one
FlexAttention "head": packed row r holds position r // G, head r % G of that group.

    q [B, T, Hq, D]  ->  [B, Hkv, T·G, D]

    rows of KV head k:  (t0,g0) (t0,g1) ... (t0,gG-1) (t1,g0) ... (tT-1,gG-1)

A query tile of QB rows therefore covers QB / G positions and shares one KV head, so every
key/value it loads serves G query heads. Every mask_mod in this package takes ``group`` = G and
reads the position as ``q_idx // group`` (group=1 gives the ordinary unpacked layout).
"""

from __future__ import annotations

import torch


def pack_gqa(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, Hkv, T·G, D] with row t·G + g."""
    B, T, Hq, D = x.shape
    G = Hq // num_kv_heads
    return x.view(B, T, num_kv_heads, G, D).permute(0, 2, 1, 3, 4).reshape(B, num_kv_heads, T * G, D)


def unpack_gqa(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, Hkv, T·G, D] -> [B, T, Hq, D], the inverse of :func:`pack_gqa`."""
    B, Hkv, TG, D = x.shape
    G = TG // seq_len
    return x.view(B, Hkv, seq_len, G, D).permute(0, 2, 1, 3, 4).reshape(B, seq_len, Hkv * G, D)


def split_rows(x: torch.Tensor, splits: int) -> torch.Tensor:
    """[B, H, S·L, ...] -> [S·B, H, L, ...]: consecutive query rows become batch entries, chunk-
    major (entry s·B + b is chunk s of batch b; at B = 1 FlexAttention can then broadcast k/v).
    At B = 1 a strided view of ``x`` (strides (L·…, S·L·…, …): the heads outermost), no copy;
    else a concatenation (a new buffer)."""
    if x.shape[0] == 1:
        H, SL = x.shape[1:3]
        return x.view(H, splits, SL // splits, *x.shape[3:]).transpose(0, 1)
    return torch.cat(x.chunk(splits, dim=2), dim=0)


def merge_rows(x: torch.Tensor, splits: int) -> torch.Tensor:
    """Inverse of :func:`split_rows`. At B = 1 by a reshape: no copy where ``x`` has the heads
    outermost (as split_rows gives at B = 1, and FlexAttention's outputs of such a query,
    whose strides follow the query's)."""
    SB, H, L = x.shape[:3]
    if SB == splits:
        return x.transpose(0, 1).reshape(1, H, splits * L, *x.shape[3:])
    return torch.cat(x.chunk(splits, dim=0), dim=2)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, T, D] (keys and values; no copy)."""
    return x.transpose(1, 2)


def tile_positions(q_rows: int, q_block: int, group: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position covered by each query tile of ``q_block`` packed rows.

    Returns (lo, hi), each [ceil(q_rows / q_block)] int64, inclusive.
    """
    m = torch.arange((q_rows + q_block - 1) // q_block, device=device)
    lo = (m * q_block) // group
    hi = (torch.clamp((m + 1) * q_block, max=q_rows) - 1) // group
    return lo, hi


def tile_keys(kv_len: int, kv_block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key of each KV tile (inclusive, clipped to the sequence)."""
    c = torch.arange((kv_len + kv_block - 1) // kv_block, device=device)
    return c * kv_block, torch.clamp((c + 1) * kv_block, max=kv_len) - 1
