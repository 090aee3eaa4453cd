"""FLASH vs Triton FlexAttention backends, per static branch: output, LSE, gradients (bf16)."""
import os, sys, time, traceback
sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import torch
from bench import CONFIGS, make
from masks import pack_gqa
from nsa_flex import operator as op, tuning

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
cfg = CONFIGS["paper"]; Hq, Hkv, D = 64, 4, 128; G = Hq // Hkv; scale = cfg.softmax_scale(D)
x = make(T, Hq, Hkv, D, D, cfg)
torch._inductor.config.fx_graph_cache = False

def run(branch, flash):
    tuning.FLASH = {"cmp": 0, "swa": 0, "forced": 0}
    if flash:
        tuning.FLASH[branch] = 1
    torch._dynamo.reset()
    qp = pack_gqa(x["q"], Hkv).detach().requires_grad_()
    if branch == "cmp":
        kk, vv = x["kc"].detach().requires_grad_(), x["vc"].detach().requires_grad_()
        def cmp(qp, k, v):
            o, lse = op.compressed_branch(qp, k, v, cfg, G, scale, True)
            return o, lse.detach()       # as the operator uses it (selection only)
        f = torch.compile(cmp, fullgraph=True)
    else:
        kk, vv = x["k"].detach().requires_grad_(), x["v"].detach().requires_grad_()
        f = torch.compile(lambda qp, k, v: (op.sliding_branch(qp, k, v, cfg, G, scale, True), None), fullgraph=True)
    t0 = time.time()
    o, lse = f(qp, kk, vv)
    g = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(o.shape, device="cuda", dtype=o.dtype, generator=g)
    o.backward(do)
    torch.cuda.synchronize()
    print(f"{branch} flash={flash} first call {time.time()-t0:.1f} s", flush=True)
    return [o.detach(), None if lse is None else lse.detach(), qp.grad, kk.grad, vv.grad]

def rel(a, b):
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    return ((a - b)[fin].abs().max() / b[fin].abs().max().clamp_min(1e-30)).item(), bool((torch.isfinite(a) == fin).all())

for branch in ("cmp", "swa"):
    try:
        ref = run(branch, 0)
        got = run(branch, 1)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
            if a is not None:
                print(f"  {branch} {name}: max rel diff {rel(a, b)}", flush=True)
    except Exception:
        traceback.print_exc()
