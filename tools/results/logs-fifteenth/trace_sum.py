"""Summarise a torch profiler chrome trace of one training step: GPU kernel time by group."""
import gzip, json, sys
path = sys.argv[1]
op = gzip.open if path.endswith(".gz") else open
tr = json.load(op(path, "rt"))
ev = tr["traceEvents"] if isinstance(tr, dict) else tr
GROUPS = [
    ("flex backward", ("flex_attention_backward",)),
    ("flex forward", ("flex_attention",)),
    ("inductor templates", ("triton_tem",)),
    ("scoring kernel", ("_scores_kernel",)),
    ("gate kernel", ("_gated_grad_kernel",)),
    ("top-n / sort", ("topk", "sort", "radix", "bitonic")),
    ("sdpa/flash/cudnn", ("flash", "fmha", "cudnn", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "_mm_", "bmm", "matmul", "sm90")),
    ("nccl", ("nccl",)),
    ("optimizer", ("multi_tensor", "adam", "Adam")),
    ("triton pointwise/reduction", ("triton_poi", "triton_red", "triton_per")),
    ("memcpy/memset", ("Memcpy", "Memset", "memcpy", "memset")),
]
steps = [e for e in ev if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep")]
kern = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
groups, names = {}, {}
for e in kern:
    n = e["name"]
    g = next((g for g, ks in GROUPS if any(k in n for k in ks)), "other")
    groups[g] = groups.get(g, 0) + e["dur"] / 1e3
    names[n] = names.get(n, 0) + e["dur"] / 1e3
tot = sum(groups.values())
print("steps (wall ms):", [round(s["dur"] / 1e3, 1) for s in steps])
if kern:
    t0 = min(e["ts"] for e in kern); t1 = max(e["ts"] + e["dur"] for e in kern)
    print(f"GPU span {((t1 - t0) / 1e3):.1f} ms, kernel sum {tot:.1f} ms")
for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
    print(f"  {g:32s} {v:9.1f} ms")
for n, v in sorted(names.items(), key=lambda kv: -kv[1])[:30]:
    print(f"    {v:8.1f}  {n[:110]}")
