"""How one attention branch is executed, from one mask_mod.

- ``flex``: FlexAttention with a BlockMask built from the branch's tile classification; compiled
  by Inductor into a fused Triton kernel (CUDA).
- ``dense``: the same mask_mod evaluated into a dense boolean mask and a plain masked softmax
  (CPU, where flex_attention has no backward). Exact, differentiable, O(T²) memory.

Both return (out [B, H, Lq, Dv] in q's dtype, lse [B, H, Lq] float32, natural log); a query that
attends nothing gets out = 0 and lse = −inf.
"""

from __future__ import annotations

import torch
from torch.nn.attention import flex_attention as _flex

from masks import block_mask_from_tiles, dense_mask

# return_aux (torch >= 2.11) replaces the deprecated return_lse, whose warning guard would
# otherwise cost a recompile.
_HAS_AUX = hasattr(_flex, "AuxRequest")


def dense_attention(q, k, v, mask: torch.Tensor, scale: float):
    ctype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(ctype), k.to(ctype).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(ctype)) / torch.where(denom > 0, denom, 1.0)
    lse = (m + torch.log(denom.detach())).squeeze(-1).float()
    return out.to(q.dtype), lse


def attend(q, k, v, mask_mod, tiles, scale: float, *, use_flex: bool, q_block: int,
           kv_block: int, kernel_options=None, need_lse: bool = False):
    """One branch. ``tiles(q_block, kv_block)`` gives the (any, all) tile classification.

    Returns (out, lse); lse is None unless ``need_lse`` (compiled CPU flex cannot return it)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if not use_flex:
        out, lse = dense_attention(q, k, v, dense_mask(mask_mod, B, H, Lq, Lk, q.device), scale)
        return out, (lse if need_lse else None)
    any_, all_ = tiles(q_block, kv_block)
    bm = block_mask_from_tiles(any_, all_, mask_mod, Lq, Lk, q_block, kv_block, B, H)
    if not need_lse:
        return _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options), None
    if _HAS_AUX:
        out, aux = _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options,
                                        return_aux=_flex.AuxRequest(lse=True))
        return out, aux.lse
    return _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True,
                                kernel_options=kernel_options)
