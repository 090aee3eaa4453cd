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

import contextlib
import functools
import warnings

import torch

from masks import (causal_mask, compressed_mask, compressed_tiles, forced_blocks_mask,
                   forced_blocks_tiles, heads_first, pack_gqa, selected_block_mask, selected_mask,
                   selected_tiles, selection_table, sliding_window_mask, sliding_window_tiles,
                   tile_keys, tile_positions, without_forced)

from . import tuning
from .backends import (attend, measure_flash_lse_scale, merge_by_lse, split_mask_mod,
                       tiled_block_mask)
from .config import NSAConfig
from .gating import GatedSum
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
    """The selected branch's KV tile: tuning.SEL_KV_BLOCK, else the largest of 128, 64, 32, 16
    dividing l' (16 if none does). Plain arithmetic: under automatic dynamic shapes l' may be a
    SymInt, and a bitwise trick on it lowers to a float index in Inductor."""
    if tuning.SEL_KV_BLOCK is not None:
        return tuning.SEL_KV_BLOCK
    return next((kb for kb in (128, 64, 32, 16) if cfg.sel_block % kb == 0), 16)


def _swa_kv_block() -> int:
    """The sliding branch's KV tile: tuning.SWA_KV_BLOCK, else tuning.KV_BLOCK."""
    kb = tuning.SWA_KV_BLOCK
    if kb is None:
        return tuning.KV_BLOCK
    if kb not in (16, 32, 64, 128):
        raise ValueError(f"tuning.SWA_KV_BLOCK={kb!r}: the sliding branch's KV tile must be one of "
                         f"16, 32, 64, 128 (or None for KV_BLOCK = {tuning.KV_BLOCK})")
    return kb


def _narrow_lists(cfg: NSAConfig, kv_block: int) -> bool:
    return bool(tuning.SEL_NARROW_LISTS) and cfg.sel_block % kv_block == 0


def refuse_unchecked_knobs(qk_dim: int | None = None, v_dim: int | None = None) -> None:
    """Stop before compute on knob settings that cannot run here (tuning.flash_problem for these
    head dims; its package lookup not while tracing, prepare_flash runs it before) or whose GPU
    gradient check failed (see tuning); called where the FlexAttention path runs on CUDA."""
    why = tuning.flash_problem(qk_dim, v_dim, package=not torch.compiler.is_compiling())
    if why:
        raise ValueError(why)
    if tuning.SEL_NARROW_Q_LISTS:
        raise ValueError("tuning.SEL_NARROW_Q_LISTS=1 gives wrong dK/dV on CUDA (failed the GPU "
                         "gradient check, see nsa_flex/tuning.py); set it to 0")


@functools.lru_cache(maxsize=None)
def _warn_flash_off(why: str) -> None:
    warnings.warn(f"the compressed branch runs on FlexAttention's Triton backend: {why}. With its "
                  "FLASH backend (pip install -e .[flash], on an sm90-sm110 card) the branch took 33 "
                  "instead of 47 ms fwd+bwd at 64k on an H100; set tuning.FLASH['cmp'] = 0 to "
                  "silence", stacklevel=3)


def prepare_flash(device, qk_dim: int | None = None, v_dim: int | None = None) -> None:
    """Before compiling for ``device`` (and head dims, where known): refuse FLASH settings that
    cannot run, say once where tuning.FLASH's automatic choice (None) falls back to Triton, and
    measure the FLASH backend's LSE scale where a branch that returns its LSE uses it
    (backends.measure_flash_lse_scale)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    refuse_unchecked_knobs(qk_dim, v_dim)   # (flash_on, there, finds tuning.flash_available
    if tuning.FLASH.get("cmp", 0) is None:  #  outside any trace)
        if not tuning.flash_available():
            _warn_flash_off("flash-attn-4 is not installed"
                            if torch.cuda.get_device_capability(device)[0] in (9, 10, 11)
                            else "this card's compute capability is outside 9.x-11.x")
        elif qk_dim is not None and not tuning.flash_fits(qk_dim, v_dim):
            _warn_flash_off(f"the head dims Dk={qk_dim}, Dv={v_dim or qk_dim} are above "
                            f"tuning.FLASH_MAX_HEAD_DIM={tuning.FLASH_MAX_HEAD_DIM}")
    if tuning.flash_on("cmp") or tuning.flash_on("forced"):
        measure_flash_lse_scale(device)


def selected_branch_block_mask(idx, table, mask_mod, cfg: NSAConfig, group: int, full_width: bool,
                               q_splits: int = 1):
    """The selected branch's BlockMask as its FlexAttention call builds it: narrow lists with
    tuning.SEL_NARROW_LISTS, else from the tile classification; for ``q_splits`` chunks of query
    tiles as batch entries (backends.attend's layout), the same tiles regrouped. idx [B, Hkv, T, n],
    table its selection_table, mask_mod the unsplit one. The visualiser reads the unsplit mask."""
    B, H, T = idx.shape[:3]
    kb, qb = _sel_kv_block(cfg), tuning.sel_q_block()
    if not _narrow_lists(cfg, kb):
        return tiled_block_mask(lambda qb_, kb_: selected_tiles(table, cfg.sel_block, group, qb_, kb_),
                                mask_mod, B, H, T * group, T, qb, kb, q_splits)
    if q_splits > 1:
        mask_mod = split_mask_mod(mask_mod, q_splits, T * group // q_splits, B)
    return selected_block_mask(idx, cfg.sel_block, group, qb, kb, mask_mod, full_width=full_width,
                               narrow_q=bool(tuning.SEL_NARROW_Q_LISTS), q_splits=q_splits,
                               full_tiles=bool(tuning.SEL_FULL_TILES))


def selected_mask_mod(idx, cfg: NSAConfig, group: int, use_flex: bool):
    """(selection table or None, mask_mod) of the selected branch. Causality alone
    (tuning.SEL_CAUSAL_ONLY) for FlexAttention over narrow lists — which list exactly the selected
    blocks' tiles — with one position per query tile: every key of a listed tile then lies in a
    block its position selected, and no [B, Hkv, T, Ts] table is built. Else the table's mask."""
    if (use_flex and tuning.SEL_CAUSAL_ONLY and group % tuning.sel_q_block() == 0
            and _narrow_lists(cfg, _sel_kv_block(cfg))):
        return None, causal_mask(group)
    table = selection_table(idx, cfg.num_sel_blocks(idx.shape[2]))
    return table, selected_mask(table, cfg.sel_block, group)


def _static_tiles(fn, q_rows: int, group: int, kv_len: int, device):
    """Tile classifier (q_block, kv_block) -> (any, all) for a mask known from positions alone."""
    def tiles(q_block, kv_block):
        q_lo, q_hi = tile_positions(q_rows, q_block, group, device)
        k_lo, k_hi = tile_keys(kv_len, kv_block, device)
        return fn(q_lo, q_hi, k_lo, k_hi)
    return tiles


def compressed_branch(qp, k_cmp, v_cmp, cfg: NSAConfig, group: int, scale: float, use_flex: bool):
    """Eq. 7: attention over the compressed keys whose block lies wholly in the past.

    qp [B, Hkv, T·G, Dk]; k_cmp/v_cmp [B, Tc, Hkv, D]. Returns (o [B, Hkv, T·G, Dv], lse)."""
    B, H, TG, Dk = qp.shape
    Tc, Dv = k_cmp.shape[1], v_cmp.shape[-1]
    if Tc == 0:  # no complete block yet: o_cmp = 0 (pinned)
        return (qp.new_zeros(B, H, TG, Dv), qp.new_full((B, H, TG), float("-inf"), dtype=torch.float32))
    tiles = _static_tiles(functools.partial(compressed_tiles, cfg.cmp_block, cfg.cmp_stride),
                          TG, group, Tc, qp.device)
    return attend(qp, heads_first(k_cmp), heads_first(v_cmp),
                  compressed_mask(cfg.cmp_block, cfg.cmp_stride, group), tiles, scale,
                  use_flex=use_flex, q_block=tuning.Q_BLOCK, kv_block=tuning.KV_BLOCK,
                  kernel_options=tuning.kernel_options("cmp", qp.dtype, Dk, tuning.KV_BLOCK, v_dim=Dv),
                  need_lse=True, q_splits=tuning.Q_SPLITS.get("cmp", 1))


def _forced_static(cfg: NSAConfig) -> bool:
    """Whether the selected branch runs as forced (static) + rest (dynamic): tuning's choice,
    where every query has a forced block and top-n keeps all of them (n ≥ n_init + n_local)."""
    forced = cfg.n_init + cfg.n_local
    return bool(tuning.SEL_FORCED_STATIC) and 0 < forced <= cfg.sel_topn


def selected_branch(qp, k, v, idx, cfg: NSAConfig, group: int, scale: float, use_flex: bool):
    """Eqs. 11–12 applied: attention over the keys of each group's selected blocks (s ≤ t).

    idx [B, Hkv, T, n] from :func:`select_blocks`. Returns o [B, Hkv, T·G, Dv].

    With tuning.SEL_FORCED_STATIC the same softmax runs in two parts over disjoint keys, merged
    through their log-sum-exp: the forced blocks (a mask of positions only) and the rest."""
    T = k.shape[1]
    kh, vh = heads_first(k), heads_first(v)
    kb, qb = _sel_kv_block(cfg), tuning.sel_q_block()
    split = _forced_static(cfg)
    if split:
        idx = without_forced(idx, cfg.sel_block, cfg.n_init, cfg.n_local)
    table, mask_mod = selected_mask_mod(idx, cfg, group, use_flex)
    narrow = None   # else attend builds it from the tiles
    if _narrow_lists(cfg, kb):
        narrow = functools.partial(selected_branch_block_mask, idx, table, mask_mod, cfg, group,
                                   full_width=qp.device.type == "cpu")
    out, lse = attend(qp, kh, vh, mask_mod,
                      lambda qb_, kb_: selected_tiles(table, cfg.sel_block, group, qb_, kb_), scale,
                      use_flex=use_flex, q_block=qb, kv_block=kb,
                      kernel_options=tuning.kernel_options("slc", qp.dtype, qp.shape[-1], kb, qb,
                                                           v_dim=vh.shape[-1]),
                      need_lse=split, q_splits=tuning.Q_SPLITS.get("slc", 1), block_mask=narrow)
    if not split:
        return out
    tiles = _static_tiles(functools.partial(forced_blocks_tiles, cfg.sel_block, cfg.n_init, cfg.n_local),
                          qp.shape[2], group, T, qp.device)
    # The forced part's mask depends on positions only, like the compressed branch's, so it takes
    # the tiles (KV_BLOCK) and query splits proven there rather than the selected branch's.
    o_f, lse_f = attend(qp, kh, vh, forced_blocks_mask(cfg.sel_block, cfg.n_init, cfg.n_local, group),
                        tiles, scale, use_flex=use_flex, q_block=tuning.Q_BLOCK, kv_block=tuning.KV_BLOCK,
                        kernel_options=tuning.kernel_options("forced", qp.dtype, qp.shape[-1], tuning.KV_BLOCK,
                                                             v_dim=vh.shape[-1]),
                        need_lse=True, q_splits=tuning.Q_SPLITS.get("forced", 1))
    return merge_by_lse(o_f, lse_f, out, lse)[0]


def sliding_branch(qp, k, v, cfg: NSAConfig, group: int, scale: float, use_flex: bool):
    """The sliding window: the w keys ending at the query. Returns o [B, Hkv, T·G, Dv]."""
    T = k.shape[1]
    tiles = _static_tiles(functools.partial(sliding_window_tiles, cfg.window), qp.shape[2], group,
                          T, qp.device)
    kb = _swa_kv_block()
    out, _ = attend(qp, heads_first(k), heads_first(v), sliding_window_mask(cfg.window, group),
                    tiles, scale, use_flex=use_flex, q_block=tuning.Q_BLOCK, kv_block=kb,
                    kernel_options=tuning.kernel_options("swa", qp.dtype, qp.shape[-1], kb,
                                                         v_dim=v.shape[-1]),
                    q_splits=tuning.Q_SPLITS.get("swa", 1))
    return out


def _nsa(q, k, v, k_cmp, v_cmp, gates, cfg: NSAConfig, k_swa, v_swa, return_indices: bool,
         use_flex: bool, sliding: bool = True):
    T, Hq, Dk = q.shape[1:]
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = cfg.softmax_scale(Dk)
    qp = pack_gqa(q, Hkv)                                            # [B, Hkv, T·G, Dk]

    # Gated sum (eq. 5), in float32; each branch's term is added right after the branch
    # (see gating.py for why). (`sliding=False` is for benchmarks against NSA kernels that have
    # no sliding branch.)
    gated = GatedSum(gates, T, q.dtype)
    o_cmp, lse_cmp = compressed_branch(qp, k_cmp, v_cmp, cfg, G, scale, use_flex)
    gated.add(o_cmp, 0)
    # Selection (eqs. 8–12): scores from p_cmp, top-n per KV-head group; no gradient.
    idx = select_blocks(qp.detach(), heads_first(k_cmp).detach(), lse_cmp.detach(), cfg, scale, G, T)
    gated.add(selected_branch(qp, k, v, idx, cfg, G, scale, use_flex), 1)
    if sliding:
        k_w, v_w = (k, v) if k_swa is None else (k_swa, v_swa)
        gated.add(sliding_branch(qp, k_w, v_w, cfg, G, scale, use_flex), 2)
    o = gated.result()
    if return_indices:
        return o, idx.transpose(1, 2)
    return o


@functools.lru_cache(maxsize=None)
def _compiled(cfg: NSAConfig, return_indices: bool, sliding: bool = True):
    fn = functools.partial(_nsa, cfg=cfg, return_indices=return_indices, use_flex=True,
                           sliding=sliding)
    return torch.compile(fn, fullgraph=True, dynamic=False)


if torch.cuda.is_available():
    tuning.install_flex_backward_configs()
    tuning.fix_scalar_tree_block_shape()
    if tuning.AUTOTUNE_BLOCKS:
        tuning.cap_autotune_blocks()
    from . import score_kernel  # noqa: F401  (registers torch.ops.nsa_flex.selection_scores)


_DENSE_ON_CUDA = False


@functools.lru_cache(maxsize=None)
def _warn_unfit_score_kernel(cfg: NSAConfig, group: int) -> None:
    """Say once per shape where tuning.SCORE_KERNEL cannot apply (the torch route scores then)."""
    from .score_kernel import unfit
    why = unfit(cfg, group)
    if why:
        warnings.warn(f"{why}: this model's selection scores take the torch route (same blocks up "
                      "to rounding, more time and memory); set tuning.SCORE_KERNEL = 0 to silence",
                      stacklevel=3)


@functools.lru_cache(maxsize=None)
def _warn_unfit_topn_kernel(cfg: NSAConfig, seq_len: int) -> None:
    """Say once per shape where tuning.TOPN_KERNEL cannot apply (the torch route ranks then)."""
    from .topn_kernel import unfit
    why = unfit(cfg.num_sel_blocks(seq_len))
    if why:
        warnings.warn(f"{why}: this sequence's top-n takes the torch route (the same blocks, more "
                      "time); raise tuning.TOPN_KERNEL_MAX_BLOCKS or set tuning.TOPN_KERNEL = 0 "
                      "to silence", stacklevel=3)


@contextlib.contextmanager
def dense_path():
    """Within this context nsa_attention takes the dense path on CUDA too: the same mask_mods
    and selection, masked softmax in row chunks, no FlexAttention kernels to compile (the
    visualiser's default forward). Results equal the FlexAttention path up to rounding."""
    global _DENSE_ON_CUDA
    saved, _DENSE_ON_CUDA = _DENSE_ON_CUDA, True
    try:
        yield
    finally:
        _DENSE_ON_CUDA = saved


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
    use_flex = q.device.type == "cuda" and not _DENSE_ON_CUDA
    if use_flex and torch.compiler.is_compiling():
        refuse_unchecked_knobs(q.shape[-1], v.shape[-1])
    elif use_flex:
        prepare_flash(q.device, q.shape[-1], v.shape[-1])   # (refuses what cannot run first)
        if tuning.SCORE_KERNEL:
            _warn_unfit_score_kernel(config, q.shape[2] // k.shape[2])
        if tuning.TOPN_KERNEL:
            _warn_unfit_topn_kernel(config, q.shape[1])
    if use_flex and not torch.compiler.is_compiling():
        return _compiled(config, return_indices)(q, k, v, k_cmp, v_cmp, gates, k_swa=k_swa, v_swa=v_swa)
    return _nsa(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, return_indices, use_flex)
