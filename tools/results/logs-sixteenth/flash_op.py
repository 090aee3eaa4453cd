"""The operator under FLASH settings vs the defaults at small T: outputs, gradients, tracebacks."""
import os, re, sys, time, traceback
sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import torch
from bench import CONFIGS, make
from nsa_flex import tuning, nsa_attention
from nsa_flex.backends import measure_flash_lse_scale
T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
cfg = CONFIGS["paper"]
x = make(T, 64, 4, 128, 128, cfg)
torch._inductor.config.fx_graph_cache = False
print("flash lse scale", measure_flash_lse_scale(torch.device("cuda")), flush=True)
defaults = {n: __import__("copy").deepcopy(v) for n, v in vars(tuning).items() if n.isupper()}
def run(knobs):
    for n, v in defaults.items():
        setattr(tuning, n, __import__("copy").deepcopy(v))
    tuning.apply(knobs.split())
    torch._dynamo.reset()
    from nsa_flex import operator as op
    op._compiled.cache_clear()
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "kc", "vc")]
    t0 = time.time()
    o, idx = nsa_attention(*leaves, x["gates"], cfg, return_indices=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    o.backward(torch.randn(o.shape, device="cuda", dtype=o.dtype, generator=g))
    torch.cuda.synchronize()
    print(f"[{knobs}] first call {time.time()-t0:.1f} s", flush=True)
    return [o.detach(), idx] + [t.grad for t in leaves]
ref = run("")
for knobs in sys.argv[2:]:
    try:
        got = run(knobs)
        same = (got[1] == ref[1]).float().mean().item()
        print(f"  [{knobs}] selection equal {same:.4f}", flush=True)
        for name, a, b in zip(("o", "q", "k", "v", "kc", "vc"), [got[0]] + got[2:], [ref[0]] + ref[2:]):
            print(f"  [{knobs}] {name}: max rel diff {((a.float()-b.float()).abs().max()/b.float().abs().max()).item():.2e}", flush=True)
    except Exception:
        tb = traceback.format_exc()
        print(tb[-3000:], flush=True)
        for path, line in re.findall(r'File "(/tmp/torchinductor[^"]+)", line (\d+)', tb):
            src = open(path).read().splitlines()
            i = int(line) - 1
            print(f"--- {path}:{line}", *src[max(0, i - 3): i + 2], sep="\n", flush=True)
