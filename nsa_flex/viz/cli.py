"""Command line of the mask visualiser: ``python tools/visualize_masks.py`` or
``python -m nsa_flex.viz``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nsa_flex.checkpoint import add_device_arguments, device_and_dtype

from . import figures, report
from .analysis import (analyse_head, branch_images, head_inputs, pooling_for, score_images,
                       selection_sharing, sparsity, tile_images)
from .model_io import (VizError, attention_tensors, build_model, capture_attention_inputs,
                       checkpoint_model_keys, make_input, model_args, parse_overrides, read_config,
                       resolve_checkpoint)

DESCRIPTION = """\
Draw what each NSA branch attends to. Runs the nsa model's forward (random weights of a flavor,
or a torchtitan DCP checkpoint) on one input sequence and writes, per layer and KV head, PNGs of
the token-level pattern of the compressed, selected and sliding branches and their union, the
selected branch's FlexAttention tiles (full / partial / skipped) with the wasted work, the
selection importance scores, and the gates; plus sparsity statistics (stats.json, stats.csv,
sparsity.png) and an index.html that shows everything. Long sequences are max-pooled (or cropped
with --query-range) to at most --max-pixels per side; the pictures say which."""

EPILOG = """\
examples:
  python tools/visualize_masks.py --flavor debug --seq-len 1024 --out viz
  python -m nsa_flex.viz --config configs/100m.toml --checkpoint outputs/100m/checkpoint \\
      --input needle --seq-len 32768 --layers 0,5,11 --query-range=-2048: --out viz-100m
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visualize_masks", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default=None,
                   help="model flavor of the nsa TrainSpec (debug, 100m, 1b, ...); default: the "
                        "--config's [model] flavor, else debug")
    p.add_argument("--config", default=None, metavar="TOML",
                   help="a training TOML: its [model] flavor, hf_assets_path (tokenizer) and [nsa] "
                        "overrides are used (flags given here win)")
    p.add_argument("--nsa", action="append", default=[], metavar="KEY=VALUE",
                   help="override an NSA option of the flavor, e.g. --nsa window=128 "
                        "(repeatable; the same names as the [nsa] TOML section)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="torchtitan DCP checkpoint: a step-N folder, the checkpoint folder holding "
                        "step-N folders (the newest is used), or a job's dump folder; default: "
                        "random weights (seed --seed)")
    p.add_argument("--tokenizer", default=None,
                   help="'embedded' (default), an HF tokenizer folder, or a tiktoken file")
    p.add_argument("--input", default="corpus",
                   help="'corpus' (a sample of the embedded stdlib corpus, validation split; "
                        "'corpus:K' starts at document K), 'needle' (a needle-in-a-haystack "
                        "sequence: a passkey sentence hidden in corpus text, asked for at the end), "
                        "or the path of a text file (repeated if shorter than --seq-len)")
    p.add_argument("--needle-depth", type=float, default=0.25,
                   help="with --input needle: where the needle sits, as a fraction of the sequence")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens in the sequence (default 1024)")
    p.add_argument("--layers", default="all",
                   help="layers to draw: 'all' or a list like '0,3,5-7' (default all)")
    p.add_argument("--heads", default="all",
                   help="KV heads to draw: 'all' or a list like '0,1'; the G query heads of a KV "
                        "head share its selection and are drawn together (default all)")
    p.add_argument("--query-range", default=None, metavar="A:B",
                   help="query positions to draw, Python-slice style: '3000:4000', '-1024:' (the "
                        "last 1024; write --query-range=-1024: so that it is not taken for a flag), "
                        "':512'; default: the whole sequence. Keys are drawn from 0 to the range's "
                        "last position")
    p.add_argument("--out", default="viz", help="output folder (created; default ./viz)")
    p.add_argument("--max-pixels", type=int, default=1024,
                   help="most data cells per side of a picture; larger ranges are max-pooled "
                        "(default 1024)")
    add_device_arguments(p)
    p.add_argument("--forward", default="dense", choices=("dense", "flex"),
                   help="how the model's forward runs on CUDA: 'dense' (default: the operator's "
                        "dense path in row chunks — same masks and selection up to rounding, no "
                        "kernel compile) or 'flex' (the compiled FlexAttention kernels used in "
                        "training; the first run on a machine compiles them, about a minute). "
                        "On CPU both are the dense path")
    p.add_argument("--documents", default="auto", choices=("auto", "on", "off"),
                   help="treat the input as packed documents that end at the tokenizer's EOS, as "
                        "attn_mask_type='block_causal' trains them ('auto': when the model's "
                        "attn_mask_type says so); boundaries are drawn and stats.json counts the "
                        "pairs any branch takes across them (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the needle")
    p.add_argument("--jobs", type=int, default=0,
                   help="processes drawing the pictures (default: up to 8, by CPU count)")
    return p


def parse_list(spec: str, n: int, what: str, hint: str) -> list[int]:
    """'all' or '0,2,4-6' -> sorted ids, each checked against range(n)."""
    if spec.strip().lower() == "all":
        return list(range(n))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                ids = range(int(a), int(b) + 1)
            else:
                ids = [int(part)]
        except ValueError:
            raise VizError(f"--{what}s {spec!r}: expected 'all' or numbers like '0,2,4-6'") from None
        for i in ids:
            if not 0 <= i < n:
                raise VizError(f"{what} {i} does not exist: {hint} has {n} {what}s (0–{n - 1})")
            out.add(i)
    if not out:
        raise VizError(f"--{what}s {spec!r} selects nothing")
    return sorted(out)


def parse_range(spec: str | None, T: int) -> tuple[int, int]:
    if spec is None or spec.strip() in ("", ":", "all"):
        return 0, T
    if ":" not in spec:
        raise VizError(f"--query-range {spec!r}: expected A:B (e.g. 3000:4000, -1024:, :512)")
    a, b = spec.split(":", 1)
    try:
        lo, hi, _ = slice(int(a) if a.strip() else None, int(b) if b.strip() else None).indices(T)
    except ValueError:
        raise VizError(f"--query-range {spec!r}: A and B must be integers") from None
    if hi <= lo:
        raise VizError(f"--query-range {spec!r} is empty for a sequence of {T} tokens")
    return lo, hi


def _log(t_start: float, msg: str) -> None:
    print(f"[viz {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def run(argv: list[str] | None = None) -> dict:
    """Run the visualiser; returns {"index": path, "figures": [...], "records": [...]}."""
    a = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    cfg_flavor, cfg_tok, cfg_nsa = read_config(a.config) if a.config else (None, None, {})
    flavor = a.flavor or cfg_flavor or "debug"
    overrides = {**cfg_nsa, **parse_overrides(a.nsa)}
    if a.seq_len < 1:
        raise VizError(f"--seq-len {a.seq_len}: must be positive")
    if a.max_pixels < 16:
        raise VizError(f"--max-pixels {a.max_pixels}: use at least 16")

    ckpt = layout = None
    if a.checkpoint:
        ckpt = resolve_checkpoint(a.checkpoint)
        layout = checkpoint_model_keys(ckpt)
        _log(t_start, f"checkpoint {ckpt}")
    # check the flavor, layers and heads before anything slow
    args = model_args(flavor, overrides, a.seq_len, vocab_size=1)
    layers = parse_list(a.layers, args.n_layers, "layer", f"flavor {flavor!r}")
    heads = parse_list(a.heads, args.kv_heads, "KV head", f"flavor {flavor!r}")
    q_lo, q_hi = parse_range(a.query_range, a.seq_len)

    device, dtype = device_and_dtype(a.device, a.dtype)

    from nsa_flex.data.tokenizer import load_tokenizer

    tok_path = a.tokenizer or cfg_tok or "embedded"
    _log(t_start, f"tokenizer {tok_path!r}")
    tok = load_tokenizer(tok_path)
    vocab = layout[1]["tok_embeddings.weight"][0] if layout else overrides.get("vocab_size") or tok.get_vocab_size()
    args = model_args(flavor, {k: v for k, v in overrides.items() if k != "vocab_size"}, a.seq_len,
                      vocab_size=int(vocab))
    seq = make_input(a.input, tok, a.seq_len, a.needle_depth, a.seed)
    T = len(seq.tokens)
    if max(seq.tokens) >= args.vocab_size:
        raise VizError(f"the tokenizer produced token {max(seq.tokens)} but the model has "
                       f"{args.vocab_size} embeddings; pass the tokenizer it was trained with (--tokenizer)")
    _log(t_start, f"input: {seq.description}; {T} tokens")

    _log(t_start, f"building flavor {flavor!r} on {device} ({str(dtype).replace('torch.', '')})"
         + (f", loading {ckpt}" if ckpt else f", random weights (seed {a.seed})"))
    model = build_model(args, device, dtype, a.seed, ckpt, layout)
    tokens = torch.tensor([seq.tokens], device=device)
    doc_ids = None
    if a.documents == "on" or (a.documents == "auto" and args.attn_mask_type == "block_causal"):
        from masks import doc_ids_from_eos
        if tok.eos_id is None:
            raise VizError("--documents: the tokenizer has no EOS token to end documents at")
        doc_ids = doc_ids_from_eos(tokens, tok.eos_id)
    doc_starts = [] if doc_ids is None else \
        [0] + (torch.nonzero(doc_ids[0, 1:] != doc_ids[0, :-1]).flatten() + 1).tolist()
    if doc_ids is not None:
        _log(t_start, f"{len(doc_starts)} documents (ending at EOS)")
    _log(t_start, f"forward up to layer {max(layers)}"
         + (f" ({a.forward} attention)" if device.type == "cuda" else ""))
    if a.forward == "dense":   # the operator's dense backend: no FlexAttention kernels to compile
        from nsa_flex.kernels import KernelConfig
        from nsa_flex.model.model import NSAAttention

        for m in model.modules():
            if isinstance(m, NSAAttention):
                m.kernel = KernelConfig("dense")
    captured = capture_attention_inputs(model, tokens, layers, doc_ids=doc_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    _log(t_start, "forward done")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nsa = model.layers[str(layers[0])].attention.nsa_config
    cfg_d = {k: getattr(nsa, k) for k in ("cmp_block", "cmp_stride", "sel_block", "sel_topn",
                                           "n_init", "n_local", "window")}
    G = args.n_heads // args.kv_heads
    max_px = a.max_pixels
    whole = (q_lo, q_hi) == (0, T)
    crop = "" if whole else f"cropped to queries {q_lo}–{q_hi - 1} (keys 0–{q_hi - 1})"
    tasks, figs, records = [], [], []
    notes_global: list[str] = []
    for li in layers:
        x, freqs_cis, positions = captured[li]
        attn = model.layers[str(li)].attention
        tens = attention_tensors(attn, x, freqs_cis, positions, doc_ids)
        for h in heads:
            t0 = time.perf_counter()
            hi = head_inputs(tens["q"], tens["k_cmp"], tens["gates"], attn.nsa_config, h, doc_ids)
            an = analyse_head(hi)
            tw = an.tiles
            name = f"L{li:02d}_H{h}"
            title = (f"layer {li}, KV head {h} (query heads {h * G}–{h * G + G - 1}); "
                     f"T={T}, {flavor}" + (", checkpoint" if ckpt else ", random weights"))
            # token patterns
            pb = pooling_for(q_lo, q_hi, 0, q_hi, max_px)
            imgs = branch_images(an.idx, hi.cfg, T, pb, an.table4, hi.docs, hi.k_cmp.shape[2])
            note_b = ("cropped to the query range: " if crop else "") + pb.describe()
            pinfo = dict(r0=pb.r0, c0=pb.c0, fr=pb.fr, fc=pb.fc, shape=pb.shape, note=note_b)
            files = {k: f"{name}_{k}.png" for k in ("branches", "tiles", "scores", "gates")}
            tasks.append(("render_branches", dict(
                path=str(out / files["branches"]), images={k: _np(v) for k, v in imgs.items()},
                pooling=pinfo, title=title, cfg=cfg_d, needle=seq.needle,
                doc_starts=[d for d in doc_starts if 0 < d < q_hi])))
            # tiles
            QB, KB = tw.q_block, tw.kv_block
            m0, m1 = (q_lo * G) // QB, -(-(q_hi * G) // QB)
            pt, st, waste = tile_images(tw, m0, m1, max_px)
            tot_range = tw.totals(m0, m1)
            note_t = (f"query tiles {m0}–{m1 - 1} (positions {m0 * QB // G}–{min(T, -(-m1 * QB // G)) - 1})"
                      f" × all {tw.states.shape[1]} KV tiles"
                      + (f", max-pooled {pt.fr}×{pt.fc} tiles per pixel (brightest state; waste "
                         f"summed)" if pt.pooled else ", one pixel per tile"))
            tasks.append(("render_tiles", dict(
                path=str(out / files["tiles"]), states=_np(st), waste=_np(waste),
                pooling=dict(r0=pt.r0, c0=pt.c0, fr=pt.fr, fc=pt.fc, shape=pt.shape, note=note_t),
                title=title, totals=tot_range, tile_info=dict(q_block=QB, kv_block=KB))))
            # scores
            Ts_hi = -(-q_hi // hi.cfg.sel_block)
            ps = pooling_for(q_lo, q_hi, 0, Ts_hi, max_px)
            scores, codes = score_images(hi, an.lse, an.idx, ps)
            note_s = ("cropped to the query range: " if crop else "") + ps.describe("queries", "selection blocks")
            needle_blocks = (seq.needle[0] / hi.cfg.sel_block, seq.needle[1] / hi.cfg.sel_block) if seq.needle else None
            tasks.append(("render_scores", dict(
                path=str(out / files["scores"]), scores=_np(scores), codes=_np(codes),
                pooling=dict(r0=ps.r0, c0=ps.c0, fr=ps.fr, fc=ps.fc, shape=ps.shape, note=note_s),
                title=title, needle_blocks=needle_blocks)))
            # gates
            g = hi.gates[q_lo:q_hi]
            fg = max(1, -(-(q_hi - q_lo) // 2048))
            if fg > 1:
                P = (q_hi - q_lo) // fg * fg
                g = g[:P].reshape(P // fg, fg, G, 3).mean(1)
                note_g = f"queries {q_lo}–{q_hi - 1}, averaged over {fg} positions per point"
            else:
                note_g = f"queries {q_lo}–{q_hi - 1}, every position"
            xs = q_lo + np.arange(g.shape[0]) * fg + (fg - 1) / 2
            tasks.append(("render_gates", dict(
                path=str(out / files["gates"]), gates=_np(g), x=xs, title=title, note=note_g,
                needle=seq.needle, first_head=h * G)))
            figs.append(dict(layer=li, kv_head=h, q_heads=f"{h * G}–{h * G + G - 1}", files=files,
                             notes={"branches": note_b, "tiles": note_t, "scores": note_s,
                                    "gates": note_g}))
            # statistics
            scopes = [("sequence", 0, T, tw.totals())]
            if not whole:
                scopes.append(("query_range", q_lo, q_hi, tot_range))
            for scope, a0, a1, tot in scopes:
                gm = hi.gates[a0:a1].mean(dim=(0, 1)).tolist()
                rec = dict(layer=li, kv_head=h, scope=scope, q_lo=a0, q_hi=a1 - 1, positions=a1 - a0,
                           documents=max(1, len(doc_starts)), cross_document_pairs=an.cross_document,
                           **sparsity(an.counts, a0, a1), gate_cmp=gm[0], gate_slc=gm[1],
                           gate_swa=gm[2], **tot, **selection_sharing(an.idx, a0, a1))
                records.append(rec)
                if rec["pairs_missed"] or rec["full_tiles_not_full"]:
                    msg = (f"layer {li} KV head {h}: the selected BlockMask misses {rec['pairs_missed']} "
                           f"needed pairs / marks {rec['full_tiles_not_full']} tiles full wrongly")
                    print("WARNING: " + msg, file=sys.stderr)
                    notes_global.append(msg)
            seq_rec = records[-len(scopes)]
            _log(t_start, f"layer {li} KV head {h}: selected {seq_rec['frac_slc']:.3f}, sliding "
                          f"{seq_rec['frac_swa']:.3f}, union {seq_rec['frac_union']:.3f} of causal keys; "
                          f"tiles wasted {100 * seq_rec['wasted_frac']:.1f}%, selections shared "
                          f"x{seq_rec['sel_share_4']:.2f} by 4 positions "
                          f"({time.perf_counter() - t0:.2f}s)")
        del tens
    del captured, model

    meta = {
        "command": "visualize_masks " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "flavor": flavor, "weights": str(ckpt) if ckpt else f"random (seed {a.seed})",
        "input": seq.description, "seq_len": T, "query_range": f"{q_lo}–{q_hi - 1}",
        "documents": (f"{len(doc_starts)}, starting at {doc_starts[:20]}" if doc_ids is not None
                      else "one (no document mask)"),
        "layers": ",".join(map(str, layers)), "kv_heads": ",".join(map(str, heads)),
        "query heads per KV head (G)": G, "nsa": ", ".join(f"{k}={v}" for k, v in cfg_d.items())
        + f", kv_mode={args.kv_mode}", "device": f"{device} ({str(dtype).replace('torch.', '')})"
        + (f", {a.forward} attention in the forward" if device.type == "cuda" else ""),
        "pictures": f"at most {max_px} cells per side (larger ranges max-pooled); "
        + ("whole sequence" if whole else crop),
    }
    report.write_stats(out, records, meta)
    tasks.append(("render_sparsity", dict(path=str(out / "sparsity.png"), records=records,
                                          title=f"fraction of causal keys attended: {flavor}, T={T}, "
                                                f"{'checkpoint' if ckpt else 'random weights'}")))
    jobs = a.jobs or min(8, os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(tasks)))
    _log(t_start, f"drawing {len(tasks)} pictures with {jobs} process{'es' if jobs > 1 else ''}")
    if jobs == 1:
        for t in tasks:
            figures.draw(t)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(figures.draw, tasks))
    notes = notes_global + ([f"Pictures are {crop}."] if crop else [])
    if any(f["notes"]["branches"].find("max-pooled") >= 0 for f in figs):
        notes.append("Some pictures are max-pooled: a pixel is lit when any (query, key) pair it "
                     "covers is attended; the title of each picture gives the factors.")
    index = report.write_index(out, meta, records, figs, notes)
    _log(t_start, f"wrote {index} ({len(tasks)} pictures, stats.json, stats.csv)")
    return {"index": index, "figures": figs, "records": records, "out": out}


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except VizError as e:
        print(f"visualize_masks: error: {e}", file=sys.stderr)
        return 2
    return 0
