"""nsa-flex: Native Sparse Attention on FlexAttention.

``from nsa_flex import NSAConfig, nsa_attention`` needs torch only. When torchtitan is already
loaded (``--experimental.custom_import nsa_flex``), importing this package also registers the
TrainSpec ``nsa``. The exports load on first use, so that a light submodule (the visualiser's
drawing workers import only numpy and matplotlib) does not pay for torch.
"""

import importlib
import sys

_EXPORTS = {"Compression": ".compression", "NSAConfig": ".config", "nsa_attention": ".operator"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "torchtitan" in sys.modules:
    from .titan import register

    register()
