"""The fused scoring kernel (nsa_flex/score_kernel.py) against the torch route of eqs. 8–10
(selection.selection_scores): on a CUDA machine the kernel itself, elsewhere Triton's
interpreter on the CPU (in a subprocess: the interpreter is chosen when triton is first
imported). Groups and l'/d that are not powers of two, and packed documents, included."""

import textwrap

import pytest
from triton_script import run_triton_script

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from masks import compressed_block_ends, document_starts, pack_gqa
    from nsa_flex import NSAConfig
    from nsa_flex.score_kernel import launch
    from nsa_flex.selection import selection_scores, top_n

    DEV = os.environ["SCORE_TEST_DEVICE"]

    def case(T, Hq, Hkv, D, l, d, lp, seed, dtype=torch.float32, tiles=(64, 64, 4, 1), docs=0):
        """Scores of chunks of positions (each with its visible selection blocks) from the
        kernel vs the torch route on the float32 values of the same inputs; with ``docs``
        documents, the compressed keys in the document layout (T // d slots)."""
        cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=lp, sel_topn=4, window=8)
        g = torch.Generator().manual_seed(seed)
        G, Ts = Hq // Hkv, cfg.num_sel_blocks(T)
        start = ends = None
        if docs:
            cuts = torch.randint(1, T, (1, docs - 1), generator=g)
            ids = (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1)
            start, ends = document_starts(ids), compressed_block_ends(ids, l, d)
            Tc = T // d
        else:
            Tc = cfg.num_cmp_blocks(T)
        q16 = pack_gqa(torch.randn(1, T, Hq, D, generator=g), Hkv).to(dtype)
        k16 = torch.randn(1, Hkv, Tc, D, generator=g).to(dtype)
        qp, kc = q16.float(), k16.float()
        scale = D ** -0.5
        s = torch.matmul(qp, kc.transpose(-1, -2)) * scale
        rows = torch.arange(T * G) // G
        if docs:
            seen = (ends[0][None, :] <= rows[:, None]) & (ends[0][None, :] >= start[0][rows][:, None])
        else:
            seen = (torch.arange(Tc) * d + l - 1)[None, :] <= rows[:, None]
        lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
        q16, k16, lse_d = q16.to(DEV), k16.to(DEV), lse.to(DEV)
        sd, ed = (None, None) if not docs else (start.to(DEV), ends.to(DEV))
        for t0, t1 in [(0, T), (T // 3, T), (T // 5, T // 2 + 1)]:
            ns = min(Ts, (t1 - 1) // lp + 2) if t0 else Ts
            want = selection_scores(qp, kc, lse, cfg, scale, G, t0, t1, ns, start, ends)
            got = torch.full((1, Hkv, t1 - t0, ns), float("nan"), device=DEV)
            launch(q16, k16, lse_d, l, d, lp, scale, G, t0, t1, got, tiles, sd, ed)
            got = got.cpu()
            assert not got.isnan().any(), ("a score was not written", t0, t1)
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            assert err < 1e-5, (T, Hq, Hkv, l, d, lp, t0, t1, err)
            pos = torch.arange(t0, t1) if not docs else (torch.arange(t0, t1) - start[:, t0:t1])[:, None]
            assert torch.equal(top_n(got, pos, cfg), top_n(want, pos, cfg)), (T, l, d, lp, t0, t1)
        # the same through the registered operator that the compiled operator calls
        op = torch.ops.nsa_flex.selection_scores(q16, k16, lse_d, l, d, lp, scale, G, t0, t1, ns,
                                                 list(tiles), sd, ed)
        assert torch.equal(op.cpu(), got)

    case(200, 8, 2, 24, 32, 16, 64, 0)     # paper's l, d, l' (a carried block), D not a power of 2
    case(150, 16, 1, 16, 64, 64, 64, 1)    # fla-core's l = d = l' (nothing carried)
    case(333, 4, 4, 16, 48, 16, 64, 2)     # two carried blocks, T not a multiple of the tile
    case(97, 2, 1, 32, 16, 8, 32, 3)
    case(600, 4, 2, 16, 16, 8, 16, 4)      # 38 blocks: early tiles stop before the second step
    case(400, 32, 2, 16, 32, 16, 64, 5, tiles=(128, 64, 8, 3))  # G = 16, the 16-bit tiles
    case(300, 18, 3, 16, 32, 16, 64, 6)    # G = 6 (the 100m flavor's): padded to 8 rows
    case(170, 9, 3, 8, 6, 3, 9, 7)         # G = 3, l'/d = 3, l/d = 2: padded group and blocks
    case(250, 6, 6, 16, 8, 8, 40, 8)       # G = 1, l'/d = 5
    case(260, 8, 2, 16, 8, 4, 16, 9, docs=5)       # documents: each its own blocks
    case(200, 6, 2, 16, 6, 3, 9, 10, docs=8)       # documents, odd blocks, G = 3
    # 16-bit inputs; float16, since the interpreter has no bf16 dot
    case(400, 32, 2, 16, 32, 16, 64, 11, torch.float16, tiles=(128, 64, 8, 3))
    print("ok")
''')


def test_fused_scores_match_the_torch_route():
    run_triton_script(SCRIPT, "SCORE_TEST_DEVICE")
