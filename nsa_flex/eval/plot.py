"""Depth × length heatmaps of retrieval results (JSONs written by ``python -m nsa_flex.eval``).

    python -m nsa_flex.eval.plot eval/nsa/retrieval.json eval/dense/retrieval.json \\
        eval/window/retrieval.json --out quality.png

One row of panels per result file; one column per task and metric (accuracy of the whole key;
selection recall where a model reports it, blank for the others), numbers in the cells. Needs only numpy,
matplotlib and the JSONs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = {"accuracy": "key accuracy", "selection_recall": "selection recall"}


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def panels_of(result: dict) -> list[tuple[str, str]]:
    """(task, metric) panels of one result, in order, leaving out metrics with no value."""
    cells = result["cells"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    return [(t, m) for t in tasks for m in METRICS
            if any(c.get(m) is not None for c in cells if c["task"] == t)]


def grid(result: dict, task: str, metric: str):
    """(depths, lengths, matrix [depth][length] with None where missing)."""
    cells = [c for c in result["cells"] if c["task"] == task]
    depths = sorted({c["depth"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    at = {(c["depth"], c["length"]): c.get(metric) for c in cells}
    return depths, lengths, [[at.get((d, L)) for L in lengths] for d in depths]


def heatmaps(results: list[dict], path: str | Path) -> Path:
    """Write the heatmaps of ``results`` (loaded JSONs) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(r, panels_of(r)) for r in results]
    rows = [(r, p) for r, p in rows if p]
    if not rows:
        raise ValueError("no cells to plot: the result files hold no evaluated cells")
    # one column per (task, metric) over all results, so that a column compares like with like
    columns = list(dict.fromkeys(panel for _, p in rows for panel in p))
    ncols = len(columns)
    first = grid(rows[0][0], *rows[0][1][0])
    cw = max(2.6, 0.75 * len(first[1]) + 1.2)
    ch = max(2.2, 0.42 * len(first[0]) + 1.3)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cw * ncols, ch * len(rows)), squeeze=False)
    for ri, (result, panels) in enumerate(rows):
        label = result.get("label") or result.get("model", "?")
        for ci, (task, metric) in enumerate(columns):
            ax = axes[ri][ci]
            if (task, metric) not in panels:
                ax.axis("off")
                continue
            depths, lengths, mat = grid(result, task, metric)
            data = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)
            ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    v = data[i, j]
                    dark = not np.isnan(v) and (v < 0.2 or v > 0.85)   # the colormap's dark ends
                    ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                            fontsize=8, color="white" if dark else "black")
            ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
            ax.set_title(f"{label}: {task}, {METRICS[metric]}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nsa_flex.eval.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="retrieval.json files of nsa_flex.eval")
    p.add_argument("--out", required=True, help="PNG to write")
    a = p.parse_args(argv)
    loaded = []
    for f in a.results:
        try:
            loaded.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {f}: {e}", file=sys.stderr)
            return 2
    try:
        out = heatmaps(loaded, a.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
