"""The operator against the independent float64 reference (tests/reference.py), on CPU.

Tolerances are what each path reaches over these cases, with a margin (relative errors of the
output and every gradient): float64 inputs reach 1.0e-15 (bound 1e-12); float32 4.8e-7 (bound
5e-6); float16 5.7e-4 and bfloat16 3.7e-3, the float32 computation rounded to the input dtype
(bounds 2e-3 and 1.5e-2, against the reference on the same rounded inputs). The selection must
be identical in every case. test_the_bounds_bite shows a softmax scale off by 1e-4 fails them.
"""

import pytest
import torch

from nsa_flex import NSAConfig, nsa_attention
from nsa_flex.kernels import KernelConfig
from reference import reference_nsa

TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
NAMES = ["q", "k", "v", "k_cmp", "v_cmp", "gates", "k_swa", "v_swa"]


def make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate_swa=False, dtype=torch.float32, seed=0,
                Tc=None):
    g = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_blocks(T) if Tc is None else Tc
    shapes = [(B, T, Hq, Dk), (B, T, Hkv, Dk), (B, T, Hkv, Dv), (B, Tc, Hkv, Dk), (B, Tc, Hkv, Dv)]
    xs = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    xs.append(torch.rand(B, T, Hq, 3, generator=g).to(dtype))
    swa = [torch.randn(B, T, Hkv, Dk, generator=g).to(dtype),
           torch.randn(B, T, Hkv, Dv, generator=g).to(dtype)] if separate_swa else [None, None]
    return xs, swa


def rel(a, b):
    """Relative error ‖a − b‖ / ‖b‖ (absolute where b is exactly 0, e.g. the key gradient of a
    softmax over one key)."""
    diff, ref = (a.double() - b.double()).norm(), b.double().norm()
    return (diff / ref if ref > 0 else diff).item()


CASES = [
    # (B, T, Hq, Hkv, Dk, Dv, cfg kwargs, separate swa)
    (1, 77, 4, 4, 16, 16, dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, n_init=1, n_local=1, window=9), False),
    (2, 61, 4, 2, 16, 8, dict(cmp_block=8, cmp_stride=8, sel_block=8, sel_topn=4, n_init=1, n_local=2, window=5), True),
    (1, 93, 8, 2, 8, 12, dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=20, n_init=1, n_local=2, window=20), False),
    (1, 70, 16, 1, 12, 16, dict(cmp_block=4, cmp_stride=2, sel_block=8, sel_topn=4, n_init=2, n_local=1, window=7), True),
    (2, 45, 32, 2, 8, 8, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topn=2, n_init=0, n_local=0, window=1), False),
    (1, 130, 4, 1, 16, 24, dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=50), False),
    (1, 20, 2, 1, 8, 8, dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=512), False),
    # l' = 128, G = 8 (the paper's block sizes but a longer selection block)
    (1, 301, 8, 1, 16, 16, dict(cmp_block=32, cmp_stride=16, sel_block=128, sel_topn=3, n_init=1, n_local=1, window=40), False),
    # G = 3 and odd l, d, l' (l'/d = 3, l/d = 2: not powers of two)
    (2, 83, 9, 3, 10, 6, dict(cmp_block=6, cmp_stride=3, sel_block=9, sel_topn=4, n_init=1, n_local=2, window=11), True),
    # G = 6 (the 100m flavor's), head dims of 4 and 1
    (1, 67, 12, 2, 4, 1, dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_topn=3, n_init=0, n_local=1, window=13), False),
    # T = 1
    (2, 1, 4, 2, 8, 8, dict(cmp_block=4, cmp_stride=2, sel_block=4, sel_topn=2, n_init=1, n_local=1, window=3), True),
]
IDS = [f"G{c[2] // c[3]}-T{c[1]}-lp{c[6]['sel_block']}" for c in CASES]


def check_against_reference(case, dtype, scale_error=1.0):
    """Output, selection and every gradient of the operator vs the float64 reference on the
    same (rounded) inputs; returns the worst relative error."""
    B, T, Hq, Hkv, Dk, Dv, kw, separate = case
    cfg = NSAConfig(**kw)
    xs, swa = make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate, dtype=dtype, seed=T)
    ours = [x.clone().requires_grad_() for x in xs + [s for s in swa if s is not None]]
    refs = [x.detach().double().requires_grad_() for x in ours]

    def split(ts):
        return ts[:6], (ts[6:] + [None, None])[:2]

    (a, (ks, vs)), (ra, (rks, rvs)) = split(ours), split(refs)
    o, idx = nsa_attention(*a, cfg, k_swa=ks, v_swa=vs, return_indices=True)
    ref_cfg = cfg if scale_error == 1.0 else NSAConfig(**{**kw, "scale": Dk ** -0.5 * scale_error})
    o_ref, sel_ref = reference_nsa(*ra, ref_cfg, k_swa=rks, v_swa=rvs)

    assert o.shape == (B, T, Hq, Dv) and o.dtype == dtype
    assert idx.shape == (B, T, Hkv, cfg.sel_topn) and idx.dtype == torch.int32
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                got = [j for j in idx[b, t, h].tolist() if j >= 0]
                assert len(set(got)) == len(got), "a block selected twice"
                assert set(got) == sel_ref[b][h][t], (b, h, t)
    worst = rel(o, o_ref)
    w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (o.double() * w).sum().backward()
    (o_ref * w).sum().backward()
    for name, x, rx in zip(NAMES, ours, refs):
        if rx.numel() == 0:
            continue
        assert x.grad is not None and x.grad.dtype == dtype, name
        worst = max(worst, rel(x.grad, rx.grad))
    return worst


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(case, dtype):
    assert check_against_reference(case, dtype) < TOL[dtype]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_matches_float64_reference(case, dtype):
    assert check_against_reference(case, dtype) < TOL[dtype]


def test_the_bounds_bite():
    """A softmax scale off by one part in 10^4 (or a wrong dtype's bound) is caught."""
    case = CASES[0]
    assert check_against_reference(case, torch.float32, scale_error=1 + 1e-4) > TOL[torch.float32]
    assert check_against_reference(case, torch.float64, scale_error=1 + 1e-9) > TOL[torch.float64]


def test_no_cmp_block_gives_zero_compressed_output():
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, window=4)
    xs, _ = make_inputs(1, 40, 2, 1, 8, 8, cfg)
    gates = torch.zeros_like(xs[5])
    gates[..., 0] = 1.0                       # compressed branch only
    o = nsa_attention(*xs[:5], gates, cfg)
    assert torch.all(o[:, :31] == 0)          # t < l - 1 sees no complete block
    assert torch.all(o[:, 31:].abs().sum(-1) > 0)


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


# -- documents --------------------------------------------------------------------------------

def packed_documents(lengths, B, Hq, Hkv, Dk, Dv, cfg, seed, separate):
    """Inputs of B packed rows (documents of ``lengths`` per row, concatenated), with k_cmp/v_cmp
    in the document layout (T // d slots; block i of a document at slot ⌊s0/d⌋ + i)."""
    T = sum(lengths[0])
    xs, swa = make_inputs(B, T, Hq, Hkv, Dk, Dv, cfg, separate, seed=seed, Tc=T // cfg.cmp_stride)
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(ls)) * 5 + 2, torch.tensor(ls))
                       for ls in lengths])
    return xs, swa, ids


def reference_by_document(xs, swa, lengths, cfg):
    """The reference run on each document alone, concatenated (float64, differentiable)."""
    q, k, v, kc, vc, g = xs
    ks, vs = swa
    d = cfg.cmp_stride
    outs, sels = [], []
    for b, ls in enumerate(lengths):
        row, sel_row, s0 = [], [], 0
        for L in ls:
            tc = cfg.num_cmp_blocks(L)
            c0 = s0 // d
            sl = slice(s0, s0 + L)
            o, sel = reference_nsa(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl],
                                   kc[b:b + 1, c0:c0 + tc], vc[b:b + 1, c0:c0 + tc], g[b:b + 1, sl],
                                   cfg, None if ks is None else ks[b:b + 1, sl],
                                   None if vs is None else vs[b:b + 1, sl])
            row.append(o)
            sel_row.append(sel[0])
            s0 += L
        outs.append(torch.cat(row, 1))
        sels.append(sel_row)
    return torch.cat(outs, 0), sels


DOC_CASES = [
    # lengths per row (each row sums to T), Hq, Hkv, Dk, Dv, cfg, separate swa
    ([[5, 1, 40, 17, 70, 2], [3, 60, 1, 71]], 4, 2, 8, 8,
     dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, n_init=1, n_local=1, window=12), True),
    ([[1, 99, 33], [133]], 6, 2, 8, 12,
     dict(cmp_block=6, cmp_stride=3, sel_block=9, sel_topn=4, n_init=1, n_local=2, window=20), False),
    ([[64, 1, 7, 50], [30, 30, 30, 32]], 3, 3, 8, 8,
     dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topn=2, n_init=0, n_local=1, window=5), False),
]


@pytest.mark.parametrize("case", DOC_CASES, ids=["mixed", "odd-blocks", "G1"])
def test_documents_each_computed_alone(case):
    """A packed row of documents gives each document's output, gradients and selection (in its
    own block numbering) as if it were alone (the reference on each document)."""
    lengths, Hq, Hkv, Dk, Dv, kw, separate = case
    cfg = NSAConfig(**kw)
    B = len(lengths)
    xs, swa, ids = packed_documents(lengths, B, Hq, Hkv, Dk, Dv, cfg, seed=len(lengths[0]), separate=separate)
    ours = [x.clone().requires_grad_() for x in xs + [s for s in swa if s is not None]]
    refs = [x.detach().double().requires_grad_() for x in ours]
    o, idx = nsa_attention(*ours[:6], cfg, k_swa=ours[6] if separate else None,
                           v_swa=ours[7] if separate else None, return_indices=True, doc_ids=ids)
    rswa = (refs[6], refs[7]) if separate else (None, None)
    o_ref, sels = reference_by_document(refs[:6], rswa, lengths, cfg)
    assert rel(o, o_ref) < TOL[torch.float32]
    for b, ls in enumerate(lengths):
        s0 = 0
        for L, sel in zip(ls, sels[b]):
            for h in range(Hkv):
                for t in range(L):
                    got = [j for j in idx[b, s0 + t, h].tolist() if j >= 0]
                    assert len(set(got)) == len(got) and set(got) == sel[h][t], (b, s0, h, t)
            s0 += L
    w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (o.double() * w).sum().backward()
    (o_ref * w).sum().backward()
    for name, x, rx in zip(NAMES, ours, refs):
        assert rel(x.grad, rx.grad) < TOL[torch.float32], name


def test_one_document_is_the_plain_sequence():
    cfg = NSAConfig(**CASES[0][6])
    T = 77
    xs, _ = make_inputs(1, T, 4, 4, 16, 16, cfg, Tc=T // cfg.cmp_stride)
    Tc = cfg.num_cmp_blocks(T)
    plain = nsa_attention(*xs[:3], xs[3][:, :Tc], xs[4][:, :Tc], xs[5], cfg)
    docs = nsa_attention(*xs, cfg, doc_ids=torch.zeros(1, T, dtype=torch.long))
    assert rel(docs, plain) < 1e-6


# -- bad input --------------------------------------------------------------------------------

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
    (dict(window=True), "window=True"),
    (dict(scale=-1.0), "scale=-1.0"),
    (dict(scale=float("nan")), "scale=nan"),
    (dict(sel_topn=0), "sel_topn=0"),
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
        ((q, k, v, kc, vc[:, :, :1], g), ValueError, "v_cmp has shape"),
        ((q[0], k, v, kc, vc, g), ValueError, "q must have 4 dimensions"),
        ((q, k.double(), v, kc, vc, g), TypeError, "k has dtype torch.float64 but q has torch.float32"),
        ((q, k, v, kc, vc, g.int()), TypeError, "gates has dtype torch.int32"),
        ((q, k, v[:, :39], kc, vc, g), ValueError, "v has shape"),
        ((q, k, v, kc, vc, g[..., :2]), ValueError, "gates has shape"),
        ((q.numpy(), k, v, kc, vc, g), TypeError, "q must be a torch.Tensor, got ndarray"),
        ((q, [1.0], v, kc, vc, g), TypeError, "k must be a torch.Tensor, got list"),
        ((q, k.to("meta"), v, kc, vc, g), ValueError, "k is on meta but q is on cpu"),
        ((q[:0], k[:0], v[:0], kc[:0], vc[:0], g[:0]), ValueError, "empty input"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            nsa_attention(*args, cfg)
    with pytest.raises(ValueError, match="both k_swa and v_swa"):
        nsa_attention(*xs, cfg, k_swa=k)
    with pytest.raises(ValueError, match="k_swa has shape"):
        nsa_attention(*xs, cfg, k_swa=k[:, :, :1], v_swa=v)
    with pytest.raises(ValueError, match="v_swa has shape"):
        nsa_attention(*xs, cfg, k_swa=k, v_swa=v[..., :4])
    with pytest.raises(TypeError, match="NSAConfig"):
        nsa_attention(*xs, {"window": 8})
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor of shape \\(1, 40\\)"):
        nsa_attention(*xs, cfg, doc_ids=torch.zeros(1, 39, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        nsa_attention(*xs, cfg, doc_ids=torch.zeros(1, 40))
    with pytest.raises(ValueError, match="with documents T=40, d=4 give T // d = 10 slots"):
        nsa_attention(*xs, cfg, doc_ids=torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="backend 'flex' runs on CUDA"):
        from nsa_flex.kernels import flex_kernel
        nsa_attention(*xs, cfg, kernel=flex_kernel(torch.float32, 8, 8, cfg))
    with pytest.raises(TypeError, match="kernel must be a KernelConfig"):
        nsa_attention(*xs, cfg, kernel="dense")


def test_dense_path_in_row_chunks_equals_one_chunk():
    """The dense backend split into many query-row chunks (each with its slice of every mask)
    gives the same output and gradients as one chunk."""
    cfg = NSAConfig(**CASES[2][6])
    xs, _ = make_inputs(1, 93, 8, 2, 8, 12, cfg, dtype=torch.float64)

    def run(kernel):
        leaves = [x.clone().requires_grad_() for x in xs]
        o = nsa_attention(*leaves, cfg, kernel=kernel)
        o.pow(2).sum().backward()
        return [o.detach()] + [x.grad for x in leaves]

    whole = run(KernelConfig("dense"))
    chunked = run(KernelConfig("dense", dense_chunk_elems=2 * 93 * 2 * 5, score_chunk_elems=500,
                               score_slices=7))
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_matches_eager_on_cpu():
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
