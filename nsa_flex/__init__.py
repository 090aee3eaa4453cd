"""nsa-flex: Native Sparse Attention on FlexAttention.

``from nsa_flex import NSAConfig, nsa_attention`` needs torch only. When torchtitan is already
loaded (``--experimental.custom_import nsa_flex``), importing this package also registers the
TrainSpec ``nsa``.
"""

import sys

from .compression import Compression
from .config import NSAConfig
from .operator import nsa_attention

__all__ = ["Compression", "NSAConfig", "nsa_attention"]

if "torchtitan" in sys.modules:
    from .titan import register

    register()
