"""Arguments of the NSA transformer (torchtitan ``BaseModelArgs`` style).

One dataclass, :class:`NSAModelArgs`: llama3's architecture fields, the operator's
:class:`~nsa_flex.config.NSAConfig` (``nsa``, the one declaration of NSA's fields), and NSA's
model options (keys/values per branch, the compression MLP's size, the initial gate value, the
document mask). ``update_from_config`` applies the ``[nsa]`` TOML section (nsa_flex/job_config.py),
the training sequence length and the tokenizer's vocabulary, and checks everything before the
model is built, so that a bad configuration stops at start with a message saying what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

from nsa_flex.compression import num_cmp_blocks
from nsa_flex.config import NSAConfig

KV_MODES = ("separate", "shared")
ATTN_MASK_TYPES = ("causal", "block_causal")


class NSAConfigError(ValueError):
    """A configuration the NSA model cannot run with."""


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class NSAModelArgs(BaseModelArgs):
    # -- llama3's decoder -----------------------------------------------------------------
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None          # query/key head dim Dk; None: dim // n_heads
    v_head_dim: int | None = None        # value head dim Dv; None: head_dim
    vocab_size: int | None = None        # None: the tokenizer's, at start
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_args: RoPEScalingArgs = field(default_factory=RoPEScalingArgs)
    max_seq_len: int = 131072
    depth_init: bool = True

    # -- NSA -------------------------------------------------------------------------------
    nsa: NSAConfig = field(default_factory=NSAConfig)
    kv_mode: str = _opt("separate", "'separate': each branch has its own key/value projections "
                        "(paper §3.3.3); 'shared': one key/value projection feeds all three")
    cmp_hidden: int | None = _opt(None, "hidden size of the compression MLP φ; None: l·Dk/2")
    gate_init: float = _opt(1.0 / 3.0, "initial value of every gate, in (0, 1): the first forward "
                            "averages the three branches")
    attn_mask_type: str = _opt("causal", "'causal': one document per sequence; 'block_causal': "
                               "documents end at the tokenizer's EOS and every branch stays inside")

    # -- derived ---------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.qk_head_dim

    @property
    def attn_type(self) -> str:
        """torchtitan's trainer asks a model with attn_type "flex" for its attention masks
        (get_attention_masks): here the document ids under "block_causal"."""
        return "flex" if self.attn_mask_type == "block_causal" else "nsa"

    # -- checks ----------------------------------------------------------------------------
    def validate(self, tp_degree: int = 1) -> None:
        """Raise :class:`NSAConfigError` naming every problem of this configuration."""
        errs: list[str] = []

        def positive(name: str, minimum: int = 1) -> bool:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                errs.append(f"{name}={v!r} must be an integer >= {minimum}")
                return False
            return True

        ok_heads = positive("n_heads") & positive("dim") & positive("n_layers")
        kvh = self.kv_heads
        if not isinstance(kvh, int) or kvh < 1:
            errs.append(f"n_kv_heads={self.n_kv_heads!r} must be a positive integer")
        elif ok_heads and self.n_heads % kvh:
            errs.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kvh} "
                        f"(G = n_heads / n_kv_heads must be a whole number)")
        if ok_heads and self.head_dim is None and self.dim % self.n_heads:
            errs.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                        f"set head_dim explicitly or change dim/n_heads")
        if ok_heads and self.qk_head_dim % 2:
            errs.append(f"query/key head dim {self.qk_head_dim} must be even (RoPE rotates pairs)")
        if ok_heads and self.value_head_dim < 1:
            errs.append(f"v_head_dim={self.v_head_dim!r} must be >= 1")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            errs.append(f"vocab_size={self.vocab_size!r} must be a positive integer or None")
        if not isinstance(self.nsa, NSAConfig):
            errs.append(f"nsa={self.nsa!r} must be an NSAConfig")
        if self.kv_mode not in KV_MODES:
            errs.append(f"kv_mode={self.kv_mode!r} must be one of {KV_MODES}")
        if self.attn_mask_type not in ATTN_MASK_TYPES:
            errs.append(f"attn_mask_type={self.attn_mask_type!r} must be one of {ATTN_MASK_TYPES}")
        if self.cmp_hidden is not None and (not isinstance(self.cmp_hidden, int) or self.cmp_hidden < 1):
            errs.append(f"cmp_hidden={self.cmp_hidden!r} must be a positive integer or None")
        if not (isinstance(self.gate_init, (int, float)) and 0.0 < self.gate_init < 1.0):
            errs.append(f"gate_init={self.gate_init!r} must lie strictly between 0 and 1 "
                        f"(it is a sigmoid output)")
        if tp_degree > 1 and ok_heads and isinstance(kvh, int) and kvh >= 1:
            if self.n_heads % tp_degree or kvh % tp_degree:
                errs.append(f"tensor_parallel_degree={tp_degree} must divide both n_heads="
                            f"{self.n_heads} and n_kv_heads={kvh} (TP shards whole KV head groups)")
        if errs:
            raise NSAConfigError("invalid NSA model configuration:\n  - " + "\n  - ".join(errs))

    def check_seq_len(self, seq_len: int, what: str = "training.seq_len") -> None:
        """The model needs at least one complete compression block in a sequence."""
        l = self.nsa.cmp_block
        if not isinstance(seq_len, int) or seq_len < l:
            raise NSAConfigError(
                f"{what}={seq_len} is shorter than the compression block cmp_block={l}: the "
                f"compressed branch would see no block and selection would have no scores. Use a "
                f"sequence of at least {l} tokens or a smaller cmp_block.")

    # -- torchtitan hooks -------------------------------------------------------------------
    def apply_overrides(self, overrides) -> list[str]:
        """Apply the set (non-None) fields of an ``[nsa]`` section; return the names changed.
        An NSAConfig the operator refuses stops here with its message."""
        if overrides is None:
            return []
        changed, nsa = [], {}
        nsa_fields = {f.name for f in dataclasses.fields(NSAConfig)}
        for f in dataclasses.fields(overrides):
            value = getattr(overrides, f.name)
            if value is None:
                continue
            current = getattr(self.nsa, f.name) if f.name in nsa_fields else getattr(self, f.name)
            if value == current:
                continue
            changed.append(f.name)
            if f.name in nsa_fields:
                nsa[f.name] = value
            else:
                setattr(self, f.name, value)
        if nsa:
            try:
                self.nsa = dataclasses.replace(self.nsa, **nsa)
            except (TypeError, ValueError) as e:
                raise NSAConfigError(f"invalid [nsa] section: {e}") from e
        return changed

    def configure(self, job_config: JobConfig, log: bool = True) -> None:
        """Apply the ``[nsa]`` section and the sequence lengths; check everything but the vocab."""
        changed = self.apply_overrides(getattr(job_config, "nsa", None))
        if changed and log:
            logger.info("NSA options from the [nsa] section: " + ", ".join(
                f"{n}={getattr(self.nsa, n, getattr(self, n, None))!r}" for n in changed))
        par = job_config.parallelism
        if par.context_parallel_degree > 1:
            raise NSAConfigError(
                f"context_parallel_degree={par.context_parallel_degree}: the nsa model does not "
                f"support context parallelism (its three branches need the whole sequence's "
                f"keys per rank). Use FSDP, TP or PP instead.")
        self.validate(tp_degree=par.tensor_parallel_degree)
        seq_len = job_config.training.seq_len
        self.check_seq_len(seq_len, "training.seq_len")
        max_len = seq_len
        if job_config.validation.enable:
            self.check_seq_len(job_config.validation.seq_len, "validation.seq_len")
            max_len = max(max_len, job_config.validation.seq_len)
        if max_len > self.max_seq_len and log:
            logger.warning(f"Sequence length {max_len} exceeds the flavor's max_seq_len "
                           f"{self.max_seq_len}; RoPE tables are extended to {max_len}.")
        self.max_seq_len = max_len

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """torchtitan hook: :meth:`configure`, then the vocabulary from the tokenizer in use
        (``tokenizer_vocab_size`` may be passed to skip loading it)."""
        self.configure(job_config)
        tok_vocab = kwargs.get("tokenizer_vocab_size")
        if tok_vocab is None:
            from nsa_flex.data.tokenizer import tokenizer_vocab_size

            tok_vocab = tokenizer_vocab_size(job_config)
        if self.vocab_size is None:
            self.vocab_size = tok_vocab
        elif self.vocab_size < tok_vocab:
            raise NSAConfigError(
                f"vocab_size={self.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens "
                f"({job_config.model.hf_assets_path}); leave vocab_size unset to follow the tokenizer.")

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        return nsa_nparams_and_flops(self, model, seq_len)


def attended_keys_per_query(args: NSAModelArgs, seq_len: int) -> dict[str, int]:
    """Keys one query attends to in each branch, at most, for a sequence of ``seq_len``.

    Following torchtitan's convention for dense attention (every query counted with the full
    context, causal sparsity not discounted), each branch is counted at its full width:
    all Tc compressed blocks, n selection blocks of l' tokens, w sliding keys, each capped by
    what a sequence of ``seq_len`` tokens holds.
    """
    c = args.nsa
    return {
        "cmp": num_cmp_blocks(seq_len, c.cmp_block, c.cmp_stride),
        "slc": min(c.sel_topn * c.sel_block, seq_len),
        "swa": min(c.window, seq_len),
    }


def nsa_nparams_and_flops(args: NSAModelArgs, model: nn.Module, seq_len: int) -> tuple[int, int]:
    """(parameter count, training FLOPs per token) of the NSA model.

    FLOPs per token = 6 * (non-embedding parameters outside φ)
                    + 6 * (φ parameters) * Tc * Hkv / T     [φ runs once per block and KV head]
                    + 6 * n_layers * Hq * (Dk + Dv) * (Tc + n*l' + w)
    The factor 6 is 2 FLOPs per multiply-add times 3 for forward and backward, as in
    torchtitan's dense formula; the attention term counts the keys NSA really attends to
    (compressed, selected, sliding) instead of a dense T keys. Recomputation is not counted.
    """
    nparams = sum(p.numel() for p in model.parameters())
    nparams_embedding = sum(
        p.numel() for m in model.children() if isinstance(m, nn.Embedding) for p in m.parameters())
    nparams_cmp = sum(p.numel() for n, p in model.named_parameters() if ".compress_" in f".{n}")
    keys = attended_keys_per_query(args, seq_len)
    per_token_cmp = nparams_cmp * keys["cmp"] * args.kv_heads / seq_len
    flops = (
        6 * (nparams - nparams_embedding - nparams_cmp)
        + 6 * per_token_cmp
        + 6 * args.n_layers * args.n_heads * (args.qk_head_dim + args.value_head_dim)
        * (keys["cmp"] + keys["slc"] + keys["swa"])
    )
    return nparams, int(flops)


def replace(args: NSAModelArgs, **changes) -> NSAModelArgs:
    """A copy of ``args`` with ``changes`` (flavors are shared objects; never mutate them);
    NSAConfig fields may be given by name too."""
    nsa_fields = {f.name for f in dataclasses.fields(NSAConfig)}
    nsa = {k: changes.pop(k) for k in list(changes) if k in nsa_fields}
    if nsa:
        changes["nsa"] = dataclasses.replace(changes.get("nsa", args.nsa), **nsa)
    return dataclasses.replace(args, **changes)
