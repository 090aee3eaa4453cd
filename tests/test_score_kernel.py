"""The fused scoring kernel (nsa_flex/score_kernel.py) against the torch route of eqs. 8–10:
on a CUDA machine the kernel itself, elsewhere Triton's interpreter on the CPU (in a subprocess:
the interpreter is chosen when triton is first imported)."""

import textwrap

import pytest
import torch
from triton_script import run_triton_script

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from masks import pack_gqa
    from nsa_flex import NSAConfig
    from nsa_flex.score_kernel import launch
    from nsa_flex.selection import selection_scores, top_n

    DEV = os.environ["SCORE_TEST_DEVICE"]

    def inputs(T, Hq, Hkv, D, l, d, lp, seed, dtype=torch.float32):
        """cfg, G, Tc, Ts, scale, q and k̃ in ``dtype``, their float32 values, and the LSE of the
        float32 scores over the visible compressed blocks (computed on the CPU: IEEE matmuls,
        where a GPU matmul may use TF32; products of 16-bit numbers are exact in float32, which
        the kernel accumulates in)."""
        cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=lp, sel_topn=4, window=8)
        g = torch.Generator().manual_seed(seed)
        G, Tc, Ts = Hq // Hkv, cfg.num_cmp_blocks(T), cfg.num_sel_blocks(T)
        q16 = pack_gqa(torch.randn(1, T, Hq, D, generator=g), Hkv).to(dtype)
        k16 = torch.randn(1, Hkv, Tc, D, generator=g).to(dtype)
        qp, kc = q16.float(), k16.float()
        scale = D ** -0.5
        s = torch.matmul(qp, kc.transpose(-1, -2)) * scale
        seen = (torch.arange(Tc) * d + l - 1)[None, :] <= (torch.arange(T * G) // G)[:, None]
        lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
        return cfg, G, Tc, Ts, scale, q16, k16, qp, kc, lse

    def case(T, Hq, Hkv, D, l, d, lp, seed, dtype=torch.float32):
        cfg, G, Tc, Ts, scale, q16, k16, qp, kc, lse = inputs(T, Hq, Hkv, D, l, d, lp, seed, dtype)
        q16, k16, lse_d = q16.to(DEV), k16.to(DEV), lse.to(DEV)
        # whole sequence, then chunks of positions with only their visible selection blocks
        for t0, t1 in [(0, T), (T // 3, T), (T // 5, T // 2 + 1)]:
            ns = min(Ts, (t1 - 1) // lp + 2) if t0 else Ts
            want = selection_scores(qp, kc, lse, cfg, scale, G, t0, t1, num_sel=ns)
            got = torch.full((1, Hkv, t1 - t0, ns), float("nan"), device=DEV)
            launch(q16, k16, lse_d, l, d, lp, scale, G, t0, t1, got)
            got = got.cpu()
            assert not got.isnan().any(), ("a score was not written", t0, t1)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (T, Hq, Hkv, l, d, lp, t0, t1, err)
            pos = torch.arange(t0, t1)
            assert torch.equal(top_n(got, pos, cfg), top_n(want, pos, cfg)), (T, l, d, lp, t0, t1)
        # the same through the registered operator that the compiled operator calls
        op = torch.ops.nsa_flex.selection_scores(q16, k16, lse_d, l, d, lp, scale, G, t0, t1, ns)
        assert torch.equal(op.cpu(), got)
        # a slice of the compressed keys (as the caller may pass): strided, not copied
        got2 = torch.full((1, Hkv, t1 - t0, ns), float("nan"), device=DEV)
        launch(q16, k16[:, :, :Tc], lse_d, l, d, lp, scale, G, t0, t1, got2)
        assert torch.equal(got2.cpu(), got)

    case(200, 8, 2, 24, 32, 16, 64, 0)     # paper's l, d, l' (a carried block), D not a power of 2
    case(150, 16, 1, 16, 64, 64, 64, 1)    # fla-core's l = d = l' (nothing carried)
    case(333, 4, 4, 16, 48, 16, 64, 2)     # two carried blocks, T not a multiple of the tile
    case(97, 2, 1, 32, 16, 8, 32, 3)
    case(600, 4, 2, 16, 16, 8, 16, 4)      # 38 blocks: early tiles stop before the second step
    case(1200, 32, 2, 16, 32, 16, 64, 5)   # G = 16 as in the paper's shapes; two steps
    # the 16-bit tiles (128 x 64); float16, since the interpreter has no bf16 dot
    case(1200, 32, 2, 16, 32, 16, 64, 6, torch.float16)
    print("ok")
''')


def test_fused_scores_match_the_torch_route():
    run_triton_script(SCRIPT, "SCORE_TEST_DEVICE")


def test_tiles_come_from_the_tuning_knobs(monkeypatch):
    from nsa_flex import tuning
    from nsa_flex.score_kernel import tiles

    assert tiles(torch.bfloat16, 128, 16, 4) == dict(BT=8, BJ=16, num_warps=8, num_stages=3)
    assert tiles(torch.bfloat16, 192, 16, 4) == dict(BT=8, BJ=16, num_warps=8, num_stages=3)
    assert tiles(torch.bfloat16, 320, 16, 4) == dict(BT=4, BJ=16, num_warps=4, num_stages=2)
    assert tiles(torch.float32, 128, 16, 4)["num_stages"] == 1
    assert tiles(torch.bfloat16, 128, 256, 4)["BT"] == 1     # at least one position a program
    monkeypatch.setattr(tuning, "SCORE_TILES", dict(rows=64, blocks=32, warps=4, stages=3))
    assert tiles(torch.bfloat16, 128, 16, 4) == dict(BT=4, BJ=8, num_warps=4, num_stages=3)
    monkeypatch.setattr(tuning, "SCORE_TILES", dict(rows=48, blocks=32, warps=4, stages=3))
    with pytest.raises(ValueError, match=r"SCORE_TILES\['rows'\] = 48"):
        tiles(torch.bfloat16, 128, 16, 4)


def test_kernel_names_what_its_tiles_cannot_take():
    from nsa_flex import NSAConfig
    from nsa_flex.score_kernel import unfit

    assert unfit(NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512), 16) is None
    assert "G=3" in unfit(NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512), 3)
    assert "l'/d=3" in unfit(NSAConfig(cmp_block=16, cmp_stride=16, sel_block=48, sel_topn=16, window=512), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the kernel's own route)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_selection_on_cuda(monkeypatch, dtype):
    """select_blocks through the kernel (compiled, as the operator runs it) against the torch
    route on float32 scores: the same blocks in float32; in bfloat16 (where the torch route rounds
    q·k̃ᵀ to bf16 first and the kernel does not) at least as close to float32 as the torch route."""
    from masks import pack_gqa
    from nsa_flex import NSAConfig, tuning
    from nsa_flex.selection import select_blocks

    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512)
    T, Hq, Hkv, D = 4096, 32, 2, 64
    G, Tc, scale = Hq // Hkv, cfg.num_cmp_blocks(T), D ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    qp = pack_gqa(torch.randn(1, T, Hq, D, device="cuda", generator=g), Hkv)
    kc = torch.randn(1, Hkv, Tc, D, device="cuda", generator=g)
    s = torch.matmul(qp, kc.transpose(-1, -2)) * scale
    pos = torch.arange(T * G, device="cuda") // G
    seen = (torch.arange(Tc, device="cuda") * 16 + 31)[None, :] <= pos[:, None]
    lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
    monkeypatch.setattr(tuning, "SCORE_KERNEL", 0)
    want = select_blocks(qp, kc, lse, cfg, scale, G, T)
    q_in, k_in = qp.to(dtype), kc.to(dtype)
    route = select_blocks(q_in, k_in, lse, cfg, scale, G, T)
    monkeypatch.setattr(tuning, "SCORE_KERNEL", 1)
    fused = torch.compile(lambda q, k, l: select_blocks(q, k, l, cfg, scale, G, T), fullgraph=True)
    got = fused(q_in, k_in, lse)

    def same(a, b):
        return (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
    if dtype == torch.float32:   # equal scores up to float32 summation order: ties may flip
        assert same(got, want) >= 0.999, same(got, want)
    else:
        assert same(got, want) >= same(route, want) - 0.01, (same(got, want), same(route, want))


@pytest.mark.parametrize("dtype,head_dim,tiles,G", [
    (torch.bfloat16, 128, None, 16), (torch.bfloat16, 192, None, 16), (torch.float32, 192, None, 16),
    (torch.bfloat16, 128, dict(rows=64, blocks=64, warps=4, stages=3), 16),
    (torch.float32, 24, None, 4), (torch.bfloat16, 128, None, 4)])
def test_kernel_compiles_for_hopper(monkeypatch, dtype, head_dim, tiles, G):
    """Ahead-of-time compile for sm90 (no GPU needed) with the tiles the launcher picks (the
    defaults, one other choice for --sweep, and G = 4, where a program holds 16 or more
    positions): fits the card's shared memory, uses tensor-core instructions for 16-bit
    inputs, has no float64 arithmetic (a float launch argument once made the scores fp64 under
    Inductor), and has one dot, q·k̃ᵀ (Triton once turned the pooling's shift, a sum of broadcast
    products, into a second, TF32 dot at G = 4: carried scores off by 1e-3 on the GPU)."""
    if tiles:
        from nsa_flex import tuning
        monkeypatch.setattr(tuning, "SCORE_TILES", tiles)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa_flex import score_kernel
    from nsa_flex.score_kernel import LOG2E, _scores_kernel

    r = 4
    opts = score_kernel.tiles(dtype, head_dim, G, r)
    ty = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    sig = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "lse_ptr": "*fp32", "out_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("sq_b", "sq_h", "sq_r", "sk_b", "sk_h", "sk_i", "sl_b", "sl_h",
                                   "so_b", "so_h", "so_t", "H", "t0", "P", "Tc", "Ts")})
    const = dict(SCALE_LOG2=head_dim ** -0.5 * LOG2E, D=head_dim, DP=triton.next_power_of_2(head_dim),
                 G=G, BT=opts["BT"], BJ=opts["BJ"], R=r, A=2, L=32, S=16, IEEE=dtype == torch.float32)
    sig.update(dict.fromkeys(const, "constexpr"))
    try:
        k = triton.compile(ASTSource(_scores_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=opts["num_warps"], num_stages=opts["num_stages"]))
    except RuntimeError as e:   # no CUDA toolchain in this triton build
        if "ptxas" in str(e) or "not found" in str(e).lower():
            pytest.skip(f"triton cannot compile for CUDA here: {e}")
        raise
    ptx = k.asm["ptx"]
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    assert ".f64" not in ptx
    assert k.asm["ttir"].count("tt.dot ") == 1, [ln for ln in k.asm["ttir"].splitlines() if "tt.dot " in ln]
    if dtype != torch.float32:
        assert "wgmma" in ptx
    else:   # float32 scores by IEEE FMAs, as the torch route's float32 matmul (no TF32)
        assert "tf32" not in ptx
