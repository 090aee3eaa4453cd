"""Session 18 call C: the compressed branch (eq. 7) in two sequential query parts (tuning.Q_PARTS)
against one call, on the GPU, bf16, compiled: output and gradients (Triton and FLASH), and peak
memory of one fwd+bwd of the branch alone at 64k under FLASH with 1 and 2 parts."""
import json, sys, time
import torch
from masks import pack_gqa
from nsa_flex import NSAConfig, tuning
from nsa_flex import operator as op

dev, cfg, Hq, Hkv, D = "cuda", NSAConfig(), 64, 4, 128
G, scale = Hq // Hkv, D ** -0.5
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def inputs(T, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    Tc = cfg.num_cmp_blocks(T)
    q = torch.randn(1, T, Hq, D, device=dev, generator=g, dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, Tc, Hkv, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn(1, Hkv, T * G, D, device=dev, generator=g, dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, kc, vc)], do


def run(T, flash, parts):
    tuning.FLASH["cmp"], tuning.Q_PARTS["cmp"] = flash, parts
    op.prepare_flash(dev, D, D)
    torch._dynamo.reset()
    f = torch.compile(lambda q, kc, vc: op.compressed_branch(pack_gqa(q, Hkv), kc, vc, cfg, G, scale, True),
                      fullgraph=True)
    (q, kc, vc), do = inputs(T)
    o, lse = f(q, kc, vc)          # compile
    torch.autograd.backward(o, do)
    for t in (q, kc, vc):
        t.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o, lse = f(q, kc, vc)
    torch.autograd.backward(o, do)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return o.detach().float(), lse.detach(), [t.grad.float() for t in (q, kc, vc)], peak


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
t0 = time.time()
ref = run(T, 0, 1)
for name, flash, parts in [("triton_parts2", 0, 2), ("flash_parts1", 1, 1), ("flash_parts2", 1, 2)]:
    try:
        o, lse, grads, peak = run(T, flash, parts)
        fin = torch.isfinite(ref[1])
        out[name] = {"out": rel(o, ref[0]), "lse_max_abs": (lse[fin] - ref[1][fin]).abs().max().item(),
                     "dq": rel(grads[0], ref[2][0]), "dk_cmp": rel(grads[1], ref[2][1]),
                     "dv_cmp": rel(grads[2], ref[2][2]), "peak_mib_over_inputs": peak,
                     "same_finite_rows": bool(torch.equal(fin, torch.isfinite(lse)))}
    except Exception as e:  # noqa: BLE001  (report and go on)
        out[name] = f"{type(e).__name__}: {str(e)[:400]}"
    print(name, out[name], f"{time.time() - t0:.0f} s", flush=True)
out["triton_parts1_peak_mib_over_inputs"] = ref[3]
out["T"] = T
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "parts_check.json", "w"), indent=1)
