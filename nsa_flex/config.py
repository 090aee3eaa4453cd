"""NSAConfig: the hyper-parameters of NSA §3.3 (docs/spec.md), checked when constructed.

The one declaration of NSA's fields: the model's arguments hold an NSAConfig and the ``[nsa]``
TOML section is made from these fields (nsa_flex/job_config.py), each with its help text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .compression import num_cmp_blocks


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NSAConfig:
    cmp_block: int = _opt(32, "l: compression block length")
    cmp_stride: int = _opt(16, "d: compression stride (divides l and l')")
    sel_block: int = _opt(64, "l': selection block length (l <= l')")
    sel_topn: int = _opt(16, "n: selected blocks per query, forced ones included")
    n_init: int = _opt(1, "forced initial selection blocks")
    n_local: int = _opt(2, "forced local selection blocks (the current one and those before it)")
    window: int = _opt(512, "w: sliding window, the query included")
    scale: float | None = _opt(None, "softmax scale of all three branches; None: 1/sqrt(Dk)")

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"NSAConfig: {msg}")

        for name in ("cmp_block", "cmp_stride", "sel_block", "sel_topn"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name}={value!r} must be a positive integer")
        for name in ("n_init", "n_local"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name}={value!r} must be an integer >= 0")
        need(isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1,
             f"window={self.window!r} must be an integer >= 1 (the sliding window counts the query itself)")
        d, l, lp = self.cmp_stride, self.cmp_block, self.sel_block
        need(l % d == 0, f"cmp_stride d={d} must divide cmp_block l={l}; pick d among the divisors of {l}")
        need(lp % d == 0, f"cmp_stride d={d} must divide sel_block l'={lp}; pick l' a multiple of {d}")
        need(l <= lp, f"cmp_block l={l} must not exceed sel_block l'={lp}; raise sel_block or lower cmp_block")
        need(self.sel_topn >= self.n_init + self.n_local,
             f"sel_topn n={self.sel_topn} must be at least n_init + n_local = {self.n_init + self.n_local}; "
             "raise sel_topn or force fewer blocks")
        if self.scale is not None:
            need(isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0,
                 f"scale={self.scale!r} must be a positive finite number or None (1/sqrt(Dk))")

    def softmax_scale(self, head_dim: int) -> float:
        return float(self.scale) if self.scale is not None else head_dim ** -0.5

    def num_cmp_blocks(self, seq_len: int) -> int:
        """Tc = max(0, ⌊(T − l)/d⌋ + 1): complete compression blocks only."""
        return num_cmp_blocks(seq_len, self.cmp_block, self.cmp_stride)

    def num_sel_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.sel_block)
