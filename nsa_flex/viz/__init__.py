"""Mask visualiser: see what each NSA branch attends to.

``python -m nsa_flex.viz --help`` (or ``python tools/visualize_masks.py``). The pieces:

* :mod:`.analysis`: selection, the selected branch's BlockMask tiles, token patterns and
  sparsity counts of one layer and KV head, from the operator's own functions;
* :mod:`.model_io`: the model, DCP checkpoints, inputs, and capturing each layer's q/k/k_cmp/gates;
* :mod:`.figures`: the pictures; :mod:`.report`: stats.json, stats.csv and index.html;
* :mod:`.cli`: the command line.
"""

__all__ = ["main", "run"]


def __getattr__(name):  # lazy: the drawing workers import nsa_flex.viz.figures only
    if name in __all__:
        from . import cli
        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
