"""GPU benchmark of the selection pass alone (scores, eqs. 8–10, and top-n, eqs. 11–12): the
torch route (matmul + pointwise per chunk of positions) against the fused Triton kernel
(tuning.SCORE_KERNEL = 1, nsa_flex/score_kernel.py), both followed by the top-n over int64 keys,
the kernel followed by the top-n by value (tuning.TOPN_BY_VALUE) and by the top-n kernel
(tuning.TOPN_KERNEL, nsa_flex/topn_kernel.py), compiled as the operator
compiles them, same process, same card, same inputs; median of repeats. Also how often the two select
the same blocks (the torch route rounds q·k̃ᵀ to bf16, the kernel keeps float32, so near-ties
may go either way) and, at the first T, both against a float32 torch route.

    python tools/bench_scoring.py --seq 8192 65536 --out tools/results/scoring-h100.json

With --sweep ROWS:BLOCKS:WARPS:STAGES ..., it also times the kernel alone (one eager launch over
the whole sequence) with each of those tiles (tuning.SCORE_TILES, or SCORE_TILES_WIDE at
Dk > 256), after the routes, and checks each against the first tiles' scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS, bench_ms, make  # noqa: E402

from masks import heads_first, pack_gqa  # noqa: E402
from nsa_flex import operator as op  # noqa: E402
from nsa_flex import score_kernel, tuning  # noqa: E402
from nsa_flex.selection import select_blocks  # noqa: E402


def same_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of (head, position) whose selected block sets are equal."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()


def sweep(specs, qp, kc, lse, cfg, scale, G, T):
    """The kernel alone with each tile spec, one eager launch over all T positions."""
    knob = "SCORE_TILES_WIDE" if qp.shape[-1] > 256 else "SCORE_TILES"
    saved, out, first = dict(getattr(tuning, knob)), [], None
    p = torch.empty(*qp.shape[:2], T, cfg.num_sel_blocks(T), device=qp.device, dtype=torch.float32)
    try:
        for spec in specs:
            rows, blocks, warps, stages = map(int, spec.split(":"))
            getattr(tuning, knob).update(rows=rows, blocks=blocks, warps=warps, stages=stages)
            entry = {"tiles": spec}
            try:
                def run():
                    return score_kernel.launch(qp, kc, lse, cfg.cmp_block, cfg.cmp_stride,
                                               cfg.sel_block, scale, G, 0, T, p)
                run()
                if first is None:
                    first = p.clone()
                entry["max_rel_diff"] = ((p - first).abs().max() / first.abs().max()).item()
                entry["kernel_ms"] = bench_ms(run)
            except Exception as e:   # a tile that does not compile or fit: say so, go on
                entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out.append(entry)
            print(json.dumps({"T": T, "Dk": qp.shape[-1], **entry}), flush=True)
    finally:
        getattr(tuning, knob).clear()
        getattr(tuning, knob).update(saved)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--dims", nargs="+", default=["128:128"], help="Dk:Dv pairs")
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--sweep", nargs="*", default=[], metavar="ROWS:BLOCKS:WARPS:STAGES")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = CONFIGS[a.config]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "config": a.config, "Hq": a.hq, "Hkv": a.hkv,
            "B": 1, "dtype": "bfloat16", "timing": "median, triton do_bench",
            "command": "python " + " ".join(sys.argv)}
    rows = []
    G = a.hq // a.hkv
    defaults = tuning.SCORE_KERNEL, tuning.TOPN_BY_VALUE, tuning.TOPN_KERNEL

    def write():
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    op.prepare_flash("cuda")   # before compiling the compressed branch outside the operator
    for dims in a.dims:
        Dk, Dv = map(int, dims.split(":"))
        for T in a.seq:
            x = make(T, a.hq, a.hkv, Dk, Dv, cfg)
            scale = cfg.softmax_scale(Dk)
            qp = pack_gqa(x["q"], a.hkv)
            kc = heads_first(x["kc"])
            cmp = torch.compile(lambda qp, kc, vc: op.compressed_branch(qp, kc, vc, cfg, G, scale, True),
                                fullgraph=True, dynamic=False)
            with torch.no_grad():
                lse = cmp(qp, x["kc"], x["vc"])[1]
            sel = torch.compile(lambda qp, kc, lse: select_blocks(qp, kc, lse, cfg, scale, G, T),
                                fullgraph=True, dynamic=False)
            row = {"T": T, "Dk": Dk, "Dv": Dv}
            idx = {}
            for name, flag, by_value, topn in (("torch_route", 0, 0, 0), ("kernel", 1, 0, 0),
                                               ("kernel_by_value", 1, 1, 0), ("kernel_topn_kernel", 1, 1, 1)):
                def run(flag=flag, by_value=by_value, topn=topn):
                    tuning.SCORE_KERNEL = flag        # read while tracing; guarded per value
                    tuning.TOPN_BY_VALUE = by_value
                    tuning.TOPN_KERNEL = topn
                    return sel(qp, kc, lse)
                idx[name] = run()
                row[f"{name}_ms"] = bench_ms(run)
                print(json.dumps({"T": T, name: row[f"{name}_ms"]}), flush=True)
            row["same_selection"] = same_sets(idx["torch_route"], idx["kernel"])
            row["by_value_same_as_kernel"] = same_sets(idx["kernel_by_value"], idx["kernel"])
            row["topn_kernel_same_as_kernel"] = same_sets(idx["kernel_topn_kernel"], idx["kernel"])
            if T == a.seq[0]:   # against float32 scores (eager torch route on float32 inputs)
                tuning.SCORE_KERNEL = tuning.TOPN_KERNEL = 0
                want = select_blocks(qp.float(), kc.float(), lse, cfg, scale, G, T)
                row["same_selection_vs_fp32"] = {n: same_sets(i, want) for n, i in idx.items()}
            tuning.SCORE_KERNEL, tuning.TOPN_BY_VALUE, tuning.TOPN_KERNEL = defaults
            row["speedup"] = row["torch_route_ms"] / row["kernel_ms"]
            if a.sweep:
                row["sweep"] = sweep(a.sweep, qp, kc, lse, cfg, scale, G, T)
            rows.append(row)
            write()
            print(json.dumps(row), flush=True)
            del x, qp, kc, lse, idx
            torch.cuda.empty_cache()
    print(f"{'T':>7} {'Dk':>4} {'torch route ms':>15} {'kernel ms':>10} {'by value ms':>12} "
          f"{'top-n kernel ms':>16} {'same sel':>9} {'top-n kernel same':>18}")
    for r in rows:
        print(f"{r['T']:>7} {r['Dk']:>4} {r['torch_route_ms']:>15.2f} {r['kernel_ms']:>10.2f} "
              f"{r['kernel_by_value_ms']:>12.2f} {r['kernel_topn_kernel_ms']:>16.2f} "
              f"{r['same_selection']:>9.4f} {r['topn_kernel_same_as_kernel']:>18.4f}")


if __name__ == "__main__":
    main()
