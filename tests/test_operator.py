"""The operator against the independent float64 reference (tests/reference.py), on CPU."""

import pytest
import torch

from nsa_flex import NSAConfig, nsa_attention
from reference import reference_nsa


def make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate_swa=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_blocks(T)
    shapes = [(B, T, Hq, Dk), (B, T, Hkv, Dk), (B, T, Hkv, Dv), (B, Tc, Hkv, Dk), (B, Tc, Hkv, Dv)]
    xs = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    xs.append(torch.rand(B, T, Hq, 3, generator=g, dtype=dtype))
    swa = [torch.randn(B, T, Hkv, Dk, generator=g, dtype=dtype),
           torch.randn(B, T, Hkv, Dv, generator=g, dtype=dtype)] if separate_swa else [None, None]
    return xs, swa


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # (B, T, Hq, Hkv, Dk, Dv, cfg kwargs, separate swa)
    (1, 77, 4, 4, 16, 16, dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, n_init=1, n_local=1, window=9), False),
    (2, 61, 4, 2, 16, 8, dict(cmp_block=8, cmp_stride=8, sel_block=8, sel_topn=4, n_init=1, n_local=2, window=5), True),
    (1, 93, 8, 2, 8, 12, dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=20, n_init=1, n_local=2, window=20), False),
    (1, 70, 16, 1, 12, 16, dict(cmp_block=4, cmp_stride=2, sel_block=8, sel_topn=4, n_init=2, n_local=1, window=7), True),
    (2, 45, 32, 2, 8, 8, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topn=2, n_init=0, n_local=0, window=1), False),
    (1, 130, 4, 1, 16, 24, dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=50), False),
    (1, 20, 2, 1, 8, 8, dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=512), False),
]


@pytest.fixture(params=[0, 1], ids=["one-call", "forced-static"])
def sel_forced_static(request, monkeypatch):
    """The selected branch as one attention, and as forced blocks + rest merged by LSE."""
    from nsa_flex import tuning
    monkeypatch.setattr(tuning, "SEL_FORCED_STATIC", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[f"G{c[2] // c[3]}-T{c[1]}" for c in CASES])
def test_matches_float64_reference(case, sel_forced_static):
    B, T, Hq, Hkv, Dk, Dv, kw, separate = case
    cfg = NSAConfig(**kw)
    xs, swa = make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate)
    ours = [x.clone().requires_grad_() for x in xs + [s for s in swa if s is not None]]
    refs = [x.detach().double().requires_grad_() for x in ours]
    n_main = 6

    def split(ts):
        return ts[:n_main], (ts[n_main:] + [None, None])[:2]

    (a, (ks, vs)), (ra, (rks, rvs)) = split(ours), split(refs)
    o, idx = nsa_attention(*a, cfg, k_swa=ks, v_swa=vs, return_indices=True)
    o_ref, sel_ref = reference_nsa(*ra, cfg, k_swa=rks, v_swa=rvs)

    assert o.shape == (B, T, Hq, Dv) and o.dtype == torch.float32
    assert idx.shape == (B, T, Hkv, cfg.sel_topn)
    assert rel(o, o_ref) < 1e-4
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                got = idx[b, t, h].tolist()
                chosen = {j for j in got if j >= 0}
                assert len(chosen) == sum(j >= 0 for j in got), "a block selected twice"
                assert chosen == sel_ref[b][h][t], (b, h, t)

    w = torch.randn_like(o_ref)
    (o * w.float()).sum().backward()
    (o_ref * w).sum().backward()
    names = ["q", "k", "v", "k_cmp", "v_cmp", "gates", "k_swa", "v_swa"]
    for name, x, rx in zip(names, ours, refs):
        if rx.grad is None or rx.numel() == 0:
            continue
        assert x.grad is not None, name
        assert rel(x.grad, rx.grad) < 1e-4, (name, rel(x.grad, rx.grad))


def test_no_cmp_block_gives_zero_compressed_output():
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, window=4)
    xs, _ = make_inputs(1, 40, 2, 1, 8, 8, cfg)
    gates = torch.zeros_like(xs[5])
    gates[..., 0] = 1.0                       # compressed branch only
    o = nsa_attention(*xs[:5], gates, cfg)
    assert torch.all(o[:, :31] == 0)          # t < l - 1 sees no complete block
    assert torch.all(o[:, 31:].abs().sum(-1) > 0)


def test_bfloat16_close_to_float32():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, window=12)
    xs, _ = make_inputs(1, 64, 4, 2, 16, 16, cfg)
    o32 = nsa_attention(*xs, cfg)
    o16 = nsa_attention(*[x.bfloat16() for x in xs], cfg)
    assert o16.dtype == torch.bfloat16
    assert rel(o16, o32) < 2e-2


@pytest.mark.parametrize("causal_slices,topn_causal,by_value", [(0, 0, 0), (3, 0, 0), (3, 1, 0), (3, 1, 1)])
def test_compiled_matches_eager_on_cpu(causal_slices, topn_causal, by_value, monkeypatch):
    from nsa_flex import tuning
    monkeypatch.setattr(tuning, "TOPN_BY_VALUE", by_value)
    monkeypatch.setattr(tuning, "SCORE_CAUSAL_SLICES", causal_slices)
    monkeypatch.setattr(tuning, "TOPN_CAUSAL", topn_causal)
    monkeypatch.setattr(tuning, "SCORE_CHUNK_ELEMS", 440)    # 5 chunks of 10 positions here
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, window=12)
    xs, _ = make_inputs(1, 50, 4, 2, 16, 8, cfg, seed=3)
    eager_in = [x.clone().requires_grad_() for x in xs]
    comp_in = [x.clone().requires_grad_() for x in xs]
    o_e, i_e = nsa_attention(*eager_in, cfg, return_indices=True)
    fn = torch.compile(lambda *a: nsa_attention(*a, cfg, return_indices=True), fullgraph=True)
    o_c, i_c = fn(*comp_in)
    assert torch.equal(i_e, i_c)
    assert rel(o_c, o_e) < 1e-5
    o_e.square().sum().backward()
    o_c.square().sum().backward()
    for a, b in zip(comp_in, eager_in):
        assert rel(a.grad, b.grad) < 1e-5


def _inputs_for_errors():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, window=8)
    xs, _ = make_inputs(1, 40, 4, 2, 8, 8, cfg)
    return xs, cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(cmp_block=32, cmp_stride=12), "must divide cmp_block"),
    (dict(cmp_block=32, cmp_stride=16, sel_block=40), "must divide sel_block"),
    (dict(cmp_block=64, cmp_stride=16, sel_block=32), "must not exceed sel_block"),
    (dict(sel_topn=2, n_init=1, n_local=2), "at least n_init \\+ n_local = 3"),
    (dict(window=0), "window=0"),
    (dict(scale=-1.0), "scale=-1.0"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSAConfig(**kwargs)


def test_bad_inputs_are_refused_before_compute():
    xs, cfg = _inputs_for_errors()
    q, k, v, kc, vc, g = xs
    cases = [
        ((torch.randn(1, 40, 3, 8), k, v, kc, vc, torch.rand(1, 40, 3, 3)), ValueError, "Hq=3 must be a multiple of KV heads Hkv=2"),
        ((q, k, v, kc[:, :-1], vc, g), ValueError, "k_cmp has shape .* = 9 complete compression blocks"),
        ((q[0], k, v, kc, vc, g), ValueError, "q must have 4 dimensions"),
        ((q, k.double(), v, kc, vc, g), TypeError, "k has dtype torch.float64 but q has torch.float32"),
        ((q, k, v, kc, vc, g.int()), TypeError, "gates has dtype torch.int32"),
        ((q, k, v[:, :39], kc, vc, g), ValueError, "v has shape"),
        ((q, k, v, kc, vc, g[..., :2]), ValueError, "gates has shape"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            nsa_attention(*args, cfg)
    with pytest.raises(ValueError, match="both k_swa and v_swa"):
        nsa_attention(*xs, cfg, k_swa=k)
    with pytest.raises(TypeError, match="NSAConfig"):
        nsa_attention(*xs, {"window": 8})


def test_ties_go_to_the_lower_block():
    # every key identical: all compressed scores tie, so the top-n beyond the forced blocks
    # must be the lowest-numbered candidates
    cfg = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_topn=4, n_init=1, n_local=1, window=2)
    T = 40
    q = torch.randn(1, T, 2, 8)
    k = torch.ones(1, T, 1, 8)
    kc = torch.ones(1, cfg.num_cmp_blocks(T), 1, 8)
    v, vc = torch.randn(1, T, 1, 8), torch.randn(1, cfg.num_cmp_blocks(T), 1, 8)
    _, idx = nsa_attention(q, k, v, kc, vc, torch.rand(1, T, 2, 3), cfg, return_indices=True)
    t = 39                                           # current block 9; forced {0, 9}
    assert sorted(idx[0, t, 0].tolist()) == [0, 1, 2, 9]


def test_dense_path_in_row_chunks_equals_one_chunk(monkeypatch):
    """The dense path split into many query-row chunks (each with its slice of every mask) gives
    the same output and gradients as one chunk."""
    from nsa_flex import tuning

    cfg = NSAConfig(**CASES[2][6])
    xs, _ = make_inputs(1, 93, 8, 2, 8, 12, cfg, dtype=torch.float64)

    def run():
        leaves = [x.clone().requires_grad_() for x in xs]
        o = nsa_attention(*leaves, cfg)
        o.pow(2).sum().backward()
        return [o.detach()] + [x.grad for x in leaves]

    whole = run()
    monkeypatch.setattr(tuning, "DENSE_CHUNK_ELEMS", 2 * 93 * 2 * 5)  # a few rows per chunk
    chunked = run()
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_dense_path_context_restores():
    from nsa_flex import operator as op
    assert not op._DENSE_ON_CUDA
    with op.dense_path():
        assert op._DENSE_ON_CUDA
        with op.dense_path():
            assert op._DENSE_ON_CUDA
        assert op._DENSE_ON_CUDA
    assert not op._DENSE_ON_CUDA


def test_inference_dense_path_through_sdpa_equals_the_masked_softmax():
    """Without autograd the dense path's selected and sliding branches run through SDPA with a
    boolean mask; output equals the masked softmax's, including rows that see no key (0)."""
    from masks import dense_mask, selected_mask, selection_table
    from nsa_flex.backends import dense_attention, dense_in_chunks

    g = torch.Generator().manual_seed(4)
    B, H, T, G, D = 1, 2, 40, 3, 8
    q = torch.randn(B, H, T * G, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    idx = torch.randint(-1, 4, (B, H, T, 2), generator=g)
    idx = torch.where(idx * 10 <= torch.arange(T)[:, None], idx, -1)
    idx[0, 0, 5] = -1                                   # a position that sees nothing
    mm = selected_mask(selection_table(idx, 4), 10, G)
    want, _ = dense_attention(q, k, v, dense_mask(mm, B, H, T * G, T), 0.3)
    with torch.no_grad():
        got, lse = dense_in_chunks(q, k, v, mm, 0.3, need_lse=False)
    assert lse is None and torch.all(got[0, 0, 5 * G:6 * G] == 0)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", [NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40),
                                 NSAConfig(cmp_block=32, cmp_stride=32, sel_block=32, sel_topn=4, window=40)])
def test_causal_score_slices_change_nothing(cfg, monkeypatch):
    """Scoring each chunk of positions against only the compressed blocks it can see gives the
    same scores and selection as scoring all of them (several chunks, several slice counts)."""
    from nsa_flex import tuning
    from masks import pack_gqa
    from nsa_flex.selection import _visible_k_cmp, select_blocks, selection_scores
    T, Hq, Hkv, D = 300, 8, 2, 16
    G, Tc = Hq // Hkv, cfg.num_cmp_blocks(T)
    g = torch.Generator().manual_seed(7)
    qp = pack_gqa(torch.randn(1, T, Hq, D, generator=g), Hkv)
    kc = torch.randn(1, Hkv, Tc, D, generator=g)
    seen = (torch.arange(Tc) * cfg.cmp_stride + cfg.cmp_block - 1)[None, :] <= (torch.arange(T * G) // G)[:, None]
    lse = torch.logsumexp((qp @ kc.transpose(-1, -2) * D ** -0.5).masked_fill(~seen, float("-inf")), -1)
    monkeypatch.setattr(tuning, "SCORE_CHUNK_ELEMS", 40 * G * Tc * Hkv)      # 8 chunks of 40 positions
    monkeypatch.setattr(tuning, "SCORE_CAUSAL_SLICES", 0)
    monkeypatch.setattr(tuning, "TOPN_CAUSAL", 0)
    want = select_blocks(qp, kc, lse, cfg, D ** -0.5, G, T)
    for slices in (1, 3, 1000):
        monkeypatch.setattr(tuning, "SCORE_CAUSAL_SLICES", slices)
        monkeypatch.setattr(tuning, "TOPN_CAUSAL", 0)
        assert torch.equal(select_blocks(qp, kc, lse, cfg, D ** -0.5, G, T), want), slices
        # ranking only the blocks a chunk can have: the same blocks (their order is free)
        monkeypatch.setattr(tuning, "TOPN_CAUSAL", 1)
        got = select_blocks(qp, kc, lse, cfg, D ** -0.5, G, T)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), slices
        for t0, t1 in ((0, 40), (120, 160), (280, 300)):
            kv = _visible_k_cmp(kc, cfg, t1)
            assert kv.shape[2] >= cfg.num_cmp_blocks(t1) and (slices > Tc or kv.shape[2] <= Tc)
            a = selection_scores(qp, kv, lse, cfg, D ** -0.5, G, t0, t1)
            b = selection_scores(qp, kc, lse, cfg, D ** -0.5, G, t0, t1)
            assert torch.allclose(a, b, rtol=1e-6, atol=0), (slices, t0)


@pytest.mark.parametrize("case", CASES, ids=[f"G{c[2] // c[3]}-T{c[1]}" for c in CASES])
def test_top_n_by_int64_keys_selects_the_reference_blocks(case, monkeypatch):
    """tuning.TOPN_BY_VALUE = 0 (one top-k over int64 keys; the default route is tested by every
    other reference test): the same blocks as the float64 reference, and the same output."""
    from nsa_flex import tuning
    B, T, Hq, Hkv, Dk, Dv, kw, separate = case
    cfg = NSAConfig(**kw)
    xs, swa = make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate)
    o_ref, sel_ref = reference_nsa(*[x.double() for x in xs], cfg,
                                   *[s.double() if s is not None else None for s in swa])
    monkeypatch.setattr(tuning, "TOPN_BY_VALUE", 0)
    o, idx = nsa_attention(*xs, cfg, k_swa=swa[0], v_swa=swa[1], return_indices=True)
    assert rel(o, o_ref) < 1e-4
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                got = [j for j in idx[b, t, h].tolist() if j >= 0]
                assert len(set(got)) == len(got) and set(got) == sel_ref[b][h][t], (b, h, t)


@pytest.mark.parametrize("n,n_init,n_local,levels", [(4, 1, 2, 3), (5, 0, 0, 2), (8, 2, 1, 1), (3, 1, 1, 1000)])
def test_top_n_by_value_equals_top_n_with_ties(n, n_init, n_local, levels):
    """Scores drawn from a few values (exact ties at the n-th place, zeros, and rows with fewer
    candidates than n): top_n_by_value picks top_n's blocks, in eager and compiled (Inductor)."""
    from nsa_flex.selection import top_n, top_n_by_value
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_topn=n, n_init=n_init,
                    n_local=n_local, window=8)
    g = torch.Generator().manual_seed(n + levels)
    for P, Ts, t0 in [(200, 40, 0), (64, 3, 0), (100, 25, 150)]:
        p = torch.randint(0, levels, (2, 3, P, Ts), generator=g).float() / levels
        pos = torch.arange(t0, t0 + P)
        want = top_n(p, pos, cfg).sort(-1).values
        got = top_n_by_value(p, pos, cfg)
        assert got.shape == want.shape and got.dtype == torch.int32
        assert torch.equal(got.sort(-1).values, want), (P, Ts, t0)
        torch._dynamo.reset()   # one compile per shape, not one cache across cases
        compiled = torch.compile(top_n_by_value, fullgraph=True, dynamic=False)(p, pos, cfg)
        assert torch.equal(compiled.sort(-1).values, want), (P, Ts, t0)
