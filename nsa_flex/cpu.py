"""Let torchtitan 0.2.2 run on a machine without an accelerator (device cpu, gloo).

torchtitan picks its device type once at import (``torchtitan.tools.utils``) and falls back to
"cuda" when no accelerator is present, then calls ``torch.cuda`` functions. On such a machine
:func:`use_cpu_if_no_accelerator` points torchtitan's device globals at "cpu" and a small
device module that answers the memory-monitor and synchronisation calls; process groups then
use gloo (torch's default backend for cpu).
"""

from __future__ import annotations

import os
import resource
import sys
from types import SimpleNamespace

import torch


class CPUDeviceModule:
    """The subset of ``torch.cuda``'s API that torchtitan calls, answered for the CPU."""

    def __getattr__(self, name):  # anything else: torch.cpu's version, if it has one
        return getattr(torch.cpu, name)

    @staticmethod
    def set_device(device) -> None:
        return None

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"cpu ({os.cpu_count()} cores)"

    @staticmethod
    def get_device_properties(device=None):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 1 << 34
        return SimpleNamespace(total_memory=total, name="cpu")

    @staticmethod
    def memory_stats(device=None) -> dict:
        # peak resident memory of this process (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None


def has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


_applied = False


def use_cpu_if_no_accelerator() -> bool:
    """Switch torchtitan to device "cpu" when torch sees no accelerator. True if switched."""
    global _applied
    if has_accelerator():
        return False
    if _applied:
        return True
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.profiling as profiling
    import torchtitan.tools.utils as tt_utils

    module = CPUDeviceModule()
    for mod in (tt_utils, metrics, parallel_dims, dist_utils, profiling):
        if hasattr(mod, "device_type"):
            mod.device_type = "cpu"
        if hasattr(mod, "device_module"):
            mod.device_module = module
    _applied = True
    from torchtitan.tools.logging import logger

    logger.info("nsa_flex: no accelerator found; torchtitan runs on device 'cpu' with gloo")
    return True
