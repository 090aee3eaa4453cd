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

from . import tuning

# return_aux (torch >= 2.11) replaces the deprecated return_lse, whose warning guard would
# otherwise cost a recompile.
_HAS_AUX = hasattr(_flex, "AuxRequest")


_FLASH_LSE_SCALE: dict[torch.device, float] = {}


def _indexed(device) -> torch.device:
    """"cuda" and "cuda:0" as one key (the current device's index where none is given)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def measure_flash_lse_scale(device) -> float:
    """What FlexAttention's FLASH backend returns as LSE, as a multiple of the natural-log LSE
    (measured once per device, before any compile that uses it; see flash_lse_scale).

    FlexAttention's top level multiplies its kernels' LSE by ln 2 (its Triton kernels work in
    base 2); the FLASH lowering (torch 2.11, flash-attn-4 4.0.0b36) hands over flash-attn-4's
    natural-log LSE unchanged, so the result comes out ln 2 times too small (measured on an H100:
    a relative difference of 1 − ln 2 from the Triton backend's). A call on 128 equal keys, whose
    LSE is log 128 in every row, says which applies; any other factor is refused."""
    import math
    device = _indexed(device)
    if device not in _FLASH_LSE_SCALE:
        x = torch.zeros(1, 1, 128, 64, device=device, dtype=torch.bfloat16)
        fn = torch.compile(lambda q: _flex.flex_attention(
            q, q, q, kernel_options={"BACKEND": "FLASH"}, return_aux=_flex.AuxRequest(lse=True)))
        got = fn(x)[1].lse.float().mean().item() / math.log(128)
        factor = next((f for f in (1.0, math.log(2)) if abs(got - f) < 1e-3), None)
        if factor is None:
            raise RuntimeError(f"FlexAttention's FLASH backend returned an LSE {got:.4f} times the "
                               "true one (expected 1 or ln 2); this torch / flash-attn-4 pair is "
                               "not supported: set tuning.FLASH off")
        _FLASH_LSE_SCALE[device] = factor
    return _FLASH_LSE_SCALE[device]


def flash_lse_scale(device) -> float:
    """measure_flash_lse_scale's factor for a call being traced: it must have run before."""
    device = _indexed(device)
    if device not in _FLASH_LSE_SCALE:
        if torch.compiler.is_compiling():
            raise RuntimeError("call nsa_flex.backends.measure_flash_lse_scale(device) before "
                               "compiling a branch under tuning.FLASH that returns its LSE")
        return measure_flash_lse_scale(device)
    return _FLASH_LSE_SCALE[device]


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


def merge_by_lse(o1, lse1, o2, lse2):
    """Attention over the union of two disjoint key sets, from each set's output and LSE:
    o = Σ_i exp(lse_i − lse)·o_i with lse = log(exp(lse1) + exp(lse2)). lse1 must be finite (a
    set every query sees); o2 may come from an empty set (lse2 = −inf). Float32 result."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - lse)[..., None], torch.exp(lse2 - lse)[..., None]
    return w1 * o1.float() + w2 * o2.float(), lse


def _masked_sdpa(q, k, v, mask: torch.Tensor, scale: float):
    """Inference only: SDPA with the boolean mask (no float32 score matrix; rows that see no key
    give 0, as in dense_attention). Returns (out, None)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0).to(q.dtype), None


def dense_in_chunks(q, k, v, mask_mod, scale: float, need_lse: bool = True):
    """The dense path over consecutive chunks of query rows, each with its slice of the mask, so
    that at most tuning.DENSE_CHUNK_ELEMS score elements exist at once (one chunk when they fit).
    Without autograd and LSE (the visualiser's forward) each chunk runs through SDPA."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    attend_chunk = dense_attention if need_lse or torch.is_grad_enabled() else _masked_sdpa
    rows = max(1, min(Lq, tuning.DENSE_CHUNK_ELEMS // max(1, B * H * Lk)))
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


def tiled_block_mask(tiles, mask_mod, B, H, Lq, Lk, q_block, kv_block, S):
    """The branch's BlockMask from its tile classification, for S query chunks (S = 1: whole).

    Tiles without a head dimension (a mask of positions, [Mq, Nkv]) give a BlockMask of one
    head, which FlexAttention broadcasts over the H heads: at 64k the sliding branch's four
    lists take 64 MiB instead of 256 with Hkv = 4."""
    any_, all_ = tiles(q_block, kv_block)
    heads = H if any_.dim() > 2 else 1
    if S > 1:
        Mq, Nkv = any_.shape[-2:]
        any_, all_ = (split_rows(t.expand(B, heads, Mq, Nkv), S) for t in (any_, all_))
        mask_mod = split_mask_mod(mask_mod, S, Lq // S, B)
    return block_mask_from_tiles(any_, all_, mask_mod, Lq // S, Lk, q_block, kv_block, B * S, heads)


def attend(q, k, v, mask_mod, tiles, scale: float, *, use_flex: bool, q_block: int,
           kv_block: int, kernel_options=None, need_lse: bool = False, q_splits: int = 1,
           block_mask=None):
    """One branch. ``tiles(q_block, kv_block)`` gives the (any, all) tile classification;
    ``block_mask(q_splits=S)`` (flex), where given, builds the BlockMask instead, for S chunks.

    ``q_splits`` (flex only) runs consecutive chunks of query rows as separate batch entries
    over the same k/v (broadcast where B = 1, copied per chunk otherwise): FlexAttention's backward
    computes dK/dV with one program per (batch, head, KV tile) looping over the query tiles that
    use it, so a KV tile used by every query (the first compressed keys, the forced initial
    block) becomes S shorter loops in parallel, summed afterwards. Results are the same up to
    rounding.

    Returns (out, lse); lse is None unless ``need_lse`` (compiled CPU flex cannot return it)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if not use_flex:
        out, lse = dense_in_chunks(q, k, v, mask_mod, scale, need_lse)
        return out, (lse if need_lse else None)
    S = effective_splits(q_splits, Lq, q_block)
    flash = (kernel_options or {}).get("BACKEND") == "FLASH"
    if block_mask is not None:
        bm = block_mask(q_splits=S)
    else:
        bm = tiled_block_mask(tiles, mask_mod, B, H, Lq, Lk, q_block, kv_block, S)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    bm = fixed_layout(bm, backward=needs_backward)
    if S > 1:
        q = split_rows(q, S, view=bool(tuning.SPLIT_VIEWS))
        # FlexAttention's Triton kernels broadcast a KV batch of 1 over the chunks (not one of
        # B > 1); its FLASH backend (flash-attn-4) broadcasts none
        if B > 1 or flash:
            k, v = (t.expand(S, *t.shape).reshape(S * B, *t.shape[1:]) for t in (k, v))
    if not need_lse:
        out = _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options)
        return (merge_rows(out, S) if S > 1 else out), None
    if _HAS_AUX:
        out, aux = _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options,
                                        return_aux=_flex.AuxRequest(lse=True))
        lse = aux.lse
        if flash:
            scale_lse = flash_lse_scale(q.device)
            lse = lse if scale_lse == 1.0 else lse * (1.0 / scale_lse)
    else:
        out, lse = _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True,
                                        kernel_options=kernel_options)
    return (merge_rows(out, S), merge_rows(lse, S)) if S > 1 else (out, lse)
