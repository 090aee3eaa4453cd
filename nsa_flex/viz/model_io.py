"""The model side of the visualiser: building it, loading a checkpoint, making the input,
and capturing each attention layer's q, k, k_cmp and gates during the forward."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class VizError(ValueError):
    """A request the visualiser cannot satisfy; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# model arguments


def model_args(flavor: str, overrides: dict | None = None, seq_len: int | None = None,
               vocab_size: int | None = None):
    """The flavor's NSAModelArgs (a copy) with NSA overrides, the vocabulary, and a RoPE table
    long enough for ``seq_len``."""
    from nsa_flex.model import nsa_flavors
    from nsa_flex.model.args import OVERRIDABLE_FIELDS, NSAConfigError

    try:
        base = nsa_flavors[flavor]
    except NSAConfigError as e:
        raise VizError(str(e).replace("(--model.flavor / [model] flavor)", "(--flavor)")) from None
    changes = {}
    for k, v in (overrides or {}).items():
        if k not in OVERRIDABLE_FIELDS:
            raise VizError(f"--nsa {k}=...: unknown NSA option; choose among {', '.join(OVERRIDABLE_FIELDS)}")
        changes[k] = v
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if seq_len is not None and seq_len > base.max_seq_len:
        changes["max_seq_len"] = seq_len
    args = dataclasses.replace(base, **changes)
    try:
        args.validate()
        if seq_len is not None:
            args.check_seq_len(seq_len, "--seq-len")
    except NSAConfigError as e:
        raise VizError(str(e)) from None
    return args


def read_config(path: str | Path) -> tuple[str | None, str | None, dict]:
    """(flavor, tokenizer path, [nsa] overrides) from a training TOML."""
    p = Path(path)
    if not p.is_file():
        raise VizError(f"--config {p}: no such file")
    with open(p, "rb") as f:
        cfg = tomllib.load(f)
    model = cfg.get("model", {})
    nsa = {k: v for k, v in cfg.get("nsa", {}).items() if v is not None}
    return model.get("flavor"), model.get("hf_assets_path"), nsa


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> dict (ints, floats, and strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise VizError(f"--nsa {item!r}: expected KEY=VALUE, e.g. --nsa window=128")
        k, v = item.split("=", 1)
        for conv in (int, float):
            try:
                out[k.strip()] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = None if v.strip().lower() == "none" else v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints (torchtitan DCP folders)


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP checkpoint directory (holding ``.metadata``) from what the user passed: such a
    directory, torchtitan's ``checkpoint.folder`` (its newest ``step-N``), or a job's dump
    folder holding ``checkpoint/``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VizError(f"--checkpoint {p}: no such file or directory. Pass a torchtitan checkpoint "
                       f"folder (e.g. outputs/debug/checkpoint) or one of its step-N folders.")
    if not p.is_dir():
        raise VizError(f"--checkpoint {p} is a file; pass a torchtitan DCP folder "
                       f"(step-N with a .metadata file, or the folder holding step-N folders)")
    if (p / ".metadata").is_file():
        return p
    for folder in (p, p / "checkpoint"):
        if not folder.is_dir():
            continue
        steps = []
        for d in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and (d / ".metadata").is_file():
                steps.append((int(m.group(1)), d))
        if steps:
            return max(steps)[1]
    raise VizError(f"--checkpoint {p} holds no DCP checkpoint: expected a .metadata file there or "
                   f"step-N folders with one (torchtitan writes <dump_folder>/checkpoint/step-N)")


def checkpoint_model_keys(ckpt: Path) -> tuple[str, dict[str, torch.Size]]:
    """(prefix, {model key: shape}) of a DCP checkpoint: torchtitan flattens the model's state
    dict to the top level (prefix ''); a nested {"model": ...} layout gives prefix 'model.'."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    shapes = {k: v.size for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    for prefix in ("", "model."):
        if prefix + "tok_embeddings.weight" in shapes:
            return prefix, {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)
                            and not k.startswith(("optimizer.", "lr_scheduler.", "dataloader.", "train_state."))}
    raise VizError(f"checkpoint {ckpt} has no model weights (no tok_embeddings.weight); it holds "
                   f"{sorted(shapes)[:8]}...")


def load_checkpoint(model: torch.nn.Module, ckpt: Path, prefix: str, shapes: dict) -> None:
    """Load the model's weights from a DCP checkpoint (single process, any saved sharding)."""
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    advice = "; pass the --flavor / --config (and --nsa overrides) it was trained with"

    def n_layers(keys):
        ids = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    if n_layers(shapes) != n_layers(sd):
        raise VizError(f"checkpoint {ckpt} has {n_layers(shapes)} layers but this model has "
                       f"{n_layers(sd)}{advice}")
    wrong = [(k, tuple(shapes[k]), tuple(v.shape)) for k, v in sd.items()
             if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
    if wrong:
        k, a, b = wrong[0]
        raise VizError(f"checkpoint {ckpt} does not fit this model: {k} is {a} in the checkpoint "
                       f"but {b} in the model ({len(wrong)} such weights){advice}")
    branch = (".wk_cmp.", ".wv_cmp.", ".wk_swa.", ".wv_swa.")
    for keys, what, mode_hint in (
            ([k for k in sd if k not in shapes], "lacks {n} weights of this model",
             "the checkpoint looks like kv_mode='shared': pass --nsa kv_mode=shared"),
            ([k for k in shapes if k not in sd], "holds {n} weights this model lacks",
             "it looks like kv_mode='separate': drop --nsa kv_mode=shared")):
        if keys:
            hint = f" ({mode_hint})" if all(any(b in k for b in branch) for k in keys) else ""
            raise VizError(f"checkpoint {ckpt} {what.format(n=len(keys))}, e.g. "
                           f"{keys[:3]}{hint}{advice}")
    state = {prefix + k: v for k, v in sd.items()} if not prefix else {prefix[:-1]: sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(sd)


def build_model(args, device: torch.device, dtype: torch.dtype, seed: int = 0,
                checkpoint: Path | None = None, ckpt_layout=None):
    """The NSA transformer, initialised with ``seed`` or loaded from ``checkpoint``, in eval mode."""
    from nsa_flex.model import NSATransformer

    torch.manual_seed(seed)
    with torch.device(device):
        model = NSATransformer(args)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, *ckpt_layout)
    # cast floating parameters only: Module.to(dtype) would also cast the complex RoPE table
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    return model.eval()


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
                             stop: bool = True) -> dict[int, tuple]:
    """Run the forward (up to the last requested layer's attention when ``stop``); return
    {layer: (x, freqs_cis, positions)}, the inputs of each requested layer's attention module."""
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
        model(tokens)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def attention_tensors(attn, x: torch.Tensor, freqs_cis: torch.Tensor, positions=None) -> dict:
    """q (RoPE), k (RoPE), k_cmp and gates of one NSAAttention module for its input x, computed
    with the module's own projections exactly as its forward does (values are not needed)."""
    from nsa_flex.model.model import apply_rotary_emb

    bs, T, _ = x.shape
    xq = attn.wq(x).view(bs, T, -1, attn.head_dim)
    xk = attn.wk(x).view(bs, T, -1, attn.head_dim)
    kc = attn.wk_cmp(x).view(bs, T, -1, attn.head_dim) if attn.kv_mode == "separate" else xk
    k_cmp = attn.compress_k(kc)
    gates = torch.sigmoid(attn.gate(x).view(bs, T, -1, 3))
    return {"q": apply_rotary_emb(xq, freqs_cis, positions),
            "k": apply_rotary_emb(xk, freqs_cis, positions),
            "k_cmp": k_cmp, "gates": gates}
