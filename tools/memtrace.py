"""What is live at the peak of one GPU step, and where each buffer came from.

Records the CUDA caching allocator's history (python stacks) while ``fn`` runs, replays the
alloc/free events to the moment the allocated bytes peak, and groups the buffers live then by
origin. A buffer allocated by Inductor's generated code is named by the comment there of the
kernel that fills it ("Topologically Sorted Source Nodes: [...]", the ops that produce it);
otherwise by the innermost frame in this project's code, else the innermost frame.

    report = peak_report(lambda: loss_fn().backward())   # {"peak_mib", "before_mib", "top": [...]}

Only allocations made while recording are seen: what was live before (inputs, weights) is
``before_mib``.
"""

from __future__ import annotations

import functools
import linecache
import os

import torch

PROJECT_DIRS = ("nsa_flex", "masks", "tools")


def live_at_peak(events) -> tuple[int, list[dict]]:
    """Replay allocator trace events (dicts with 'action', 'addr', 'size', optional 'frames');
    returns (peak bytes allocated during the trace, the events of the blocks live then)."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    live = {}
    for e in events[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    return peak, sorted(live.values(), key=lambda e: -e["size"])


@functools.lru_cache(maxsize=None)
def _source_nodes(filename: str, line: int) -> str | None:
    """The ops behind the buffer allocated at ``line`` of Inductor's generated ``filename``: the
    'Topologically Sorted Source Nodes' comment of the kernel that fills it. Generated code
    allocates with ``empty_strided`` before that comment and its kernel, so look below such a
    line; an op that allocates its own output (a fallback call) stands below its comment."""
    text = linecache.getline(filename, line)
    lines = range(line + 1, line + 40) if "empty_strided" in text else range(line, max(0, line - 40), -1)
    for n in lines:
        text = linecache.getline(filename, n).strip()
        if text.startswith("# Topologically Sorted Source Nodes:"):
            return text.split(":", 1)[1].strip()
        if text.startswith("def "):
            break
    return None


def origin(frames: list[dict]) -> str:
    """Where a buffer came from, from its allocation stack (innermost frame first)."""
    for f in frames:                 # Inductor's generated code: the comment above the line
        name = f.get("filename", "")
        nodes = _source_nodes(name, f.get("line", 0)) if name.endswith(".py") else None
        if nodes:
            return f"inductor: {nodes}"
    for f in frames:
        parts = f.get("filename", "").replace(os.sep, "/").split("/")
        if any(d in parts for d in PROJECT_DIRS):
            return f"{'/'.join(parts[-2:])}:{f.get('line')} ({f.get('name')})"
    if frames:
        f = frames[0]
        return f"{f.get('filename')}:{f.get('line')} ({f.get('name')})"
    return "(no stack)"


def summarize(events, top: int = 15) -> dict:
    """Peak bytes of the trace and the ``top`` origins by bytes live at the peak."""
    peak, live = live_at_peak(events)
    groups: dict[str, list[int]] = {}
    for e in live:
        g = groups.setdefault(origin(e.get("frames", [])), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"peak_mib": round(peak / 2**20, 1),
            "top": [{"mib": round(b / 2**20, 1), "buffers": n, "origin": o} for o, (b, n) in rows[:top]]}


def peak_report(fn, top: int = 15, max_entries: int = 1_000_000) -> dict:
    """Run ``fn`` once while recording the allocator; see the module docstring."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python",
                                             clear_history=True)
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    if len(events) >= max_entries:
        raise RuntimeError(f"the allocator trace filled all {max_entries} entries; the peak may be "
                           "missing: raise max_entries")
    return {"before_mib": round(before / 2**20, 1), **summarize(events, top)}
