"""GPU benchmark of the whole NSA operator against dense attention and fla-core's NSA kernels.

Times forward and forward+backward (median of repeats, CUDA events via triton's do_bench) and
peak memory, for nsa_flex (the whole operator: scoring, top-n, mask build, three branches,
gates), SDPA causal with the cuDNN and flash backends, and fla-core's ``parallel_nsa`` when it
is importable. For nsa_flex it also times each part alone. Prints a table last and writes JSON.

    python tools/bench.py --seq 8192 65536 --dims 128:128 192:128 --configs paper fla \
        --out tools/results/bench-h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from masks import pack_gqa
from nsa_flex import NSAConfig
from nsa_flex import operator as op
from nsa_flex.backends import effective_splits
from nsa_flex.selection import select_blocks
from masks import heads_first

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


def ours(x, cfg, sliding, fla_pool, profile=False, memory=False):
    fn = op._compiled(cfg, False, sliding)
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "kc", "vc", "gates")]

    def run():
        if fla_pool:  # the compressed keys by mean pooling, as fla-core computes them
            kc, vc = mean_pool(x["k"], cfg.cmp_block), mean_pool(x["v"], cfg.cmp_block)
        else:
            kc, vc = x["kc"], x["vc"]
        return fn(x["q"], x["k"], x["v"], kc, vc, x["gates"], k_swa=None, v_swa=None)

    def extra(r):
        got = {"profile": kernel_breakdown(r)} if profile else {}
        if memory:
            got["memory_at_peak"] = memory_at_peak(r, leaves)
        return got

    row = fwd_and_fwdbwd(run, leaves, extra if profile or memory else None)
    row["selected_blockmask_mib_per_layer"] = selected_blockmask_mib(x["q"].shape[1], x["q"].shape[2],
                                                                     x["k"].shape[2], cfg)
    return row


def memory_at_peak(run, leaves):
    """One fwd+bwd under the allocator's recorder (tools/memtrace.py, next to this file): the
    buffers live at the peak, grouped by the ops that made them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nsa_memtrace", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "memtrace.py"))
    memtrace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memtrace)
    for x in leaves:        # before recording: the step starts from no gradients
        x.grad = None

    def step():
        o = run()
        o.backward(torch.ones_like(o))

    return memtrace.peak_report(step)


def selected_blockmask_mib(T, Hq, Hkv, cfg, batch=1):
    """Memory of the selected branch's BlockMask (one layer, one call) as the operator builds it
    on CUDA: int32 KV lists [B, Hkv, Mq, W] (partial and full; W = Nkv, or P·n·l'/kv_block with
    tuning.SEL_NARROW_LISTS), their transposes [B, Hkv, Nkv, Mq] for the backward (the partial
    one kv_block·G/q_block wide with SEL_NARROW_Q_LISTS and one position per tile), and the four
    count vectors (the partial ones alone with SEL_FULL_TILES=0); plus the forced part's mask
    with SEL_FORCED_STATIC. Query splits only regroup them."""
    from masks.selected import positions_per_tile
    G = Hq // Hkv
    qb, kb = op.tuning.sel_q_block(), op._sel_kv_block(cfg)
    parts = [(qb, kb, op._narrow_lists(cfg, kb))]
    if op._forced_static(cfg):
        parts.append((op.tuning.Q_BLOCK, op.tuning.KV_BLOCK, False))
    total = 0
    for q_block, kv_block, narrow in parts:
        Mq, Nkv = -(-T * G // q_block), -(-T // kv_block)
        W = positions_per_tile(q_block, G) * cfg.sel_topn * (cfg.sel_block // kv_block) if narrow else Nkv
        Wq = (kv_block * G // q_block if narrow and op.tuning.SEL_NARROW_Q_LISTS and G % q_block == 0
              else Mq)                                                   # partial query lists
        if narrow and not op.tuning.SEL_FULL_TILES:   # partial lists only, Mq wide on the q side
            total += 4 * batch * Hkv * (Mq * W + Nkv * Mq + Mq + Nkv)
            continue
        total += 4 * batch * Hkv * (2 * Mq * W + Nkv * (Mq + Wq) + 2 * Mq + 2 * Nkv)
    return round(total / 2**20, 1)


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


def parts(x, cfg):
    """Each part of the operator alone (compiled alone, so fusion across parts is lost)."""
    q, k, v, kc, vc = x["q"], x["k"], x["v"], x["kc"], x["vc"]
    T, Hq, Dk = q.shape[1:]
    Hkv = k.shape[2]
    G, scale = Hq // Hkv, cfg.softmax_scale(Dk)
    qp = pack_gqa(q.detach(), Hkv).requires_grad_()
    comp = lambda f: torch.compile(f, fullgraph=True, dynamic=False)
    cmp_fn = comp(lambda qp, kc, vc: op.compressed_branch(qp, kc, vc, cfg, G, scale, True))
    sel_fn = comp(lambda qp, kc, lse: select_blocks(qp, heads_first(kc), lse, cfg, scale, G, T))
    out = {}
    kc_, vc_ = kc.detach().requires_grad_(), vc.detach().requires_grad_()
    out["compressed"] = fwd_and_fwdbwd(lambda: cmp_fn(qp, kc_, vc_)[0], [qp, kc_, vc_])
    with torch.no_grad():
        _, lse = cmp_fn(qp, kc, vc)
    out["scoring_topn"] = {"fwd_ms": timed_ms(lambda: sel_fn(qp.detach(), kc, lse))}
    idx = sel_fn(qp.detach(), kc, lse)

    def build(idx):   # the selected branch's BlockMask as its FlexAttention call gets it
        table, mm = op.selected_mask_mod(idx, cfg, G, use_flex=True)
        S = effective_splits(op.tuning.Q_SPLITS.get("slc", 1), T * G, op.tuning.sel_q_block())
        bm = op.selected_branch_block_mask(idx, table, mm, cfg, G, full_width=False, q_splits=S)
        return tuple(t for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                 bm.full_kv_indices, bm.q_num_blocks, bm.q_indices,
                                 bm.full_q_num_blocks, bm.full_q_indices) if t is not None)
    build_fn = comp(build)
    out["mask_build"] = {"fwd_ms": timed_ms(lambda: build_fn(idx))}
    lists = build_fn(idx)
    out["mask_build"]["selected_blockmask_mib"] = sum(t.numel() * t.element_size() for t in lists) / 2**20
    listed = lists[0] + (lists[2] if len(lists) == 8 else 0)     # partial (+ full) KV tiles
    out["mask_build"]["mean_kv_tiles_per_q_tile"] = listed.float().mean().item()
    k_, v_ = k.detach().requires_grad_(), v.detach().requires_grad_()
    slc_fn = comp(lambda qp, k, v, idx: op.selected_branch(qp, k, v, idx, cfg, G, scale, True))
    out["selected"] = fwd_and_fwdbwd(lambda: slc_fn(qp, k_, v_, idx), [qp, k_, v_])
    swa_fn = comp(lambda qp, k, v: op.sliding_branch(qp, k, v, cfg, G, scale, True))
    out["sliding"] = fwd_and_fwdbwd(lambda: swa_fn(qp, k_, v_), [qp, k_, v_])
    return out


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
            cmd += ["--tune", *variant.split()]
        print(f"[bench] variant {i} ({variant or 'defaults'}): log {log}", flush=True)
        # each variant its own Inductor cache: a knob that changes only Inductor's choices (not
        # the traced graph) would otherwise get another variant's cached kernels
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
        meta = meta or {k: v for k, v in got["meta"].items() if k != "tuning"}
        for r in got["rows"]:
            rows.append({"variant": variant, "tuning": got["meta"]["tuning"], **r})
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
    ap.add_argument("--parts", action="store_true",
                    help="also time each part of nsa_flex alone (compiles each part: slow)")
    ap.add_argument("--profile", action="store_true",
                    help="device time of nsa_flex per kernel group, from the profiler (no extra compile)")
    ap.add_argument("--memory", action="store_true",
                    help="for nsa_flex, what is live at the peak of one fwd+bwd and which ops made "
                         "it (tools/memtrace.py; after the timings, no extra compile)")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--tune", nargs="*", default=[], metavar="KNOB=VALUE",
                    help="set nsa_flex.tuning knobs before compiling, e.g. SEL_Q_BLOCK=16 Q_SPLITS.cmp=8 "
                         "(recorded in the JSON)")
    ap.add_argument("--gpu-lock", default=None, metavar="FILE",
                    help="hold this file lock while timing and compiling, so several bench "
                         "processes sharing one card never time while another times or autotunes "
                         "(with --barrier the first compiles overlap instead)")
    ap.add_argument("--barrier", default=None, metavar="DIR:N",
                    help="wait before the first timing until N runs have written DIR/ready.* (set "
                         "by --variants: no run times while another still compiles and autotunes)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="'KNOB=V ...'",
                    help="run each quoted set of knobs (\"\" for the defaults) in its own process, all "
                         "at once: compiles overlap, timings take turns under one lock; the rows "
                         "of all variants go to --out, each with its 'variant'")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench.py times GPU kernels and torch sees no CUDA device here")
    if a.variants is not None:
        return run_variants(a)
    global GPU_LOCK, BARRIER
    GPU_LOCK, BARRIER = a.gpu_lock, a.barrier
    tuned = op.tuning.apply(a.tune)
    op.prepare_flash("cuda")   # (parts() compiles branches outside the operator)
    rows = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cuda": torch.version.cuda,
            "B": 1, "Hq": a.hq, "Hkv": a.hkv, "dtype": "bfloat16", "timing": "median, triton do_bench",
            "date": time.strftime("%Y-%m-%d"), "tuning": tuned,
            "timed_under_lock": a.gpu_lock is not None,
            "inductor_scalar_tree_fix": op.tuning.fix_scalar_tree_block_shape()}

    def save():
        json.dump({"meta": meta, "rows": rows}, open(a.out, "w"), indent=1)

    for cname in a.configs:
        cfg = CONFIGS[cname]
        for dims in a.dims:
            Dk, Dv = map(int, dims.split(":"))
            if cname == "fla" and Dk != Dv:
                continue
            for T in a.seq:
                x = make(T, a.hq, a.hkv, Dk, Dv, cfg)
                impls = a.impls if cname == "fla" else [i for i in a.impls if i != "fla"]
                for impl in impls:
                    if impl.startswith("sdpa") and cname == "fla":
                        continue  # dense rows are the same in both configurations
                    row = {"impl": impl, "config": cname, "T": T, "Dk": Dk, "Dv": Dv}
                    t0 = time.time()
                    try:
                        if impl == "nsa_flex":
                            row.update(ours(x, cfg, sliding=cname != "fla", fla_pool=cname == "fla",
                                            profile=a.profile, memory=a.memory))
                            if a.parts and cname == "paper":
                                row["parts"] = parts(x, cfg)
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
    print(f"{'impl':<11}{'config':<7}{'T':>7}{'Dk':>5}{'Dv':>5}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "err"
        print(f"{r['impl']:<11}{r['config']:<7}{r['T']:>7}{r['Dk']:>5}{r['Dv']:>5}{f('fwd_ms'):>10}"
              f"{f('fwdbwd_ms'):>12}{f('peak_mem_mib'):>10}")


if __name__ == "__main__":
    main()
