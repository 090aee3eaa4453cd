"""The Inductor patches the flex backend needs, in one place.

Each patch says why it exists, which torch versions it applies to, and how it finds out whether
the installed torch still needs it (``needed()``, read from torch's own source, not from its
version number). tests/test_patches.py checks that ``needed()`` agrees with ``versions`` for the
installed torch, so a torch that no longer needs a patch (or changed the code it patches) fails
a test instead of being patched blindly.

Nothing is patched at import. :func:`install` is called explicitly where a compile that lowers
the operator starts (``operator.compiled`` and the model's ``parallelize_nsa``); it is
idempotent and installs only the patches ``needed()`` says this torch needs.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class Patch:
    name: str
    versions: tuple[str, str]        # first and last torch minor version it applies to (checked)
    why: str
    needed: Callable[[], bool]       # does the installed torch have the code this patch changes?
    apply: Callable[[], None]        # idempotent
    applied: Callable[[], bool]

    def applies_to_installed_torch(self) -> bool:
        lo, hi = (tuple(int(x) for x in v.split(".")) for v in self.versions)
        return lo <= _torch_minor() <= hi


# -- 1. a backward candidate that every BlockMask tile admits ----------------------------------

FALLBACK_BWD = (16, 16, 16, 16)   # BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2


def _flex_lowering_source() -> str:
    from torch._inductor.kernel.flex import flex_attention as fa
    return inspect.getsource(fa)


def _fallback_needed() -> bool:
    """Inductor drops backward candidates whose blocks do not divide the BlockMask's tiles before
    it applies kernel options, and its sm90 16-bit list has none for a 16-row or 32-key tile."""
    try:
        source = _flex_lowering_source()
        from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic  # noqa: F401
    except (ImportError, AttributeError, OSError):
        return False
    return "SPARSE_Q_BLOCK_SIZE % conf.block_m1 != 0" in source


def _heuristic():
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic, FlexBwDConfig
    return CUDAConfigHeuristic, FlexBwDConfig


def _fallback_applied() -> bool:
    try:
        cls, _ = _heuristic()
    except ImportError:
        return False
    return getattr(cls.get_flex_attn_bwd_configs, "_nsa_flex", False)


def _apply_fallback() -> None:
    cls, FlexBwDConfig = _heuristic()
    original = cls.get_flex_attn_bwd_configs
    if getattr(original, "_nsa_flex", False):
        return

    def get_flex_attn_bwd_configs(self, head_dim, dtype):
        configs = list(original(self, head_dim, dtype))
        if not any((c.block_m1, c.block_n1, c.block_m2, c.block_n2) == FALLBACK_BWD for c in configs):
            configs.append(FlexBwDConfig(*FALLBACK_BWD, 1, 4))
        return configs

    get_flex_attn_bwd_configs._nsa_flex = True
    cls.get_flex_attn_bwd_configs = get_flex_attn_bwd_configs


BWD_FALLBACK = Patch(
    name="flex backward fallback candidate",
    versions=("2.11", "2.13"),
    why=("Inductor filters FlexAttention backward candidates by the BlockMask's tiles before the "
         "kernel options that set our tiles apply; on sm90 its only 16-bit candidate (64x128) "
         "admits no 16-row query tile and no 32-key tile, so the selected branch stopped with "
         "NoValidChoicesError (l' = 32, D = 128, bf16). A (16, 16, 16, 16) candidate admits "
         "every tile; KernelConfig's bwd options then replace its blocks and launch."),
    needed=_fallback_needed, apply=_apply_fallback, applied=_fallback_applied)


# -- 2. dQ steps wider than the query tile -----------------------------------------------------

DQ_STEP_ASSERT = "tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0)"


def _backward_template_source() -> str:
    from torch._inductor.kernel.flex.common import load_flex_template
    return load_flex_template("flex_backwards") + load_flex_template("utilities")


def _wide_dq_needed() -> bool:
    try:
        return _backward_template_source().count(DQ_STEP_ASSERT) == 1
    except (ImportError, AttributeError, OSError):
        return False


def _template():
    from torch._inductor.kernel.flex import flex_attention as fa
    return fa.flex_attention_backward_template


def _wide_dq_applied() -> bool:
    try:
        return getattr(_template(), "_nsa_flex_wide_dq", False)
    except (ImportError, AttributeError):
        return False


def _apply_wide_dq() -> None:
    template = _template()
    if getattr(template, "_nsa_flex_wide_dq", False):
        return
    source = _backward_template_source()
    if source.count(DQ_STEP_ASSERT) != 1:
        raise RuntimeError(f"nsa_flex.patches: this torch's FlexAttention backward template does "
                           f"not assert {DQ_STEP_ASSERT!r} once; the patch does not apply")
    source = source.replace(DQ_STEP_ASSERT, "pass  # nsa_flex: dQ steps may be wider than the query tile")
    template.template = template._template_from_string(source)
    template._hash = hashlib.sha256(source.encode("utf-8")).hexdigest()   # new kernels, new cache keys
    template._nsa_flex_source = source
    template._nsa_flex_wide_dq = True


WIDE_DQ_STEPS = Patch(
    name="wide dQ steps",
    versions=("2.11", "2.13"),
    why=("FlexAttention's backward template asserts BLOCK_M2 % BLOCK_N2 == 0, which its dQ loop "
         "(BLOCK_N2 keys at a time inside each listed KV tile) does not need. The selected branch's "
         "16-row query tiles would otherwise take dQ in 16-key steps: its backward kernel took "
         "65.9 instead of 42.0 ms at 64k on an H100 (docs/performance.md)."),
    needed=_wide_dq_needed, apply=_apply_wide_dq, applied=_wide_dq_applied)


# -- 3. index expressions over a scalar range tree (torch 2.11) --------------------------------

def _block_shape_fn():
    from torch._inductor.codegen.triton import TritonSymbols
    return TritonSymbols.get_block_shape.__func__


def _scalar_tree_needed() -> bool:
    try:
        fn = _block_shape_fn()
        fn = getattr(fn, "_nsa_flex_original", fn)
        return "tensor_dim is None" not in inspect.getsource(fn)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


def _scalar_tree_applied() -> bool:
    try:
        return hasattr(_block_shape_fn(), "_nsa_flex_original")
    except (ImportError, AttributeError):
        return False


def scalar_trees_as_constants(get_block_shape, kernel):
    """``get_block_shape(cls, expr)`` with the symbols of the kernel's range trees that have no
    tensor dimension replaced by 0 first (a scalar has shape ())."""
    def patched(cls, expr):
        scalar = [t.prefix for t in kernel().range_trees if t.tensor_dim is None]
        if scalar:
            zero = {v: 0 for v in expr.free_symbols if any(v.name.startswith(p) for p in scalar)}
            expr = expr.subs(zero) if zero else expr
        return get_block_shape(cls, expr)

    patched._nsa_flex_original = get_block_shape
    return patched


def _apply_scalar_tree() -> None:
    from torch._inductor.codegen.triton import TritonSymbols
    from torch._inductor.virtualized import V
    original = _block_shape_fn()
    if hasattr(original, "_nsa_flex_original"):
        return
    TritonSymbols.get_block_shape = classmethod(scalar_trees_as_constants(original, lambda: V.kernel))


SCALAR_TREE_SHAPES = Patch(
    name="scalar range trees in Triton codegen",
    versions=("2.11", "2.12"),
    why=("Split scans and persistent reductions without an X dimension run their X range as a "
         "scalar (tensor_dim None); torch 2.11's TritonSymbols.get_block_shape indexes a shape list "
         "with that None ('list indices must be integers or slices, not NoneType') whenever an "
         "index expression of that range is fused in, which the BlockMask builders' prefix counts "
         "do on CUDA. Later torch treats such a tree as a scalar; this does the same."),
    needed=_scalar_tree_needed, apply=_apply_scalar_tree, applied=_scalar_tree_applied)


PATCHES = (BWD_FALLBACK, WIDE_DQ_STEPS, SCALAR_TREE_SHAPES)


def install() -> list[str]:
    """Install every patch this torch needs (idempotent); returns the names installed."""
    done = []
    for patch in PATCHES:
        if patch.applied() or patch.needed():
            patch.apply()
            done.append(patch.name)
    return done


def missing() -> list[str]:
    """The needed patches that are not installed (the operator refuses to compile without them)."""
    return [p.name for p in PATCHES if not p.applied() and p.needed()]
