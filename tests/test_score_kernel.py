"""The fused scoring kernel (nsa_flex/score_kernel.py) against the torch route of eqs. 8–10,
run by Triton's interpreter on the CPU (in a subprocess: the interpreter is chosen when triton
is first imported)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import torch
    from masks import pack_gqa
    from nsa_flex import NSAConfig
    from nsa_flex.score_kernel import launch
    from nsa_flex.selection import selection_scores, top_n

    def case(T, Hq, Hkv, D, l, d, lp, seed):
        cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=lp, sel_topn=4, window=8)
        g = torch.Generator().manual_seed(seed)
        G, Tc, Ts = Hq // Hkv, cfg.num_cmp_blocks(T), cfg.num_sel_blocks(T)
        qp = pack_gqa(torch.randn(1, T, Hq, D, generator=g), Hkv)
        kc = torch.randn(1, Hkv, Tc, D, generator=g)
        scale = D ** -0.5
        s = torch.matmul(qp, kc.transpose(-1, -2)) * scale
        seen = (torch.arange(Tc) * d + l - 1)[None, :] <= (torch.arange(T * G) // G)[:, None]
        lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
        want = selection_scores(qp, kc, lse, cfg, scale, G, 0, T)
        got = torch.full((1, Hkv, T, Ts), float("nan"))
        launch(qp, kc, lse, l, d, lp, scale, G, T, got)
        assert not got.isnan().any(), "a score was not written"
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (T, Hq, Hkv, l, d, lp, err)
        pos = torch.arange(T)
        assert torch.equal(top_n(got, pos, cfg), top_n(want, pos, cfg)), (T, l, d, lp)
        # the same through the registered operator that the compiled operator calls
        op = torch.ops.nsa_flex.selection_scores(qp, kc, lse, l, d, lp, scale, G, T, Ts)
        assert torch.equal(op, got)

    case(200, 8, 2, 24, 32, 16, 64, 0)     # paper's l, d, l' (a halo block), D not a power of 2
    case(150, 16, 1, 16, 64, 64, 64, 1)    # fla-core's l = d = l' (no halo)
    case(333, 4, 4, 16, 48, 16, 64, 2)     # two halo blocks, T not a multiple of the tile
    case(97, 2, 1, 32, 16, 8, 32, 3)
    case(600, 4, 2, 16, 16, 8, 16, 4)      # 38 blocks: early tiles stop before the second step
    print("ok")
''')


def test_fused_scores_match_the_torch_route():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_kernel_refuses_what_its_tiles_cannot_take():
    from nsa_flex import NSAConfig
    from nsa_flex.score_kernel import check

    check(NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512), 16)
    with pytest.raises(ValueError, match="G=3"):
        check(NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512), 3)
