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
import torch.nn.functional as F
from torch.nn.attention import flex_attention as _flex
from torch.nn.attention.flex_attention import BlockMask

from masks import block_mask_from_tiles, dense_mask, merge_rows, split_rows

from .kernels import FlexTiles

def dense_attention(q, k, v, mask: torch.Tensor, scale: float):
    ctype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(ctype), k.to(ctype).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    has = denom > 0
    out = torch.matmul(p, v.to(ctype)) / torch.where(has, denom, 1.0)
    # differentiable (m is a constant shift: lse does not depend on it); −inf where nothing is seen
    lse = torch.where(has, m + torch.log(torch.where(has, denom, 1.0)), float("-inf"))
    return out.to(q.dtype), lse.squeeze(-1).float()


def _masked_sdpa(q, k, v, mask: torch.Tensor, scale: float):
    """Inference only: SDPA with the boolean mask (no float32 score matrix; rows that see no key
    give 0, as in dense_attention). Returns (out, None)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0).to(q.dtype), None


def dense_in_chunks(q, k, v, mask_mod, scale: float, need_lse: bool = True,
                    chunk_elems: int = 1 << 28):
    """The dense path over consecutive chunks of query rows, each with its slice of the mask, so
    that at most ``chunk_elems`` score elements exist at once (one chunk when they fit).
    Without autograd and LSE (the visualiser's forward) each chunk runs through SDPA."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    attend_chunk = dense_attention if need_lse or torch.is_grad_enabled() else _masked_sdpa
    rows = max(1, min(Lq, chunk_elems // max(1, B * H * Lk)))
    outs, lses = [], []
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        shifted = mask_mod if r0 == 0 else (lambda b, h, qi, kv, r0=r0: mask_mod(b, h, qi + r0, kv))
        o, l = attend_chunk(q[:, :, r0:r1], k, v, dense_mask(shifted, B, H, r1 - r0, Lk, q.device), scale)
        outs.append(o)
        lses.append(l)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 2), (torch.cat(lses, 2) if lses[0] is not None else None)


_KV_LISTS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
_LISTS = _KV_LISTS + ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
_DQ_ORDERS = ("dq_write_order", "dq_write_order_full", "dq_kv_order", "dq_kv_order_spt")


@torch.library.custom_op("nsa_flex::contiguous_copies", mutates_args=())
def contiguous_copies(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Row-major copies that Inductor cannot lay out otherwise (an opaque op's outputs keep the
    strides its fake gives). ``clone(contiguous_format)``, not ``contiguous()``: a tensor whose
    size-1 dimension has an odd stride counts as contiguous and would be returned as it is."""
    return [x.clone(memory_format=torch.contiguous_format) for x in xs]


@contiguous_copies.register_fake
def _(xs):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def fixed_layout(bm: BlockMask, backward: bool = True) -> BlockMask:
    """The same BlockMask with every list a row-major buffer; where no ``backward`` follows, only
    the KV lists, which the forward kernel reads (the query lists are left as they are).

    FlexAttention's Triton kernels read index list (b, h, m) at (b·H + h)·stride(1) + m·stride(2)
    (the counts at (b·H + h)·stride(1) + m) and step along the last dimension by 1: they assume a
    row-major layout. A list computed inside a compiled graph and consumed only there (so with
    activation checkpointing, which recomputes it) gets whatever layout Inductor picks; measured
    on an H100 (torch 2.11), the query-split KV lists [8, 1, 64, 16] came out with strides
    (1024, 8192, 16, 1), a legal layout for a size-1 head dimension that the kernel read past
    its end (illegal memory access), and with two KV heads the gradients were wrong. Copies
    through an opaque op pin the layout. The op gets and gives them flattened (1-D), viewed
    back outside it: at 128k (paper config, H100, torch 2.11) Inductor handed the op the
    sliding branch's [1, 1, 1024] list as a 1-D buffer and the op's output failed its size check
    ("wrong number of dimensions"); a 1-D argument has no dimensions to lose. Other fields of
    the mask (newer torch's dQ orders) are kept."""
    present = [n for n in (_LISTS if backward else _KV_LISTS) if getattr(bm, n) is not None]
    flat = contiguous_copies([getattr(bm, n).reshape(-1) for n in present])
    copies = {n: f.view(getattr(bm, n).shape) for n, f in zip(present, flat)}
    extra = {n: getattr(bm, n) for n in _DQ_ORDERS if hasattr(bm, n)}
    return BlockMask(bm.seq_lengths, *(copies.get(n, getattr(bm, n)) for n in _LISTS),
                     BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, **extra)


def split_mask_mod(mask_mod, splits: int, rows: int, batch: int):
    """The mask_mod of entry b = s·batch + b0 (chunk s of batch b0), whose query rows start at
    s·rows."""
    def query_chunk(b, h, q_idx, kv_idx):
        return mask_mod(b % batch, h, q_idx + (b // batch) * rows, kv_idx)

    return query_chunk


def effective_splits(requested: int, q_len: int, q_block: int) -> int:
    """The largest S <= requested with q_len a multiple of S·q_block (1 if none)."""
    return next((s for s in range(max(1, requested), 0, -1) if q_len % (s * q_block) == 0), 1)


def tiled_block_mask(any_, all_, mask_mod, B, Lq, Lk, q_block, kv_block, S):
    """The branch's BlockMask from its tile classification (any, all) [Mq, Nkv] or
    [B, 1, Mq, Nkv], for S query chunks (S = 1: whole).

    The static branches' masks depend on positions (and documents) only: a BlockMask of one head,
    which FlexAttention broadcasts over the KV heads (at 64k the sliding branch's four lists take
    64 MiB instead of 256 with Hkv = 4)."""
    if S > 1:
        Mq, Nkv = any_.shape[-2:]
        any_, all_ = (split_rows(t.expand(B, 1, Mq, Nkv), S) for t in (any_, all_))
        mask_mod = split_mask_mod(mask_mod, S, Lq // S, B)
    return block_mask_from_tiles(any_, all_, mask_mod, Lq // S, Lk, q_block, kv_block, B * S, 1)


def flex_attend(q, k, v, block_mask, scale: float, tiles: FlexTiles, need_lse: bool):
    """One branch through FlexAttention: ``block_mask(S)`` builds its BlockMask for S query chunks
    (S = tiles.q_splits where the query tiles divide evenly, else fewer).

    Query chunks run as separate batch entries over the same k/v (broadcast where B = 1, copied
    per chunk otherwise): FlexAttention's backward computes dK/dV with one program per (batch,
    head, KV tile) looping over the query tiles that use it, so a KV tile every query uses (the
    first compressed keys, the first selected block) becomes S shorter loops in parallel, summed
    afterwards. Returns (out, lse or None)."""
    B, H, Lq, _ = q.shape
    S = effective_splits(tiles.q_splits, Lq, tiles.q_block)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    bm = fixed_layout(block_mask(S), backward=needs_backward)
    if S > 1:
        q = split_rows(q, S)
        if B > 1:   # FlexAttention's kernels broadcast a KV batch of 1 over the chunks only
            k, v = (t.expand(S, *t.shape).reshape(S * B, *t.shape[1:]) for t in (k, v))
    kwargs = dict(block_mask=bm, scale=scale, kernel_options=tiles.kernel_options())
    if not need_lse:
        out = _flex.flex_attention(q, k, v, **kwargs)
        return (merge_rows(out, S) if S > 1 else out), None
    out, aux = _flex.flex_attention(q, k, v, return_aux=_flex.AuxRequest(lse=True), **kwargs)
    return (merge_rows(out, S), merge_rows(aux.lse, S)) if S > 1 else (out, aux.lse)
