"""What is live at the peak of one GPU step, and where each buffer came from.

Records the CUDA caching allocator's history (python stacks) while ``fn`` runs, replays the
alloc/free events to the moment the allocated bytes peak, and groups the buffers live then by
origin. A buffer allocated by Inductor's generated code is named by the comment there of the
kernel that fills it ("Topologically Sorted Source Nodes: [...]", the ops that produce it);
otherwise by the innermost frame in this project's code, else the innermost frame.

    report = peak_report(lambda: loss_fn().backward())   # {"before_mib", "peak_mib", "top"}

Only allocations made while recording are seen: what was live before (inputs, weights) is
``before_mib``, and ``peak_mib`` is the largest rise above it (their sum is the absolute peak).
"""

from __future__ import annotations

import functools
import linecache
import os

import torch

PROJECT_DIRS = ("nsa_flex", "masks", "tools")


def live_at_peak(events) -> tuple[int, list[dict]]:
    """Replay allocator trace events (dicts with 'action', 'addr', 'size', optional 'frames');
    returns (the peak of the bytes allocated, counted from the trace's start, so a free of a
    block allocated before it counts as negative; the events of the trace's blocks live then).
    A block counts as freed at 'free_requested', where torch's allocated-bytes count drops; its
    'free_completed' (or a second free) is ignored."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] == "free_requested":
            total -= live.pop(e["addr"])["size"] if e["addr"] in live else e["size"]
    live = {}
    for e in events[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return peak, sorted(live.values(), key=lambda e: -e["size"])


@functools.lru_cache(maxsize=None)
def _source_nodes(filename: str, line: int) -> str | None:
    """The ops behind the buffer allocated at ``line`` of Inductor's generated ``filename``: the
    'Topologically Sorted Source Nodes' comment of the kernel that fills it. Generated code
    allocates with ``empty_strided`` just before that comment and its kernel, so look below such
    a line, past only other allocations, aliases and ``del``s (None where a kernel comes first:
    some kernels carry no comment); an op that allocates its own output (a fallback call) stands
    below its comment. A reused buffer (``buf2 = buf1; del buf1  # reuse``) keeps the name of
    its first producer."""
    text = linecache.getline(filename, line)
    if "empty_strided" not in text:
        lines = range(line, max(0, line - 40), -1)
    else:
        lines = range(line + 1, line + 40)
    for n in lines:
        text = linecache.getline(filename, n).strip()
        if text.startswith("# Topologically Sorted Source Nodes:"):
            return text.split(":", 1)[1].strip()
        if text.startswith("def ") or (n > line and not _allocation_line(text)):
            break
    return None


def _allocation_line(text: str) -> bool:
    """A generated line that only allocates, aliases or frees (or is blank / a comment)."""
    return (not text or text.startswith(("#", "del ")) or "empty_strided" in text
            or "reinterpret_tensor" in text or "get_raw_stream" in text)


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
    """The peak rise of the trace (MiB) and the ``top`` origins by bytes live at the peak."""
    peak, live = live_at_peak(events)
    groups: dict[str, list[int]] = {}
    for e in live:
        g = groups.setdefault(origin(e.get("frames", [])), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"peak_mib": round(peak / 2**20, 1),
            "top": [{"mib": round(b / 2**20, 1), "buffers": n, "origin": o}
                    for o, (b, n) in rows[:top]]}


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
