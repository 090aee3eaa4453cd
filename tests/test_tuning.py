"""nsa_flex.tuning: the --tune parser of the GPU tools and the extra flex backward candidates."""

import copy

import pytest
import torch

from nsa_flex import tuning


@pytest.fixture
def restore():
    saved = {n: copy.deepcopy(v) for n, v in vars(tuning).items() if n.isupper()}
    yield
    for n, v in saved.items():
        setattr(tuning, n, v)


def test_apply_sets_knobs_and_dict_entries(restore):
    slc = tuning.Q_SPLITS["slc"]
    got = tuning.apply(["SEL_Q_BLOCK=16", "Q_SPLITS.cmp=3", "SEL_KV_BLOCK=None"])
    assert tuning.SEL_Q_BLOCK == 16 and tuning.sel_q_block() == 16
    assert tuning.Q_SPLITS["cmp"] == 3 and tuning.Q_SPLITS["slc"] == slc
    assert tuning.SEL_KV_BLOCK is None
    assert got["Q_SPLITS"]["cmp"] == 3 and got["Q_BLOCK"] == 128
    for bad in ("NOPE=1", "SEL_Q_BLOCK", "apply=1", "SEL_Q_BLOCK=x", "Q_SPLITS.nope=2", "Q_BLOCK.cmp=1"):
        with pytest.raises(ValueError):
            tuning.apply([bad])


def test_apply_sets_a_scoring_tile(restore):
    tuning.apply(["SCORE_TILES.rows=64"])
    assert tuning.SCORE_TILES["rows"] == 64 and tuning.SCORE_TILES["blocks"] == 64
    with pytest.raises(ValueError, match="no branch 'nope'"):
        tuning.apply(["SCORE_TILES.nope=1"])


def test_apply_sets_and_removes_a_kernel_option_of_one_branch(restore):
    tuning.apply(["KERNEL_OPTIONS.slc.bwd_num_warps=2", "KERNEL_OPTIONS.slc.USE_TMA=1"])
    assert tuning.KERNEL_OPTIONS["slc"] == {"bwd_num_warps": 2, "USE_TMA": 1}
    assert tuning.KERNEL_OPTIONS["cmp"] == {}
    opts = tuning.kernel_options("slc", torch.bfloat16, 128, 64, 16)
    assert opts["bwd_num_warps"] == 2 and opts["USE_TMA"] == 1 and opts["fwd_BLOCK_M"] == 16
    tuning.apply(["KERNEL_OPTIONS.slc.USE_TMA=None"])
    assert tuning.KERNEL_OPTIONS["slc"] == {"bwd_num_warps": 2}
    with pytest.raises(ValueError, match="takes a value, not options"):
        tuning.apply(["Q_SPLITS.cmp.x=1"])
    with pytest.raises(ValueError, match="no branch 'nope'"):
        tuning.apply(["KERNEL_OPTIONS.nope.bwd_num_warps=1"])
    with pytest.raises(ValueError, match="takes options per branch"):
        tuning.apply(["KERNEL_OPTIONS=1"])


def test_apply_sets_every_branch_of_a_per_branch_knob_without_a_key(restore):
    tuning.apply(["GATE_GRADS_APART=1"])
    assert tuning.GATE_GRADS_APART == {"cmp": 1, "slc": 1, "swa": 1}
    tuning.apply(["GATE_GRADS_APART=0", "GATE_GRADS_APART.cmp=1"])
    assert tuning.GATE_GRADS_APART == {"cmp": 1, "slc": 0, "swa": 0}


def test_small_query_tile_gets_forward_block_and_backward_candidate(restore, monkeypatch):
    tuning.SEL_DQ_WIDE_STEPS = 0      # the template as torch ships it (the next test lifts its assert)
    assert tuning.kernel_options("slc", torch.bfloat16, 128, 64, 16)["fwd_BLOCK_M"] == 16
    assert tuning.kernel_options("slc", torch.float32, 192, 64, 16)["fwd_BLOCK_M"] == 16
    assert "fwd_BLOCK_M" not in (tuning.kernel_options("slc", torch.bfloat16, 128, 64) or {})
    try:
        from torch._inductor.template_heuristics import triton as heuristics
        heuristic = heuristics.CUDAConfigHeuristic()
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"this torch has no CUDA flex heuristic to extend: {e}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # as on an H100
    assert tuning.install_flex_backward_configs()

    def blocks(dtype):
        return {(c.block_m1, c.block_n1, c.block_m2, c.block_n2)
                for c in heuristic.get_flex_attn_bwd_configs(128, dtype)}

    tuning.SEL_Q_BLOCK = 64                  # no small tile: no small candidate
    assert tuning.EXTRA_BWD_CONFIG in blocks(torch.bfloat16)
    for q in (16, 32):
        assert tuning.small_q_bwd_config(q) not in blocks(torch.bfloat16)
        tuning.SEL_Q_BLOCK = q
        assert tuning.small_q_bwd_config(q) in blocks(torch.bfloat16)
        assert tuning.small_q_bwd_config(q) in blocks(torch.float32)
        tuning.SEL_Q_BLOCK = 64
    # what the flex backward template asserts, and each tile dividing its sparse block (q x 64)
    for q in (16, 32):
        m1, n1, m2, n2 = tuning.small_q_bwd_config(q)
        assert n1 % m1 == 0 and m2 % n2 == 0 and q % m1 == 0 and q % m2 == 0 and 64 % n1 == 0 and 64 % n2 == 0
    m1, n1, m2, n2 = tuning.EXTRA_BWD_CONFIG
    assert n1 % m1 == 0 and m2 % n2 == 0


def test_wide_dq_steps_lift_one_template_line_and_offer_64_key_steps(restore, monkeypatch):
    try:
        from torch._inductor.kernel.flex import flex_attention as fa
        from torch._inductor.kernel.flex.common import load_flex_template
        from torch._inductor.template_heuristics import triton as heuristics
    except ImportError as e:
        pytest.skip(f"this torch has no flex backward template to patch: {e}")
    template = fa.flex_attention_backward_template
    for name in ("template", "_hash", "_nsa_flex_source", "_nsa_flex_wide_dq"):   # undone after
        if hasattr(template, name):
            monkeypatch.setattr(template, name, getattr(template, name))
        else:
            monkeypatch.setattr(template, name, None, raising=False)
    original = load_flex_template("flex_backwards") + load_flex_template("utilities")
    before, hash_before = template.template, template._hash
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    tuning.SEL_DQ_WIDE_STEPS = 0
    assert tuning.install_flex_backward_configs()
    heuristic = heuristics.CUDAConfigHeuristic()
    blocks = lambda: {(c.block_m1, c.block_n1, c.block_m2, c.block_n2)
                      for c in heuristic.get_flex_attn_bwd_configs(128, torch.bfloat16)}
    assert (16, 64, 16, 16) in blocks() and template.template is before   # off: untouched

    assert "bwd_BLOCK_N2" not in tuning.kernel_options("slc", torch.bfloat16, 128, 64, 16)
    tuning.apply(["SEL_DQ_WIDE_STEPS=1"])
    # in the traced kernel options too (compiled graphs are cached by what they trace), 16-bit only
    assert tuning.kernel_options("slc", torch.bfloat16, 128, 64, 16)["bwd_BLOCK_N2"] == 64
    assert "bwd_BLOCK_N2" not in tuning.kernel_options("slc", torch.float32, 128, 64, 16)
    assert "bwd_BLOCK_N2" not in (tuning.kernel_options("slc", torch.bfloat16, 128, 64, 64) or {})
    got = blocks()
    assert (16, 64, 16, 64) in got and (16, 64, 16, 16) not in got
    assert template.template is not before and template._hash != hash_before
    old_lines, new_lines = original.splitlines(), template._nsa_flex_source.splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) == 1
    assert changed[0][0].strip() == tuning.DQ_STEP_ASSERT and "static_assert" not in changed[0][1]
    patched, patched_hash = template.template, template._hash
    tuning.allow_wide_dq_steps()                              # idempotent: no second patch
    assert template.template is patched and template._hash == patched_hash
    assert template._nsa_flex_source.count("BLOCK_N1 % BLOCK_M1 == 0") == 1   # the other stays
    # a template without the line: refused, not offered unpatched
    import torch._inductor.kernel.flex.common as flex_common
    monkeypatch.setattr(template, "_nsa_flex_wide_dq", False)
    monkeypatch.setattr(flex_common, "load_flex_template",
                        lambda name: original.replace(tuning.DQ_STEP_ASSERT, "") if name == "flex_backwards" else "")
    with pytest.raises(RuntimeError, match="SEL_DQ_WIDE_STEPS=1"):
        tuning.allow_wide_dq_steps()


def test_block_shape_sizes_scalar_trees_as_constants():
    import sympy
    from types import SimpleNamespace as NS
    x0, r0, tmp = sympy.symbols("x0 r0_0 tmp3", integer=True)
    kernel = NS(range_trees=[NS(prefix="x", tensor_dim=None), NS(prefix="r0_", tensor_dim=0)])

    def strict(cls, expr):          # torch 2.11's behaviour: a symbol of a scalar tree fails
        if any(v.name.startswith("x") for v in expr.free_symbols):
            raise TypeError("list indices must be integers or slices, not NoneType")
        return sorted(v.name for v in expr.free_symbols)

    patched = tuning.scalar_trees_as_constants(strict, lambda: kernel)
    with pytest.raises(TypeError):
        strict(None, 64 * x0 + r0)
    assert patched(None, 64 * x0 + r0 + tmp - 1) == ["r0_0", "tmp3"]
    assert patched(None, x0 + 1) == []
    kernel.range_trees[0].tensor_dim = 0            # no scalar tree: the expression untouched
    with pytest.raises(TypeError):
        patched(None, x0)


def test_autotune_block_counts_capped_only_when_asked(restore, monkeypatch):
    """The fake block counts Inductor autotunes FlexAttention with: as wide as the index list
    (Inductor's own generator), clamped to AUTOTUNE_BLOCKS when that is > 0."""
    from torch._inductor.kernel.flex import common, flex_attention

    class Node:   # an IR node as the generator sees it
        def __init__(self, *size):
            self.size = size

        def get_size(self):
            return self.size

        def get_dtype(self):
            return torch.int32

        def get_device(self):
            return torch.device("cpu")

    def generator(sparse_indices):        # stands in for Inductor's (same contract)
        return lambda x: torch.full(x.get_size(), sparse_indices.get_size()[-1], dtype=torch.int32)

    capped = tuning.capped_num_blocks_generator(generator, lambda: tuning.AUTOTUNE_BLOCKS)
    width = Node(1, 4, 64, 4096)
    monkeypatch.setattr(tuning, "AUTOTUNE_BLOCKS", 0)
    assert torch.equal(capped(width)(Node(1, 4, 64)), torch.full((1, 4, 64), 4096, dtype=torch.int32))
    monkeypatch.setattr(tuning, "AUTOTUNE_BLOCKS", 16)
    assert torch.equal(capped(width)(Node(1, 4, 64)), torch.full((1, 4, 64), 16, dtype=torch.int32))
    assert torch.equal(capped(Node(1, 1, 8, 5))(Node(1, 1, 8)), torch.full((1, 1, 8), 5, dtype=torch.int32))

    original = common.create_num_blocks_fake_generator
    monkeypatch.setattr(common, "create_num_blocks_fake_generator", original)
    monkeypatch.setattr(flex_attention, "create_num_blocks_fake_generator", original)
    assert tuning.cap_autotune_blocks() and tuning.cap_autotune_blocks()     # idempotent
    wrapped = flex_attention.create_num_blocks_fake_generator
    assert wrapped is not original and wrapped._nsa_flex_cap
    assert common.create_num_blocks_fake_generator is wrapped


def test_knob_that_failed_the_gpu_check_is_refused_on_cuda(restore):
    from nsa_flex import NSAConfig, nsa_attention
    from nsa_flex.operator import refuse_unchecked_knobs

    tuning.apply(["SEL_NARROW_Q_LISTS=1"])
    with pytest.raises(ValueError, match="SEL_NARROW_Q_LISTS=1 gives wrong dK/dV on CUDA.*set it to 0"):
        refuse_unchecked_knobs()
    # the CPU path (dense) runs with it
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_topn=3, window=16)
    T, Tc = 64, cfg.num_cmp_blocks(64)
    x = lambda *s: torch.randn(*s)
    out = nsa_attention(x(1, T, 4, 8), x(1, T, 1, 8), x(1, T, 1, 8), x(1, Tc, 1, 8), x(1, Tc, 1, 8),
                        torch.rand(1, T, 4, 3), cfg)
    assert out.shape == (1, T, 4, 8) and torch.isfinite(out).all()
    tuning.apply(["SEL_NARROW_Q_LISTS=0"])
    refuse_unchecked_knobs()


def test_flash_knob_gives_the_flash_backend_to_16_bit_calls_of_its_branches_only(restore):
    tuning.apply(["FLASH.cmp=1"])
    assert tuning.kernel_options("cmp", torch.bfloat16, 128, 128) == {"BACKEND": "FLASH"}
    assert tuning.kernel_options("swa", torch.bfloat16, 128, 128) is None
    fp32 = tuning.kernel_options("cmp", torch.float32, 128, 128)   # flash-attn-4 has no fp32
    assert "BACKEND" not in fp32 and fp32["fwd_BLOCK_M"] == 32
    with pytest.raises(ValueError, match="no branch 'slc'"):      # 16-row tiles: not offered
        tuning.apply(["FLASH.slc=1"])


def test_flash_problem_names_the_tiles_or_the_missing_package(restore, monkeypatch):
    import importlib.util
    assert tuning.flash_problem() is None                   # defaults: auto, off on this machine
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "flash_attn.cute" else real(name))
    tuning.apply(["FLASH.swa=1", "SWA_KV_BLOCK=64"])
    assert "['swa']" in tuning.flash_problem() and "SWA_KV_BLOCK=64" in tuning.flash_problem()
    tuning.apply(["SWA_KV_BLOCK=None", "KV_BLOCK=64"])
    assert "KV_BLOCK=64" in tuning.flash_problem()
    tuning.apply(["KV_BLOCK=128"])
    assert tuning.flash_problem() is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "flash-attn-4" in tuning.flash_problem() and "pip install" in tuning.flash_problem()


def test_flash_none_follows_availability(restore, monkeypatch):
    tuning.apply(["FLASH.cmp=None"])
    monkeypatch.setattr(tuning, "flash_available", lambda: True)
    assert tuning.flash_on("cmp") and not tuning.flash_on("swa")
    assert tuning.kernel_options("cmp", torch.bfloat16, 128, 128) == {"BACKEND": "FLASH"}
    tuning.apply(["KV_BLOCK=64"])                  # auto-on counts for the tile check too
    assert "['cmp']" in tuning.flash_problem()
    monkeypatch.setattr(tuning, "flash_available", lambda: False)
    assert not tuning.flash_on("cmp") and tuning.flash_problem() is None
    assert tuning.kernel_options("cmp", torch.bfloat16, 128, 128) is None


def test_operator_refuses_flash_settings_that_cannot_run_before_compute(restore):
    from nsa_flex import operator as op
    op.refuse_unchecked_knobs()                                     # defaults: nothing to refuse
    tuning.apply(["FLASH.cmp=1"])                      # (no flash-attn-4 on the CPU machines)
    with pytest.raises(ValueError, match=r"FLASH is 1 for \['cmp'\].*pip install -e .\[flash\]"):
        op.refuse_unchecked_knobs()


def test_flash_none_needs_its_answer_found_before_a_trace(restore, monkeypatch):
    tuning.apply(["FLASH.cmp=None"])
    monkeypatch.setattr(tuning, "_FLASH_AVAILABLE", None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="prepare_flash"):
        tuning.flash_on("cmp")
    monkeypatch.setattr(tuning, "_FLASH_AVAILABLE", False)        # found earlier: read
    assert not tuning.flash_on("cmp")


def test_knob_refusal_inside_a_trace_looks_for_no_package(restore, monkeypatch):
    import importlib.util

    from nsa_flex import operator as op

    def no_lookup(name):
        raise AssertionError("find_spec called while tracing (Dynamo refuses it)")
    tuning.apply(["FLASH.cmp=1"])
    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    op.refuse_unchecked_knobs()


def test_flash_above_its_head_dim_stays_on_triton_or_is_refused(restore, monkeypatch):
    import importlib.util

    from nsa_flex import operator as op
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "flash_attn.cute" else real(name))
    tuning.apply(["FLASH.cmp=1"])
    assert tuning.kernel_options("cmp", torch.bfloat16, 128, 128, v_dim=128) == {"BACKEND": "FLASH"}
    # the paper's Dk = 192: Triton's options, not FLASH, and FLASH = 1 refused before compute
    assert "BACKEND" not in (tuning.kernel_options("cmp", torch.bfloat16, 192, 128, v_dim=128) or {})
    assert "BACKEND" not in (tuning.kernel_options("cmp", torch.bfloat16, 128, 128, v_dim=256) or {})
    assert tuning.flash_problem(128, 128) is None
    why = tuning.flash_problem(192, 128)
    assert "Dk=192" in why and "Dv=128" in why and "FLASH_MAX_HEAD_DIM" in why and "set FLASH" in why
    with pytest.raises(ValueError, match=r"Dk=192, Dv=128"):
        op.refuse_unchecked_knobs(192, 128)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # inside a trace too
    with pytest.raises(ValueError, match=r"Dk=192, Dv=128"):
        op.refuse_unchecked_knobs(192, 128)
    # automatic (None) with the package: Triton at Dk = 192, not an error
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    tuning.apply(["FLASH.cmp=None"])
    monkeypatch.setattr(tuning, "flash_available", lambda: True)
    assert tuning.flash_problem(192, 128) is None
    assert "BACKEND" not in (tuning.kernel_options("cmp", torch.bfloat16, 192, 128, v_dim=128) or {})
