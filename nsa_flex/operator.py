"""The NSA attention operator (NSA §3.3, eqs. 5–12), as pinned by NSA_SPEC.md.

    o_t = g_cmp·Attn(q_t, K̃cmp, Ṽcmp)      compressed branch   (eq. 7)
        + g_slc·Attn(q_t, K̃slc, Ṽslc)      selected branch     (eqs. 8–12)
        + g_swa·Attn(q_t, K̃win, Ṽwin)      sliding branch
                                            gated sum           (eq. 5)

Every branch is attention under a mask (masks/): compressed-block visibility, the selected
blocks of the query's KV-head group (rebuilt from the compressed scores on every call), and the
sliding window. Queries use the packed-GQA layout (masks/packing.py). On CUDA the whole function
runs under torch.compile and each branch is a FlexAttention kernel; on CPU each branch is a dense
masked softmax built from the same mask_mods (flex_attention has no CPU backward).
"""

from __future__ import annotations

import functools

import torch

from masks import (compressed_mask, compressed_tiles, heads_first, pack_gqa, selected_mask,
                   selected_tiles, selection_table, sliding_window_mask, sliding_window_tiles,
                   tile_keys, tile_positions, unpack_gqa)

from . import tuning
from .backends import attend
from .config import NSAConfig
from .selection import select_blocks

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inputs(q, k, v, k_cmp, v_cmp, gates, cfg, k_swa, v_swa):
    """Refuse bad input before any compute, naming the value and the fix (static checks only)."""
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(cfg).__name__}")
    named = {"q": q, "k": k, "v": v, "k_cmp": k_cmp, "v_cmp": v_cmp, "gates": gates}
    if (k_swa is None) != (v_swa is None):
        raise ValueError("pass both k_swa and v_swa (separate sliding-branch keys/values) or neither")
    if k_swa is not None:
        named.update(k_swa=k_swa, v_swa=v_swa)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(t.shape)}; "
                             "see the layouts in nsa_attention's docstring")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; use float32 or bfloat16 (float16, float64 also work)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    for name in ("k", "v", "k_cmp", "v_cmp", "k_swa", "v_swa"):
        if name in named and named[name].dtype != q.dtype:
            raise TypeError(f"{name} has dtype {named[name].dtype} but q has {q.dtype}; cast them to one dtype")
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if T < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv} (GQA); "
                         f"use Hkv among the divisors of {Hq}")
    Tc = cfg.num_cmp_blocks(T)
    expect = {"k": (B, T, Hkv, Dk), "v": (B, T, Hkv, Dv), "k_cmp": (B, Tc, Hkv, Dk),
              "v_cmp": (B, Tc, Hkv, Dv), "gates": (B, T, Hq, 3)}
    if k_swa is not None:
        expect.update(k_swa=(B, T, Hkv, Dk), v_swa=(B, T, Hkv, Dv))
    for name, shape in expect.items():
        if tuple(named[name].shape) != shape:
            hint = ""
            if name in ("k_cmp", "v_cmp") and named[name].shape[1] != Tc:
                hint = (f": T={T} with l={cfg.cmp_block}, d={cfg.cmp_stride} has Tc = "
                        f"max(0, (T - l)//d + 1) = {Tc} complete compression blocks")
            raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {shape}{hint}")


def _sel_kv_block(cfg: NSAConfig) -> int:
    if tuning.SEL_KV_BLOCK is not None:
        return tuning.SEL_KV_BLOCK
    lp = cfg.sel_block
    return min(128, max(16, lp & -lp))  # the largest power of two dividing l', within [16, 128]


def _nsa(q, k, v, k_cmp, v_cmp, gates, cfg: NSAConfig, k_swa, v_swa, return_indices: bool,
         use_flex: bool):
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G, Tc, Ts = Hq // Hkv, k_cmp.shape[1], cfg.num_sel_blocks(T)
    scale = cfg.softmax_scale(Dk)
    run = functools.partial(attend, scale=scale, use_flex=use_flex, q_block=tuning.Q_BLOCK)
    qp = pack_gqa(q, Hkv)                                            # [B, Hkv, T·G, Dk]
    dev = q.device

    def static_tiles(fn):
        def tiles(qb, kb, kv_len):
            q_lo, q_hi = tile_positions(T * G, qb, G, dev)
            k_lo, k_hi = tile_keys(kv_len, kb, dev)
            return fn(q_lo, q_hi, k_lo, k_hi)
        return tiles

    # Compressed branch (eq. 7): attention over the Tc compressed keys visible to each query.
    if Tc > 0:
        tiles = static_tiles(functools.partial(compressed_tiles, cfg.cmp_block, cfg.cmp_stride))
        o_cmp, lse_cmp = run(qp, heads_first(k_cmp), heads_first(v_cmp),
                             compressed_mask(cfg.cmp_block, cfg.cmp_stride, G),
                             lambda qb, kb: tiles(qb, kb, Tc), kv_block=tuning.KV_BLOCK,
                             kernel_options=tuning.KERNEL_OPTIONS["cmp"])
    else:   # no complete block yet: o_cmp = 0 (pinned)
        o_cmp = qp.new_zeros(B, Hkv, T * G, Dv)
        lse_cmp = qp.new_full((B, Hkv, T * G), float("-inf"), dtype=torch.float32)

    # Selection (eqs. 8–12): scores from p_cmp, top-n per KV-head group; no gradient.
    idx = select_blocks(qp.detach(), heads_first(k_cmp).detach(), lse_cmp.detach(), cfg, scale, G, T)
    table = selection_table(idx, Ts)                                 # [B, Hkv, T, Ts]
    kb_sel = _sel_kv_block(cfg)
    o_slc, _ = run(qp, heads_first(k), heads_first(v), selected_mask(table, cfg.sel_block, G),
                   lambda qb, kb: selected_tiles(table, cfg.sel_block, G, qb, kb),
                   kv_block=kb_sel, kernel_options=tuning.KERNEL_OPTIONS["slc"])

    # Sliding branch: the w keys ending at the query, with the branch's own keys/values.
    k_w, v_w = (k, v) if k_swa is None else (k_swa, v_swa)
    tiles = static_tiles(functools.partial(sliding_window_tiles, cfg.window))
    o_swa, _ = run(qp, heads_first(k_w), heads_first(v_w), sliding_window_mask(cfg.window, G),
                   lambda qb, kb: tiles(qb, kb, T), kv_block=tuning.KV_BLOCK,
                   kernel_options=tuning.KERNEL_OPTIONS["swa"])

    # Gated sum (eq. 5), in float32.
    g = gates.float()
    o = (g[..., 0:1] * unpack_gqa(o_cmp, T).float() + g[..., 1:2] * unpack_gqa(o_slc, T).float()
         + g[..., 2:3] * unpack_gqa(o_swa, T).float()).to(q.dtype)
    if return_indices:
        return o, idx.transpose(1, 2)
    return o


@functools.lru_cache(maxsize=None)
def _compiled(cfg: NSAConfig, return_indices: bool):
    fn = functools.partial(_nsa, cfg=cfg, return_indices=return_indices, use_flex=True)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, config: NSAConfig, k_swa=None, v_swa=None,
                  return_indices: bool = False):
    """NSA attention.

    q [B, T, Hq, Dk]; k [B, T, Hkv, Dk]; v [B, T, Hkv, Dv]  (selected branch, and sliding unless
    k_swa/v_swa are given); k_cmp [B, Tc, Hkv, Dk]; v_cmp [B, Tc, Hkv, Dv] (compressed branch,
    Tc = max(0, (T − l)//d + 1)); gates [B, T, Hq, 3] in [0, 1], order (cmp, slc, swa).
    Returns o [B, T, Hq, Dv]; with return_indices, (o, idx) with idx [B, T, Hkv, n] int32 the
    selected block numbers, −1 where unused.
    """
    _check_inputs(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa)
    use_flex = q.device.type == "cuda"
    if use_flex and not torch.compiler.is_compiling():
        return _compiled(config, return_indices)(q, k, v, k_cmp, v_cmp, gates, k_swa=k_swa, v_swa=v_swa)
    return _nsa(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, return_indices, use_flex)
