"""TrainSpec ``llama3_dense``: torchtitan's llama3, unchanged, at the dims of each ``nsa`` flavor.

The baseline for speed comparisons: the same width, depth, heads, feed-forward size and
vocabulary as the ``nsa`` flavor of the same name, with llama3's default attention (SDPA,
causal) and the same tokenizer (``model.hf_assets_path``, "embedded" by default), so that
``--model.name llama3_dense`` in an ``nsa`` TOML trains the dense model on the same data::

    python -m nsa_flex.train --job.config_file configs/100m.toml --model.name llama3_dense
"""

from __future__ import annotations

import dataclasses

from torchtitan.models.llama3 import TransformerModelArgs
from torchtitan.models.llama3 import get_train_spec as llama3_train_spec
from torchtitan.protocols.train_spec import TrainSpec

from nsa_flex.data.tokenizer import load_tokenizer, tokenizer_vocab_size
from nsa_flex.model import nsa_flavors

SPEC_NAME = "llama3_dense"


class DenseArgs(TransformerModelArgs):
    """llama3's args; the vocabulary follows the tokenizer in use, as the ``nsa`` model's does
    (llama3's own hook keeps its flavor's fixed vocabulary)."""

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.vocab_size = tokenizer_vocab_size(job_config)


def dense_args(flavor: str) -> DenseArgs:
    """llama3's args at the dims, RoPE and document mask of the nsa flavor ``flavor``
    (documents through FlexAttention's block-causal mask, as llama3 does them)."""
    a = nsa_flavors[flavor]
    docs = a.attn_mask_type == "block_causal"
    return DenseArgs(
        dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
        multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier, norm_eps=a.norm_eps,
        rope_theta=a.rope_theta, rope_scaling_args=a.rope_scaling_args, max_seq_len=a.max_seq_len,
        attn_type="flex" if docs else "sdpa", attn_mask_type=a.attn_mask_type)


def get_train_spec() -> TrainSpec:
    return dataclasses.replace(
        llama3_train_spec(),
        model_args={name: dense_args(name) for name in nsa_flavors},
        build_tokenizer_fn=lambda job_config: load_tokenizer(job_config.model.hf_assets_path))
