"""Per-token decode latency: one NSA attention layer's decode step against dense attention over
the full KV cache, at long contexts (GPU).

A one-layer nsa model of attention width Hq·D (dim 1024, Hq = 64, Hkv = 4, D = 128 by default,
paper NSA settings) decodes one token per sequence from a cache already holding ``context``
positions (random keys, values and compressed blocks: decode time does not depend on their
values). Its step (``nsa_flex.decode.decode_step``: projections, compression of a completed block,
scores, top-n, the three branches, the gate, the feed-forward) is timed compiled with CUDA graphs,
against the same layer with dense attention: the same projections and feed-forward, and SDPA of
the one query over all ``context`` keys (``enable_gqa``), also compiled with CUDA graphs. The
attention-only times (the dense SDPA call alone, and the NSA step minus the dense step's
non-attention part) are reported too. Median of repeats (triton's do_bench). Prints a table last
and writes JSON.

    python tools/bench_decode.py --context 8192 32768 65536 131072 --batch 1 8 --out decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def build(context: int, batch: int, heads: int, kv_heads: int, head_dim: int, dim: int,
          layers: int, vocab: int):
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
    model = model.to(torch.bfloat16).eval()
    dec = NSADecoder(model, batch, context + 8, compile=True, mode="reduce-overhead")
    with torch.no_grad():
        for b in dec.cache.buffers():
            if b.is_floating_point():
                b.normal_()
    return model, dec


def dense_step(model, caches):
    """The same model with dense attention of the new token over the whole cache (llama3's
    attention with a KV cache: ``caches`` holds one (k, v) [B, Hkv, C, D] pair per layer)."""

    @torch.no_grad()
    def step(tokens, pos):
        from nsa_flex.model.model import apply_rotary_emb
        h = model.tok_embeddings(tokens[:, None])
        B = h.shape[0]
        bi = torch.arange(B, device=h.device)
        for block, (k_cache, v_cache) in zip(model.layers.values(), caches):
            attn = block.attention
            x = block.attention_norm(h)
            q = attn.wq(x).view(B, 1, -1, attn.head_dim)
            k = attn.wk(x).view(B, 1, -1, attn.head_dim)
            v = attn.wv(x).view(B, 1, -1, attn.v_head_dim)
            q, k = apply_rotary_emb(q, k, model.freqs_cis, pos[:, None])
            k_cache[bi, :, pos] = k[:, 0]
            v_cache[bi, :, pos] = v[:, 0]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, enable_gqa=True)
            h = h + attn.wo(o.transpose(1, 2).reshape(B, 1, -1))
            h = h + block.feed_forward(block.ffn_norm(h))
        return model.output(model.norm(h))[:, 0].float()

    return step


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
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench_decode.py times GPU kernels and torch sees no CUDA device here")
    from triton.testing import do_bench

    from nsa_flex import patches
    patches.install()
    rows = []
    for context in a.context:
        for batch in a.batch:
            t0 = time.time()
            row = {"context": context, "batch": batch}
            torch._dynamo.reset()   # each shape its own compile (no recompile limit, no dynamic shapes)
            try:
                model, dec = build(context, batch, a.heads, a.kv_heads, a.head_dim, a.dim, a.layers,
                                   a.vocab)
                tokens = torch.randint(0, a.vocab, (batch,), device="cuda")
                start = torch.full((batch,), context - 1, device="cuda", dtype=torch.long)

                def nsa():
                    dec.cache.pos.copy_(start)
                    return dec.step(tokens)

                caches = [(torch.randn(batch, a.kv_heads, context, a.head_dim, device="cuda",
                                       dtype=torch.bfloat16),) * 2 for _ in range(a.layers)]
                caches = [(k, torch.randn_like(k)) for k, _ in caches]
                k_cache, v_cache = caches[0]
                dense = torch.compile(dense_step(model, caches), fullgraph=True,
                                      mode="reduce-overhead")
                q = torch.randn(batch, a.heads, 1, a.head_dim, device="cuda", dtype=torch.bfloat16)
                sdpa = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
                for fn in (nsa, lambda: dense(tokens, start), sdpa):   # compile, capture, warm up
                    for _ in range(3):
                        fn()
                torch.cuda.synchronize()
                row["nsa_step_us"] = 1e3 * do_bench(nsa, warmup=50, rep=300, return_mode="median")
                row["dense_step_us"] = 1e3 * do_bench(lambda: dense(tokens, start), warmup=50, rep=300,
                                                      return_mode="median")
                row["dense_attention_us"] = 1e3 * do_bench(sdpa, warmup=50, rep=300, return_mode="median")
                row["nsa_tokens_per_s"] = batch / row["nsa_step_us"] * 1e6
                row["dense_tokens_per_s"] = batch / row["dense_step_us"] * 1e6
                # projections, ffn, head: the dense step less its SDPA calls
                rest = row["dense_step_us"] - a.layers * row["dense_attention_us"]
                row["nsa_attention_us_est"] = (row["nsa_step_us"] - rest) / a.layers
                row["speedup_step"] = row["dense_step_us"] / row["nsa_step_us"]
                row["speedup_attention_est"] = row["dense_attention_us"] / max(row["nsa_attention_us_est"], 1e-3)
            except Exception as e:   # recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dim": a.dim,
            "layers": a.layers, "vocab": a.vocab,
            "date": time.strftime("%Y-%m-%d"), "timing": "median, triton do_bench, CUDA graphs"}
    json.dump({"meta": meta, "rows": rows}, open(a.out, "w"), indent=1)
    print(f"\n{'context':>8}{'batch':>6}{'nsa step us':>13}{'dense step us':>15}{'dense attn us':>15}"
          f"{'step x':>8}{'attn x (est)':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>8}{r['batch']:>6}  error: {r['error'][:80]}")
            continue
        print(f"{r['context']:>8}{r['batch']:>6}{r['nsa_step_us']:>13.1f}{r['dense_step_us']:>15.1f}"
              f"{r['dense_attention_us']:>15.1f}{r['speedup_step']:>8.2f}{r['speedup_attention_est']:>14.2f}")


if __name__ == "__main__":
    main()
