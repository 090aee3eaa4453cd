# fp32 scoring kernel on the GPU vs a CPU fp32 reference, and vs the reference on TF32-rounded inputs
import torch
from masks import pack_gqa
from nsa_flex import NSAConfig
from nsa_flex.score_kernel import launch
from nsa_flex.selection import selection_scores

def tf32(x):
    i = x.view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

for (T, Hq, Hkv, D, l, d, lp, seed) in [(200, 8, 2, 24, 32, 16, 64, 0), (200, 8, 2, 32, 32, 16, 64, 0), (200, 8, 2, 48, 32, 16, 64, 0), (200, 8, 2, 24, 32, 16, 64, 1), (1200, 32, 2, 24, 32, 16, 64, 5), (1200, 32, 2, 16, 32, 16, 64, 5), (200, 8, 2, 16, 32, 16, 64, 0), (200, 8, 2, 64, 32, 16, 64, 0)]:
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=lp, sel_topn=4, window=8)
    g = torch.Generator().manual_seed(seed)
    G, Tc, Ts = Hq // Hkv, cfg.num_cmp_blocks(T), cfg.num_sel_blocks(T)
    qp = pack_gqa(torch.randn(1, T, Hq, D, generator=g), Hkv)
    kc = torch.randn(1, Hkv, Tc, D, generator=g)
    scale = D ** -0.5
    s = torch.matmul(qp, kc.transpose(-1, -2)) * scale
    seen = (torch.arange(Tc) * d + l - 1)[None, :] <= (torch.arange(T * G) // G)[:, None]
    lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
    want = selection_scores(qp, kc, lse, cfg, scale, G, 0, T, num_sel=Ts)
    want32 = selection_scores(tf32(qp.clone()), tf32(kc.clone()), lse, cfg, scale, G, 0, T, num_sel=Ts)
    got = torch.full((1, Hkv, T, Ts), float("nan"), device="cuda")
    launch(qp.cuda(), kc.cuda(), lse.cuda(), l, d, lp, scale, G, 0, T, got)
    got = got.cpu()
    e = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    w = ((got - want).abs() == (got - want).abs().max()).nonzero()[0].tolist()
    print({"worst_at": w, "got": got[tuple(w)].item(), "want": want[tuple(w)].item(), "max": want.abs().max().item()})
    print({"case": (T, Hq, Hkv, D), "vs_fp32": e(got, want), "vs_tf32_inputs": e(got, want32),
           "tf32_ref_vs_fp32_ref": e(want32, want)}, flush=True)
