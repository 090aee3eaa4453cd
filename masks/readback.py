"""Reading masks back: the dense token mask of a mask_mod, and what a BlockMask makes
FlexAttention compute (for tests and the visualiser)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

SKIPPED, PARTIAL, FULL = 0, 1, 2


def dense_mask(mask_mod, batch: int, heads: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[batch, heads, q_len, kv_len] bool: mask_mod evaluated on broadcast index tensors.

    Every mask_mod of this package is written with broadcastable tensor operations, so this is
    one vectorised call (no vmap).
    """
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, h, q, kv).expand(batch, heads, q_len, kv_len)


def _states(num, idx, full_num, full_idx, n_cols):
    B, H, M, _ = idx.shape
    states = torch.zeros(B, H, M, n_cols + 1, dtype=torch.int8, device=idx.device)
    for n_, i_, value in ((num, idx, PARTIAL), (full_num, full_idx, FULL)):
        if n_ is None:
            continue
        used = torch.arange(i_.shape[-1], device=idx.device) < n_[..., None]
        cols = torch.where(used, i_.long(), n_cols)
        states.scatter_(-1, cols, torch.full_like(cols, value, dtype=torch.int8))
    return states[..., :n_cols]


def tile_states(bm: BlockMask, transposed: bool = False) -> torch.Tensor:
    """[B, H, Mq, Nkv] int8 tile map (SKIPPED / PARTIAL / FULL) from the KV-side lists used by the
    forward, or (transposed=True) from the query-side lists used by the backward."""
    q_len, kv_len = bm.seq_lengths
    QB, KB = bm.BLOCK_SIZE
    Mq, Nkv = -(-q_len // QB), -(-kv_len // KB)
    if not transposed:
        return _states(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, Nkv)[..., :Mq, :]
    s = _states(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, Mq)
    return s[..., :Nkv, :].transpose(-1, -2)


def computed_mask(bm: BlockMask, transposed: bool = False) -> torch.Tensor:
    """[B, H, q_len, kv_len] bool: the pairs FlexAttention attends with this BlockMask."""
    q_len, kv_len = bm.seq_lengths
    QB, KB = bm.BLOCK_SIZE
    states = tile_states(bm, transposed)
    B, H = states.shape[:2]
    tok = states.repeat_interleave(QB, 2).repeat_interleave(KB, 3)[..., :q_len, :kv_len]
    inner = dense_mask(bm.mask_mod, B, H, q_len, kv_len, states.device)
    return (tok == FULL) | ((tok == PARTIAL) & inner)
