"""GPU benchmark of the attention branches alone, each under several sets of tuning knobs.

For one T and shape, each branch (``cmp``, ``slc``, ``swa``: operator.compressed_branch,
selected_branch, sliding_branch) is compiled and timed once per set of knobs (``--tune`` syntax,
e.g. per-branch FlexAttention kernel options ``KERNEL_OPTIONS.slc.bwd_num_warps=2``), all in one
process on the same inputs: forward and forward+backward (median of repeats), peak memory, the
FlexAttention kernels' own device time from the profiler, and the largest difference of the
output and every input gradient from the first set's (a knob must not change the result beyond
bf16 rounding). The selected branch gets the blocks the operator's own selection picks for these
inputs. A set that fails to compile or run is recorded with its error and the sweep goes on.

    python tools/bench_branches.py --seq 65536 --branches slc \
        --sets "" "KERNEL_OPTIONS.slc.bwd_num_warps=2" --out tools/results/branches-h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS, fwd_and_fwdbwd, kernel_breakdown, make  # noqa: E402

from masks import heads_first, pack_gqa  # noqa: E402
from nsa_flex import operator as op  # noqa: E402
from nsa_flex import tuning  # noqa: E402
from nsa_flex.selection import select_blocks  # noqa: E402


def branch_run(name, x, idx, cfg, G, scale):
    """(run, leaves) for one branch: run() compiles on first call and returns the output."""
    qp = pack_gqa(x["q"].detach(), x["k"].shape[2]).requires_grad_()
    comp = lambda f: torch.compile(f, fullgraph=True, dynamic=False)   # a fresh compile per set
    if name == "cmp":
        kc, vc = (x[n].detach().requires_grad_() for n in ("kc", "vc"))
        fn = comp(lambda qp, kc, vc: op.compressed_branch(qp, kc, vc, cfg, G, scale, True)[0])
        return (lambda: fn(qp, kc, vc)), [qp, kc, vc]
    k, v = (x[n].detach().requires_grad_() for n in ("k", "v"))
    if name == "slc":
        fn = comp(lambda qp, k, v, idx: op.selected_branch(qp, k, v, idx, cfg, G, scale, True))
        return (lambda: fn(qp, k, v, idx)), [qp, k, v]
    fn = comp(lambda qp, k, v: op.sliding_branch(qp, k, v, cfg, G, scale, True))
    return (lambda: fn(qp, k, v)), [qp, k, v]


def result(run, leaves, do):
    for t in leaves:
        t.grad = None
    o = run()
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def max_rel_diff(got, want):
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--dims", default="128:128", help="Dk:Dv")
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--branches", nargs="+", default=["slc"], choices=["cmp", "slc", "swa"])
    ap.add_argument("--sets", nargs="+", default=[""], metavar="'KNOB=V ...'",
                    help='quoted sets of knobs, "" for the defaults; the first is the reference')
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg, T = CONFIGS[a.config], a.seq
    Dk, Dv = map(int, a.dims.split(":"))
    G, scale = a.hq // a.hkv, cfg.softmax_scale(Dk)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "config": a.config, "T": T, "Dk": Dk, "Dv": Dv,
            "Hq": a.hq, "Hkv": a.hkv, "B": 1, "dtype": "bfloat16",
            "timing": "median, triton do_bench; kernel ms from the profiler, mean of 3",
            "command": "python " + " ".join(sys.argv)}
    rows = []

    def write():
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    defaults = {n: copy.deepcopy(v) for n, v in vars(tuning).items() if n.isupper()}
    # every set compiles afresh: a knob that changes only Inductor's choices, not the traced
    # graph, would otherwise get an earlier set's cached kernels (it once did)
    torch._inductor.config.fx_graph_cache = False
    x = make(T, a.hq, a.hkv, Dk, Dv, cfg)
    with torch.no_grad():   # the blocks the operator would select for these inputs
        qp = pack_gqa(x["q"], a.hkv)
        lse = torch.compile(lambda qp, kc, vc: op.compressed_branch(qp, kc, vc, cfg, G, scale, True),
                            fullgraph=True, dynamic=False)(qp, x["kc"], x["vc"])[1]
        idx = torch.compile(lambda qp, kc, lse: select_blocks(qp, kc, lse, cfg, scale, G, T),
                            fullgraph=True, dynamic=False)(qp, heads_first(x["kc"]), lse)
        del qp, lse
    for name in a.branches:
        reference, do = None, None
        for knobs in a.sets:
            for n, v in defaults.items():
                setattr(tuning, n, copy.deepcopy(v))
            row = {"branch": name, "set": knobs}
            t0 = time.time()
            torch._dynamo.reset()   # each set traces afresh (knobs are read while tracing)
            try:
                row["tuning"] = {k: v for k, v in tuning.apply(knobs.split()).items()
                                 if v != defaults[k]}
                op.prepare_flash(x["q"].device)   # (the operator does this itself)
                run, leaves = branch_run(name, x, idx, cfg, G, scale)
                row.update(fwd_and_fwdbwd(run, leaves))
                prof = kernel_breakdown(run)["ms_per_fwdbwd"]
                row["flex_fwd_kernel_ms"] = prof.get("flex forward", 0.0)
                row["flex_bwd_kernel_ms"] = prof.get("flex backward", 0.0)
                if do is None:
                    do = torch.randn_like(run().detach())
                got = result(run, leaves, do)
                if reference is None:
                    reference = got
                row["max_rel_diff_vs_first"] = max_rel_diff(got, reference)
                del got
            except Exception as e:   # a set that does not compile or run: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc()
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            write()
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        del reference
    for n, v in defaults.items():
        setattr(tuning, n, v)
    print(f"{'branch':>6} {'fwd ms':>7} {'fwd+bwd':>8} {'flex fwd':>9} {'flex bwd':>9} {'diff':>8}  set")
    for r in rows:
        if "error" in r:
            print(f"{r['branch']:>6} {'error':>7}  {r['set']!r}: {r['error'][:100]}")
            continue
        print(f"{r['branch']:>6} {r['fwd_ms']:>7.2f} {r['fwdbwd_ms']:>8.2f} {r['flex_fwd_kernel_ms']:>9.2f} "
              f"{r['flex_bwd_kernel_ms']:>9.2f} {r['max_rel_diff_vs_first']:>8.1e}  {r['set']!r}")


if __name__ == "__main__":
    main()
