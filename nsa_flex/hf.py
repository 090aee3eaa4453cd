"""The nsa model in Hugging Face's layout: safetensors weights plus a ``config.json``.

:class:`NSAStateDictAdapter` is the TrainSpec's ``state_dict_adapter``: torchtitan's
checkpointer calls ``to_hf`` before writing ``--checkpoint.last_save_in_hf true`` (with
``--checkpoint.last_save_model_only true``) through ``HuggingFaceStorageWriter`` (one consolidated
``model-00001-of-00001.safetensors`` plus ``model.safetensors.index.json`` in ``step-N/``), and
``get_hf_storage_reader`` + ``from_hf`` for ``--checkpoint.initial_load_in_hf true``
(``--checkpoint.initial_load_path DIR``).

config.json: torchtitan 0.2.2 writes none. The adapter, when the trainer builds it, wraps
``CheckpointManager.dcp_save`` once (:func:`install_config_hook`): after a save with
``to_hf=True`` whose checkpointer holds an NSAStateDictAdapter, rank 0 writes ``config.json``
into that checkpoint's folder. It holds every field of :class:`NSAModelArgs` (the nested
``nsa`` NSAConfig and ``rope_scaling_args`` as objects) next to HF's ``architectures``,
``model_type``, ``torch_dtype`` and the tokenizer the model was trained with. Loading checks the
export before reading a tensor: every option against the model being loaded (an export with other
NSA options stops, naming them), every key and shape against the ones that configuration has.

Names: llama's for the parts llama has, clear ones for NSA's own (per layer ``N``):

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.wq/wk/wv/wo         model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj
    layers.N.attention.wk_cmp/wv_cmp       model.layers.N.self_attn.k_cmp_proj/v_cmp_proj
    layers.N.attention.wk_swa/wv_swa       model.layers.N.self_attn.k_swa_proj/v_swa_proj
    layers.N.attention.gate                model.layers.N.self_attn.gate_proj   (weight, bias)
    layers.N.attention.compress_k/_v.*     model.layers.N.self_attn.compress_k/_v.*  (pos_emb,
                                           fc1.weight/bias, fc2.weight/bias: φ of eq. 7)
    layers.N.feed_forward.w1/w3/w2         model.layers.N.mlp.gate_proj/up_proj/down_proj
    layers.N.attention_norm / ffn_norm     model.layers.N.input_layernorm / post_attention_layernorm
    norm.weight, output.weight             model.norm.weight, lm_head.weight

Weights are stored as the model holds them: q_proj/k_proj rows are *not* permuted to HF's
rotate-half RoPE order (llama3's adapter does that for HF's Llama code). No HF modeling code runs
NSA, and a permuted key layout would also have to permute φ's weights (it reads keys before RoPE
and its output meets RoPE'd queries); config.json says ``"rope_interleaved": true``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from nsa_flex.config import NSAConfig
from nsa_flex.model.args import NSAConfigError, NSAModelArgs

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
ARCHITECTURE = "NSATransformer"
MODEL_TYPE = "nsa_flex"
# config.json keys that are not NSAModelArgs fields (HF's, and what the export records)
META_KEYS = ("architectures", "model_type", "torch_dtype", "rope_interleaved", "tokenizer",
             "nsa_flex_format", "transformers_version", "_name_or_path")
# options that do not change the function a loaded model computes on one sequence (the RoPE
# table's length, initialisation, the document mask of packed training data): not compared
# when an export is loaded into a model configured otherwise
NOT_COMPARED = ("max_seq_len", "depth_init", "gate_init", "attn_mask_type")

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wk_cmp.weight": "self_attn.k_cmp_proj.weight",
    "attention.wv_cmp.weight": "self_attn.v_cmp_proj.weight",
    "attention.wk_swa.weight": "self_attn.k_swa_proj.weight",
    "attention.wv_swa.weight": "self_attn.v_swa_proj.weight",
    "attention.gate.weight": "self_attn.gate_proj.weight",
    "attention.gate.bias": "self_attn.gate_proj.bias",
    **{f"attention.compress_{kv}.{p}": f"self_attn.compress_{kv}.{p}"
       for kv in "kv" for p in ("pos_emb", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")},
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class HFExportError(ValueError):
    """An HF export that cannot be written or loaded as it is; the message names the key/option."""


# ---------------------------------------------------------------------------------------------
# names


def hf_key(key: str) -> str:
    """torchtitan name -> HF name (table in the module docstring)."""
    if key in _TOP:
        return _TOP[key]
    m = _NATIVE_LAYER.fullmatch(key)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise HFExportError(f"no HF name for the nsa model's weight {key!r} (nsa_flex/hf.py names "
                        f"every weight of NSATransformer; a new weight needs an entry there)")


def native_key(key: str) -> str:
    """HF name -> torchtitan name."""
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    m = _HF_LAYER.fullmatch(key)
    if m and m.group(2) in _LAYER_BACK:
        return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise HFExportError(f"unknown key {key!r} in the HF export: not a weight of the nsa model")


# ---------------------------------------------------------------------------------------------
# config.json


def config_dict(args: NSAModelArgs, dtype: torch.dtype | None = None,
                tokenizer: str | None = None) -> dict:
    """config.json's content: every NSAModelArgs field (nested dataclasses as objects)."""
    if args.vocab_size is None:
        raise HFExportError("vocab_size is unset in the model arguments; an export needs the "
                            "trained vocabulary size")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "nsa_flex_format": FORMAT_VERSION,
        "torch_dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "rope_interleaved": True,   # q/k rows in torchtitan's (Meta's) RoPE pair order
        "tokenizer": tokenizer,
    }
    for f in dataclasses.fields(args):
        if f.name == "_enforced":
            continue
        v = getattr(args, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def args_from_config(cfg: dict, where: str = CONFIG_NAME) -> NSAModelArgs:
    """NSAModelArgs from config.json's content; a missing or unknown option stops, named."""
    if cfg.get("model_type") != MODEL_TYPE:
        raise HFExportError(f"{where}: model_type is {cfg.get('model_type')!r}, not {MODEL_TYPE!r}: "
                            "not an nsa model export")
    if cfg.get("nsa_flex_format") != FORMAT_VERSION:
        raise HFExportError(f"{where}: nsa_flex_format={cfg.get('nsa_flex_format')!r}; this version "
                            f"reads format {FORMAT_VERSION}")
    if cfg.get("rope_interleaved") is not True:
        raise HFExportError(f"{where}: rope_interleaved={cfg.get('rope_interleaved')!r}; only "
                            "exports in the model's own RoPE order (true) are read")
    fields = {f.name: f for f in dataclasses.fields(NSAModelArgs) if f.name != "_enforced"}
    unknown = sorted(k for k in cfg if k not in fields and k not in META_KEYS)
    if unknown:
        raise HFExportError(f"{where}: unknown option(s) {unknown} (not NSAModelArgs fields); "
                            f"remove them or use the nsa_flex version that wrote this export")
    missing = sorted(k for k in fields if k not in cfg)
    if missing:
        raise HFExportError(f"{where}: option(s) {missing} missing; every NSAModelArgs field must be "
                            f"recorded (re-export with this version, or add them with their values)")
    kw = {k: cfg[k] for k in fields}
    for name, cls in (("nsa", NSAConfig), ("rope_scaling_args", RoPEScalingArgs)):
        sub = kw[name]
        if not isinstance(sub, dict):
            raise HFExportError(f"{where}: {name} must be an object of {cls.__name__} fields, got {sub!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(sub) - names:
            raise HFExportError(f"{where}: unknown option(s) {sorted(set(sub) - names)} in {name} "
                                f"(the {cls.__name__} fields are {sorted(names)})")
        if names - set(sub):
            raise HFExportError(f"{where}: option(s) {sorted(names - set(sub))} of {name} missing; "
                                f"every {cls.__name__} field must be recorded")
        try:
            kw[name] = cls(**sub)
        except (TypeError, ValueError) as e:
            raise HFExportError(f"{where}: {name}: {e}") from None
    args = NSAModelArgs(**kw)
    try:
        args.validate()
    except NSAConfigError as e:
        raise HFExportError(f"{where}: {e}") from None
    if not isinstance(args.vocab_size, int) or args.vocab_size < 1:
        raise HFExportError(f"{where}: vocab_size={args.vocab_size!r} must be a positive integer")
    return args


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise HFExportError(f"{folder} has no {CONFIG_NAME}: an nsa HF export holds config.json next "
                            f"to its *.safetensors (written by --checkpoint.last_save_in_hf true with "
                            f"the nsa TrainSpec, or python -m nsa_flex.hf export)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFExportError(f"{path} is not valid JSON: {e}") from None


def compare_args(export: NSAModelArgs, model: NSAModelArgs, where: str) -> None:
    """Stop where the export's options differ from the model's (except NOT_COMPARED)."""
    a, b = config_dict(export), config_dict(model)
    diffs = []
    for k in a:
        if k in META_KEYS or k in NOT_COMPARED:
            continue
        if isinstance(a[k], dict):
            diffs += [f"{k}.{s}: export {a[k][s]!r}, model {b[k][s]!r}" for s in a[k] if a[k][s] != b[k][s]]
        elif a[k] != b[k]:
            diffs.append(f"{k}: export {a[k]!r}, model {b[k]!r}")
    if diffs:
        raise HFExportError(f"the HF export {where} was written with other options than this model "
                            f"has: {'; '.join(diffs)}. Configure the model as the export's config.json "
                            f"says (flavor / [nsa] section) or load another export")


# ---------------------------------------------------------------------------------------------
# checking an export before loading it


def expected_hf_shapes(args: NSAModelArgs) -> dict[str, tuple[int, ...]]:
    """{HF key: shape} of the model ``args`` describe (built on the meta device, no memory)."""
    from nsa_flex.model import NSATransformer

    with torch.device("meta"):
        model = NSATransformer(dataclasses.replace(args))
    return {hf_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def safetensors_files(folder: Path) -> list[Path]:
    """The export's weight files: those its model.safetensors.index.json names, else every
    *.safetensors directly in the folder (not the sharded/ staging copies torchtitan leaves)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise HFExportError(f"{index} names {absent}, which are not there")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFExportError(f"{folder} holds no *.safetensors file")
    return files


def export_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{HF key: (shape, dtype, file)} read from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype(), f)
    return out


def check_export(folder: str | Path, args: NSAModelArgs | None = None) -> NSAModelArgs:
    """Check an export before loading: its config.json (against ``args`` where given: the model
    it is loaded into) and every key and shape against that configuration. Returns the
    export's NSAModelArgs."""
    folder = Path(folder)
    export_args = args_from_config(read_config(folder), str(folder / CONFIG_NAME))
    if args is not None:
        compare_args(export_args, args, str(folder))
    want = expected_hf_shapes(export_args)
    have = export_shapes(folder)
    missing = [k for k in want if k not in have]
    if missing:
        raise HFExportError(f"the HF export {folder} lacks {len(missing)} weight(s) its config.json "
                            f"needs, e.g. {missing[:3]}")
    extra = [k for k in have if k not in want]
    if extra:
        raise HFExportError(f"the HF export {folder} holds {len(extra)} weight(s) its config.json does "
                            f"not describe, e.g. {extra[:3]} (kv_mode={export_args.kv_mode!r}, "
                            f"n_layers={export_args.n_layers})")
    for k, shape in want.items():
        if have[k][0] != shape:
            raise HFExportError(f"the HF export {folder}: {k} has shape {list(have[k][0])} in "
                                f"{have[k][2].name} but {list(shape)} by its config.json")
    return export_args


def load_hf_state_dict(folder: str | Path, args: NSAModelArgs | None = None,
                       device="cpu") -> tuple[NSAModelArgs, dict[str, torch.Tensor]]:
    """(the export's NSAModelArgs, the model's state dict in torchtitan names), checked first."""
    from safetensors.torch import load_file

    folder = Path(folder)
    export_args = check_export(folder, args)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        hf_sd.update(load_file(str(f), device=str(device)))
    return export_args, {native_key(k): v for k, v in hf_sd.items()}


# ---------------------------------------------------------------------------------------------
# the adapter


class NSAStateDictAdapter(StateDictAdapter):
    """torchtitan state-dict adapter of the nsa model (names in the module docstring).

    ``fqn_to_index_mapping`` is always None: the export is one consolidated safetensors file.
    (torchtitan's base class would read the mapping from ``hf_assets_path``, which for this
    model is a tokenizer, "embedded" or an HF tokenizer folder whose index describes another
    model.)"""

    def __init__(self, model_args: NSAModelArgs, hf_assets_path: str | None):
        self.model_args = model_args
        self.hf_assets_path = hf_assets_path
        self.fqn_to_index_mapping = None
        self.export_dtype: torch.dtype | None = None
        install_config_hook()

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {hf_key(k): v for k, v in state_dict.items()}
        floats = [v.dtype for v in state_dict.values() if v.is_floating_point()]
        self.export_dtype = floats[0] if floats else None
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {native_key(k): v for k, v in hf_state_dict.items()}

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> HuggingFaceStorageReader:
        """The reader of an export, after :func:`check_export` against this model's options."""
        if from_quantized:
            raise HFExportError("--checkpoint.initial_load_in_hf_quantized: the nsa model has no "
                                "quantized export format; load an unquantized export")
        check_export(path, self.model_args)
        return HuggingFaceStorageReader(path)

    def config(self) -> dict:
        return config_dict(self.model_args, self.export_dtype, self.hf_assets_path)

    def write_config(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.config(), indent=2) + "\n")
        return path


def install_config_hook() -> None:
    """Wrap torchtitan's ``CheckpointManager.dcp_save`` (once) so that an HF save by a
    checkpointer holding an :class:`NSAStateDictAdapter` also writes config.json (rank 0)."""
    from torchtitan.components.checkpoint import CheckpointManager

    original = CheckpointManager.dcp_save
    if getattr(original, "_writes_nsa_config", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def dcp_save(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["to_hf"] and isinstance(self.sd_adapter, NSAStateDictAdapter):
            dist = torch.distributed
            if not dist.is_initialized() or dist.get_rank() == 0:
                self.sd_adapter.write_config(bound.arguments["checkpoint_id"])
        return result

    dcp_save._writes_nsa_config = True
    CheckpointManager.dcp_save = dcp_save


# ---------------------------------------------------------------------------------------------
# export of a torchtitan DCP checkpoint


def export(model: torch.nn.Module, folder: str | Path, tokenizer: str | None = None) -> Path:
    """Write ``model`` (an NSATransformer) as an HF export, as the trainer's
    ``last_save_in_hf`` does: torchtitan's HuggingFaceStorageWriter, then config.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    folder = Path(folder)
    adapter = NSAStateDictAdapter(model.model_args, tokenizer)
    sd = adapter.to_hf({k: v.detach() for k, v in model.state_dict().items()})
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path=str(folder), save_distributed=True,
                                                         enable_consolidation=True))
    adapter.write_config(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m nsa_flex.hf export --checkpoint DCP --out DIR [--config TOML | --flavor F]``:
    an HF export of a torchtitan DCP checkpoint."""
    import argparse

    from nsa_flex.checkpoint import (CheckpointError, build_model, checkpoint_model_keys, model_args,
                                     parse_overrides, read_config as read_toml, resolve_checkpoint)

    p = argparse.ArgumentParser(prog="python -m nsa_flex.hf", description=main.__doc__)
    p.add_argument("command", choices=["export"])
    p.add_argument("--checkpoint", required=True, help="torchtitan DCP folder (step-N, or the "
                   "checkpoint folder: its newest step, or the job's dump folder)")
    p.add_argument("--out", required=True, help="folder of the export (created)")
    p.add_argument("--config", default=None, metavar="TOML",
                   help="the training TOML: its flavor, [nsa] section and tokenizer")
    p.add_argument("--flavor", default=None, help="model flavor (default: the TOML's, else debug)")
    p.add_argument("--nsa", action="append", default=[], metavar="KEY=VALUE",
                   help="an NSA option the checkpoint was trained with (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to record in config.json "
                   "(default: the TOML's hf_assets_path, else 'embedded')")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a = p.parse_args(argv)
    try:
        flavor, tok, nsa = read_toml(a.config) if a.config else (None, None, {})
        ckpt = resolve_checkpoint(a.checkpoint)
        layout = checkpoint_model_keys(ckpt)
        vocab = int(layout[1]["tok_embeddings.weight"][0])
        args = model_args(a.flavor or flavor or "debug", {**nsa, **parse_overrides(a.nsa)},
                          vocab_size=vocab)
        model = build_model(args, torch.device("cpu"), getattr(torch, a.dtype), 0, ckpt, layout)
        out = export(model, a.out, a.tokenizer or tok or "embedded")
    except (CheckpointError, HFExportError) as e:
        print(f"nsa_flex.hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({CONFIG_NAME} and safetensors) from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
