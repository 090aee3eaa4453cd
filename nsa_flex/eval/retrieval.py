"""Retrieval scoring: passkey prompts over a grid of lengths × depths, teacher-forced.

For every prompt (``nsa_flex.data.passkey.build_prompt``) the model reads the whole prompt once;
at the answer positions (those whose next token is a key token) its argmax is compared with the
key's tokens. A key counts as retrieved when every one of its tokens is the argmax (no sampling,
no partial credit); ``token_accuracy`` is the share of key tokens that are.

Selection recall (models with NSA layers): with ``record_selection`` on, each NSA layer leaves
the blocks it selected, ``last_selection`` [B, T, Hkv, n] (−1 unused). At each answer position,
for each layer and KV head, a hit is a selection that contains a selection block holding a
token of the needle's key (the key's tokens may straddle two blocks: either counts). The recall
of a prompt is the share of hits over answer positions × KV heads, per layer; a cell reports
its mean over prompts and layers, and per layer.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from nsa_flex.data.passkey import (CyclicFiller, PasskeyError, PasskeyPrompt, corpus_filler,
                                   draw_prompt, repeat_filler)

# task name -> what the haystack is
TASKS = {
    "needle": "embedded-corpus text (validation split, held out from training)",
    "passkey": "a repeated sentence block (the classic passkey haystack)",
}


def make_filler(tok, task: str) -> CyclicFiller:
    if task == "needle":
        return corpus_filler(tok, "validation")
    if task == "passkey":
        return repeat_filler(tok)
    raise PasskeyError(f"--tasks {task!r}: choose among {', '.join(TASKS)}")


def grid_prompts(tok, task: str, length: int, depths: list[float], samples: int, seed: int,
                 digits: int, filler: CyclicFiller) -> list[tuple[float, int, PasskeyPrompt]]:
    """(depth, sample, prompt) for every depth and sample of one task and length, one needle a
    prompt. Sample i has the same name, key and haystack start at every depth (its rng is
    seeded by seed, task, length, i), so depths differ in the needle's place only, and a cell
    does not depend on the others."""
    out = []
    for i in range(samples):
        rng = random.Random(f"{seed}:{task}:{length}:{i}")
        offset = rng.randrange(len(filler))
        state = rng.getstate()
        for d in depths:
            rng.setstate(state)   # the same key at every depth (redrawn alike on a collision)
            out.append((d, i, draw_prompt(tok, length, rng, digits, filler, offset, depth=d)))
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def attention_masks(model: nn.Module, tokens: torch.Tensor, tok):
    """The document masks a model trained with ``attn_mask_type="block_causal"`` takes (its own
    ``get_attention_masks``; a prompt is one document), else None."""
    args = getattr(model, "model_args", None)
    if getattr(args, "attn_mask_type", "causal") != "block_causal":
        return None
    return model.get_attention_masks(tokens, tok)


def answer_logits(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                  masks=None) -> torch.Tensor:
    """Logits [B, K, V] of ``model`` at ``positions`` [B, K] of ``tokens`` [B, T] (``masks``:
    its attention masks, if it takes any). A model with an ``output`` Linear (nsa, llama3) runs
    it at those positions only; any other model's full logits [B, T, V] are gathered."""
    kwargs = {} if masks is None else {"attention_masks": masks}
    out = getattr(model, "output", None)
    if isinstance(out, nn.Linear):
        def pick(module, args):
            h = args[0]
            return (torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1])),)

        handle = out.register_forward_pre_hook(pick)
        try:
            return model(tokens, **kwargs)
        finally:
            handle.remove()
    logits = model(tokens, **kwargs)
    return torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def score(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """(key retrieved [B] bool, token correct [B, K] bool) from logits [B, K, V] at the answer
    positions, the key's tokens ``targets`` [B, K] and ``mask`` [B, K] (False: padding)."""
    correct = (logits.argmax(-1) == targets) & mask
    return (correct | ~mask).all(-1), correct


def selection_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that can record their selection (NSAAttention, or anything alike)."""
    return [m for m in model.modules() if isinstance(getattr(m, "record_selection", None), bool)]


def selection_hits(selection: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   key_blocks: torch.Tensor) -> torch.Tensor:
    """Recall of one layer per prompt [B]: ``selection`` [B, T, Hkv, n] (−1 unused), answer
    ``positions`` [B, K] with ``mask`` [B, K], ``key_blocks`` [B, 2] (the needle's key blocks)."""
    B, K = positions.shape
    sel = torch.gather(selection, 1, positions[:, :, None, None].expand(-1, -1, *selection.shape[2:]))
    kb = key_blocks.to(sel.device)[:, None, None, None, :]           # [B, 1, 1, 1, 2]
    hit = (sel[..., None] == kb).any(-1).any(-1).float()               # [B, K, Hkv]
    m = mask.float()[:, :, None]
    return (hit * m).sum((1, 2)) / (m.sum((1, 2)) * hit.shape[-1])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class PromptResult:
    depth: float
    retrieved: bool
    token_hits: int
    key_tokens: int
    distance: int                        # answer position − needle position (tokens)
    recall: list[float] | None = None    # per NSA layer


def run_batch(model: nn.Module, prompts: list[PasskeyPrompt], device: torch.device,
              record: list[nn.Module], tok=None) -> list[PromptResult]:
    """Score a batch of prompts of one length; with ``record`` (NSA layers), their recall.
    ``tok``: the tokenizer, for models that take document masks."""
    K = max(len(p.key_tokens) for p in prompts)
    tokens = torch.tensor([p.tokens for p in prompts], device=device)
    pos = torch.tensor([p.answer_positions + [p.answer_positions[-1]] * (K - len(p.key_tokens))
                        for p in prompts], device=device)
    tgt = torch.tensor([p.targets + [-1] * (K - len(p.key_tokens)) for p in prompts], device=device)
    mask = tgt >= 0
    for m in record:
        m.record_selection = True
        m.last_selection = None
    try:
        logits = answer_logits(model, tokens, pos, attention_masks(model, tokens, tok))
        ok, correct = score(logits.float(), tgt, mask)
        recall = None
        if record:
            per_layer = []
            for m in record:
                if m.last_selection is None:
                    raise RuntimeError(f"{type(m).__name__} recorded no selection in the forward")
                blocks = torch.tensor([p.key_blocks(m.nsa_config.sel_block) for p in prompts])
                per_layer.append(selection_hits(m.last_selection, pos, mask, blocks))
            recall = torch.stack(per_layer, 1).cpu().tolist()           # [B, layers]
    finally:
        for m in record:
            m.record_selection = False
            m.last_selection = None
    ok, hits = ok.cpu().tolist(), correct.sum(-1).cpu().tolist()
    return [PromptResult(p.depth, bool(ok[b]), int(hits[b]), len(p.key_tokens),
                         p.answer_at - p.needle_at, recall[b] if recall else None)
            for b, p in enumerate(prompts)]


def cell(task: str, length: int, depth: float, results: list[PromptResult]) -> dict:
    n = len(results)
    k = sum(r.retrieved for r in results)
    out = {
        "task": task, "length": length, "depth": depth, "n": n,
        "accuracy": k / n, "accuracy_ci95": list(wilson(k, n)),
        "token_accuracy": sum(r.token_hits for r in results) / sum(r.key_tokens for r in results),
        "mean_distance": sum(r.distance for r in results) / n,
        "selection_recall": None, "selection_recall_by_layer": None,
    }
    if results[0].recall is not None:
        layers = len(results[0].recall)
        by_layer = [sum(r.recall[i] for r in results) / n for i in range(layers)]
        out["selection_recall_by_layer"] = by_layer
        out["selection_recall"] = sum(by_layer) / layers
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, tok, tasks: list[str], lengths: list[int], depths: list[float],
             samples: int, seed: int, digits: int, batch_tokens: int, device: torch.device,
             record_selection: bool, on_group=None, time_limit: float | None = None) -> dict:
    """Every (task, length, depth) cell; lengths in the outer loop. ``on_group(cells)`` is called
    after each (length, task) with the cells so far (to write them as they come). Stops before a
    new group once ``time_limit`` seconds have passed. Returns {"cells", "stopped_early",
    "seconds"}."""
    t0 = time.perf_counter()
    fillers = {t: make_filler(tok, t) for t in tasks}
    record = selection_modules(model) if record_selection else []
    if record_selection and not record:
        raise RuntimeError("selection recall was asked for but the model has no NSA layers")
    cells: list[dict] = []
    groups = [(L, t) for L in lengths for t in tasks]
    stopped = False
    for gi, (length, task) in enumerate(groups):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            log(f"[eval] time limit {time_limit:.0f}s reached: {len(groups) - gi} of {len(groups)} "
                f"(length, task) groups left out")
            stopped = True
            break
        tg = time.perf_counter()
        prompts = grid_prompts(tok, task, length, depths, samples, seed, digits, fillers[task])
        bs = max(1, batch_tokens // length)
        results: list[PromptResult] = []
        for i in range(0, len(prompts), bs):
            results += run_batch(model, [p for _, _, p in prompts[i:i + bs]], device, record, tok)
        for d in depths:
            c = cell(task, length, d, [r for r in results if r.depth == d])
            cells.append(c)
            rec = ("" if c["selection_recall"] is None
                   else f"  selection recall {c['selection_recall']:.2f}")
            log(f"[eval] {task:7s} length {length:6d} depth {d:4.2f}: accuracy {c['accuracy']:.2f} "
                f"(n={c['n']}), key tokens {c['token_accuracy']:.2f}{rec}")
        log(f"[eval] group {gi + 1}/{len(groups)} ({task}, {length}) done in "
            f"{time.perf_counter() - tg:.1f}s, {time.perf_counter() - t0:.0f}s in all")
        if on_group is not None:
            on_group(cells)
    return {"cells": cells, "stopped_early": stopped, "seconds": time.perf_counter() - t0}
