"""How the operator runs on a device: one frozen :class:`KernelConfig`, chosen by
:func:`choose_kernel` from the device, the dtype, the head dims and the NSAConfig, and passed
down explicitly (``nsa_attention(..., kernel=...)`` overrides it). No operator module reads
mutable module state. docs/performance.md has the measurements behind each default.

Two backends, chosen by a plain string as torchtitan chooses its ``attn_type``:

- ``"flex"`` (CUDA): each branch is a FlexAttention call over a BlockMask built in the graph,
  the whole operator compiled by Inductor; the scores and the top-n are Triton kernels.
- ``"dense"`` (any device; the only one on CPU, where FlexAttention has no backward): each
  branch evaluates the same mask_mod densely and runs a masked softmax, exact and
  differentiable, O(T²) memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import NSAConfig

BACKENDS = ("flex", "dense")
MAX_HEAD_DIM = 256      # FlexAttention's Triton kernels hold a head in registers up to this
MIN_FLEX_HEAD_DIM = 16  # smaller head dims are zero-padded to this (exact: see operator._pad)


@dataclass(frozen=True)
class FlexTiles:
    """One branch's FlexAttention call: its BlockMask tiles, query splits and Triton tiles."""

    q_block: int        # BlockMask query tile, in packed rows (position·G + head)
    kv_block: int       # BlockMask key tile
    q_splits: int       # consecutive query chunks run as batch entries (parallel dK/dV loops)
    fwd: tuple[int, int, int, int]            # BLOCK_M, BLOCK_N, num_warps, num_stages
    bwd: tuple[int, int, int, int, int, int]  # BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps, stages
    tma: bool = False   # K/V (and Q/dO in backward) loaded by TMA (Hopper)

    def kernel_options(self) -> dict:
        m, n, warps, stages = self.fwd
        m1, n1, m2, n2, bwarps, bstages = self.bwd
        opts = dict(fwd_BLOCK_M=m, fwd_BLOCK_N=n, fwd_num_warps=warps, fwd_num_stages=stages,
                    bwd_BLOCK_M1=m1, bwd_BLOCK_N1=n1, bwd_BLOCK_M2=m2, bwd_BLOCK_N2=n2,
                    bwd_num_warps=bwarps, bwd_num_stages=bstages,
                    # these are the main kernel's tiles: a branch (or query split) of fewer than
                    # 128 rows would otherwise go to FlexAttention's decoding kernel, which has
                    # no config for them (NoValidChoicesError, H200, torch 2.11)
                    FORCE_USE_FLEX_ATTENTION=True)
        if self.tma:
            opts["USE_TMA"] = True
        return opts

    def check(self, branch: str) -> None:
        """Refuse tiles no kernel can run (before compute, naming the field)."""
        m, n = self.fwd[:2]
        m1, n1, m2, n2 = self.bwd[:4]
        for name, sparse, tile in (("fwd BLOCK_M", self.q_block, m), ("fwd BLOCK_N", self.kv_block, n),
                                   ("bwd BLOCK_M1", self.q_block, m1), ("bwd BLOCK_N1", self.kv_block, n1),
                                   ("bwd BLOCK_M2", self.q_block, m2), ("bwd BLOCK_N2", self.kv_block, n2)):
            if tile < 16 or tile & (tile - 1) or sparse % tile:
                raise ValueError(f"KernelConfig.{branch}: {name}={tile} must be a power of two >= 16 "
                                 f"dividing the BlockMask tile {sparse}")
        if n1 % m1:
            raise ValueError(f"KernelConfig.{branch}: bwd BLOCK_N1={n1} must be a multiple of "
                             f"BLOCK_M1={m1} (FlexAttention's backward template asserts it)")
        if self.q_splits < 1:
            raise ValueError(f"KernelConfig.{branch}: q_splits={self.q_splits} must be >= 1")


@dataclass(frozen=True)
class KernelConfig:
    """Everything that decides how (not what) the operator computes. Results do not depend on it
    beyond rounding."""

    backend: str                     # "flex" or "dense" (see the module docstring)
    cmp: FlexTiles | None = None     # compressed branch (flex)
    slc: FlexTiles | None = None     # selected branch (flex)
    swa: FlexTiles | None = None     # sliding branch (flex)
    score_tiles: tuple[int, int, int, int] = (128, 64, 8, 3)  # scoring kernel: rows, blocks, warps, stages
    topn_tile: int = 8192            # top-n kernel: row elements a program holds
    score_chunk_elems: int = 1 << 28  # scoring: score elements alive at once (chunks of positions)
    score_slices: int = 4            # chunk shapes: each chunk scores and ranks what it can see
    dense_chunk_elems: int = 1 << 28  # dense backend: score elements alive at once

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"KernelConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.backend == "flex":
            for branch in ("cmp", "slc", "swa"):
                tiles = getattr(self, branch)
                if tiles is None:
                    raise ValueError(f"KernelConfig(backend='flex') needs tiles for {branch!r}")
                tiles.check(branch)
        rows, blocks = self.score_tiles[:2]
        for name, v in (("rows", rows), ("blocks", blocks), ("topn_tile", self.topn_tile)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig: {name}={v} must be a power of two >= 16")
        if self.score_slices < 1:
            raise ValueError(f"KernelConfig.score_slices={self.score_slices} must be >= 1")

    def replace(self, **changes) -> "KernelConfig":
        return dataclasses.replace(self, **changes)


def sel_kv_block(cfg: NSAConfig) -> int:
    """The selected branch's key tile: the largest of 128, 64, 32, 16 dividing l' (16 if none
    does; a block then straddles tiles and the mask_mod reads the selection)."""
    return next((kb for kb in (128, 64, 32, 16) if cfg.sel_block % kb == 0), 16)


def _static_tiles(dtype: torch.dtype, head_dim: int, q_splits: int) -> FlexTiles:
    """128 x 128 tiles of the compressed and sliding branches (masks of positions only)."""
    if dtype == torch.float32:
        return FlexTiles(128, 128, q_splits, fwd=(32, 32, 4, 2), bwd=(16, 16, 16, 16, 4, 1))
    if head_dim <= 64:
        fwd = (128, 128, 4, 3)
    elif head_dim <= 128:
        fwd = (128, 64, 8, 3)
    else:
        fwd = (64, 32, 4, 3) if head_dim > 192 else (64, 64, 4, 3)
    bwd = (64, 128, 128, 64, 8, 3) if 64 <= head_dim <= 128 else (64, 64, 64, 64, 4, 3 if head_dim < 64 else 2)
    return FlexTiles(128, 128, q_splits, fwd=fwd, bwd=bwd)


def _selected_tiles(dtype: torch.dtype, head_dim: int, kv_block: int, hopper: bool) -> FlexTiles:
    """16-row query tiles (one position at G = 16): each reads only its position's n blocks."""
    q = 16
    n = min(64, kv_block)
    if dtype == torch.float32:
        return FlexTiles(q, kv_block, 8, fwd=(q, min(32, kv_block), 4, 2), bwd=(q, q, q, q, 4, 1))
    stages = 2 if head_dim > 128 else 3
    # dQ in steps of n keys, wider than the 16-row query tile (patches.wide_dq_steps)
    return FlexTiles(q, kv_block, 8, fwd=(q, n, 2, 3), bwd=(q, n, q, n, 4, stages), tma=hopper)


def choose_kernel(device, dtype: torch.dtype, qk_dim: int, v_dim: int, cfg: NSAConfig) -> KernelConfig:
    """The default KernelConfig for these inputs. CUDA: "flex"; elsewhere: "dense"."""
    device = torch.device(device)
    if device.type != "cuda":
        return KernelConfig("dense")
    return flex_kernel(dtype, qk_dim, v_dim, cfg, torch.cuda.get_device_capability(device))


def flex_kernel(dtype: torch.dtype, qk_dim: int, v_dim: int, cfg: NSAConfig,
                capability: tuple[int, int] = (9, 0)) -> KernelConfig:
    """The "flex" KernelConfig for these inputs on a card of this compute capability."""
    head = max(qk_dim, v_dim, MIN_FLEX_HEAD_DIM)
    hopper = capability[0] >= 9 and dtype != torch.float32
    wide = dtype == torch.float32 or qk_dim > 256
    return KernelConfig(
        "flex",
        cmp=_static_tiles(dtype, head, q_splits=8),
        slc=_selected_tiles(dtype, head, sel_kv_block(cfg), hopper),
        swa=_static_tiles(dtype, head, q_splits=1),
        score_tiles=(64, 64, 4, 1) if wide else (128, 64, 8, 3),
    )


def check_head_dims(qk_dim: int, v_dim: int, kernel: KernelConfig) -> None:
    """The flex backend's head-dim limit, refused before compute."""
    if kernel.backend == "flex" and max(qk_dim, v_dim) > MAX_HEAD_DIM:
        raise ValueError(f"head dims Dk={qk_dim}, Dv={v_dim}: the flex backend runs head dims up to "
                         f"{MAX_HEAD_DIM}; use smaller heads or kernel=KernelConfig('dense')")


def override(kernel: KernelConfig, items: list[str]) -> KernelConfig:
    """``FIELD=V`` / ``BRANCH.FIELD=V`` strings (V an int or comma-separated ints) -> a
    KernelConfig with those fields replaced, e.g. ``cmp.bwd=64,64,64,64,4,3``, ``slc.q_splits=16``,
    ``score_tiles=128,64,8,3`` (the GPU tools' --kernel). Refused, naming the item, where a
    field does not exist or the result cannot run."""
    def value(text):
        parts = [int(x) for x in text.split(",")]
        return parts[0] if len(parts) == 1 else tuple(parts)

    for item in items:
        name, _, text = item.partition("=")
        branch, _, field = name.rpartition(".")
        try:
            if branch:
                tiles = dataclasses.replace(getattr(kernel, branch), **{field: value(text)})
                kernel = kernel.replace(**{branch: tiles})
            else:
                kernel = kernel.replace(**{field: value(text)})
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{item!r}: {e}") from None
    return kernel
