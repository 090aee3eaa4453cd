"""GPU: the top-n kernel vs the torch routes on large random score rows (eager), and the
operator compiled with TOPN_KERNEL 0 vs 1 at 8k (same blocks, same output bits)."""
import json, sys, time
import torch
from nsa_flex import NSAConfig, tuning, nsa_attention
from nsa_flex.selection import top_n, top_n_by_value
from nsa_flex.topn_kernel import launch

res = {}
cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=512)
g = torch.Generator(device="cuda").manual_seed(0)
for T, levels in ((65536, 0), (65536, 8), (131072, 0)):
    Ts = T // 64
    P = 16384
    t0 = T - P
    p = torch.rand(1, 4, P, Ts, device="cuda", generator=g)
    if levels:
        p = torch.round(p * levels) / levels
    pos = torch.arange(t0, T, device="cuda")
    want = top_n_by_value(p, pos, cfg)
    want2 = top_n(p, pos, cfg)
    got = launch(p, t0, 64, 1, 2, 16)
    torch.cuda.synchronize()
    eq = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    eq2 = (want2.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    def ms(f, n=20):
        f(); torch.cuda.synchronize(); s = torch.cuda.Event(True); e = torch.cuda.Event(True)
        ts = []
        for _ in range(n):
            s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        return sorted(ts)[n // 2]
    r = {"rows_same_as_by_value": eq, "top_n_same_as_by_value": eq2,
         "kernel_ms": ms(lambda: launch(p, t0, 64, 1, 2, 16)),
         "by_value_eager_ms": ms(lambda: top_n_by_value(p, pos, cfg))}
    res[f"T{T}_P{P}_levels{levels}"] = r
    print(json.dumps({f"T{T}_levels{levels}": r}), flush=True)
    del p, want, want2, got
# the operator at 8k, compiled, TOPN_KERNEL 0 vs 1
T, Hq, Hkv, D = 8192, 64, 4, 128
gen = torch.Generator(device="cuda").manual_seed(1)
x = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=torch.bfloat16)
Tc = cfg.num_cmp_blocks(T)
args = (x(1, T, Hq, D), x(1, T, Hkv, D), x(1, T, Hkv, D), x(1, Tc, Hkv, D), x(1, Tc, Hkv, D),
        torch.rand(1, T, Hq, 3, device="cuda", generator=gen).to(torch.bfloat16))
outs = {}
for flag in (0, 1):
    tuning.TOPN_KERNEL = flag
    t = time.time()
    o, idx = nsa_attention(*args, cfg, return_indices=True)
    torch.cuda.synchronize()
    outs[flag] = (o, idx)
    print(f"TOPN_KERNEL={flag}: {time.time() - t:.1f} s", flush=True)
res["op8k_same_idx"] = bool(torch.equal(outs[0][1].sort(-1).values, outs[1][1].sort(-1).values))
res["op8k_out_max_abs_diff"] = (outs[0][0].float() - outs[1][0].float()).abs().max().item()
res["device"] = torch.cuda.get_device_name()
print(json.dumps(res), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
