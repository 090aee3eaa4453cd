"""The NSA attention operator (NSA §3.3, eqs. 5–12), as docs/spec.md pins it.

    o_t = g_cmp·Attn(q_t, K̃cmp, Ṽcmp)      compressed branch   (eq. 7)
        + g_slc·Attn(q_t, K̃slc, Ṽslc)      selected branch     (eqs. 8–12)
        + g_swa·Attn(q_t, K̃win, Ṽwin)      sliding branch
                                            gated sum           (eq. 5)

Every branch is attention under a mask (masks/): compressed-block visibility, the selected blocks
of the query's KV-head group (rebuilt from the compressed scores on every call), and the sliding
window; with packed documents each also stays inside the query's document. Queries use the
packed-GQA layout (masks/packing.py). How each branch runs (FlexAttention compiled by Inductor,
or a dense masked softmax) is the KernelConfig's choice (kernels.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from masks import (causal_mask, compressed_block_ends, compressed_document_mask,
                   compressed_document_tiles, compressed_mask, compressed_tiles, document_starts,
                   document_tiles, heads_first, pack_gqa, selected_block_mask, selected_mask,
                   selection_table, sliding_window_mask, sliding_window_tiles, tile_keys,
                   tile_positions)

from . import patches
from .backends import (contiguous_copies, dense_in_chunks, flex_attend, split_mask_mod,
                       tiled_block_mask)
from .config import NSAConfig
from .gating import GatedSum
from .kernels import (MIN_FLEX_HEAD_DIM, FlexTiles, KernelConfig, check_head_dims,
                      choose_kernel)
from .selection import select_blocks

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Documents(NamedTuple):
    """Packed documents, from ``doc_ids`` [B, T] (masks/document.py)."""

    start: torch.Tensor        # [B, T] int32: each position's document start
    cmp_ends: torch.Tensor     # [B, T // d] int32: each compressed slot's last token, −1: none

    @staticmethod
    def of(doc_ids: torch.Tensor, cfg: NSAConfig) -> "Documents":
        # through one opaque copy: the mask_mods capture these, and FlexAttention's lowering
        # needs its captured buffers laid out (computed inside a checkpointed compiled model they
        # were not: "convert FlexibleLayout to FixedLayout first", H200, torch 2.11)
        start, ends = contiguous_copies([document_starts(doc_ids),
                                         compressed_block_ends(doc_ids, cfg.cmp_block, cfg.cmp_stride)])
        return Documents(start, ends)


def num_cmp_slots(cfg: NSAConfig, seq_len: int, documents: bool) -> int:
    """k_cmp's length: Tc complete blocks, or T // d slots with documents."""
    return seq_len // cfg.cmp_stride if documents else cfg.num_cmp_blocks(seq_len)


# -- the three branches ---------------------------------------------------------------------

def _attend(q, k, v, mask_mod, block_mask, scale, kernel: KernelConfig, tiles: FlexTiles | None,
            need_lse: bool):
    """One branch: FlexAttention over ``block_mask(S)`` (flex) or the dense masked softmax of
    ``mask_mod``. Returns (out, lse or None)."""
    if kernel.backend == "dense":
        out, lse = dense_in_chunks(q, k, v, mask_mod, scale, need_lse, kernel.dense_chunk_elems)
        return out, (lse if need_lse else None)
    return flex_attend(q, k, v, block_mask, scale, tiles, need_lse)


def _static_block_mask(tiles_of, mask_mod, B, Lq, Lk, tiles: FlexTiles, group: int, docs, device):
    """BlockMask builder of a branch whose mask depends on positions (and documents) only.
    ``tiles_of(q_lo, q_hi, k_lo, k_hi, q_start_lo, q_start_hi)`` classifies its tiles."""
    def build(S):
        q_lo, q_hi = tile_positions(Lq, tiles.q_block, group, device)
        k_lo, k_hi = tile_keys(Lk, tiles.kv_block, device)
        starts = (None, None) if docs is None else (docs.start[:, q_lo], docs.start[:, q_hi])
        any_, all_ = tiles_of(q_lo, q_hi, k_lo, k_hi, *starts)
        return tiled_block_mask(any_, all_, mask_mod, B, Lq, Lk, tiles.q_block, tiles.kv_block, S)
    return build


def compressed_branch(qp, k_cmp, v_cmp, cfg: NSAConfig, group: int, scale: float,
                      kernel: KernelConfig, docs: Documents | None = None):
    """Eq. 7: attention over the compressed keys whose block lies wholly in the past (and in the
    query's document). qp [B, Hkv, T·G, Dk]; k_cmp/v_cmp [B, Tc, Hkv, D]. Returns (o, lse);
    a query that sees no block gets o = 0, lse = −inf (pinned)."""
    B, H, TG, _ = qp.shape
    Tc, Dv = k_cmp.shape[1], v_cmp.shape[-1]
    if Tc == 0:
        return qp.new_zeros(B, H, TG, Dv), qp.new_full((B, H, TG), float("-inf"), dtype=torch.float32)
    l, d = cfg.cmp_block, cfg.cmp_stride
    if docs is None:
        mask_mod = compressed_mask(l, d, group)

        def tiles_of(q_lo, q_hi, k_lo, k_hi, *_):
            return compressed_tiles(l, d, q_lo, q_hi, k_lo, k_hi)
    else:
        mask_mod = compressed_document_mask(docs.cmp_ends, docs.start, group)

        def tiles_of(q_lo, q_hi, k_lo, k_hi, s_lo, s_hi):
            return compressed_document_tiles(docs.cmp_ends, q_lo, q_hi, s_lo, s_hi, kernel.cmp.kv_block)
    bm = _static_block_mask(tiles_of, mask_mod, B, TG, Tc, kernel.cmp, group, docs, qp.device)
    return _attend(qp, heads_first(k_cmp), heads_first(v_cmp), mask_mod, bm, scale, kernel,
                   kernel.cmp, need_lse=True)


def selected_mask_mod(idx, cfg: NSAConfig, group: int, kernel: KernelConfig, docs=None):
    """The selected branch's mask_mod. Causality alone where FlexAttention's lists name exactly
    the selected blocks' tiles for one position per query tile (blocks aligned to the KV tiles,
    no documents): no [B, Hkv, T, Ts] selection table is built. Else the table's mask."""
    tiles = kernel.slc
    if (kernel.backend == "flex" and docs is None and cfg.sel_block % tiles.kv_block == 0
            and group % tiles.q_block == 0):
        return causal_mask(group)
    table = selection_table(idx, cfg.num_sel_blocks(idx.shape[2]))
    if kernel.backend == "flex":   # a captured buffer with a fixed layout (see Documents.of)
        table = contiguous_copies([table])[0]
    return selected_mask(table, cfg.sel_block, group, None if docs is None else docs.start)


def selected_block_mask_of(idx, mask_mod, cfg: NSAConfig, group: int, tiles: FlexTiles, docs=None,
                           full_width: bool = False):
    """The selected branch's BlockMask builder (S query chunks -> BlockMask); idx [B, Hkv, T, n]."""
    B = idx.shape[0]

    def build(S):
        mm = mask_mod if S == 1 else split_mask_mod(mask_mod, S, idx.shape[2] * group // S, B)
        return selected_block_mask(idx, cfg.sel_block, group, tiles.q_block, tiles.kv_block, mm,
                                   None if docs is None else docs.start, full_width, S)
    return build


def selected_branch(qp, k, v, idx, cfg: NSAConfig, group: int, scale: float, kernel: KernelConfig,
                    docs: Documents | None = None):
    """Eqs. 11–12 applied: attention over the keys of each group's selected blocks (s ≤ t).
    idx [B, Hkv, T, n] from :func:`selection.select_blocks`. Returns o [B, Hkv, T·G, Dv]."""
    mask_mod = selected_mask_mod(idx, cfg, group, kernel, docs)
    bm = (selected_block_mask_of(idx, mask_mod, cfg, group, kernel.slc, docs,
                                 full_width=qp.device.type == "cpu")   # (CPU FlexAttention's need)
          if kernel.backend == "flex" else None)
    return _attend(qp, heads_first(k), heads_first(v), mask_mod, bm, scale, kernel, kernel.slc,
                   need_lse=False)[0]


def sliding_branch(qp, k, v, cfg: NSAConfig, group: int, scale: float, kernel: KernelConfig,
                   docs: Documents | None = None):
    """The sliding window: the w keys ending at the query (inside its document).
    Returns o [B, Hkv, T·G, Dv]."""
    B, _, TG, _ = qp.shape
    T, w = k.shape[1], cfg.window
    mask_mod = sliding_window_mask(w, group, None if docs is None else docs.start)

    def tiles_of(q_lo, q_hi, k_lo, k_hi, s_lo=None, s_hi=None):
        any_, all_ = sliding_window_tiles(w, q_lo, q_hi, k_lo, k_hi)
        if s_lo is None:
            return any_, all_
        doc_any, doc_all = document_tiles(s_lo, s_hi, k_lo, k_hi)
        return any_ & doc_any, all_ & doc_all

    bm = _static_block_mask(tiles_of, mask_mod, B, TG, T, kernel.swa, group, docs, qp.device)
    return _attend(qp, heads_first(k), heads_first(v), mask_mod, bm, scale, kernel, kernel.swa,
                   need_lse=False)[0]


# -- the operator ---------------------------------------------------------------------------

def _pad_head_dim(x, dim: int):
    """Zero-pad the last dim to ``dim`` (exact: zero columns add nothing to q·k, and give zero
    output columns, sliced off)."""
    return x if x is None or x.shape[-1] >= dim else F.pad(x, (0, dim - x.shape[-1]))


def _nsa(q, k, v, k_cmp, v_cmp, gates, cfg: NSAConfig, k_swa, v_swa, return_indices: bool,
         kernel: KernelConfig, doc_ids=None):
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    scale = cfg.softmax_scale(Dk)
    docs = None if doc_ids is None else Documents.of(doc_ids, cfg)
    if k_swa is None:
        k_swa, v_swa = k, v
    if kernel.backend == "flex":   # FlexAttention's kernels take head dims of at least 16
        dk, dv = max(Dk, MIN_FLEX_HEAD_DIM), max(Dv, MIN_FLEX_HEAD_DIM)
        q, k, k_cmp, k_swa = (_pad_head_dim(x, dk) for x in (q, k, k_cmp, k_swa))
        v, v_cmp, v_swa = (_pad_head_dim(x, dv) for x in (v, v_cmp, v_swa))
    qp = pack_gqa(q, Hkv)                                            # [B, Hkv, T·G, Dk]

    # The gated sum (eq. 5), in float32; each branch's term is added right after the branch.
    gated = GatedSum(gates, T, q.dtype, apart=(0,) if kernel.backend == "flex" else ())
    o_cmp, lse_cmp = compressed_branch(qp, k_cmp, v_cmp, cfg, G, scale, kernel, docs)   # eq. 7
    gated.add(o_cmp, 0)
    # Selection (eqs. 8–12): scores from p_cmp, top-n per KV-head group; no gradient.
    idx = select_blocks(qp.detach(), heads_first(k_cmp).detach(), lse_cmp.detach(), cfg, scale,
                        G, T, kernel, *(() if docs is None else docs))
    gated.add(selected_branch(qp, k, v, idx, cfg, G, scale, kernel, docs), 1)
    gated.add(sliding_branch(qp, k_swa, v_swa, cfg, G, scale, kernel, docs), 2)
    o = gated.result()[..., :Dv]
    return (o, idx.transpose(1, 2)) if return_indices else o


@functools.lru_cache(maxsize=None)
def compiled(cfg: NSAConfig, kernel: KernelConfig, return_indices: bool, documents: bool):
    """The operator under torch.compile (fullgraph, static shapes) for the flex backend."""
    patches.install()
    fn = functools.partial(_nsa, cfg=cfg, return_indices=return_indices, kernel=kernel)
    if not documents:
        fn = functools.partial(fn, doc_ids=None)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _check_inputs(q, k, v, k_cmp, v_cmp, gates, cfg, k_swa, v_swa, doc_ids):
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
    if B < 1 or T < 1 or Hq < 1 or Hkv < 1 or Dk < 1 or Dv < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "every dimension must be at least 1")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv} (GQA); "
                         f"use Hkv among the divisors of {Hq}")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor):
            raise TypeError(f"doc_ids must be a torch.Tensor or None, got {type(doc_ids).__name__}")
        if doc_ids.shape != (B, T) or doc_ids.is_floating_point() or doc_ids.is_complex() \
                or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor of shape {(B, T)} (a document number "
                             f"per position), got {doc_ids.dtype} {tuple(doc_ids.shape)}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids is on {doc_ids.device} but q is on {q.device}")
    Tc = num_cmp_slots(cfg, T, doc_ids is not None)
    expect = {"k": (B, T, Hkv, Dk), "v": (B, T, Hkv, Dv), "k_cmp": (B, Tc, Hkv, Dk),
              "v_cmp": (B, Tc, Hkv, Dv), "gates": (B, T, Hq, 3)}
    if k_swa is not None:
        expect.update(k_swa=(B, T, Hkv, Dk), v_swa=(B, T, Hkv, Dv))
    for name, shape in expect.items():
        if tuple(named[name].shape) != shape:
            hint = ""
            if name in ("k_cmp", "v_cmp") and named[name].shape[1] != Tc:
                hint = (f": with documents T={T}, d={cfg.cmp_stride} give T // d = {Tc} slots "
                        "(Compression(..., block_ends) lays them out)" if doc_ids is not None else
                        f": T={T} with l={cfg.cmp_block}, d={cfg.cmp_stride} has Tc = "
                        f"max(0, (T - l)//d + 1) = {Tc} complete compression blocks")
            raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {shape}{hint}")


def _check_kernel(kernel, q, cfg, Dk: int, Dv: int) -> KernelConfig:
    if kernel is None:
        kernel = choose_kernel(q.device, q.dtype, Dk, Dv, cfg)
    elif not isinstance(kernel, KernelConfig):
        raise TypeError(f"kernel must be a KernelConfig or None, got {type(kernel).__name__}")
    if kernel.backend == "flex":
        if q.device.type != "cuda":
            raise ValueError(f"kernel backend 'flex' runs on CUDA; q is on {q.device}: use "
                             "KernelConfig('dense') (or kernel=None) there")
        if q.dtype == torch.float64:
            raise ValueError("float64 runs on the dense backend only: pass "
                             "kernel=KernelConfig('dense') or use float32")
    check_head_dims(Dk, Dv, kernel)
    return kernel


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, config: NSAConfig, k_swa=None, v_swa=None,
                  return_indices: bool = False, doc_ids=None, kernel: KernelConfig | None = None):
    """NSA attention (docs/spec.md).

    q [B, T, Hq, Dk]; k [B, T, Hkv, Dk]; v [B, T, Hkv, Dv]  (selected branch, and sliding unless
    k_swa/v_swa are given); k_cmp [B, Tc, Hkv, Dk]; v_cmp [B, Tc, Hkv, Dv] (compressed branch,
    Tc = max(0, (T − l)//d + 1)); gates [B, T, Hq, 3] in [0, 1], order (cmp, slc, swa).
    ``doc_ids`` [B, T] integers: packed documents (a new one wherever the value changes), each
    computed as if alone; k_cmp/v_cmp then hold T // d slots laid out by position
    (``Compression(x, block_ends)``). ``kernel``: how to run (kernels.choose_kernel by default).
    Returns o [B, T, Hq, Dv]; with return_indices, (o, idx) with idx [B, T, Hkv, n] int32 the
    selected block numbers (of each position's document), −1 where unused.
    """
    _check_inputs(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, doc_ids)
    kernel = _check_kernel(kernel, q, config, q.shape[-1], v.shape[-1])
    if kernel.backend == "flex" and not torch.compiler.is_compiling():
        fn = compiled(config, kernel, return_indices, doc_ids is not None)
        args = (q, k, v, k_cmp, v_cmp, gates)
        return fn(*args, k_swa=k_swa, v_swa=v_swa, **({} if doc_ids is None else {"doc_ids": doc_ids}))
    return _nsa(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, return_indices, kernel, doc_ids)
