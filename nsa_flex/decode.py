"""NSA inference: a fixed-capacity KV cache, a prefill through the model's forward, and a decode
step of one token per sequence (docs/spec.md, NSA §3.3, eqs. 5–12).

Prefill runs the prompt through each block's ordinary forward (the same operator as training) and
keeps, per layer, what later tokens attend to. A step then runs one new token per sequence
through the blocks with the cache in place of the full sequence. The cache holds, per layer
(B sequences, Hkv KV heads, capacity C positions; D = Dk for keys, Dv for values):

    k, v          [B, Hkv, C, D]   selected branch: keys after RoPE, values, by position
    k_swa, v_swa  [B, Hkv, W, D]   sliding branch (kv_mode "separate" only; "shared" reads k, v):
                                   a ring of W = min(w, C) slots, position p in slot p mod W
    kc, vc        [B, Hkv, l, D]   compressed branch's inputs before RoPE (what φ reads): a ring of
                                   the last l positions, position p in slot p mod l
    k_cmp, v_cmp  [B, Hkv, Tc, D]  k̃_i, ṽ_i of the complete compression blocks, Tc = max(0,
                                   ⌊(C − l)/d⌋ + 1) slots; block i = φ(tokens [i·d, i·d + l))
    pos           [B]              each sequence's next position (its length so far)

Entries not written yet are 0, so a prefilled cache is exactly (up to float rounding of batched
matmuls) the state that stepping the prompt token by token from an empty cache leaves.

One step for the token at position t of each sequence (all sequences step together, each at
its own t; nothing depends on t through Python control flow, so the step has static shapes and
no host sync, and compiles with ``torch.compile(fullgraph=True)``):

1. Projections q, k, v (and k_cmp/v_cmp/k_swa/v_swa inputs in "separate"), RoPE at t on q, k
   and k_swa; the new entries are written at t (rings at t mod l, t mod W).
2. Compression (eq. 7): where t = i·d + l − 1 a block completes; k̃_i = φ(kc[t−l+1 … t]) with
   ``Compression._phi`` (the same MLP and position embedding as ``Compression.forward``) is
   written to slot i. With torch ops φ runs every step and ``torch.where`` keeps the slot
   unchanged elsewhere; the Triton kernel reads φ's weights only on the steps that complete a
   block.
3. Compressed branch (eq. 7): softmax(scale·q·k̃_i) over the visible blocks i·d + l − 1 ≤ t, per
   query head; a row with no visible block (t < l − 1) gets o_cmp = 0 (pinned).
4. Selection (eqs. 8–12): p_cmp summed over the G query heads of each KV head group (eq. 10),
   pooled onto selection blocks in the overlap form (eq. 9, ``selection.pool_to_selection_blocks``),
   top-n with the forced blocks (eqs. 11–12, ``selection.top_n``); one selection per group.
5. Selected branch: softmax over the keys s ≤ t of the selected blocks, gathered from k, v.
6. Sliding branch: softmax over the w keys t − w < s ≤ t.
7. Gated sum (eq. 5) o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa in float32, g = sigmoid(gate(x));
   then ``wo`` and the rest of llama3's block (residual, ffn_norm, feed_forward), norm, output.

Steps 2–7 run as torch ops (``kernel="torch"``, any device, written below as the equations read)
or as six Triton launches (``kernel="triton"``, nsa_flex/decode_kernel.py; the default on CUDA),
which read only the compressed keys, the n selected blocks and the window of each sequence.

Ragged batches: prompts of different lengths are right-padded to one length for the prefill (a
causal model's rows never see the padding) and every sequence then advances from its own length.
A request that would exceed the capacity (prompt + new tokens > C) is refused before any compute
(:meth:`NSADecoder.check_request`). The context is one document: a model trained with
``attn_mask_type="block_causal"`` decodes its prompt as a single document (no split at EOS).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from nsa_flex.compression import num_cmp_blocks
from nsa_flex.model.model import apply_rotary_emb
from nsa_flex.selection import pool_to_selection_blocks, top_n


KERNELS = ("torch", "triton")   # the attention over the cache: torch ops, or decode_kernel.py


def check_kernel(kernel: str, device) -> None:
    """Refuse a decode kernel that cannot run on ``device``, before any compute."""
    if kernel not in KERNELS:
        raise ValueError(f"decode kernel {kernel!r} is not one of {KERNELS}")
    if kernel == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"decode kernel 'triton' needs a CUDA device (the model is on {device}); "
                         f"use kernel='torch' (generate: --decode-kernel torch), or TRITON_INTERPRET=1 to "
                         f"run the Triton kernels on the CPU under Triton's interpreter (slow)")


class CacheCapacityError(ValueError):
    """A request that does not fit the cache or the model's RoPE table; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# the cache


class LayerCache(nn.Module):
    """One attention layer's part of :class:`NSACache` (buffers as in the module docstring)."""

    def __init__(self, batch: int, capacity: int, kv_heads: int, dk: int, dv: int, cfg,
                 separate: bool, device, dtype):
        super().__init__()
        l, d = cfg.cmp_block, cfg.cmp_stride
        self.capacity, self.window_slots = capacity, min(cfg.window, capacity)
        self.cmp_slots = num_cmp_blocks(capacity, l, d)
        self.separate = separate

        def buf(name, length, dim):
            self.register_buffer(name, torch.zeros(batch, kv_heads, length, dim, device=device,
                                                   dtype=dtype), persistent=False)

        buf("k", capacity, dk)
        buf("v", capacity, dv)
        buf("kc", l, dk)
        buf("vc", l, dv)
        buf("k_cmp", self.cmp_slots, dk)
        buf("v_cmp", self.cmp_slots, dv)
        if separate:
            buf("k_swa", self.window_slots, dk)
            buf("v_swa", self.window_slots, dv)


class NSACache(nn.Module):
    """The KV cache of an nsa model for ``batch`` sequences of at most ``capacity`` positions."""

    def __init__(self, model_args, batch: int, capacity: int, device=None, dtype=torch.float32):
        super().__init__()
        if batch < 1 or capacity < 1:
            raise CacheCapacityError(f"batch={batch}, capacity={capacity}: both must be at least 1")
        a = model_args
        self.cfg = a.nsa
        self.batch, self.capacity = batch, capacity
        self.kv_heads, self.n_heads = a.kv_heads, a.n_heads
        self.head_dim, self.v_head_dim = a.qk_head_dim, a.value_head_dim
        self.layers = nn.ModuleList(
            LayerCache(batch, capacity, a.kv_heads, a.qk_head_dim, a.value_head_dim, a.nsa,
                       a.kv_mode == "separate", device, dtype) for _ in range(a.n_layers))
        self.register_buffer("pos", torch.zeros(batch, dtype=torch.long, device=device),
                             persistent=False)

    @torch.no_grad()
    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()


# ---------------------------------------------------------------------------------------------
# attention over the cache


def _attend(q, k, v, mask, scale: float, dtype):
    """Masked softmax attention in float32, as the operator's dense path computes it.
    q [B, H, G, Dk]; k [B, H, S, Dk]; v [B, H, S, Dv]; mask broadcastable to [B, H, G, S].
    Returns (o [B, H, G, Dv] in ``dtype``, lse [B, H, G] float32, −inf where no key is seen)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    has = denom > 0
    o = torch.matmul(p, v.float()) / torch.where(has, denom, 1.0)
    lse = torch.where(has, m + torch.log(torch.where(has, denom, 1.0)), float("-inf"))
    return o.to(dtype), lse.squeeze(-1)


def _phi_params(phi) -> list[torch.Tensor]:
    return [phi.pos_emb, phi.fc1.weight, phi.fc1.bias, phi.fc2.weight, phi.fc2.bias]


def _attention_step(attn, lc: LayerCache, x, t, freqs_cis, return_indices: bool, kernel: str = "torch"):
    """One NSAAttention layer for one token per sequence. x [B, 1, dim] (after attention_norm),
    t [B] positions. Writes the new entries into ``lc``; returns (out [B, 1, Hq·Dv] before
    ``wo``, selected blocks [B, Hkv, n] or None). ``kernel``: steps 2–7 as torch ops ("torch")
    or in Triton (nsa_flex/decode_kernel.py, "triton")."""
    cfg = attn.nsa_config
    B = x.shape[0]
    Dk, Dv = attn.head_dim, attn.v_head_dim
    Hkv = lc.k.shape[1]
    G = attn.n_heads // Hkv
    l, d, lp = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    C, Tc, W = lc.capacity, lc.cmp_slots, lc.window_slots
    scale = cfg.softmax_scale(Dk)
    dev, dtype = x.device, x.dtype
    bi = torch.arange(B, device=dev)
    positions = t[:, None]                                       # [B, 1] for RoPE

    # 1. projections, RoPE at t, cache writes
    xq = attn.wq(x).view(B, 1, -1, Dk)
    xk = attn.wk(x).view(B, 1, -1, Dk)
    xv = attn.wv(x).view(B, 1, -1, Dv)
    if lc.separate:
        kc = attn.wk_cmp(x).view(B, -1, Dk)
        vc = attn.wv_cmp(x).view(B, -1, Dv)
        ks = attn.wk_swa(x).view(B, 1, -1, Dk)
        k_swa = apply_rotary_emb(ks, ks, freqs_cis, positions)[0]
        v_swa = attn.wv_swa(x).view(B, -1, Dv)
    else:
        kc, vc = xk[:, 0], xv[:, 0]                              # φ reads keys before RoPE
    gates = torch.sigmoid(attn.gate(x).view(B, attn.n_heads, 3)).float()
    q, k = apply_rotary_emb(xq, xk, freqs_cis, positions)
    lc.k[bi, :, t] = k[:, 0]
    lc.v[bi, :, t] = xv[:, 0]
    lc.kc[bi, :, t % l] = kc
    lc.vc[bi, :, t % l] = vc
    if lc.separate:
        lc.k_swa[bi, :, t % W] = k_swa[:, 0]
        lc.v_swa[bi, :, t % W] = v_swa
    qg = q[:, 0].view(B, Hkv, G, Dk)                             # head h = kv_head·G + g

    # 2. compression: the block ending at t, if one does
    if Tc > 0 and kernel == "triton":   # two launches that read φ's weights only when one does
        torch.ops.nsa_flex.decode_compress(t, lc.kc, lc.vc, _phi_params(attn.compress_k),
                                           _phi_params(attn.compress_v), lc.k_cmp, lc.v_cmp, l, d)
    elif Tc > 0:
        start = t - (l - 1)                                      # first token of the block ending at t
        ready = (start >= 0) & (start % d == 0)
        slot = (start.clamp(min=0) // d).clamp(max=Tc - 1)
        ring = (start[:, None] + torch.arange(l, device=dev)) % l  # [B, l] slots of t−l+1 … t
        for phi, ring_buf, out in ((attn.compress_k, lc.kc, lc.k_cmp), (attn.compress_v, lc.vc, lc.v_cmp)):
            block = ring_buf[bi[:, None], :, ring].transpose(1, 2)    # [B, Hkv, l, D]
            new = phi._phi(block)                                     # [B, Hkv, D]
            out[bi, :, slot] = torch.where(ready[:, None, None], new, out[bi, :, slot])
    k_win, v_win = (lc.k_swa, lc.v_swa) if lc.separate else (lc.k, lc.v)
    if kernel == "triton":   # 3.–7. in four launches (decode_kernel.py)
        o, idx = torch.ops.nsa_flex.decode_attention(
            qg, lc.k, lc.v, lc.k_cmp, lc.v_cmp, k_win, v_win, t, gates.view(B, Hkv, G, 3),
            l, d, lp, cfg.sel_topn, cfg.n_init, cfg.n_local, cfg.window, scale, lc.separate)
        return o.reshape(B, 1, -1), (idx if return_indices else None)

    # 3.–4. compressed branch, selection scores
    Ts = -(-C // lp)
    if Tc > 0:
        visible = torch.where(t >= l - 1, (t - (l - 1)).clamp(min=0) // d + 1, 0)   # blocks seen
        cmp_mask = (torch.arange(Tc, device=dev)[None, :] < visible[:, None])[:, None, None, :]
        # one score matmul for both: eq. 8's p = exp(scale·q·k̃ − lse) (as the operator's
        # selection computes it) is the compressed branch's softmax
        s = torch.matmul(qg.float(), lc.k_cmp.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~cmp_mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        denom = torch.exp(s - m).sum(-1, keepdim=True)
        lse = m + torch.log(torch.where(denom > 0, denom, 1.0))
        p_cmp = torch.where(cmp_mask, torch.exp(s - lse), 0.0)      # 0 for a row that sees none
        o_cmp = torch.matmul(p_cmp, lc.v_cmp.float()).to(dtype)
        p_slc = pool_to_selection_blocks(p_cmp.sum(2), cfg, Ts)      # eqs. 10, 9: [B, Hkv, Ts]
    else:   # the cache is shorter than one compression block: no block is ever seen
        o_cmp = qg.new_zeros(B, Hkv, G, Dv)
        p_slc = torch.zeros(B, Hkv, Ts, device=dev)
    idx = top_n(p_slc[:, :, None, :], t[:, None, None], cfg)[:, :, 0]   # eqs. 11–12: [B, Hkv, n]

    # 5. selected branch: keys s ≤ t of the selected blocks
    keys = (idx.long()[..., None] * lp + torch.arange(lp, device=dev)).flatten(2)   # [B, Hkv, n·l']
    sel_mask = (idx[..., None] >= 0).expand(-1, -1, -1, lp).flatten(2) & (keys <= t[:, None, None])
    hi = torch.arange(Hkv, device=dev)
    keys = keys.clamp(0, C - 1)
    k_sel = lc.k[bi[:, None, None], hi[None, :, None], keys]
    v_sel = lc.v[bi[:, None, None], hi[None, :, None], keys]
    o_slc, _ = _attend(qg, k_sel, v_sel, sel_mask[:, :, None, :], scale, dtype)

    # 6. sliding branch: t − w < s ≤ t
    r = torch.arange(W, device=dev)
    if lc.separate:   # slot r of the ring holds position t − ((t − r) mod W)
        held = t[:, None] - (t[:, None] - r) % W
    else:
        held = t[:, None] - (W - 1) + r
        k_win = lc.k[bi[:, None], :, held.clamp(min=0)].transpose(1, 2)
        v_win = lc.v[bi[:, None], :, held.clamp(min=0)].transpose(1, 2)
    o_swa, _ = _attend(qg, k_win, v_win, (held >= 0)[:, None, None, :], scale, dtype)

    # 7. gated sum (eq. 5) in float32, in the operator's order
    g = gates.view(B, Hkv, G, 3, 1)
    o = g[:, :, :, 0] * o_cmp.float() + g[:, :, :, 1] * o_slc.float() + g[:, :, :, 2] * o_swa.float()
    return o.to(dtype).reshape(B, 1, -1), (idx if return_indices else None)


@torch.no_grad()
def decode_step(model, cache: NSACache, tokens: torch.Tensor, return_indices: bool = False,
                kernel: str = "torch"):
    """One token per sequence at positions ``cache.pos``: tokens [B] -> logits [B, vocab]
    (float32); ``cache.pos`` advances by one. With ``return_indices`` also the selected blocks
    of every layer, a list of [B, Hkv, n] int32 (−1 unused). No host sync, static shapes.
    ``kernel``: "torch" or "triton" (:data:`KERNELS`)."""
    t = cache.pos
    h = model.tok_embeddings(tokens[:, None])
    selections = []
    for block, lc in zip(model.layers.values(), cache.layers):
        attn = block.attention
        out, idx = _attention_step(attn, lc, block.attention_norm(h), t, model.freqs_cis,
                                   return_indices, kernel)
        h = h + attn.wo(out)
        h = h + block.feed_forward(block.ffn_norm(h))
        selections.append(idx)
    logits = model.output(model.norm(h))[:, 0].float()
    cache.pos.add_(1)
    return (logits, selections) if return_indices else logits


# ---------------------------------------------------------------------------------------------
# prefill


def _capture(attn, store: dict):
    """Forward hooks that keep what one attention layer computes for the cache."""
    names = ["wk", "wv", "compress_k", "compress_v"]
    if attn.kv_mode == "separate":
        names += ["wk_cmp", "wv_cmp", "wk_swa", "wv_swa"]

    def hook_for(name):
        def hook(module, args, output):
            store[name] = output
        return hook
    return [getattr(attn, n).register_forward_hook(hook_for(n)) for n in names]


def _ring_positions(lengths, slots: int):
    """[B, slots]: the position each ring slot holds after ``lengths`` tokens (−1: none)."""
    r = torch.arange(slots, device=lengths.device)
    last = lengths[:, None] - 1
    return last - (last - r) % slots


def _fill_layer(lc: LayerCache, cap: dict, lengths, freqs_cis, attn) -> None:
    """Write one layer's prefill tensors (``cap``: the hooked outputs) into the cache."""
    cfg = attn.nsa_config
    B, P = cap["wk"].shape[:2]
    Dk, Dv = attn.head_dim, attn.v_head_dim
    dev = lengths.device
    bi = torch.arange(B, device=dev)[:, None]
    valid = (torch.arange(P, device=dev)[None, :] < lengths[:, None])[:, :, None, None]   # [B, P, 1, 1]

    def keep(x):   # positions past a sequence's length are padding: 0, as never written
        return torch.where(valid, x, 0).transpose(1, 2)

    xk = cap["wk"].view(B, P, -1, Dk)
    k = apply_rotary_emb(xk, xk, freqs_cis)[0]
    xv = cap["wv"].view(B, P, -1, Dv)
    lc.k[:, :, :P] = keep(k)
    lc.v[:, :, :P] = keep(xv)
    if lc.separate:
        kc, vc = cap["wk_cmp"].view(B, P, -1, Dk), cap["wv_cmp"].view(B, P, -1, Dv)
        ks = cap["wk_swa"].view(B, P, -1, Dk)
        k_swa = apply_rotary_emb(ks, ks, freqs_cis)[0]
        v_swa = cap["wv_swa"].view(B, P, -1, Dv)
        held = _ring_positions(lengths, lc.window_slots)
        ok = (held >= 0)[:, :, None, None]
        lc.k_swa.copy_(torch.where(ok, k_swa[bi, held.clamp(min=0)], 0).transpose(1, 2))
        lc.v_swa.copy_(torch.where(ok, v_swa[bi, held.clamp(min=0)], 0).transpose(1, 2))
    else:
        kc, vc = xk, xv
    held = _ring_positions(lengths, cfg.cmp_block)
    ok = (held >= 0)[:, :, None, None]
    lc.kc.copy_(torch.where(ok, kc[bi, held.clamp(min=0)], 0).transpose(1, 2))
    lc.vc.copy_(torch.where(ok, vc[bi, held.clamp(min=0)], 0).transpose(1, 2))
    tc = cap["compress_k"].shape[1]
    if tc:   # block i exists for a sequence once i·d + l ≤ its length
        i = torch.arange(tc, device=dev)
        done = ((i * cfg.cmp_stride + cfg.cmp_block)[None, :] <= lengths[:, None])[:, :, None, None]
        lc.k_cmp[:, :, :tc] = torch.where(done, cap["compress_k"], 0).transpose(1, 2)
        lc.v_cmp[:, :, :tc] = torch.where(done, cap["compress_v"], 0).transpose(1, 2)


@torch.no_grad()
def prefill(model, cache: NSACache, tokens: torch.Tensor, lengths) -> torch.Tensor:
    """Run prompts through the model's blocks (their ordinary forward, the training operator)
    and fill the cache. tokens [B, P] right-padded (the padding's value does not matter);
    ``lengths`` [B] (list or tensor) each prompt's length, 1 ≤ length ≤ P. Returns the logits of
    each prompt's last token [B, vocab] (float32); ``cache.pos`` becomes ``lengths``."""
    if tokens.dim() != 2 or tokens.shape[0] != cache.batch:
        raise CacheCapacityError(f"tokens has shape {tuple(tokens.shape)}; expected [{cache.batch}, P] "
                                 f"(the cache was built for batch {cache.batch})")
    B, P = tokens.shape
    lens = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(lens) != B:
        raise CacheCapacityError(f"{len(lens)} lengths for a batch of {B} prompts")
    bad = [n for n in lens if not 1 <= n <= P]
    if bad:
        raise CacheCapacityError(f"prompt lengths {bad} must lie in [1, {P}] (tokens has {P} columns); "
                                 f"every prompt needs at least one token")
    if P > cache.capacity:
        raise CacheCapacityError(f"prompts padded to {P} tokens exceed the cache capacity "
                                 f"{cache.capacity}; build the cache with capacity >= {P}")
    lengths = torch.tensor(lens, device=tokens.device)
    cache.reset()
    h = model.tok_embeddings(tokens)
    for block, lc in zip(model.layers.values(), cache.layers):
        store: dict = {}
        hooks = _capture(block.attention, store)
        try:
            h = block(h, model.freqs_cis, attention_masks=None, positions=None)
        finally:
            for hk in hooks:
                hk.remove()
        _fill_layer(lc, store, lengths, model.freqs_cis, block.attention)
    last = h[torch.arange(B, device=h.device), lengths - 1]
    cache.pos.copy_(lengths)
    return model.output(model.norm(last)).float()


# ---------------------------------------------------------------------------------------------
# the decoder


class NSADecoder:
    """Prefill and decode steps for ``model`` (an NSATransformer in eval mode) over a cache of
    ``batch`` sequences and ``capacity`` positions. ``compile``: the step under
    ``torch.compile(fullgraph=True, dynamic=False)`` (``mode`` e.g. "reduce-overhead" for CUDA
    graphs; the cache's buffers are marked static so that they keep their addresses).
    ``kernel``: the attention over the cache, "triton" (decode_kernel.py; the default on CUDA)
    or "torch" (the default elsewhere)."""

    def __init__(self, model, batch: int, capacity: int, compile: bool = False, mode: str | None = None,
                 kernel: str | None = None):
        rope = model.freqs_cis.shape[0]
        if capacity > rope:
            raise CacheCapacityError(
                f"cache capacity {capacity} exceeds the model's RoPE table of {rope} positions; "
                f"build the model with max_seq_len >= {capacity} (the table is not a weight: "
                f"model_args(..., seq_len={capacity}) or replace(args, max_seq_len={capacity}))")
        p = next(model.parameters())
        kernel = kernel or ("triton" if p.is_cuda else "torch")
        check_kernel(kernel, p.device)
        if kernel == "triton":
            from . import decode_kernel  # noqa: F401  (registers torch.ops.nsa_flex.decode_attention)
        self.model, self.kernel = model, kernel
        self.cache = NSACache(model.model_args, batch, capacity, p.device, p.dtype)
        self._step = functools.partial(decode_step, model, self.cache, kernel=kernel)
        if compile:
            for b in self.cache.buffers():
                torch._dynamo.mark_static_address(b)
            self._step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def check_request(self, lengths, max_new_tokens: int) -> None:
        """Refuse, before any compute, prompts + new tokens that do not fit the cache."""
        lens = [int(x) for x in lengths]
        if len(lens) != self.cache.batch:
            raise CacheCapacityError(f"{len(lens)} prompts for a decoder built for batch {self.cache.batch}")
        if max_new_tokens < 1:
            raise CacheCapacityError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        need = max(lens) + max_new_tokens
        if need > self.capacity:
            raise CacheCapacityError(
                f"the longest prompt ({max(lens)} tokens) + {max_new_tokens} new tokens = {need} "
                f"positions exceed the cache capacity of {self.capacity}; raise the capacity to "
                f">= {need} (generate: --max-seq-len {need}) or shorten the prompt / "
                f"--max-new-tokens to at most {max(0, self.capacity - max(lens))}")

    def prefill(self, tokens: torch.Tensor, lengths) -> torch.Tensor:
        return prefill(self.model, self.cache, tokens, lengths)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] at positions ``cache.pos`` -> logits [B, vocab]."""
        return self._step(tokens)
