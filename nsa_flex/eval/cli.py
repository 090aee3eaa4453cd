"""``python -m nsa_flex.eval``: passkey / needle-in-a-haystack retrieval of a checkpoint.

    python -m nsa_flex.eval --config configs/quality.toml --checkpoint outputs/quality-nsa \\
        --lengths 1024 2048 4096 8192 --depths 0 0.25 0.5 0.75 1 --samples 20 --out eval/nsa
    python -m nsa_flex.eval --config configs/quality.toml --model llama3_dense \\
        --checkpoint outputs/quality-dense --out eval/dense

Writes ``<out>/retrieval.json`` (every cell: task, length, depth, accuracy, n, selection
recall; rewritten after each length so that a stopped run keeps what it measured) and
``<out>/retrieval.png`` (depth × length heatmaps). Prompts are built offline from the embedded
corpus (``nsa_flex.data.passkey``, the builder the ``stdlib_passkey`` training mixture uses).
A model evaluated beyond the length it was trained at gets a RoPE table extended to the longest
length (positions it never saw in training).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from nsa_flex.checkpoint import (CheckpointError, MODEL_NAMES, add_device_arguments,
                                 build_named_model, checkpoint_model_keys, device_and_dtype,
                                 named_model_args, parse_overrides, read_config, read_model_name,
                                 resolve_checkpoint)
from nsa_flex.data.passkey import ANSWER, NAMES, NEEDLE, QUESTION, PasskeyError, fixed_tokens

from .retrieval import TASKS, evaluate, log


class EvalError(ValueError):
    """A request the evaluation cannot run; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_flex.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model.name", dest="model", default=None, choices=MODEL_NAMES,
                   help="TrainSpec of the checkpoint (default: the --config's [model] name, else nsa)")
    p.add_argument("--flavor", "--model.flavor", dest="flavor", default=None,
                   help="model flavor (default: the --config's, else debug)")
    p.add_argument("--config", default=None,
                   help="the training TOML: model name, flavor, tokenizer and [nsa] options")
    p.add_argument("--checkpoint", default=None,
                   help="torchtitan checkpoint: a step-N folder, its parent, or the job's dump "
                        "folder (default: random weights, for testing the harness)")
    p.add_argument("--nsa", action="append", default=[], metavar="KEY=VALUE",
                   help="NSA option override, as in the [nsa] section (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (model.hf_assets_path; default: the --config's, else embedded)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                   help="'needle': key in held-out corpus text; 'passkey': key in a repeated "
                        "sentence block (default: both)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096],
                   help="prompt lengths in tokens (default 1024 2048 4096)")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (0: at the start; default 0 0.25 0.5 0.75 1)")
    p.add_argument("--samples", type=int, default=10, help="prompts per cell (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and haystacks (default 0)")
    p.add_argument("--digits", type=int, default=5, help="digits of a key (default 5)")
    p.add_argument("--batch-tokens", type=int, default=32768,
                   help="tokens per forward: prompts of one length are batched up to this "
                        "(default 32768)")
    add_device_arguments(p)
    p.add_argument("--forward", default="dense", choices=("dense", "flex"),
                   help="NSA forward on CUDA: 'dense' (default: the operator's exact dense path, "
                        "no kernels to compile) or 'flex' (the compiled training kernels; one "
                        "compile per length). On CPU always dense")
    p.add_argument("--label", default=None, help="name of the model in the JSON and plots "
                                                   "(default: the model name)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no new length after this; what was measured is kept")
    p.add_argument("--init-seed", type=int, default=0, help="seed of random weights (no --checkpoint)")
    p.add_argument("--out", default="eval", help="output folder (default ./eval)")
    return p


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON's content."""
    a = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    cfg_flavor, cfg_tok, cfg_nsa, cfg_name = None, None, {}, None
    if a.config:
        cfg_flavor, cfg_tok, cfg_nsa = read_config(a.config)
        cfg_name = read_model_name(a.config)
    name = a.model or cfg_name or "nsa"
    if name not in MODEL_NAMES:
        raise EvalError(f"[model] name = {name!r} in {a.config}: the evaluation knows "
                        f"{', '.join(MODEL_NAMES)}; pass --model")
    flavor = a.flavor or cfg_flavor or "debug"
    cli_nsa = parse_overrides(a.nsa)
    overrides = cli_nsa if name == "llama3_dense" else {**cfg_nsa, **cli_nsa}

    # every check before anything slow
    lengths = sorted(set(a.lengths))
    if min(lengths) < 1:
        raise EvalError(f"--lengths {a.lengths}: lengths must be positive")
    bad = [d for d in a.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise EvalError(f"--depths {bad}: depths must lie in [0, 1]")
    depths = sorted(set(a.depths))
    if a.samples < 1:
        raise EvalError(f"--samples {a.samples}: must be >= 1")
    if not 1 <= a.digits <= 18:
        raise EvalError(f"--digits {a.digits}: must lie in 1..18")
    if a.batch_tokens < 1:
        raise EvalError(f"--batch-tokens {a.batch_tokens}: must be >= 1")
    args = named_model_args(name, flavor, {k: v for k, v in overrides.items() if k != "vocab_size"},
                            None, vocab_size=1)
    if name != "llama3_dense":
        from nsa_flex.model.args import NSAConfigError

        try:
            args.check_seq_len(min(lengths), "--lengths")
        except NSAConfigError as e:
            raise EvalError(str(e)) from None
    device, dtype = device_and_dtype(a.device, a.dtype)
    ckpt = layout = None
    if a.checkpoint:
        ckpt = resolve_checkpoint(a.checkpoint)
        layout = checkpoint_model_keys(ckpt)
        log(f"[eval] checkpoint {ckpt}")
    else:
        log("[eval] no --checkpoint: random weights (this tests the harness, not a model)")

    from nsa_flex.data.tokenizer import load_tokenizer

    tok_path = a.tokenizer or cfg_tok or "embedded"
    tok = load_tokenizer(tok_path)
    shortest = max(fixed_tokens(tok, "9" * a.digits, n) for n in NAMES) + 2
    if min(lengths) < shortest:
        raise EvalError(f"--lengths {min(lengths)}: a passkey prompt needs at least {shortest} "
                        f"tokens (needle, question and answer take {shortest - 2})")
    vocab = (layout[1]["tok_embeddings.weight"][0] if layout
             else overrides.get("vocab_size") or tok.get_vocab_size())
    if tok.get_vocab_size() > vocab:
        raise EvalError(f"the tokenizer {tok_path!r} has {tok.get_vocab_size()} tokens but the model "
                        f"has {vocab} embeddings; pass the tokenizer it was trained with (--tokenizer)")
    args = named_model_args(name, flavor, {k: v for k, v in overrides.items() if k != "vocab_size"},
                            max(lengths), vocab_size=int(vocab))
    label = a.label or name
    log(f"[eval] {label}: model {name}, flavor {flavor!r} on {device} "
        f"({str(dtype).replace('torch.', '')}), RoPE table {args.max_seq_len} positions"
        + (f", loading {ckpt}" if ckpt else f", random weights (seed {a.init_seed})"))
    model = build_named_model(name, args, device, dtype, a.init_seed, ckpt, layout)
    if name != "llama3_dense" and (device.type == "cpu" or a.forward == "dense"):
        from nsa_flex.kernels import KernelConfig
        from nsa_flex.model.model import NSAAttention

        for m in model.modules():
            if isinstance(m, NSAAttention):
                m.kernel = KernelConfig("dense")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step = re.fullmatch(r"step-(\d+)", ckpt.name) if ckpt else None
    record = name == "nsa"
    data = {
        "label": label, "model": name, "flavor": flavor,
        "checkpoint": str(ckpt) if ckpt else None, "step": int(step.group(1)) if step else None,
        "random_weights": ckpt is None, "tokenizer": tok_path,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "forward": "dense" if device.type == "cpu" or name == "llama3_dense" else a.forward,
        "settings": {"tasks": a.tasks, "lengths": lengths, "depths": depths, "samples": a.samples,
                     "seed": a.seed, "digits": a.digits, "batch_tokens": a.batch_tokens},
        "nsa": ({k: getattr(args.nsa, k) for k in ("cmp_block", "cmp_stride", "sel_block",
                                                    "sel_topn", "n_init", "n_local", "window")}
                if name != "llama3_dense" else None),
        "selection_recall": ("recorded at the answer positions" if record else
                             "not reported: " + ("no NSA layers" if name == "llama3_dense"
                                                 else "the selected branch is gated off")),
        "prompt": {"needle": NEEDLE, "question": QUESTION, "answer": ANSWER,
                   "tasks": {t: TASKS[t] for t in a.tasks}},
        "cells": [], "stopped_early": False, "seconds": None,
    }
    json_path = out / "retrieval.json"

    def on_group(cells):
        data["cells"] = cells
        _write_json(json_path, data)

    res = evaluate(model, tok, a.tasks, lengths, depths, a.samples, a.seed, a.digits,
                   a.batch_tokens, device, record_selection=record, on_group=on_group,
                   time_limit=a.time_limit)
    data.update(cells=res["cells"], stopped_early=res["stopped_early"], seconds=res["seconds"])
    _write_json(json_path, data)
    log(f"[eval] wrote {json_path}")
    if data["cells"]:
        from .plot import heatmaps

        png = heatmaps([data], out / "retrieval.png")
        log(f"[eval] wrote {png}")
    log(f"[eval] done in {time.perf_counter() - t_start:.0f}s")
    return data


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (EvalError, CheckpointError, PasskeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
