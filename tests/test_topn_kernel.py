"""The top-n kernel (nsa_flex/topn_kernel.py) against the reference's plain top-n (tests/
reference.py) and selection.top_n, the route it replaces: on a CUDA machine the kernel itself,
elsewhere Triton's interpreter on the CPU (tests/triton_script.py)."""

import textwrap
import warnings

import pytest
import torch
from triton_script import run_triton_script

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from nsa_flex import NSAConfig, tuning
    from nsa_flex.selection import top_n, top_n_by_value
    from nsa_flex.topn_kernel import launch
    from reference import reference_top_n

    DEV = os.environ["TOPN_TEST_DEVICE"]

    def case(B, H, P, Ts, t0, lp, n, n_init, n_local, levels, seed):
        """Scores on ``levels`` distinct values (0: continuous) so that ties are common, some
        negative (clamped to 0 by the rule), for positions t0 … t0 + P − 1."""
        cfg = NSAConfig(cmp_block=lp, cmp_stride=lp, sel_block=lp, sel_topn=n, n_init=n_init,
                        n_local=n_local, window=lp)
        g = torch.Generator().manual_seed(seed)
        p = torch.randn(B, H, P, Ts, generator=g)
        if levels:
            p = torch.round(p * levels / 3) / levels
        pos = torch.arange(t0, t0 + P)
        want = top_n(p, pos, cfg)
        got = launch(p.to(DEV), t0, lp, n_init, n_local, n).cpu()
        assert got.dtype == torch.int32 and got.shape == want.shape, (got.shape, want.shape)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), (B, H, P, Ts, t0, lp, n)
        assert torch.equal(got.sort(-1).values, top_n_by_value(p, pos, cfg).sort(-1).values)
        # the reference on scores >= 0 (the operator's are: sums of exp), one row at a time
        pa = p.abs()
        got = launch(pa.to(DEV), t0, lp, n_init, n_local, n).cpu()
        for b in range(B):
            for h in range(H):
                for i in range(P):
                    want_set = reference_top_n(pa[b, h, i].tolist(), t0 + i, cfg)
                    row = got[b, h, i]
                    assert set(row[row >= 0].tolist()) == want_set and len(want_set) == (row >= 0).sum(), (b, h, i)
        return pa, got

    case(1, 2, 300, 20, 0, 16, 4, 1, 2, 4, 0)        # ties on a few levels, from position 0
    case(2, 3, 97, 37, 400, 16, 8, 1, 2, 0, 1)       # a later chunk, continuous scores, B = 2
    case(1, 1, 64, 5, 0, 16, 8, 1, 2, 2, 2)          # fewer blocks than n: -1 fills
    case(1, 4, 130, 64, 3000, 64, 16, 0, 0, 3, 3)    # nothing forced
    case(1, 2, 50, 70, 64 * 40, 64, 16, 2, 3, 1, 4)  # two initial, three local blocks, all ties
    case(1, 1, 1, 1, 0, 64, 16, 1, 2, 0, 5)          # one position, one block
    case(1, 2, 257, 300, 1000, 16, 16, 1, 2, 5, 6)            # rows over several programs
    # a candidate scored −0.0 is a candidate (score 0), in both routes
    z = torch.tensor([[[[0.5, -0.0, 0.25, -1.0]]]])
    assert torch.equal(launch(z.to(DEV), 63, 16, 0, 0, 3).cpu().sort(-1).values,
                       torch.tensor([[[[0, 1, 2]]]], dtype=torch.int32))
    assert torch.equal(top_n(z, torch.tensor([63]), NSAConfig(cmp_block=16, cmp_stride=16, sel_block=16,
                       sel_topn=3, n_init=0, n_local=0, window=16)).sort(-1).values,
                       torch.tensor([[[[0, 1, 2]]]], dtype=torch.int32))
    # the registered operator that the compiled operator calls; one row a program gives the same
    p, got = case(1, 1, 40, 37, 200, 16, 8, 1, 2, 3, 7)
    assert torch.equal(torch.ops.nsa_flex.top_n(p.to(DEV), 200, 16, 1, 2, 8).cpu(), got)
    tuning.TOPN_KERNEL_TILE = 16
    assert torch.equal(launch(p.to(DEV), 200, 16, 1, 2, 8).cpu(), got)
    print("ok")
''')


def test_topn_kernel_matches_the_exact_route():
    run_triton_script(SCRIPT, "TOPN_TEST_DEVICE")


def test_topn_kernel_names_a_row_it_cannot_hold(monkeypatch):
    from nsa_flex import tuning
    from nsa_flex.topn_kernel import launch, unfit

    assert unfit(4096) is None
    assert "TOPN_KERNEL_MAX_BLOCKS = 4096" in unfit(4097) and "4097" in unfit(4097)
    monkeypatch.setattr(tuning, "TOPN_KERNEL_MAX_BLOCKS", 8)
    with pytest.raises(ValueError, match="at most tuning.TOPN_KERNEL_MAX_BLOCKS = 8 selection blocks, got 9"):
        launch(torch.zeros(1, 1, 4, 9), 0, 16, 1, 2, 4)


def test_a_sequence_too_long_for_the_kernel_is_named_once(monkeypatch):
    from nsa_flex import NSAConfig, tuning
    from nsa_flex.operator import _warn_unfit_topn_kernel

    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512)
    monkeypatch.setattr(tuning, "TOPN_KERNEL_MAX_BLOCKS", 8)
    _warn_unfit_topn_kernel.cache_clear()
    with pytest.warns(UserWarning, match=r"got 9: this sequence's top-n takes the torch route"):
        _warn_unfit_topn_kernel(cfg, 9 * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unfit_topn_kernel(cfg, 9 * 64)   # once per shape
        _warn_unfit_topn_kernel(cfg, 8 * 64)   # fits: nothing to say
    _warn_unfit_topn_kernel.cache_clear()
