"""nsa_flex/patches.py: each Inductor patch applies exactly to the torch versions it declares
(checked from torch's own source: a torch that no longer needs a patch, or changed the code it
patches, fails here), installs idempotently, and does what it says."""

import pytest
import torch

from nsa_flex import patches


@pytest.mark.parametrize("patch", patches.PATCHES, ids=[p.name for p in patches.PATCHES])
def test_each_patch_is_needed_exactly_where_declared(patch):
    assert patch.needed() == patch.applies_to_installed_torch(), (
        f"{patch.name}: declared for torch {patch.versions}, but this torch "
        f"({torch.__version__}) {'needs' if patch.needed() else 'does not need'} it; "
        "update the declared versions (or delete the patch)")
    assert patch.why


@pytest.fixture
def restored(monkeypatch):
    """Install the patches for one test and undo them after."""
    from torch._inductor.codegen.triton import TritonSymbols
    from torch._inductor.kernel.flex import flex_attention as fa
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic
    template = fa.flex_attention_backward_template
    for name in ("template", "_hash", "_nsa_flex_wide_dq", "_nsa_flex_source"):
        monkeypatch.setattr(template, name, getattr(template, name, None), raising=False)
    monkeypatch.setattr(CUDAConfigHeuristic, "get_flex_attn_bwd_configs",
                        CUDAConfigHeuristic.get_flex_attn_bwd_configs)
    monkeypatch.setattr(TritonSymbols, "get_block_shape", TritonSymbols.get_block_shape)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    return template


def test_install_is_idempotent_and_complete(restored):
    first = patches.install()
    assert first == [p.name for p in patches.PATCHES if p.needed()]
    template, h = restored.template, restored._hash
    assert patches.install() == first and patches.missing() == []
    assert restored.template is template and restored._hash == h


def test_every_kernel_tile_has_a_backward_candidate(restored):
    """After install, Inductor's candidate filter (blocks dividing the BlockMask's tiles) keeps
    a candidate for every tile the KernelConfigs use, in every dtype and head dim."""
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    from nsa_flex import NSAConfig
    from nsa_flex.kernels import flex_kernel
    patches.install()
    heuristic = CUDAConfigHeuristic()
    for dtype, head, lp in [(d, h, lp) for d in (torch.bfloat16, torch.float16, torch.float32)
                            for h in (8, 24, 64, 96, 128, 192, 256) for lp in (16, 32, 48, 64, 128)]:
        kernel = flex_kernel(dtype, head, head, NSAConfig(cmp_block=16, cmp_stride=16, sel_block=lp))
        configs = heuristic.get_flex_attn_bwd_configs(head, dtype)
        for branch in ("cmp", "slc", "swa"):
            t = getattr(kernel, branch)
            kept = [c for c in configs if t.q_block % c.block_m1 == 0 and t.q_block % c.block_m2 == 0
                    and t.kv_block % c.block_n1 == 0 and t.kv_block % c.block_n2 == 0]
            assert kept, (dtype, head, lp, branch)


def test_wide_dq_steps_lift_one_template_line(restored):
    from torch._inductor.kernel.flex.common import load_flex_template
    if not patches.WIDE_DQ_STEPS.needed():
        pytest.skip("this torch's template has no such assert")
    original = load_flex_template("flex_backwards") + load_flex_template("utilities")
    before, hash_before = restored.template, restored._hash
    patches.WIDE_DQ_STEPS.apply()
    assert restored.template is not before and restored._hash != hash_before
    old_lines, new_lines = original.splitlines(), restored._nsa_flex_source.splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) == 1
    assert changed[0][0].strip() == patches.DQ_STEP_ASSERT and "static_assert" not in changed[0][1]
    assert restored._nsa_flex_source.count("BLOCK_N1 % BLOCK_M1 == 0") == 1   # the other stays


def test_scalar_trees_as_constants():
    import sympy
    from types import SimpleNamespace as NS
    x0, r0, tmp = sympy.symbols("x0 r0_0 tmp3", integer=True)
    kernel = NS(range_trees=[NS(prefix="x", tensor_dim=None), NS(prefix="r0_", tensor_dim=0)])

    def strict(cls, expr):          # torch 2.11's behaviour: a symbol of a scalar tree fails
        if any(v.name.startswith("x") for v in expr.free_symbols):
            raise TypeError("list indices must be integers or slices, not NoneType")
        return sorted(v.name for v in expr.free_symbols)

    patched = patches.scalar_trees_as_constants(strict, lambda: kernel)
    with pytest.raises(TypeError):
        strict(None, 64 * x0 + r0)
    assert patched(None, 64 * x0 + r0 + tmp - 1) == ["r0_0", "tmp3"]
    assert patched(None, x0 + 1) == []
    kernel.range_trees[0].tensor_dim = 0            # no scalar tree: the expression untouched
    with pytest.raises(TypeError):
        patched(None, x0)


def test_nothing_is_patched_at_import():
    import subprocess
    import sys
    code = ("import nsa_flex, nsa_flex.operator, nsa_flex.model; from nsa_flex import patches; "
            "from torch._inductor.kernel.flex import flex_attention as fa; "
            "assert not any(p.applied() for p in patches.PATCHES), 'patched at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
