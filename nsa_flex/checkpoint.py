"""Building an nsa model from a flavor (or a training TOML) and loading a torchtitan checkpoint
into it, for the tools that use a trained model (the visualiser, evaluation, generation)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import torch

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class CheckpointError(ValueError):
    """A model or checkpoint request that cannot be satisfied; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# model arguments


def add_device_arguments(parser) -> None:
    """--device and --dtype, read back by :func:`device_and_dtype`."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The CLIs' --device (auto/cpu/cuda) and --dtype (auto/float32/bfloat16): auto is cuda when
    torch sees one, and bfloat16 on cuda, float32 on cpu."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda: torch sees no CUDA device; use --device cpu")
    else:
        dev = torch.device(device)
    return dev, {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def model_args(flavor: str, overrides: dict | None = None, seq_len: int | None = None,
               vocab_size: int | None = None):
    """The flavor's NSAModelArgs (a copy) with NSA overrides, the vocabulary, and a RoPE table
    long enough for ``seq_len``."""
    from nsa_flex.job_config import NSA
    from nsa_flex.model import nsa_flavors
    from nsa_flex.model.args import NSAConfigError, replace

    try:
        base = nsa_flavors[flavor]
    except NSAConfigError as e:
        raise CheckpointError(str(e).replace("(--model.flavor / [model] flavor)", "(--flavor)")) from None
    changes = {}
    known = [f.name for f in dataclasses.fields(NSA)]
    for k, v in (overrides or {}).items():
        if k not in known:
            raise CheckpointError(f"--nsa {k}=...: unknown NSA option; choose among {', '.join(known)}")
        changes[k] = v
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if seq_len is not None and seq_len > base.max_seq_len:
        changes["max_seq_len"] = seq_len
    try:
        args = replace(base, **changes)
        args.validate()
        if seq_len is not None:
            args.check_seq_len(seq_len, "--seq-len")
    except (NSAConfigError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return args


def read_config(path: str | Path) -> tuple[str | None, str | None, dict]:
    """(flavor, tokenizer path, [nsa] overrides) from a training TOML."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--config {p}: no such file")
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
            raise CheckpointError(f"--nsa {item!r}: expected KEY=VALUE, e.g. --nsa window=128")
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
        raise CheckpointError(f"--checkpoint {p}: no such file or directory. Pass a torchtitan checkpoint "
                       f"folder (e.g. outputs/debug/checkpoint) or one of its step-N folders.")
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint {p} is a file; pass a torchtitan DCP folder "
                       f"(step-N with a .metadata file, or the folder holding step-N folders)")
    if (p / ".metadata").is_file():
        return p
    newest = newest_step(p, lambda d: (d / ".metadata").is_file())
    if newest is not None:
        return newest
    raise CheckpointError(f"--checkpoint {p} holds no DCP checkpoint: expected a .metadata file there or "
                   f"step-N folders with one (torchtitan writes <dump_folder>/checkpoint/step-N)")


def newest_step(p: Path, is_checkpoint) -> Path | None:
    """The newest ``step-N`` folder for which ``is_checkpoint(folder)`` holds, in ``p`` or in its
    ``checkpoint/`` (torchtitan's layout), or None."""
    for folder in (p, p / "checkpoint"):
        if not folder.is_dir():
            continue
        steps = [(int(m.group(1)), d) for d in folder.iterdir()
                 if (m := re.fullmatch(r"step-(\d+)", d.name)) and is_checkpoint(d)]
        if steps:
            return max(steps)[1]
    return None


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
    raise CheckpointError(f"checkpoint {ckpt} has no model weights (no tok_embeddings.weight); it holds "
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
        raise CheckpointError(f"checkpoint {ckpt} has {n_layers(shapes)} layers but this model has "
                       f"{n_layers(sd)}{advice}")
    wrong = [(k, tuple(shapes[k]), tuple(v.shape)) for k, v in sd.items()
             if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
    if wrong:
        k, a, b = wrong[0]
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: {k} is {a} in the checkpoint "
                       f"but {b} in the model ({len(wrong)} such weights){advice}")
    branch = (".wk_cmp.", ".wv_cmp.", ".wk_swa.", ".wv_swa.")
    for keys, what, mode_hint in (
            ([k for k in sd if k not in shapes], "lacks {n} weights of this model",
             "the checkpoint looks like kv_mode='shared': pass --nsa kv_mode=shared"),
            ([k for k in shapes if k not in sd], "holds {n} weights this model lacks",
             "it looks like kv_mode='separate': drop --nsa kv_mode=shared")):
        if keys:
            hint = f" ({mode_hint})" if all(any(b in k for b in branch) for k in keys) else ""
            raise CheckpointError(f"checkpoint {ckpt} {what.format(n=len(keys))}, e.g. "
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

    return _built(NSATransformer, args, device, dtype, seed, checkpoint, ckpt_layout)


def _built(model_cls, args, device, dtype, seed, checkpoint, ckpt_layout):
    """``model_cls(args)`` initialised with ``seed`` or loaded from ``checkpoint``, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, *ckpt_layout)
    # cast floating parameters only: Module.to(dtype) would also cast the complex RoPE table
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# models by TrainSpec name: the nsa model, the llama3 baseline and the sliding-window control

MODEL_NAMES = ("nsa", "llama3_dense", "nsa_window")


def read_model_name(path: str | Path) -> str | None:
    """``[model] name`` of a training TOML (None if unset)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--config {p}: no such file")
    with open(p, "rb") as f:
        return tomllib.load(f).get("model", {}).get("name")


def dense_model_args(flavor: str, seq_len: int | None = None, vocab_size: int | None = None):
    """The llama3_dense baseline's args for ``flavor`` (nsa_flex.baseline: llama3 at the dims of
    the nsa flavor of that name), with the vocabulary and a RoPE table long enough for
    ``seq_len``, built as the trainer does (llama3's RoPE scaling included)."""
    from nsa_flex.baseline import dense_args
    from nsa_flex.model.args import NSAConfigError

    try:
        args = dense_args(flavor)
    except NSAConfigError as e:
        raise CheckpointError(str(e).replace("for model 'nsa'", "for model 'llama3_dense'")
                              .replace("(--model.flavor / [model] flavor)", "(--flavor)")) from None
    if vocab_size is not None:
        args.vocab_size = vocab_size
    if seq_len is not None:
        if seq_len < 1:
            raise CheckpointError(f"sequence length {seq_len}: must be positive")
        args.max_seq_len = max(args.max_seq_len, seq_len)
    return args


def named_model_args(name: str, flavor: str, overrides: dict | None = None,
                     seq_len: int | None = None, vocab_size: int | None = None):
    """Model args of TrainSpec ``name`` (one of MODEL_NAMES) for ``flavor``; NSA ``overrides``
    apply to nsa and nsa_window only."""
    if name not in MODEL_NAMES:
        raise CheckpointError(f"--model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if name == "llama3_dense":
        if overrides:
            raise CheckpointError(f"--nsa {', '.join(overrides)}: NSA options do not apply to "
                                  f"llama3_dense; drop them")
        return dense_model_args(flavor, seq_len, vocab_size)
    return model_args(flavor, overrides, seq_len, vocab_size)


def build_named_model(name: str, args, device: torch.device, dtype: torch.dtype, seed: int = 0,
                      checkpoint: Path | None = None, ckpt_layout=None):
    """The model of TrainSpec ``name`` (nsa, llama3_dense, nsa_window), initialised with ``seed``
    or loaded from ``checkpoint``, cast to ``dtype``, in eval mode."""
    if name == "nsa":
        return build_model(args, device, dtype, seed, checkpoint, ckpt_layout)
    if name == "nsa_window":
        from nsa_flex.window_only import window_only

        return window_only(build_model(args, device, dtype, seed, checkpoint, ckpt_layout))
    if name != "llama3_dense":
        raise CheckpointError(f"--model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    from torchtitan.models.llama3 import Transformer

    return _built(Transformer, args, device, dtype, seed, checkpoint, ckpt_layout)
