"""The compiled operator on a GPU (skipped without CUDA): every shape the contract admits either
compiles and matches the float64 reference (forward and every gradient, float32 with TF32 off),
or is refused before compute. Run on a CUDA machine, one line per test as it ends:
``python -m pytest tests/test_gpu.py -o addopts="" -v -n 8 --timeout 300``."""

import pytest
import torch

from nsa_flex import NSAConfig, nsa_attention
from reference import reference_nsa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# float32 kernels on the GPU (TF32 off) reach ~1e-6 relative here; selection must be identical
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

GRID = [
    # (B, T, Hq, Hkv, Dk, Dv, l, d, l', n, n_init, n_local, w, dtype)
    (1, 200, 16, 1, 128, 128, 32, 16, 32, 4, 1, 2, 64, torch.bfloat16),   # l' = 32 at D = 128, bf16
    (1, 150, 4, 2, 24, 24, 32, 16, 32, 4, 1, 2, 40, torch.float32),       # l' = 32 at D = 24, fp32
    (2, 40, 6, 2, 32, 32, 32, 16, 64, 16, 1, 2, 512, torch.float32),      # G = 3, T = 40
    (1, 97, 8, 2, 8, 8, 16, 8, 32, 3, 1, 1, 20, torch.float32),           # head dims below 16
    (1, 77, 4, 4, 1, 3, 8, 4, 16, 3, 1, 1, 9, torch.float32),             # head dims 1 and 3
    (1, 129, 12, 2, 80, 96, 32, 16, 64, 4, 1, 2, 48, torch.float32),      # G = 6, D 80/96
    (1, 301, 8, 1, 64, 64, 32, 16, 128, 3, 1, 1, 40, torch.float32),      # l' = 128, G = 8
    (2, 143, 6, 3, 16, 16, 6, 3, 9, 4, 2, 1, 11, torch.float32),          # l' = 9 (odd), G = 2
    (1, 160, 4, 1, 16, 16, 16, 16, 48, 3, 0, 0, 1, torch.float32),        # l' = 48, w = 1, none forced
    (1, 1, 4, 2, 16, 16, 8, 4, 16, 2, 1, 1, 4, torch.float32),            # T = 1
    (1, 191, 4, 2, 256, 256, 16, 8, 16, 3, 1, 2, 30, torch.float32),      # D = 256
    (1, 257, 64, 4, 192, 128, 32, 16, 64, 16, 1, 2, 512, torch.bfloat16), # the paper's shape
]


def _inputs(B, T, Hq, Hkv, Dk, Dv, cfg, dtype, seed, Tc=None):
    g = torch.Generator().manual_seed(seed)
    Tc = cfg.num_cmp_blocks(T) if Tc is None else Tc
    xs = [torch.randn(*s, generator=g) for s in [(B, T, Hq, Dk), (B, T, Hkv, Dk), (B, T, Hkv, Dv),
                                                  (B, Tc, Hkv, Dk), (B, Tc, Hkv, Dv)]]
    xs.append(torch.rand(B, T, Hq, 3, generator=g))
    return [x.to(dtype) for x in xs]


def _rel(a, b):
    d, r = (a.double().cpu() - b.double().cpu()).norm(), b.double().cpu().norm()
    return (d / r if r > 0 else d).item()


def _check(xs, cfg, dtype, doc_ids=None, reference=None):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()   # each case its own compile (and Dynamo's recompile limit not reached)
    ours = [x.cuda().requires_grad_() for x in xs]
    refs = [x.double().requires_grad_() for x in xs]
    extra = {} if doc_ids is None else {"doc_ids": doc_ids.cuda()}
    o, idx = nsa_attention(*ours, cfg, return_indices=True, **extra)
    o_ref, sel = (reference or reference_nsa)(*refs, cfg)
    assert torch.isfinite(o).all()
    w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (o.double() * w.cuda()).sum().backward()
    (o_ref * w).sum().backward()
    errs = {"out": _rel(o, o_ref)}
    for name, x, r in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), ours, refs):
        if r.numel():
            errs[name] = _rel(x.grad, r.grad)
    return idx.cpu(), sel, errs


@pytest.mark.parametrize("case", GRID, ids=[f"G{c[2] // c[3]}-T{c[1]}-D{c[4]}x{c[5]}-l{c[6]}d{c[7]}lp{c[8]}-"
                                            f"{str(c[13])[6:]}" for c in GRID])
def test_shape_compiles_and_matches_the_reference(case):
    B, T, Hq, Hkv, Dk, Dv, l, d, lp, n, n_init, n_local, w, dtype = case
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=lp, sel_topn=n, n_init=n_init,
                    n_local=n_local, window=w)
    xs = _inputs(B, T, Hq, Hkv, Dk, Dv, cfg, dtype, seed=T)
    idx, sel, errs = _check(xs, cfg, dtype)
    if dtype == torch.float32:   # bf16 may flip near-ties of the scores; fp32 may not here
        for b in range(B):
            for h in range(Hkv):
                for t in range(T):
                    got = {j for j in idx[b, t, h].tolist() if j >= 0}
                    assert got == sel[b][h][t], (b, h, t)
    assert max(errs.values()) < TOL[dtype], errs


def test_head_dims_above_256_are_refused_before_compute():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, window=8)
    xs = [x.cuda() for x in _inputs(1, 40, 2, 1, 288, 64, cfg, torch.bfloat16, 0)]
    with pytest.raises(ValueError, match="up to 256"):
        nsa_attention(*xs, cfg)


def test_documents_compile_and_match_the_reference():
    """Packed documents (one of length 1, some shorter than a block, one longer than the
    window) through the compiled operator: each as if alone (the reference on each)."""
    from test_operator import reference_by_document
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, n_init=1, n_local=1, window=24)
    lengths = [[5, 1, 90, 30, 7, 123]]
    T = sum(lengths[0])
    xs = _inputs(1, T, 8, 2, 32, 32, cfg, torch.float32, seed=3, Tc=T // cfg.cmp_stride)
    ids = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths[0]))[None]

    def reference(*refs_and_cfg):
        refs = list(refs_and_cfg[:6])
        o, sels = reference_by_document(refs, (None, None), lengths, cfg)
        return o, sels

    idx, sels, errs = _check(xs, cfg, torch.float32, ids, reference)
    assert max(errs.values()) < TOL[torch.float32], errs
    s0 = 0
    for L, sel in zip(lengths[0], sels[0]):
        for h in range(2):
            for t in range(L):
                assert {j for j in idx[0, s0 + t, h].tolist() if j >= 0} == sel[h][t]
        s0 += L


def test_moving_document_boundaries_do_not_recompile():
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=8, window=128)
    T = 1024
    torch._dynamo.reset()
    torch._dynamo.config.error_on_recompile = True
    try:
        for s in range(4):
            g = torch.Generator().manual_seed(s)
            cuts = torch.randint(1, T, (s + 1,), generator=g)
            ids = (torch.arange(T)[:, None] >= cuts[None, :]).sum(-1)[None].cuda()
            xs = [x.cuda().requires_grad_() for x in
                  _inputs(1, T, 16, 2, 64, 64, cfg, torch.bfloat16, s, Tc=T // cfg.cmp_stride)]
            o = nsa_attention(*xs, cfg, doc_ids=ids)
            o.float().sum().backward()
            assert torch.isfinite(o).all()
    finally:
        torch._dynamo.config.error_on_recompile = False
