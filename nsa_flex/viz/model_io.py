"""The model side of the visualiser: making the input, and capturing each attention layer's
q, k, k_cmp and gates during the forward (building the model and loading a checkpoint:
nsa_flex/checkpoint.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nsa_flex.checkpoint import CheckpointError as VizError
from nsa_flex.checkpoint import (build_model, checkpoint_model_keys, load_checkpoint,  # noqa: F401
                                 model_args, parse_overrides, read_config, resolve_checkpoint)


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class InputSeq:
    tokens: list[int]
    description: str
    needle: tuple[int, int] | None = None   # token span [a, b) of the needle, if any


NEEDLE = " The secret passkey is {key}. Remember it: the secret passkey is {key}. "
QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"


def _corpus_tokens(tok, n: int, skip: int = 0) -> tuple[list[int], str]:
    """n tokens of the embedded corpus from validation document ``skip`` on; where the
    validation split runs out (about 50k tokens) the text continues with the train split."""
    from nsa_flex.data.corpus import ensure_stdlib_corpus, iter_texts

    corpus = ensure_stdlib_corpus()
    ids: list[int] = []
    used: list[str] = []
    for split in ("validation", "train"):
        first = last = None
        for i, text in enumerate(iter_texts(corpus, split)):
            if split == "validation" and i < skip:
                continue
            first = i if first is None else first
            last = i
            ids.extend(tok.encode(text))
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
            if len(ids) >= n:
                break
        if first is not None:
            used.append(f"{split} documents {first}–{last}")
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise VizError(f"the embedded corpus holds only {len(ids)} tokens after validation "
                       f"document {skip}; use a smaller --seq-len or a text file")
    return ids[:n], "embedded corpus (stdlib), " + ", then ".join(used)


def make_input(spec: str, tok, seq_len: int, needle_depth: float = 0.25, seed: int = 0) -> InputSeq:
    """``corpus`` / ``corpus:K`` (starting at validation document K), ``needle``, or a text file."""
    if spec == "corpus" or spec.startswith("corpus:"):
        skip = int(spec.split(":", 1)[1]) if ":" in spec else 0
        ids, desc = _corpus_tokens(tok, seq_len, skip)
        return InputSeq(ids, desc)
    if spec == "needle":
        if not 0.0 <= needle_depth <= 1.0:
            raise VizError(f"--needle-depth {needle_depth}: must lie in [0, 1]")
        key = 10000 + (seed * 7919 + 4211) % 90000
        needle = tok.encode(NEEDLE.format(key=key))
        question = tok.encode(QUESTION)
        n_hay = seq_len - len(needle) - len(question)
        if n_hay < 1:
            raise VizError(f"--seq-len {seq_len} is too short for a needle-in-a-haystack input "
                           f"(needle and question take {len(needle) + len(question)} tokens)")
        hay, _ = _corpus_tokens(tok, n_hay)
        at = int(round(needle_depth * n_hay))
        ids = hay[:at] + needle + hay[at:] + question
        return InputSeq(ids, f"needle in a haystack: passkey {key} at tokens {at}–{at + len(needle) - 1} "
                             f"(depth {needle_depth:.2f}) of embedded-corpus text, question at the end",
                        needle=(at, at + len(needle)))
    p = Path(spec).expanduser()
    if not p.is_file():
        raise VizError(f"--input {spec!r}: not 'corpus', 'corpus:K', 'needle', nor an existing text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    ids = tok.encode(text)
    if not ids:
        raise VizError(f"--input {p}: the file is empty")
    reps = -(-seq_len // len(ids))
    desc = f"text file {p} ({len(ids)} tokens)"
    if reps > 1:
        sep = [tok.eos_id] if tok.eos_id is not None else []
        ids = (ids + sep) * reps
        desc += f", repeated {reps}× to fill {seq_len} tokens"
    return InputSeq(ids[:seq_len], desc)


# ---------------------------------------------------------------------------------------------
# capturing the attention layers


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_attention_inputs(model, tokens: torch.Tensor, layers: list[int],
                             stop: bool = True, doc_ids: torch.Tensor | None = None) -> dict[int, tuple]:
    """Run the forward (up to the last requested layer's attention when ``stop``; with packed
    documents ``doc_ids``); return {layer: (x, freqs_cis, positions)}, the inputs of each
    requested layer's attention module."""
    captured: dict[int, tuple] = {}
    last = max(layers)
    handles = []

    def hook_for(i):
        def hook(module, args):
            x, freqs_cis = args[0], args[1]
            positions = args[3] if len(args) > 3 else None
            captured[i] = (x.detach(), freqs_cis, positions)
            if stop and i == last:
                raise _Stop
        return hook

    for i in layers:
        handles.append(model.layers[str(i)].attention.register_forward_pre_hook(hook_for(i)))
    try:
        model(tokens, doc_ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def attention_tensors(attn, x: torch.Tensor, freqs_cis: torch.Tensor, positions=None,
                      doc_ids=None) -> dict:
    """q (RoPE), k (RoPE), k_cmp and gates of one NSAAttention module for its input x, computed
    with the module's own projections exactly as its forward does (values are not needed)."""
    from masks import compressed_block_ends
    from nsa_flex.model.model import apply_rotary_emb

    bs, T, _ = x.shape
    xq = attn.wq(x).view(bs, T, -1, attn.head_dim)
    xk = attn.wk(x).view(bs, T, -1, attn.head_dim)
    kc = attn.wk_cmp(x).view(bs, T, -1, attn.head_dim) if attn.kv_mode == "separate" else xk
    cfg = attn.nsa_config
    ends = None if doc_ids is None else compressed_block_ends(doc_ids, cfg.cmp_block, cfg.cmp_stride)
    k_cmp = attn.compress_k(kc, ends)
    gates = torch.sigmoid(attn.gate(x).view(bs, T, -1, 3))
    q, k = apply_rotary_emb(xq, xk, freqs_cis, positions)
    return {"q": q, "k": k, "k_cmp": k_cmp, "gates": gates}
