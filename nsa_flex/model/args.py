"""Arguments of the NSA transformer (torchtitan ``BaseModelArgs`` style).

One dataclass, :class:`NSAModelArgs`, holds the llama3-style architecture plus every field of
``NSAConfig`` and the model options of NSA (separate or shared keys/values per branch, the size
of the compression MLP, the initial gate value). ``update_from_config`` applies the ``[nsa]``
TOML section (see ``nsa_flex.job_config``), the training sequence length, the tokenizer's
vocabulary size, and checks everything that can be checked before the model is built, so that
bad configurations stop at start with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

KV_MODES = ("separate", "shared")

# Fields of the ``[nsa]`` TOML section that override the flavor's values (None = keep).
OVERRIDABLE_FIELDS = (
    "cmp_block", "cmp_stride", "sel_block", "sel_topn", "n_init", "n_local", "window", "scale",
    "kv_mode", "cmp_hidden", "gate_init", "vocab_size",
)


class NSAConfigError(ValueError):
    """A configuration the NSA model cannot run with."""


def num_cmp_blocks(seq_len: int, block: int, stride: int) -> int:
    """Tc = max(0, floor((T - l) / d) + 1): complete compression blocks in T tokens."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1


@dataclass
class NSAModelArgs(BaseModelArgs):
    # -- llama3-style decoder -------------------------------------------------------------
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    """Query/key head dim Dk; None: dim // n_heads."""
    v_head_dim: int | None = None
    """Value head dim Dv; None: the same as head_dim."""
    vocab_size: int | None = None
    """None: taken from the tokenizer at start (see ``update_from_config``)."""
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 131072
    depth_init: bool = True

    # -- NSAConfig (NSA_SPEC.md) ----------------------------------------------------------
    cmp_block: int = 32
    """l: compression block length."""
    cmp_stride: int = 16
    """d: compression stride (divides l and l')."""
    sel_block: int = 64
    """l': selection block length (l <= l')."""
    sel_topn: int = 16
    """n: selected blocks per query, forced ones included."""
    n_init: int = 1
    """Forced initial selection blocks."""
    n_local: int = 2
    """Forced local selection blocks (the current one and the ones before it)."""
    window: int = 512
    """w: sliding window, including the query."""
    scale: float | None = None
    """Softmax scale of all three branches; None: 1/sqrt(Dk)."""

    # -- NSA model options -----------------------------------------------------------------
    kv_mode: str = "separate"
    """'separate': each branch has its own key/value projections (paper, §3.3.3);
    'shared': one key/value projection feeds all three branches."""
    cmp_hidden: int | None = None
    """Hidden size of the compression MLP φ; None: l * D / 2 (Compression's default)."""
    gate_init: float = 1.0 / 3.0
    """Initial value of every gate: the gate bias starts at logit(gate_init), the gate weight
    at zero, so the first forward mixes the three branches with equal weights that sum to 1."""

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

    def nsa_config_kwargs(self) -> dict:
        return dict(
            cmp_block=self.cmp_block, cmp_stride=self.cmp_stride, sel_block=self.sel_block,
            sel_topn=self.sel_topn, n_init=self.n_init, n_local=self.n_local,
            window=self.window, scale=self.scale,
        )

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
            errs.append(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={kvh} "
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

        blocks_ok = all([positive("cmp_block"), positive("cmp_stride"), positive("sel_block"),
                         positive("sel_topn"), positive("n_init", 0), positive("n_local", 0),
                         positive("window")])
        if blocks_ok:
            l, d, lp = self.cmp_block, self.cmp_stride, self.sel_block
            if l % d:
                errs.append(f"cmp_stride d={d} must divide cmp_block l={l} (NSA_SPEC: d divides l)")
            if lp % d:
                errs.append(f"cmp_stride d={d} must divide sel_block l'={lp} (NSA_SPEC: d divides l')")
            if l > lp:
                errs.append(f"cmp_block l={l} must not exceed sel_block l'={lp} (NSA_SPEC: l <= l')")
            if self.n_init + self.n_local > self.sel_topn:
                errs.append(
                    f"n_init={self.n_init} + n_local={self.n_local} forced blocks exceed "
                    f"sel_topn n={self.sel_topn} (the forced blocks count towards n)")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            errs.append(f"scale={self.scale!r} must be a positive number or None (1/sqrt(Dk))")
        if self.kv_mode not in KV_MODES:
            errs.append(f"kv_mode={self.kv_mode!r} must be one of {KV_MODES}")
        if self.cmp_hidden is not None and (not isinstance(self.cmp_hidden, int) or self.cmp_hidden < 1):
            errs.append(f"cmp_hidden={self.cmp_hidden!r} must be a positive integer or None")
        if not (isinstance(self.gate_init, (int, float)) and 0.0 < self.gate_init < 1.0):
            errs.append(f"gate_init={self.gate_init!r} must lie strictly between 0 and 1 "
                        f"(it is a sigmoid output)")

        if tp_degree > 1 and ok_heads and isinstance(kvh, int) and kvh >= 1:
            if self.n_heads % tp_degree or kvh % tp_degree:
                errs.append(
                    f"tensor_parallel_degree={tp_degree} must divide both n_heads={self.n_heads} "
                    f"and n_kv_heads={kvh} (TP shards whole KV head groups)")
        if not errs:
            from nsa_flex.config import NSAConfig  # the operator's own checks, if it adds any

            try:
                NSAConfig(**self.nsa_config_kwargs())
            except (TypeError, ValueError) as e:
                errs.append(str(e))
        if errs:
            raise NSAConfigError("invalid NSA model configuration:\n  - " + "\n  - ".join(errs))

    def check_seq_len(self, seq_len: int, what: str = "training.seq_len") -> None:
        """The model needs at least one complete compression block in a sequence."""
        if not isinstance(seq_len, int) or seq_len < self.cmp_block:
            raise NSAConfigError(
                f"{what}={seq_len} is shorter than the compression block cmp_block={self.cmp_block}: "
                f"the compressed branch would see no block and selection would have no scores. "
                f"Use a sequence of at least {self.cmp_block} tokens or a smaller cmp_block.")

    # -- torchtitan hooks -------------------------------------------------------------------
    def apply_overrides(self, overrides) -> list[str]:
        """Apply the non-None fields of an ``[nsa]`` section; return the names changed."""
        changed = []
        if overrides is None:
            return changed
        for name in OVERRIDABLE_FIELDS:
            value = getattr(overrides, name, None)
            if value is not None and value != getattr(self, name):
                setattr(self, name, value)
                changed.append(name)
        return changed

    def configure(self, job_config: JobConfig, log: bool = True) -> None:
        """Apply the ``[nsa]`` section and the sequence lengths; check everything but the vocab."""
        changed = self.apply_overrides(getattr(job_config, "nsa", None))
        if changed and log:
            logger.info("NSA options from the [nsa] section: "
                        + ", ".join(f"{n}={getattr(self, n)!r}" for n in changed))
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
    return {
        "cmp": num_cmp_blocks(seq_len, args.cmp_block, args.cmp_stride),
        "slc": min(args.sel_topn * args.sel_block, seq_len),
        "swa": min(args.window, seq_len),
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
    tc = num_cmp_blocks(seq_len, args.cmp_block, args.cmp_stride)
    keys = attended_keys_per_query(args, seq_len)
    per_token_cmp = nparams_cmp * tc * args.kv_heads / seq_len
    flops = (
        6 * (nparams - nparams_embedding - nparams_cmp)
        + 6 * per_token_cmp
        + 6 * args.n_layers * args.n_heads * (args.qk_head_dim + args.value_head_dim)
        * (keys["cmp"] + keys["slc"] + keys["swa"])
    )
    return nparams, int(flops)


def replace(args: NSAModelArgs, **changes) -> NSAModelArgs:
    """A copy of ``args`` with ``changes`` (flavors are shared objects; never mutate them)."""
    return dataclasses.replace(args, **changes)
