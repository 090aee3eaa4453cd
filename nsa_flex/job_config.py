"""The ``[nsa]`` TOML section (and ``--nsa.*`` flags) of torchtitan's JobConfig.

Enable it with ``[job] custom_config_module = "nsa_flex.job_config"`` (the configs in
``configs/`` do) or ``--job.custom_config_module nsa_flex.job_config``. Its fields are made from
NSAConfig's and from NSAModelArgs' NSA options (declared there, with their help), plus
``vocab_size``; every field left unset keeps the flavor's value. The values are applied and
checked in ``NSAModelArgs.update_from_config`` before the model is built.
"""

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from typing import Annotated

import tyro

from nsa_flex.config import NSAConfig

MODEL_OPTIONS = ("kv_mode", "cmp_hidden", "gate_init", "attn_mask_type")


def _section_fields():
    from nsa_flex.model.args import NSAModelArgs

    model_fields = {f.name: f for f in dataclasses.fields(NSAModelArgs)}
    out = []
    for f in list(dataclasses.fields(NSAConfig)) + [model_fields[n] for n in MODEL_OPTIONS]:
        base = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        help_ = f.metadata.get("help", "") + " (default: the flavor's)"
        out.append((f.name, Annotated[base | None, tyro.conf.arg(help=help_)], field(default=None)))
    out.append(("vocab_size", Annotated[int | None, tyro.conf.arg(
        help="embedding rows (default: the tokenizer's vocabulary size)")], field(default=None)))
    return out


NSA = make_dataclass("NSA", _section_fields())


@dataclass
class JobConfig:
    nsa: NSA = field(default_factory=NSA)
