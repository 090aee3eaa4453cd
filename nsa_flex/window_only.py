"""TrainSpec ``nsa_window``: the nsa model with only its sliding-window branch, a control for
quality comparisons.

The model is the ``nsa`` model of the same flavor (same parameters, same data, same training
settings, the same NSA operator) whose gates of the compressed and the selected branches are
held at 0: each layer's gate Linear outputs logit −inf for them, so sigmoid gives exactly 0 and
``o = g_swa · o_swa``. What remains is a transformer with sliding-window attention of
``window`` tokens (512 in the paper's configuration), no compressed or selected branch
reaching further back. The two branches still run (their outputs are multiplied by 0, and
their parameters get zero gradients); this control measures quality, not speed.

    python -m nsa_flex.train --job.config_file configs/quality.toml --model.name nsa_window

A checkpoint of this model has the nsa model's keys; ``python -m nsa_flex.eval --model
nsa_window`` rebuilds it with the gates held at 0 again.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nsa_flex.model import NSATransformer

SPEC_NAME = "nsa_window"
BRANCHES_OFF = 2   # gate outputs are (cmp, slc, swa) per head: the first two are held at 0


class WindowOnlyGate(nn.Linear):
    """The gate Linear of NSAAttention (outputs laid out head-major, (cmp, slc, swa) per head)
    with the cmp and slc logits replaced by −inf. Works on a tensor-parallel shard too: each
    shard holds whole heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).unflatten(-1, (-1, 3))
        off = torch.full_like(y[..., :BRANCHES_OFF], float("-inf"))
        return torch.cat([off, y[..., BRANCHES_OFF:]], dim=-1).flatten(-2)


def window_only(model: NSATransformer) -> NSATransformer:
    """Turn every NSA layer of ``model`` into sliding-window only, in place (the gate's weights
    are kept: the state dict is unchanged)."""
    for block in model.layers.values():
        attn = block.attention
        old = attn.gate
        if isinstance(old, WindowOnlyGate):
            continue
        new = WindowOnlyGate(old.in_features, old.out_features, bias=old.bias is not None,
                             device=old.weight.device, dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict(), assign=True)
        attn.gate = new
    return model


class WindowOnlyTransformer(NSATransformer):
    """The nsa transformer with only the sliding-window branch (see the module docstring)."""

    def __init__(self, model_args):
        super().__init__(model_args)
        window_only(self)


def get_train_spec():
    from nsa_flex.titan import get_train_spec as nsa_train_spec

    return dataclasses.replace(nsa_train_spec(), model_cls=WindowOnlyTransformer)


def register_window_only() -> None:
    """Register the TrainSpec ``nsa_window`` (idempotent)."""
    from torchtitan.protocols import train_spec as train_spec_module

    if SPEC_NAME not in train_spec_module._extra_train_specs:
        train_spec_module.register_train_spec(SPEC_NAME, get_train_spec())
