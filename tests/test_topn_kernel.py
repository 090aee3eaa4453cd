"""The top-n kernel (nsa_flex/topn_kernel.py) against the reference's plain top-n (tests/
reference.py) and the torch route (selection.top_n): on a CUDA machine the kernel itself,
elsewhere Triton's interpreter on the CPU (tests/triton_script.py)."""

import textwrap

import pytest
from triton_script import run_triton_script

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from masks import document_starts
    from nsa_flex import NSAConfig
    from nsa_flex.selection import top_n
    from nsa_flex.topn_kernel import launch
    from reference import reference_top_n

    DEV = os.environ["TOPN_TEST_DEVICE"]

    def case(B, H, P, Ts, t0, lp, n, n_init, n_local, levels, seed, tile=8192, docs=False):
        """Scores on ``levels`` distinct values (0: continuous) so that ties are common, some
        negative (clamped to 0 by the rule), for positions t0 … t0 + P − 1; with documents the
        positions count from each one's document start."""
        cfg = NSAConfig(cmp_block=lp, cmp_stride=lp, sel_block=lp, sel_topn=n, n_init=n_init,
                        n_local=n_local, window=lp)
        g = torch.Generator().manual_seed(seed)
        p = torch.randn(B, H, P, Ts, generator=g)
        if levels:
            p = torch.round(p * levels / 3) / levels
        pos = torch.arange(t0, t0 + P)
        start = None
        if docs:
            cuts = torch.randint(0, t0 + P, (B, 3), generator=g)
            ids = (torch.arange(t0 + P)[None, :, None] >= cuts[:, None, :]).sum(-1)
            start = document_starts(ids)
            pos = (pos - start[:, t0:])[:, None]
        want = top_n(p, pos, cfg)
        got = launch(p.to(DEV), t0, lp, n_init, n_local, n, tile,
                     None if start is None else start.to(DEV)).cpu()
        assert got.dtype == torch.int32 and got.shape == want.shape, (got.shape, want.shape)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), (B, H, P, Ts, t0, lp, n)
        # the reference on scores >= 0 (the operator's are: sums of exp), one row at a time
        pa = p.abs()
        got = launch(pa.to(DEV), t0, lp, n_init, n_local, n, tile,
                     None if start is None else start.to(DEV)).cpu()
        for b in range(B):
            for h in range(H):
                for i in range(P):
                    t = t0 + i - (0 if start is None else int(start[b, t0 + i]))
                    want_set = reference_top_n(pa[b, h, i].tolist(), t, cfg)
                    row = got[b, h, i]
                    assert set(row[row >= 0].tolist()) == want_set and len(want_set) == (row >= 0).sum(), (b, h, i)

''')

# one subprocess a case, so that a slow or failing case names itself
CASES = [
    "case(1, 2, 100, 20, 0, 16, 4, 1, 2, 4, 0)",           # ties on a few levels, from position 0
    "case(2, 1, 40, 37, 400, 16, 8, 1, 2, 0, 1)",          # a later chunk, continuous scores, B = 2
    "case(1, 1, 64, 5, 0, 16, 8, 1, 2, 2, 2)",             # fewer blocks than n: -1 fills
    "case(1, 2, 40, 64, 3000, 64, 16, 0, 0, 3, 3)",        # nothing forced
    "case(1, 1, 30, 70, 64 * 40, 64, 16, 2, 3, 1, 4)",     # two initial, three local blocks, all ties
    "case(1, 1, 1, 1, 0, 64, 16, 1, 2, 0, 5)",             # one position, one block
    "case(1, 1, 70, 300, 1000, 16, 16, 1, 2, 5, 6)",       # rows over several programs
    "case(1, 1, 12, 300, 4700, 16, 5, 1, 2, 3, 7, tile=128)",  # rows longer than a program's tile:
    "case(2, 1, 6, 130, 1000, 8, 16, 1, 1, 0, 8, tile=64)",    # walked in chunks, ties across them
    "case(2, 1, 60, 40, 300, 8, 4, 1, 2, 3, 9, docs=True)",    # positions of several documents
    "case(1, 2, 30, 50, 0, 4, 3, 2, 1, 0, 10, tile=32, docs=True)",
    # a candidate scored −0.0 is a candidate (score 0), in both routes
    "assert torch.equal(launch(torch.tensor([[[[0.5, -0.0, 0.25, -1.0]]]]).to(DEV), 63, 16, 0, 0, 3, "
    "8192).cpu().sort(-1).values, torch.tensor([[[[0, 1, 2]]]], dtype=torch.int32))",
]


@pytest.mark.parametrize("call", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_top_n_kernel_matches_the_reference(call):
    run_triton_script(SCRIPT + call + "\nprint('ok')\n", "TOPN_TEST_DEVICE")
