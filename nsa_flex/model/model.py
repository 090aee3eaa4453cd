"""The NSA transformer: torchtitan's llama3 decoder whose attention is Native Sparse Attention.

The block, the transformer, the feed-forward and RoPE are llama3's (subclassed or called, not
copied), so module names match (``tok_embeddings``, ``layers.<i>``, ``norm``, ``output``,
``attention.wq/wk/wv/wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``) and
torchtitan's activation checkpointing, compile, FSDP and pipeline splitting apply unchanged.
NSA adds, per attention layer:

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

With ``attn_mask_type="block_causal"`` the attention masks are the document ids of the batch
(``get_attention_masks``): RoPE positions restart at 0 in each document, φ compresses each
document's own blocks, and the operator keeps every branch inside the query's document.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.models.llama3.model.model import (FeedForward, Transformer, TransformerBlock,
                                                  apply_rotary_emb, precompute_freqs_cis)
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.train_spec import ModelProtocol

from masks import compressed_block_ends, doc_ids_from_eos, document_starts
from nsa_flex.compression import Compression
from nsa_flex.kernels import KernelConfig
from nsa_flex.operator import nsa_attention

from .args import NSAModelArgs


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] RoPE positions that restart at 0 in each document."""
    t = torch.arange(doc_ids.shape[-1], device=doc_ids.device)
    return t - document_starts(doc_ids).long()


class NSAAttention(nn.Module):
    """Grouped-query attention whose core is ``nsa_attention`` (three gated branches).

    ``kernel`` (None: the operator's choice) says how the operator runs; with
    ``record_selection`` set, each forward keeps its selected blocks in ``last_selection``
    ([B, T, Hkv, n], for evaluation tools)."""

    def __init__(self, model_args: NSAModelArgs):
        super().__init__()
        a = model_args
        self.n_heads = a.n_heads
        self.n_kv_heads = a.kv_heads
        self.head_dim = a.qk_head_dim
        self.v_head_dim = a.value_head_dim
        self.kv_mode = a.kv_mode
        self.nsa_config = a.nsa
        self.gate_init = a.gate_init
        self.kernel: KernelConfig | None = None
        self.record_selection = False
        self.last_selection: torch.Tensor | None = None

        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.v_head_dim, a.dim, bias=False)
        if self.kv_mode == "separate":
            self.wk_cmp = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.wv_cmp = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
            self.wk_swa = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.wv_swa = nn.Linear(a.dim, self.n_kv_heads * self.v_head_dim, bias=False)
        l, d = a.nsa.cmp_block, a.nsa.cmp_stride
        self.compress_k = Compression(self.head_dim, l, d, hidden=a.cmp_hidden)
        self.compress_v = Compression(self.v_head_dim, l, d, hidden=a.cmp_hidden)
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

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                attention_masks: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_masks``: the document ids [B, T] under "block_causal", else None."""
        doc_ids = attention_masks
        bs, seqlen, _ = x.shape
        # -1 instead of the head counts: tensor parallelism may have sharded the heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.v_head_dim)
        if self.kv_mode == "separate":
            kc = self.wk_cmp(x).view(bs, seqlen, -1, self.head_dim)
            vc = self.wv_cmp(x).view(bs, seqlen, -1, self.v_head_dim)
            k_swa = self.wk_swa(x).view(bs, seqlen, -1, self.head_dim)
            k_swa = apply_rotary_emb(k_swa, k_swa, freqs_cis, positions)[0]
            v_swa = self.wv_swa(x).view(bs, seqlen, -1, self.v_head_dim)
        else:
            kc, vc = xk, xv
            k_swa = v_swa = None
        # φ on the keys before RoPE (see the module docstring), each document's own blocks
        cfg = self.nsa_config
        ends = None if doc_ids is None else compressed_block_ends(doc_ids, cfg.cmp_block, cfg.cmp_stride)
        k_cmp = self.compress_k(kc, ends)
        v_cmp = self.compress_v(vc, ends)
        gates = torch.sigmoid(self.gate(x).view(bs, seqlen, -1, 3))

        xq, xk = apply_rotary_emb(xq, xk, freqs_cis, positions)
        out = nsa_attention(xq, xk, xv, k_cmp, v_cmp, gates, cfg, k_swa=k_swa, v_swa=v_swa,
                            return_indices=self.record_selection, doc_ids=doc_ids,
                            kernel=self.kernel)
        if self.record_selection:
            out, self.last_selection = out[0], out[1].detach()
        return self.wo(out.reshape(bs, seqlen, -1))


class NSATransformerBlock(TransformerBlock):
    """llama3's block (forward, init) with NSAAttention."""

    def __init__(self, layer_id: int, model_args: NSAModelArgs):
        nn.Module.__init__(self)
        self.n_heads = model_args.n_heads
        self.dim = model_args.dim
        self.attention = NSAAttention(model_args)
        self.feed_forward = FeedForward(dim=model_args.dim, hidden_dim=4 * model_args.dim,
                                        multiple_of=model_args.multiple_of,
                                        ffn_dim_multiplier=model_args.ffn_dim_multiplier)
        self.attention_norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.ffn_norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        if model_args.depth_init:
            self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        else:
            self.weight_init_std = 0.02 / (2 * model_args.n_layers) ** 0.5


class NSATransformer(Transformer):
    """llama3's decoder-only transformer (forward, init) with NSA blocks (torchtitan
    ModelProtocol); documents under ``attn_mask_type="block_causal"``."""

    def __init__(self, model_args: NSAModelArgs):
        ModelProtocol.__init__(self, model_args)
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
        a = self.model_args
        return precompute_freqs_cis(a.qk_head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling_args)

    def get_attention_masks(self, input_batch: torch.Tensor, tokenizer: BaseTokenizer,
                            extra_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The document ids [B, T] of a packed batch under "block_causal" (a token after an EOS
        starts a new document). Under "causal" a TypeError, which torchtitan's validator reads as
        "this model takes no masks"."""
        if self.model_args.attn_mask_type != "block_causal":
            raise TypeError("the nsa model with attn_mask_type='causal' takes no attention masks")
        if tokenizer.eos_id is None:
            raise ValueError("attn_mask_type='block_causal' needs a tokenizer with an EOS token "
                             "(documents end at EOS)")
        return doc_ids_from_eos(input_batch, tokenizer.eos_id)

    def forward(self, tokens: torch.Tensor, attention_masks: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_masks``: document ids [B, T] (get_attention_masks) or None; RoPE
        positions then restart in each document unless ``positions`` are given."""
        if attention_masks is not None and positions is None:
            positions = document_positions(attention_masks)
        return super().forward(tokens, attention_masks, positions)
