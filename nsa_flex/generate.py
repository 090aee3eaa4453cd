"""``python -m nsa_flex.generate``: text from a trained nsa model, with the NSA KV cache.

The model comes from a torchtitan DCP checkpoint (what ``python -m nsa_flex.train`` writes:
``outputs/debug/checkpoint``, a ``step-N`` folder or the dump folder; the flavor, ``[nsa]``
options and tokenizer come from ``--config TOML`` / ``--flavor`` / ``--nsa``) or from an HF
export (a folder with ``config.json`` and ``*.safetensors``, written by
``--checkpoint.last_save_in_hf true`` or ``python -m nsa_flex.hf export``; everything comes
from its config.json). A checkpoint folder holding both kinds of ``step-N`` uses the newest.

The prompt (``--prompt`` text or ``--prompt-file``, each repeatable: several make a batch of
ragged prompts) is encoded with a BOS token as training documents start (``--no-bos``: without),
prefilled through the model's forward, and continued one token at a time by
``nsa_flex.decode`` (see there): greedy at ``--temperature 0`` (the default), else sampled from
softmax(logits / temperature) restricted to the ``--top-k`` most likely tokens and to the
smallest set whose probability reaches ``--top-p`` (``--seed``). A sequence stops at the
tokenizer's EOS (not printed) or after ``--max-new-tokens``. One prompt's text is streamed to
stdout as it comes; a batch prints each text at the end. Timing goes to stderr.

The cache holds ``--max-seq-len`` positions (default: longest prompt + new tokens, rounded up
to a multiple of 256, so that similar requests share one compiled step); a request that does
not fit stops before any compute with a message saying what to change. On CUDA ``--compile``
runs the decode step under ``torch.compile`` (``--compile-mode reduce-overhead`` also captures
it in a CUDA graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from nsa_flex.checkpoint import (CheckpointError, add_device_arguments, build_model,
                                 checkpoint_model_keys, device_and_dtype, model_args, newest_step,
                                 parse_overrides, read_config, resolve_checkpoint)
from nsa_flex.decode import KERNELS, CacheCapacityError, NSADecoder, check_kernel
from nsa_flex.hf import CONFIG_NAME, HFExportError, args_from_config, load_hf_state_dict
from nsa_flex.hf import read_config as read_hf_config

BUCKET = 256            # default cache capacities are multiples of this
PREFILL_BUCKET = 64     # prompts are padded to a multiple of this (fewer prefill shapes)


class GenerateError(ValueError):
    """A request generate cannot run; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# the model


def is_hf_export(p: Path) -> bool:
    return p.is_dir() and (p / CONFIG_NAME).is_file() and any(p.glob("*.safetensors"))


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """("hf" | "dcp", folder) from what the user passed: an HF export, a DCP step folder, or a
    folder of step-N folders (its own or its ``checkpoint/``), of which the newest of either kind."""
    p = Path(path).expanduser()
    if is_hf_export(p):
        return "hf", p
    if (p / ".metadata").is_file():
        return "dcp", p
    if p.is_dir():
        d = newest_step(p, lambda d: (d / ".metadata").is_file() or is_hf_export(d))
        if d is not None:
            return ("dcp" if (d / ".metadata").is_file() else "hf"), d
        if (p / CONFIG_NAME).is_file() or (p / "model.safetensors.index.json").is_file():
            if not (p / CONFIG_NAME).is_file():
                raise HFExportError(f"{p} holds safetensors but no {CONFIG_NAME}: export it with the "
                                    f"nsa TrainSpec (--checkpoint.last_save_in_hf true) or "
                                    f"python -m nsa_flex.hf export")
            raise HFExportError(f"{p} has {CONFIG_NAME} but no *.safetensors file")
    return "dcp", resolve_checkpoint(p)   # its error names what was expected


@dataclasses.dataclass
class ModelSource:
    kind: str                 # "hf" or "dcp"
    path: Path
    args: object              # NSAModelArgs as stored (HF) or as built from the flavor (DCP)
    tokenizer: str            # tokenizer path recorded with the model (or the default)
    layout: tuple | None = None


def model_source(a) -> ModelSource:
    """Where the weights and the configuration come from (nothing loaded yet)."""
    kind, path = resolve_model_path(a.checkpoint)
    if kind == "hf":
        if a.config or a.flavor or a.nsa:
            raise GenerateError(f"{path} is an HF export: its config.json fixes the model; drop "
                                f"--config/--flavor/--nsa")
        args = args_from_config(read_hf_config(path), str(path / CONFIG_NAME))
        tok = read_hf_config(path).get("tokenizer") or "embedded"
        return ModelSource("hf", path, args, tok)
    flavor, tok, nsa = read_config(a.config) if a.config else (None, None, {})
    layout = checkpoint_model_keys(path)
    vocab = int(layout[1]["tok_embeddings.weight"][0])
    args = model_args(a.flavor or flavor or "debug", {**nsa, **parse_overrides(a.nsa)},
                      vocab_size=vocab)
    return ModelSource("dcp", path, args, tok or "embedded", layout)


def load_model(src: ModelSource, capacity: int, device: torch.device, dtype: torch.dtype):
    """The NSATransformer of ``src`` in eval mode, with a RoPE table of at least ``capacity``."""
    from nsa_flex.model.args import replace

    args = replace(src.args, max_seq_len=max(src.args.max_seq_len, capacity))
    if src.kind == "dcp":
        return build_model(args, device, dtype, 0, src.path, src.layout)
    _, sd = load_hf_state_dict(src.path)
    model = build_model(args, device, dtype)
    model.load_state_dict(sd)
    return model


# ---------------------------------------------------------------------------------------------
# sampling and the decoding loop


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (0: all) and the smallest
    set of them whose probability reaches top_p (1: all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs          # probability of the tokens ranked above
        drop = before >= top_p                     # the first token is always kept
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_ids(decoder: NSADecoder, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None,
                 on_tokens=None, pad_to: int = PREFILL_BUCKET) -> tuple[list[list[int]], dict]:
    """Continue each prompt (token ids; a batch of the decoder's size) by up to
    ``max_new_tokens`` tokens, stopping a sequence at ``eos_id`` (not included). ``on_tokens``
    (list of new ids per sequence, None where finished) is called after every step. Returns
    (the new ids per prompt, timings)."""
    decoder.check_request([len(p) for p in prompts], max_new_tokens)
    device = decoder.cache.pos.device
    B = len(prompts)
    P = min(-(-max(len(p) for p in prompts) // pad_to) * pad_to, decoder.capacity)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)   # padding: never attended to
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = decoder.prefill(tokens, [len(p) for p in prompts])
    sync()
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    steps = 0
    for k in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)
        ids = nxt.tolist()
        fresh: list[int | None] = [None] * B
        for b, i in enumerate(ids):
            if done[b]:
                continue
            if eos_id is not None and i == eos_id:
                done[b] = True
            else:
                out[b].append(i)
                fresh[b] = i
                done[b] = len(out[b]) >= max_new_tokens
        if on_tokens is not None:
            on_tokens(fresh)
        if all(done):
            break
        logits = decoder.step(nxt)
        steps += 1
        if steps == 1:   # the first step includes compiling it (--compile)
            sync()
            t_first = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return out, {"prefill_s": t1 - t0, "decode_s": t2 - t1, "prompt_tokens": sum(map(len, prompts)),
                 "new_tokens": sum(map(len, out)), "steps": steps,
                 "later_steps_s": t2 - t_first if steps else 0.0}


class TextStream:
    """Writes the text of a growing id list as it comes: each time the new suffix of the
    decoded text, holding back a trailing U+FFFD (an incomplete UTF-8 sequence of byte-level
    BPE) until the next token completes it. The whole output equals decode(ids)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tok, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self._write(text)

    def close(self) -> str:
        text = self.tok.decode(self.ids)
        if not text.startswith(self.printed):
            raise RuntimeError("the tokenizer's decode of a longer id list does not extend the "
                               "text already printed; streaming cannot match decode(ids)")
        self._write(text)
        return text

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_flex.generate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="torchtitan DCP checkpoint (step-N, the checkpoint folder: newest step, or "
                        "the dump folder) or an HF export folder (config.json + *.safetensors)")
    p.add_argument("--config", default=None, metavar="TOML",
                   help="DCP only: the training TOML (its flavor, [nsa] options and tokenizer)")
    p.add_argument("--flavor", default=None,
                   help="DCP only: model flavor (default: the TOML's, else debug)")
    p.add_argument("--nsa", action="append", default=[], metavar="KEY=VALUE",
                   help="DCP only: an NSA option the model was trained with (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="'embedded', an HF tokenizer folder or a tiktoken file (default: the one "
                        "recorded in the export's config.json / the TOML's hf_assets_path, "
                        "else embedded)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: a batch)")
    p.add_argument("--prompt-file", action="append", default=[],
                   help="file whose text is a prompt (repeatable)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not start the prompt with the BOS token")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens generated per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (default); else the sampling temperature")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set with this probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"cache capacity in positions (default: longest prompt + --max-new-tokens, "
                        f"rounded up to a multiple of {BUCKET})")
    add_device_arguments(p)
    p.add_argument("--prefill-kernel", default="dense", choices=("dense", "flex", "auto"),
                   help="how the prefill's operator runs on CUDA: 'dense' (default, nothing to "
                        "compile), 'flex' (the compiled FlexAttention kernels of training), 'auto' "
                        "(the operator's choice). CPU: dense")
    p.add_argument("--decode-kernel", default=None, choices=KERNELS,
                   help="the decode step's attention over the cache: 'triton' (decode_kernel.py, "
                        "the default on CUDA) or 'torch' (the default on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is often fastest for a "
                        "small model, whose per-token ops are too small to split)")
    p.add_argument("--compile", action="store_true", help="run the decode step under torch.compile")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the step, e.g. reduce-overhead (CUDA graphs)")
    return p


def _check(a) -> None:
    if not a.prompt and not a.prompt_file:
        raise GenerateError("give a prompt: --prompt TEXT or --prompt-file FILE")
    if a.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if a.temperature < 0:
        raise GenerateError(f"--temperature {a.temperature}: must be >= 0 (0 is greedy)")
    if a.top_k < 0:
        raise GenerateError(f"--top-k {a.top_k}: must be >= 0 (0 keeps every token)")
    if not 0.0 < a.top_p <= 1.0:
        raise GenerateError(f"--top-p {a.top_p}: must lie in (0, 1]")
    if a.threads is not None and a.threads < 1:
        raise GenerateError(f"--threads {a.threads}: must be at least 1")
    if a.max_seq_len is not None and a.max_seq_len < 1:
        raise GenerateError(f"--max-seq-len {a.max_seq_len}: must be positive")


def run(argv: list[str] | None = None, out=None, err=None) -> dict:
    """The command line's work; returns {"ids": [[...]], "texts": [...], "stats": {...}}."""
    out = out or sys.stdout
    err = err or sys.stderr
    a = build_parser().parse_args(argv)
    _check(a)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    src = model_source(a)

    from nsa_flex.data.tokenizer import load_tokenizer

    tok = load_tokenizer(a.tokenizer or src.tokenizer)
    texts = list(a.prompt)
    for f in a.prompt_file:
        path = Path(f).expanduser()
        if not path.is_file():
            raise GenerateError(f"--prompt-file {f}: no such file")
        texts.append(path.read_text(encoding="utf-8"))
    prompts = [tok.encode(t, add_bos=not a.no_bos, add_eos=False) for t in texts]
    for i, p in enumerate(prompts):
        if not p:
            raise GenerateError(f"prompt {i} encodes to no token; give some text or drop --no-bos")
        if max(p) >= src.args.vocab_size:
            raise GenerateError(f"prompt {i} has token {max(p)} but the model has "
                                f"{src.args.vocab_size} embeddings: pass the tokenizer it was "
                                f"trained with (--tokenizer)")
    longest = max(map(len, prompts))
    need = longest + a.max_new_tokens
    capacity = a.max_seq_len or -(-need // BUCKET) * BUCKET
    if need > capacity:   # before loading anything
        raise CacheCapacityError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens {a.max_new_tokens} = {need} "
            f"positions exceed the cache capacity --max-seq-len {capacity}; raise --max-seq-len to "
            f">= {need}, or lower --max-new-tokens to at most {max(0, capacity - longest)} or "
            f"shorten the prompt")

    device, dtype = device_and_dtype(a.device, a.dtype)
    if a.decode_kernel is not None:   # before the model loads
        try:
            check_kernel(a.decode_kernel, device)
        except ValueError as e:
            raise GenerateError(f"--decode-kernel {a.decode_kernel}: {e}") from None
    if need > src.args.max_seq_len and src.kind == "hf":
        err.write(f"note: {need} positions exceed the {src.args.max_seq_len} the model was "
                  f"trained with (RoPE extrapolates)\n")
    model = load_model(src, capacity, device, dtype)
    if a.prefill_kernel != "auto":
        from nsa_flex.kernels import KernelConfig
        from nsa_flex.model.model import NSAAttention

        kernel = KernelConfig("dense" if device.type != "cuda" else a.prefill_kernel)
        for m in model.modules():
            if isinstance(m, NSAAttention):
                m.kernel = kernel
    decoder = NSADecoder(model, len(prompts), capacity, compile=a.compile, mode=a.compile_mode,
                         kernel=a.decode_kernel)
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)

    stream = TextStream(tok, out) if len(prompts) == 1 else None
    on_tokens = (lambda fresh: fresh[0] is not None and stream.add(fresh[0])) if stream else None
    ids, stats = generate_ids(decoder, prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                              tok.eos_id, gen, on_tokens)
    if stream is not None:
        results = [stream.close()]
        out.write("\n")
    else:
        results = [tok.decode(x) for x in ids]
        for i, text in enumerate(results):
            out.write(f"--- {i}: {texts[i][:40]!r} ---\n{text}\n")
    out.flush()
    total = stats["prefill_s"] + stats["decode_s"]
    later = stats["steps"] - 1   # decode steps after the first (which may compile)
    rate = later * len(prompts) / max(stats["later_steps_s"], 1e-9)
    step_rate = f"; decode steps after the first: {rate:.1f} tokens/s" if later > 0 else ""
    err.write(f"{src.kind} {src.path} on {device} ({str(dtype).replace('torch.', '')}), cache "
              f"{capacity} positions x {len(prompts)}: prefill {stats['prompt_tokens']} tokens in "
              f"{stats['prefill_s']:.3f} s; {stats['new_tokens']} new tokens in {total:.3f} s = "
              f"{stats['new_tokens'] / max(total, 1e-9):.1f} tokens/s{step_rate}\n")
    err.flush()
    return {"ids": ids, "texts": results, "stats": stats, "capacity": capacity}


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (GenerateError, CacheCapacityError, CheckpointError, HFExportError,
            FileNotFoundError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
