"""Per-token decode latency of NSA against dense attention over the full KV cache, at long
contexts (GPU).

An nsa model (by default one layer of attention width Hq·D with dim 1024, Hq = 64, Hkv = 4,
D = 128 and the paper's NSA settings; ``--layers/--dim/--heads/...`` for a whole model) decodes
one token per sequence from a cache already holding ``context`` positions (random keys, values
and compressed blocks: decode time does not depend on their values). These functions are timed,
each compiled with CUDA graphs:

- ``nsa_step``: ``nsa_flex.decode.decode_step``, the whole model for one token;
- ``dense_step``: the same model with dense attention: the same projections and feed-forward,
  SDPA of the new token over all ``context`` cached keys (llama3 with a KV cache);
- ``nsa_attention``: layer 0's NSA attention alone (its projections, compression of a completed
  block, scores, top-n, the three branches, the gate; up to ``wo``);
- ``dense_attention``: layer 0's dense attention alone (q/k/v projections, RoPE, cache write,
  SDPA);
- ``nsa_kernel``: the attention over the cache alone, from the new token's q and gates to the
  gated output (``--decode-kernel``: the Triton launches of nsa_flex/decode_kernel.py, or torch
  ops; the cache update and φ excluded);
- ``dense_kernel``: SDPA of the new token over the whole cache alone.

The NSA step and layer run at a position that completes no compression block (φ idle, as on
d − 1 of every d steps) and, as ``nsa_step_block`` / ``nsa_attention_block``, at one that does.
Every cache has a fixed address (no copy into the CUDA graph's inputs). With ``--profile`` the
JSON also holds each function's GPU kernel time per call (``*_gpu_us``, torch.profiler) and its
largest kernels: at batch 1 the host side of a graph replay can take longer than the kernels.

SDPA is called as an opaque op (eager SDPA with ``enable_gqa``): compiled, Inductor would expand
the KV heads to the query heads, reading and writing 16x the cache. Every row is compiled first
(``--wait-for`` then holds the timing until other GPU work is done), then timed: median of
triton's do_bench. Prints a table last and writes JSON.

    python tools/bench_decode.py --context 8192 32768 65536 131072 --batch 1 8 --out decode.json
    python tools/bench_decode.py --context 65536 --batch 1 8 --layers 12 --dim 768 --heads 12 \
        --kv-heads 2 --head-dim 64 --vocab 8192 --out decode-100m.json     # the 100m flavor
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


@torch.library.custom_op("nsa_bench::sdpa_gqa", mutates_args=())
def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eager SDPA with grouped KV heads (its own kernel choice), opaque to Inductor."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).contiguous()


@sdpa_gqa.register_fake
def _(q, k, v):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def profile(fn, steps: int = 20, top: int = 25) -> tuple[float, list[dict]]:
    """GPU kernel time per call of ``fn``: the total, and by kernel name (torch.profiler) the
    ``top`` largest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:100], "us_per_call": e.device_time_total / steps, "count": e.count // steps}
            for e in p.key_averages() if e.device_time_total > 0]
    return sum(r["us_per_call"] for r in rows), sorted(rows, key=lambda r: -r["us_per_call"])[:top]


def build(context: int, batch: int, heads: int, kv_heads: int, head_dim: int, dim: int,
          layers: int, vocab: int, kernel: str):
    from nsa_flex.decode import NSADecoder
    from nsa_flex.model import NSATransformer, nsa_flavors
    from nsa_flex.model.args import replace

    args = replace(nsa_flavors["100m"], n_layers=layers, dim=dim, n_heads=heads, n_kv_heads=kv_heads,
                   head_dim=head_dim, vocab_size=vocab, max_seq_len=context + 8)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = NSATransformer(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
        for m in model.modules():                  # random gates: all three branches matter
            if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Linear):
                torch.nn.init.normal_(m.gate.weight, std=0.1)
    model = model._apply(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t).eval()   # RoPE stays complex
    dec = NSADecoder(model, batch, context + 8, compile=True, mode="reduce-overhead", kernel=kernel)
    with torch.no_grad():
        for b in dec.cache.buffers():
            if b.is_floating_point():
                b.normal_()
    return model, dec


def dense_attention(model, attn, k_cache, v_cache):
    """``attn``'s attention as dense decoding does it (llama3 with a KV cache): q/k/v
    projections, RoPE, cache write, SDPA over the whole cache. x [B, 1, dim] -> [B, Hq, 1, Dv]."""
    from nsa_flex.model.model import apply_rotary_emb

    @torch.no_grad()
    def step(x, pos):
        B = x.shape[0]
        q = attn.wq(x).view(B, 1, -1, attn.head_dim)
        k = attn.wk(x).view(B, 1, -1, attn.head_dim)
        v = attn.wv(x).view(B, 1, -1, attn.v_head_dim)
        q, k = apply_rotary_emb(q, k, model.freqs_cis, pos[:, None])
        bi = torch.arange(B, device=x.device)
        k_cache[bi, :, pos] = k[:, 0]
        v_cache[bi, :, pos] = v[:, 0]
        return sdpa_gqa(q.transpose(1, 2), k_cache, v_cache)

    return step


def dense_step(model, caches):
    """The same model with dense attention (:func:`dense_attention`) in every layer; ``caches``
    holds one (k, v) [B, Hkv, C, D] pair per layer."""
    layers = [(block, dense_attention(model, block.attention, *kv))
              for block, kv in zip(model.layers.values(), caches)]

    @torch.no_grad()
    def step(tokens, pos):
        h = model.tok_embeddings(tokens[:, None])
        B = h.shape[0]
        for block, attend in layers:
            o = attend(block.attention_norm(h), pos)
            h = h + block.attention.wo(o.transpose(1, 2).reshape(B, 1, -1))
            h = h + block.feed_forward(block.ffn_norm(h))
        return model.output(model.norm(h))[:, 0].float()

    return step


def prepare(context: int, batch: int, a) -> dict:
    """Build, compile and warm up one row's four functions: the NSA model step, the dense model
    step, and each one's layer-0 attention alone (projections up to the attention output)."""
    from nsa_flex import decode_kernel  # noqa: F401  (registers torch.ops.nsa_flex.decode_attention)
    from nsa_flex.decode import _attention_step

    model, dec = build(context, batch, a.heads, a.kv_heads, a.head_dim, a.dim, a.layers, a.vocab,
                       a.decode_kernel)
    tokens = torch.randint(0, a.vocab, (batch,), device="cuda")
    # a step at a position that completes no compression block (φ idle; 15 of every 16 steps
    # with d = 16) and, as "nsa_*_block", the last one that does (φ runs)
    cfg = model.layers["0"].attention.nsa_config
    l, d = cfg.cmp_block, cfg.cmp_stride
    completes = [t for t in range(context - 1, context - 1 - 2 * d, -1) if t >= l - 1 and (t - l + 1) % d == 0]
    idle = [t for t in range(context - 1, context - 1 - 2 * d, -1) if not (t >= l - 1 and (t - l + 1) % d == 0)]
    start = torch.full((batch,), (idle or completes)[0], device="cuda", dtype=torch.long)
    block = torch.full((batch,), (completes or idle)[0], device="cuda", dtype=torch.long)
    x = torch.randn(batch, 1, a.dim, device="cuda", dtype=torch.bfloat16)
    caches = [tuple(torch.randn(batch, a.kv_heads, context, a.head_dim, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2)) for _ in range(a.layers)]
    for kv in caches:   # like the NSA cache's buffers: fixed addresses, not copied into each replay
        for c in kv:
            torch._dynamo.mark_static_address(c)
    dense = torch.compile(dense_step(model, caches), fullgraph=True, mode="reduce-overhead")
    dense_attn = torch.compile(dense_attention(model, model.layers["0"].attention, *caches[0]), fullgraph=True,
                               mode="reduce-overhead")
    attn, lc = model.layers["0"].attention, dec.cache.layers[0]

    @torch.no_grad()
    def nsa_layer_attention(x, t):
        return _attention_step(attn, lc, x, t, model.freqs_cis, False, a.decode_kernel)[0]
    nsa_attn = torch.compile(nsa_layer_attention, fullgraph=True, mode="reduce-overhead")
    G = a.heads // a.kv_heads
    qg = torch.randn(batch, a.kv_heads, G, a.head_dim, device="cuda", dtype=torch.bfloat16)
    q_dense = qg.view(batch, a.heads, 1, a.head_dim)
    gates = torch.rand(batch, a.kv_heads, G, 3, device="cuda")
    win = (lc.k_swa, lc.v_swa) if lc.separate else (lc.k, lc.v)

    @torch.no_grad()
    def nsa_cache_attention(t):
        return torch.ops.nsa_flex.decode_attention(
            qg, lc.k, lc.v, lc.k_cmp, lc.v_cmp, *win, t, gates, cfg.cmp_block, cfg.cmp_stride,
            cfg.sel_block, cfg.sel_topn, cfg.n_init, cfg.n_local, cfg.window,
            cfg.softmax_scale(a.head_dim), lc.separate)[0]
    nsa_kernel = torch.compile(nsa_cache_attention, fullgraph=True, mode="reduce-overhead")
    dense_kernel = torch.compile(lambda: sdpa_gqa(q_dense, *caches[0]), fullgraph=True, mode="reduce-overhead")

    def nsa(at):
        dec.cache.pos.copy_(at)
        return dec.step(tokens)

    fns = {"step": {"nsa_step": lambda: nsa(start), "nsa_step_block": lambda: nsa(block),
                    "dense_step": lambda: dense(tokens, start)},
           "attention": {"nsa_attention": lambda: nsa_attn(x, start), "nsa_attention_block": lambda: nsa_attn(x, block),
                         "dense_attention": lambda: dense_attn(x, start)},
           "kernel": {"nsa_kernel": lambda: nsa_kernel(start), "dense_kernel": dense_kernel}}
    fns = {k: fn for what in a.only for k, fn in fns[what].items()}
    for fn in fns.values():   # compile, capture, warm up
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    return fns


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1, help="transformer blocks (default 1)")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="+", choices=("step", "attention", "kernel"),
                    default=["step", "attention", "kernel"],
                    help="time the model steps, the layer-0 attentions, the attention over the cache "
                         "alone (default all three)")
    ap.add_argument("--decode-kernel", default="triton", choices=("triton", "torch"),
                    help="NSA's attention over the cache (default triton: nsa_flex/decode_kernel.py)")
    ap.add_argument("--profile", action="store_true",
                    help="also record the kernels of the steps (torch.profiler) in the JSON, printed")
    ap.add_argument("--wait-for", nargs="+", default=[], metavar="PATH",
                    help="compile every row first, then wait until these files exist before timing "
                         "(other GPU work sharing the machine finishes first)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench_decode.py times GPU kernels and torch sees no CUDA device here")
    if "kernel" in a.only and a.decode_kernel != "triton":
        raise SystemExit("--only kernel times the Triton decode kernel: it needs --decode-kernel triton")
    from triton.testing import do_bench

    from nsa_flex import patches
    patches.install()
    # every row keeps its compiled functions until it is timed
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    prepared = []
    for context in a.context:
        for batch in a.batch:
            t0 = time.time()
            row = {"context": context, "batch": batch}
            try:
                fns = prepare(context, batch, a)
            except Exception as e:   # recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                fns = None
            row["compile_s"] = round(time.time() - t0, 1)
            print(f"prepared context {context} batch {batch} in {row['compile_s']}s", flush=True)
            prepared.append((row, fns))
    while not all(os.path.exists(p) for p in a.wait_for):
        time.sleep(1)
    rows = []
    for row, fns in prepared:
        if fns is not None:
            try:
                for name, fn in fns.items():
                    row[f"{name}_us"] = 1e3 * do_bench(fn, warmup=50, rep=300, return_mode="median")
                if "step" in a.only:
                    row["nsa_tokens_per_s"] = row["batch"] / row["nsa_step_us"] * 1e6
                    row["dense_tokens_per_s"] = row["batch"] / row["dense_step_us"] * 1e6
                    row["speedup_step"] = row["dense_step_us"] / row["nsa_step_us"]
                for f in ("attention", "kernel"):
                    if f in a.only:
                        row[f"speedup_{f}"] = row[f"dense_{f}_us"] / row[f"nsa_{f}_us"]
                if a.profile:   # GPU time alone: at batch 1 a replay's host side can exceed it
                    for name in fns:
                        row[f"{name}_gpu_us"], row[f"{name}_kernels"] = profile(fns[name])
                    for f in a.only:
                        row[f"speedup_{f}_gpu"] = row[f"dense_{f}_gpu_us"] / row[f"nsa_{f}_gpu_us"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_kernels")}), flush=True)
        for name in ("nsa_kernel", "nsa_attention", "nsa_step"):
            for r in row.get(f"{name}_kernels", [])[:12]:
                print(f"  {name} {r['us_per_call']:8.1f} us {r['count']:3d}x {r['kernel']}")
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": "bfloat16",
            "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dim": a.dim,
            "layers": a.layers, "vocab": a.vocab, "decode_kernel": a.decode_kernel, "date": time.strftime("%Y-%m-%d"),
            "timing": "median of triton do_bench (warmup 50 ms, 300 ms), compiled, CUDA graphs",
            "command": "python tools/bench_decode.py " + " ".join(sys.argv[1:])}
    json.dump({"meta": meta, "rows": rows}, open(a.out, "w"), indent=1)
    cols = [(f"{w} {f}", f"{w}_{f}_us") for f in a.only for w in ("nsa", "dense")] + \
        [(f"{f} x", f"speedup_{f}") for f in a.only]
    print("\n" + f"{'context':>8}{'batch':>6}" + "".join(f"{c:>18}" for c, _ in cols))
    for r in rows:
        cells = "".join(f"{r[k]:>18.2f}" if k in r else f"{'error':>18}" for _, k in cols)
        print(f"{r['context']:>8}{r['batch']:>6}{cells}" + (f"  {r['error'][:100]}" if "error" in r else ""))


if __name__ == "__main__":
    main()
