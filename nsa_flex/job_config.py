"""The ``[nsa]`` TOML section (and ``--nsa.*`` flags) of torchtitan's JobConfig.

Enable it with ``[job] custom_config_module = "nsa_flex.job_config"`` (the configs in
``configs/`` do) or ``--job.custom_config_module nsa_flex.job_config``. Every field left unset
keeps the flavor's value; the values are applied and checked in
``NSAModelArgs.update_from_config`` before the model is built.
"""


from dataclasses import dataclass, field


@dataclass
class NSA:
    cmp_block: int | None = None
    """l: compression block length (NSA_SPEC default 32)."""
    cmp_stride: int | None = None
    """d: compression stride; divides l and l' (default 16)."""
    sel_block: int | None = None
    """l': selection block length, l <= l' (default 64)."""
    sel_topn: int | None = None
    """n: selected blocks per query, forced ones included (default 16)."""
    n_init: int | None = None
    """Forced initial selection blocks (default 1)."""
    n_local: int | None = None
    """Forced local selection blocks (default 2)."""
    window: int | None = None
    """w: sliding window including the query (default 512)."""
    scale: float | None = None
    """Softmax scale of all branches (default 1/sqrt(Dk))."""
    kv_mode: str | None = None
    """'separate' (paper: own k/v projections per branch) or 'shared' (one k/v for all)."""
    cmp_hidden: int | None = None
    """Hidden size of the compression MLP φ (default: the flavor's, else l*D/2)."""
    gate_init: float | None = None
    """Initial value of every gate, in (0, 1) (default 1/3)."""
    vocab_size: int | None = None
    """Embedding rows; default: the tokenizer's vocabulary size."""


@dataclass
class JobConfig:
    nsa: NSA = field(default_factory=NSA)
