"""GPU benchmark of the whole NSA operator against dense attention and fla-core's NSA kernels.

Times forward and forward+backward (median of repeats, CUDA events via triton's do_bench) and
peak memory, for nsa_flex (the whole operator compiled: scoring, top-n, mask build, three
branches, gates), SDPA causal with the cuDNN and flash backends, and fla-core's ``parallel_nsa``
when it is importable. ``--docs`` also times nsa_flex on sequences packed from N equal documents;
``--kernel`` replaces fields of the KernelConfig; ``--variants`` runs several such sets in
parallel processes that take turns on the card. Prints a table last and writes JSON.

    python tools/bench.py --seq 8192 65536 --dims 128:128 --configs paper --out bench.json
    python tools/bench.py --seq 65536 --impls nsa_flex --docs 1 8 --out docs.json
    python tools/bench.py --seq 8192 --impls nsa_flex --variants "" "cmp.bwd=64,64,64,64,4,3" --out v.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_flex import NSAConfig
from nsa_flex import operator as op
from nsa_flex.kernels import KernelConfig, flex_kernel, override
from masks.selected_lists import positions_per_tile, tiles_per_block

CONFIGS = {
    "paper": NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=512),
    # fla-core's own setting: l = d = l' = 64, no sliding window; compression by mean pooling.
    "fla": NSAConfig(cmp_block=64, cmp_stride=64, sel_block=64, sel_topn=16, n_init=1, n_local=2, window=512),
}


def bench_ms(fn, warmup_ms=100, rep_ms=400):
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def peak_mib(fn):
    """Peak allocated MiB over one call of ``fn``: what it allocates plus what was live before
    (the inputs, the output gradient; nothing else of the caller's must be held)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def mean_pool(x, block):
    B, T, H, D = x.shape
    tc = T // block
    return x[:, : tc * block].view(B, tc, block, H, D).mean(2)


def make(T, Hq, Hkv, Dk, Dv, cfg, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)
    Tc = cfg.num_cmp_blocks(T)
    return dict(q=r(1, T, Hq, Dk), k=r(1, T, Hkv, Dk), v=r(1, T, Hkv, Dv), kc=r(1, Tc, Hkv, Dk),
                vc=r(1, Tc, Hkv, Dv),
                gates=torch.rand(1, T, Hq, 3, device="cuda", generator=g, dtype=torch.bfloat16))


GPU_LOCK = None  # --gpu-lock: a file held while timing and compiling, so runs sharing one card
# take turns (see warmup_turn for what --barrier lets overlap)
# --barrier DIR:N: before its first timing turn a run waits until N runs have written DIR/ready.*
# (compiled, or exited), so that no run's timing shares the card with another's compile-time
# autotuning.
BARRIER = None


def wait_at_barrier():
    global BARRIER
    if BARRIER is None:
        return
    folder, n = BARRIER.rsplit(":", 1)
    BARRIER = None
    open(os.path.join(folder, f"ready.{os.getpid()}"), "w").close()
    t0 = time.time()
    while len([f for f in os.listdir(folder) if f.startswith("ready.")]) < int(n):
        if time.time() - t0 > 1800:
            raise RuntimeError(f"--barrier {folder}:{n}: the other runs never became ready")
        time.sleep(1)


TIMED_ONCE = False  # this run has had its first timing turn


@contextlib.contextmanager
def timing_turn():
    global TIMED_ONCE
    wait_at_barrier()
    TIMED_ONCE = True
    if GPU_LOCK is None:
        yield
        return
    with open(GPU_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def warmup_turn():
    """Compiles, autotuning and first calls. Before this run's first timing turn, and only with a
    barrier, they run freely (runs sharing a card overlap their compiles, and the barrier holds
    every timing back until all have compiled); otherwise — no barrier, or the next impl, T or
    config of the same run — they take the lock too, so that one run's autotuning never shares
    the card with another's timing. (Two runs given only --gpu-lock once overlapped: one's
    first-call autotuning ran during the other's timing.)"""
    if TIMED_ONCE or BARRIER is None:
        with timing_turn():
            yield
    else:
        yield


def timed_ms(fn):
    """bench_ms of ``fn`` after a first (compiling) call in a warm-up turn."""
    with warmup_turn():
        fn()
        torch.cuda.synchronize()
    with timing_turn():
        return bench_ms(fn)


def fwd_and_fwdbwd(run, leaves, extra=None):
    """run() -> output tensor. Returns dict with fwd_ms, fwdbwd_ms, peak_mem_mib (and whatever
    ``extra(run)`` returns, measured in the same timing turn). Compiles (grad and no-grad)
    happen before the timing turn."""
    def fwd():
        with torch.no_grad():
            run()

    with warmup_turn():
        o = run()
        do = torch.randn_like(o)
        finite = bool(torch.isfinite(o).all())
        del o   # its autograd graph (every saved activation) would stay live through the timings

        def fwdbwd():
            for x in leaves:
                x.grad = None
            run().backward(do)

        fwdbwd()
        finite = finite and all(bool(torch.isfinite(x.grad).all())
                                for x in leaves if x.grad is not None)
        fwd()
        torch.cuda.synchronize()
    with timing_turn():
        row = {"fwd_ms": bench_ms(fwd), "fwdbwd_ms": bench_ms(fwdbwd), "peak_mem_mib": peak_mib(fwdbwd)}
        if extra is not None:
            row.update(extra(run))
    row["finite"] = finite  # output and every input gradient free of NaN/inf
    return row


def apply_overrides(kernel: KernelConfig, items: list[str]) -> KernelConfig:
    try:
        return override(kernel, items)
    except ValueError as e:
        raise SystemExit(f"--kernel: {e}")


def document_ids(T: int, docs: int) -> torch.Tensor | None:
    """[1, T] ids of ``docs`` documents of equal length (None for one)."""
    if docs <= 1:
        return None
    return (torch.arange(T, device="cuda") * docs // T)[None].to(torch.int32)


def ours(x, cfg, kernel, docs=1, fla_pool=False, profile=False):
    T = x["q"].shape[1]
    ids = document_ids(T, docs)
    fn = op.compiled(cfg, kernel, False, ids is not None)
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "kc", "vc", "gates")]
    if ids is not None:   # the compressed keys in the document layout: T // d slots
        slots = T // cfg.cmp_stride
        kc, vc = (torch.randn(1, slots, *x[n].shape[2:], device="cuda", dtype=x[n].dtype)
                  .requires_grad_() for n in ("kc", "vc"))
        leaves[3:5] = [kc, vc]

    def run():
        if fla_pool:  # the compressed keys by mean pooling, as fla-core computes them
            kc, vc = mean_pool(x["k"], cfg.cmp_block), mean_pool(x["v"], cfg.cmp_block)
        else:
            kc, vc = leaves[3], leaves[4]
        extra = {} if ids is None else {"doc_ids": ids}
        return fn(x["q"], x["k"], x["v"], kc, vc, x["gates"], k_swa=None, v_swa=None, **extra)

    row = fwd_and_fwdbwd(run, leaves, (lambda r: {"profile": kernel_breakdown(r)}) if profile else None)
    row["selected_blockmask_mib_per_layer"] = selected_blockmask_mib(
        T, x["q"].shape[2], x["k"].shape[2], cfg, kernel, docs > 1)
    return row


def selected_blockmask_mib(T, Hq, Hkv, cfg, kernel: KernelConfig, docs: bool = False, batch=1):
    """Memory of the selected branch's BlockMask (one layer, one call) as the operator builds it
    on CUDA: int32 KV lists [B, Hkv, Mq, W] (W = P·n·R, capped at Nkv), their transposes [B, Hkv,
    Nkv, Mq] for the backward, and the two count vectors. Query splits only regroup them."""
    G = Hq // Hkv
    t = kernel.slc
    Mq, Nkv = -(-T * G // t.q_block), -(-T // t.kv_block)
    W = min(Nkv, positions_per_tile(t.q_block, G) * cfg.sel_topn
            * tiles_per_block(cfg.sel_block, t.kv_block, aligned=not docs))
    return round(4 * batch * Hkv * (Mq * W + Nkv * Mq + Mq + Nkv) / 2**20, 1)


KERNEL_GROUPS = [  # (group, substrings of the kernel name), first match wins
    ("flex backward", ("flex_attention_backward", "FlashAttentionBackward")),   # (FLASH backend:
    ("flex forward", ("flex_attention", "FlashAttentionForward")),              # flash-attn-4's)
    ("inductor templates (flex)", ("triton_tem",)),
    ("top-n / sort", ("topk", "sort", "radix", "bitonic")),
    ("matmul (scoring, gates)", ("gemm", "nvjet", "xmma", "cutlass", "_mm_", "bmm", "matmul")),
]


def kernel_breakdown(run, iters=3, activity="cuda"):
    """Device time per kernel group of one fwd+bwd of ``run`` (one compile: the profiler reads
    the kernels of the whole compiled operator, no per-part compiles)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if activity == "cuda" else [ProfilerActivity.CPU]
    do = torch.randn_like(run().detach())   # (the output's graph is freed at once)
    with profile(activities=acts) as prof:
        for _ in range(iters):
            run().backward(do)
        if activity == "cuda":
            torch.cuda.synchronize()
    groups: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for e in prof.events():
        if activity == "cuda" and e.device_type.name != "CUDA":
            continue
        us = e.device_time if activity == "cuda" else e.self_cpu_time_total
        name = e.name
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other (scoring, masks, gates)")
        groups[group] = groups.get(group, 0.0) + us / 1e3 / iters
        kernels[name] = kernels.get(name, 0.0) + us / 1e3 / iters
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"ms_per_fwdbwd": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[n[:120], round(v, 3)] for n, v in top]}


def sdpa(x, backend):
    q, k, v = (x[n].detach().transpose(1, 2).requires_grad_() for n in ("q", "k", "v"))
    G = q.shape[1] // k.shape[1]
    be = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    return fwd_and_fwdbwd(run, [q, k, v])


def fla(x, cfg):
    from fla.ops.nsa import parallel_nsa
    q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))
    g = x["gates"].detach()
    g_cmp, g_slc = g[..., 0].contiguous().requires_grad_(), g[..., 1].contiguous().requires_grad_()

    def run():
        return parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=cfg.sel_topn,
                            block_size=cfg.sel_block, window_size=0)

    return fwd_and_fwdbwd(run, [q, k, v, g_cmp, g_slc])


def run_variants(a) -> None:
    """One child process per variant (this script with --tune and a shared --gpu-lock), then one
    JSON with every row tagged by its variant, and one table."""
    import subprocess
    import sys
    import tempfile

    work = tempfile.mkdtemp(prefix="nsa_bench_")
    lock = a.gpu_lock or os.path.join(work, "gpu.lock")
    argv, skip = [], False
    for tok in sys.argv[1:]:            # this command line without --variants/--out/--gpu-lock
        if tok in ("--variants", "--out", "--gpu-lock", "--barrier"):
            skip = True
            continue
        if skip and not tok.startswith("--"):
            continue
        skip = False
        argv.append(tok)
    children = []
    for i, variant in enumerate(a.variants):
        out, log = os.path.join(work, f"v{i}.json"), os.path.join(work, f"v{i}.log")
        cmd = [sys.executable, __file__, *argv, "--gpu-lock", lock, "--out", out,
               "--barrier", f"{work}:{len(a.variants)}"]
        if variant.split():
            cmd += ["--kernel", *variant.split()]
        print(f"[bench] variant {i} ({variant or 'defaults'}): log {log}", flush=True)
        # each variant its own Inductor cache (kernel options change only Inductor's choices)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(work, f"inductor-v{i}"))
        children.append((variant, out, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                                        env=env)))
    running = {proc.pid for _, _, proc in children}
    while running:                      # a run that exits counts as ready at the barrier
        for _, _, proc in children:
            if proc.pid in running and proc.poll() is not None:
                running.discard(proc.pid)
                open(os.path.join(work, f"ready.exited.{proc.pid}"), "w").close()
        time.sleep(1)
    rows, meta = [], None
    for variant, out, proc in children:
        rc = proc.wait()
        if not os.path.exists(out):
            rows.append({"variant": variant, "error": f"exit {rc} before writing any row"})
            continue
        got = json.load(open(out))
        meta = meta or {k: v for k, v in got["meta"].items() if k != "kernel_overrides"}
        for r in got["rows"]:
            rows.append({"variant": variant, **r})
        if rc:
            rows.append({"variant": variant, "error": f"exit {rc}"})
    json.dump({"meta": {**(meta or {}), "variants": a.variants, "timed_under_lock": True},
               "rows": rows}, open(a.out, "w"), indent=1)
    print(f"\n{'variant':<40}{'impl':<11}{'T':>7}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "err"
        print(f"{(r['variant'] or 'defaults')[:39]:<40}{r.get('impl', '-'):<11}{r.get('T', 0):>7}"
              f"{f('fwd_ms'):>10}{f('fwdbwd_ms'):>12}{f('peak_mem_mib'):>10}")
    print(f"wrote {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--dims", nargs="+", default=["128:128", "192:128"], help="Dk:Dv pairs")
    ap.add_argument("--configs", nargs="+", default=["paper", "fla"], choices=list(CONFIGS))
    ap.add_argument("--impls", nargs="+", default=["nsa_flex", "sdpa_cudnn", "sdpa_flash", "fla"])
    ap.add_argument("--docs", type=int, nargs="+", default=[1],
                    help="nsa_flex on sequences packed from N equal documents (1: one document)")
    ap.add_argument("--profile", action="store_true",
                    help="device time of nsa_flex per kernel group, from the profiler (no extra compile)")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--kernel", nargs="*", default=[], metavar="FIELD=V",
                    help="replace KernelConfig fields, e.g. cmp.bwd=64,64,64,64,4,3 slc.q_splits=16 "
                         "(recorded in the JSON)")
    ap.add_argument("--gpu-lock", default=None, metavar="FILE",
                    help="hold this file lock while timing and compiling, so several bench "
                         "processes sharing one card never time while another times or autotunes "
                         "(with --barrier the first compiles overlap instead)")
    ap.add_argument("--barrier", default=None, metavar="DIR:N",
                    help="wait before the first timing until N runs have written DIR/ready.* (set "
                         "by --variants: no run times while another still compiles and autotunes)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="'FIELD=V ...'",
                    help="run each quoted set of --kernel fields (\"\" for the defaults) in its own "
                         "process, all at once: compiles overlap, timings take turns under one lock")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench.py times GPU kernels and torch sees no CUDA device here")
    if a.variants is not None:
        return run_variants(a)
    global GPU_LOCK, BARRIER
    GPU_LOCK, BARRIER = a.gpu_lock, a.barrier
    rows = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cuda": torch.version.cuda,
            "B": 1, "Hq": a.hq, "Hkv": a.hkv, "dtype": "bfloat16", "timing": "median, triton do_bench",
            "date": time.strftime("%Y-%m-%d"), "kernel_overrides": a.kernel,
            "command": "python tools/bench.py " + " ".join(sys.argv[1:]),
            "timed_under_lock": a.gpu_lock is not None}

    def save():
        json.dump({"meta": meta, "rows": rows}, open(a.out, "w"), indent=1)

    for cname in a.configs:
        cfg = CONFIGS[cname]
        for dims in a.dims:
            Dk, Dv = map(int, dims.split(":"))
            if cname == "fla" and Dk != Dv:
                continue
            kernel = apply_overrides(flex_kernel(torch.bfloat16, Dk, Dv, cfg,
                                                 torch.cuda.get_device_capability()), a.kernel)
            if cname == "fla":   # fla-core's NSA has no sliding branch: a window of one key
                cfg = NSAConfig(**{**cfg.__dict__, "window": 1})
            for T in a.seq:
                x = make(T, a.hq, a.hkv, Dk, Dv, cfg)
                impls = a.impls if cname == "fla" else [i for i in a.impls if i != "fla"]
                jobs = [(impl, d) for impl in impls for d in (a.docs if impl == "nsa_flex" else [1])]
                for impl, docs in jobs:
                    if impl.startswith("sdpa") and cname == "fla":
                        continue  # dense rows are the same in both configurations
                    row = {"impl": impl, "config": cname, "T": T, "Dk": Dk, "Dv": Dv, "docs": docs}
                    t0 = time.time()
                    try:
                        if impl == "nsa_flex":
                            row.update(ours(x, cfg, kernel, docs, fla_pool=cname == "fla",
                                            profile=a.profile))
                        elif impl.startswith("sdpa"):
                            row.update(sdpa(x, impl))
                        elif impl == "fla":
                            row.update(fla(x, cfg))
                    except Exception as e:  # recorded, not hidden: the row says why it has no time
                        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                        traceback.print_exc()
                    row["wall_s"] = round(time.time() - t0, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save()
                    torch.cuda.empty_cache()
                del x
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  bf16 B=1 Hq={a.hq} Hkv={a.hkv}")
    print(f"{'impl':<11}{'config':<7}{'T':>7}{'docs':>5}{'Dk':>5}{'Dv':>5}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "err"
        print(f"{r['impl']:<11}{r['config']:<7}{r['T']:>7}{r['docs']:>5}{r['Dk']:>5}{r['Dv']:>5}"
              f"{f('fwd_ms'):>10}{f('fwdbwd_ms'):>12}{f('peak_mem_mib'):>10}")


if __name__ == "__main__":
    main()
