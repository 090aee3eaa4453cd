"""The NSA transformer: a llama3-style decoder whose attention is Native Sparse Attention.

Module names follow torchtitan's llama3 (``tok_embeddings``, ``layers.<i>``, ``norm``,
``output``, ``attention.wq/wk/wv/wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``,
``ffn_norm``) so that torchtitan's activation checkpointing, compile, FSDP and pipeline
splitting apply unchanged. NSA adds, per attention layer:

* ``gate``: Linear(dim -> 3 * n_heads) + sigmoid, the per-head gates (cmp, slc, swa) of eq. 5.
  The weight starts at zero and the bias at logit(gate_init), so at initialisation every gate
  equals ``gate_init`` (default 1/3: the three branch outputs are averaged, and the layer's
  output has the scale of one attention, which is what llama3's init of ``wo`` assumes).
* ``compress_k`` / ``compress_v``: the compression φ (``nsa_flex.compression.Compression``).
  φ reads keys **before RoPE**: a compressed key stands for a whole block of l tokens and carries
  its position through φ's learned intra-block position embedding, as the paper describes; keys
  already rotated by RoPE would hand φ an absolute, position-dependent rotation it would have to
  undo. Queries are the RoPE-rotated queries of the other branches (one q per head).
* ``kv_mode="separate"`` (paper, §3.3.3): the compressed branch reads its own projections
  ``wk_cmp``/``wv_cmp`` (then φ) and the sliding branch ``wk_swa``/``wv_swa`` (RoPE on the keys);
  ``wk``/``wv`` feed the selected branch. ``kv_mode="shared"``: ``wk``/``wv`` feed all three.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import AttentionMasksType
from torchtitan.protocols.train_spec import ModelProtocol

from nsa_flex.compression import Compression
from nsa_flex import NSAConfig, nsa_attention

from .args import NSAModelArgs


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE table [end, dim // 2] of complex rotations (complex64), as in llama3 without scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def _freqs_for(freqs_cis: torch.Tensor, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The rotations for x [B, T, H, D/2] (complex), broadcastable, optionally at ``positions``."""
    bs, seqlen = x.shape[0], x.shape[1]
    if positions is None:
        return freqs_cis[:seqlen].view(1, seqlen, 1, x.shape[-1])
    if positions.size(0) == 1:
        return freqs_cis[positions.squeeze(0)].view(1, seqlen, 1, x.shape[-1])
    return freqs_cis[positions].view(bs, seqlen, 1, x.shape[-1])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [B, T, H, D] by RoPE (computed in float32, returned in x's dtype)."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(x_ * _freqs_for(freqs_cis, x_, positions)).flatten(3)
    return out.type_as(x)


class NSAAttention(nn.Module):
    """Grouped-query attention whose core is ``nsa_attention`` (three gated branches)."""

    def __init__(self, model_args: NSAModelArgs):
        super().__init__()
        a = model_args
        self.n_heads = a.n_heads
        self.n_kv_heads = a.kv_heads
        self.head_dim = a.qk_head_dim
        self.v_head_dim = a.value_head_dim
        self.kv_mode = a.kv_mode
        self.nsa_config = NSAConfig(**a.nsa_config_kwargs())
        self.gate_init = a.gate_init

        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.v_head_dim, a.dim, bias=False)
        if self.kv_mode == "separate":
            self.wk_cmp = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.wv_cmp = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
            self.wk_swa = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.wv_swa = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
        self.compress_k = Compression(self.head_dim, a.cmp_block, a.cmp_stride, hidden=a.cmp_hidden)
        self.compress_v = Compression(self.v_head_dim, a.cmp_block, a.cmp_stride, hidden=a.cmp_hidden)
        # gate outputs are laid out head-major ([h0: cmp, slc, swa], [h1: ...]) so that a
        # column-wise tensor-parallel shard of this Linear holds whole heads.
        self.gate = nn.Linear(a.dim, a.n_heads * 3, bias=True)

    def _projections(self):
        return [self.wq, self.wk, self.wv] + (
            [self.wk_cmp, self.wv_cmp, self.wk_swa, self.wv_swa] if self.kv_mode == "separate" else [])

    def init_weights(self, init_std: float):
        for linear in self._projections():
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        self.compress_k.init_weights(0.02)
        self.compress_v.init_weights(0.02)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(self.gate_init / (1.0 - self.gate_init)))

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        attention_masks: AttentionMasksType | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_masks is not None:
            raise TypeError("the nsa model builds its sparsity inside the operator and takes no "
                            "attention masks")
        bs, seqlen, _ = x.shape
        # -1 instead of the head counts: tensor parallelism may have sharded the heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.v_head_dim)
        if self.kv_mode == "separate":
            kc = self.wk_cmp(x).view(bs, seqlen, -1, self.head_dim)
            vc = self.wv_cmp(x).view(bs, seqlen, -1, self.v_head_dim)
            k_swa = apply_rotary_emb(
                self.wk_swa(x).view(bs, seqlen, -1, self.head_dim), freqs_cis, positions)
            v_swa = self.wv_swa(x).view(bs, seqlen, -1, self.v_head_dim)
        else:
            kc, vc = xk, xv
            k_swa = v_swa = None
        # φ on the keys before RoPE (see the module docstring)
        k_cmp = self.compress_k(kc)
        v_cmp = self.compress_v(vc)
        gates = torch.sigmoid(self.gate(x).view(bs, seqlen, -1, 3))

        xq = apply_rotary_emb(xq, freqs_cis, positions)
        xk = apply_rotary_emb(xk, freqs_cis, positions)
        out = nsa_attention(xq, xk, xv, k_cmp, v_cmp, gates, self.nsa_config,
                            k_swa=k_swa, v_swa=v_swa)
        return self.wo(out.reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU feed-forward, as llama3."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float):
        trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)


class NSATransformerBlock(nn.Module):
    def __init__(self, layer_id: int, model_args: NSAModelArgs):
        super().__init__()
        self.n_heads = model_args.n_heads
        self.dim = model_args.dim
        self.attention = NSAAttention(model_args)
        self.feed_forward = FeedForward(
            dim=model_args.dim,
            hidden_dim=4 * model_args.dim,
            multiple_of=model_args.multiple_of,
            ffn_dim_multiplier=model_args.ffn_dim_multiplier,
        )
        self.attention_norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.ffn_norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        if model_args.depth_init:
            self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        else:
            self.weight_init_std = 0.02 / (2 * model_args.n_layers) ** 0.5

    def forward(self, x, freqs_cis, attention_masks=None, positions=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, attention_masks, positions)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self):
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class NSATransformer(ModelProtocol):
    """Decoder-only transformer with NSA attention (torchtitan ModelProtocol)."""

    def __init__(self, model_args: NSAModelArgs):
        super().__init__(model_args)
        if model_args.vocab_size is None:
            raise ValueError("NSAModelArgs.vocab_size is unset: call update_from_config(job_config) "
                             "(it takes the tokenizer's size) or set vocab_size before building")
        model_args.validate()
        self.model_args = model_args
        self.vocab_size = model_args.vocab_size
        self.n_layers = model_args.n_layers
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        self.layers = torch.nn.ModuleDict()
        for layer_id in range(model_args.n_layers):
            self.layers[str(layer_id)] = NSATransformerBlock(layer_id, model_args)
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)

    def _precompute_freqs_cis(self) -> torch.Tensor:
        return precompute_freqs_cis(
            self.model_args.qk_head_dim, self.model_args.max_seq_len, self.model_args.rope_theta)

    def init_weights(self, buffer_device: torch.device | None = None):
        buffer_device = buffer_device or self.freqs_cis.device
        with torch.device(buffer_device):
            self.freqs_cis = self._precompute_freqs_cis()
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            if layer is not None:
                cast(NSATransformerBlock, layer).init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        final_out_std = self.model_args.dim ** -0.5
        cutoff_factor = 3
        if self.output is not None:
            trunc_normal_(self.output.weight, mean=0.0, std=final_out_std,
                          a=-cutoff_factor * final_out_std, b=cutoff_factor * final_out_std)

    def get_attention_masks(
        self,
        input_batch: torch.Tensor,
        tokenizer: BaseTokenizer,
        extra_inputs: dict[str, torch.Tensor] | None = None,
    ) -> AttentionMasksType:
        # torchtitan's validator calls this and accepts TypeError as "this model takes no masks".
        raise TypeError("the nsa model takes no attention masks: NSA's causal, compressed, "
                        "selected and sliding masks are built inside nsa_attention")

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks: AttentionMasksType | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # layers set to None by pipeline splitting pass their input through
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, attention_masks=attention_masks, positions=positions)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
