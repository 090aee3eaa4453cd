"""The NSA transformer and its flavors (``--model.flavor``)."""

from nsa_flex.config import NSAConfig

from .args import NSAConfigError, NSAModelArgs
from .model import NSATransformer


class Flavors(dict):
    """Flavor name -> NSAModelArgs; an unknown name is a clear error, not a bare KeyError."""

    def __missing__(self, key):
        raise NSAConfigError(
            f"unknown flavor {key!r} for model 'nsa'; choose one of {sorted(self)} "
            f"(--model.flavor / [model] flavor)")


PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, n_init=1, n_local=2,
                  window=512)

nsa_flavors = Flavors({
    # 2 layers, runs seconds per step on a 2-core CPU; small blocks so that all three branches
    # matter at seq_len 256-512.
    "debug": NSAModelArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, cmp_hidden=128,
        max_seq_len=2048,
        nsa=NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=4, n_init=1, n_local=2,
                      window=64),
    ),
    # ~104M parameters with the embedded 8k vocabulary; NSA at the paper's block sizes, for 8k context.
    "100m": NSAModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=2, cmp_hidden=256, max_seq_len=32768,
        nsa=PAPER,
    ),
    # ~43M parameters with the embedded 8k vocabulary: the quality comparison's size, small
    # enough that three models train side by side on one GPU in minutes.
    "50m": NSAModelArgs(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=2, cmp_hidden=256, max_seq_len=32768,
        nsa=PAPER,
    ),
    # ~1B: 16 query heads per KV head as in the paper (32 q heads, 2 KV heads).
    "1b": NSAModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=2, ffn_dim_multiplier=1.5, cmp_hidden=512,
        rope_theta=500000.0, max_seq_len=32768, nsa=PAPER,
    ),
})

__all__ = ["NSAConfigError", "NSAModelArgs", "NSATransformer", "nsa_flavors", "Flavors"]
