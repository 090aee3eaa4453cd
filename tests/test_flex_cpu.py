"""FlexAttention itself (compiled, CPU forward) consuming the BlockMasks the operator builds in
the same graph, against the dense path of the same mask_mods.

CPU FlexAttention has no backward and no LSE, so this covers the selected and sliding branches
in inference; the GPU path (all branches, gradients) is checked by tools/check_gpu.py.
"""

import pytest
import torch

from masks import pack_gqa
from nsa_flex import NSAConfig
from nsa_flex import operator as op


# The cases run in one process: the second compile sees changed shapes and ints (automatic
# dynamic shapes), which once lowered a bitwise SymInt expression to a float index.
@pytest.mark.parametrize("T,Hq,Hkv,lp", [(173, 16, 1, 16), (150, 3, 3, 48)])
def test_compiled_flex_matches_dense(T, Hq, Hkv, lp):
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=lp, sel_topn=3, window=40)
    G, D = Hq // Hkv, 16
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    Ts = cfg.num_sel_blocks(T)
    idx = torch.randint(-1, Ts, (1, Hkv, T, cfg.sel_topn), generator=g).int()
    idx = torch.where(idx * lp <= torch.arange(T)[:, None], idx, -1)   # candidates only
    qp = pack_gqa(q, Hkv)
    scale = D ** -0.5

    def run(use_flex):
        return (op.selected_branch(qp, k, v, idx, cfg, G, scale, use_flex),
                op.sliding_branch(qp, k, v, cfg, G, scale, use_flex))

    with torch.no_grad():
        want = run(False)
        got = torch.compile(lambda: run(True), fullgraph=True)()
    for name, a, b in zip(("selected", "sliding"), got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name
