"""Drawing the visualiser's pictures (matplotlib, Agg, no pyplot state).

Every function takes numpy arrays and plain values (so that pictures can be drawn in worker
processes) and writes one PNG. Mask pictures are laid out in exact pixels: one data cell is an
integer number of screen pixels, so no lit cell can vanish in resampling, and each function
returns where its panels lie in the PNG ({name: (x, y, width, height)}, pixels from the top-left),
which the tests use to read cells back.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DPI = 100
FONT = 11

# colours (RGB in [0, 1])
FUTURE = (0.0, 0.0, 0.0)            # keys after the query (never attended)
DARK = (0.13, 0.13, 0.19)           # causal keys the branch does not attend
CMP = (0.30, 0.61, 0.91)
CMP_DIM = (0.17, 0.33, 0.52)
SLC = (0.98, 0.74, 0.0)
SWA = (0.24, 0.86, 0.52)
BOTH = (1.0, 1.0, 1.0)
TILE_COLORS = {0: DARK, 1: (0.95, 0.50, 0.10), 2: (0.25, 0.80, 0.45)}
TILE_NAMES = {0: "skipped", 1: "partial (masked)", 2: "full (no mask)"}
BLOCK_COLORS = {0: FUTURE, 1: DARK, 2: SWA, 3: CMP, 4: SLC}
NEEDLE = (0.0, 1.0, 1.0)
DOC = (1.0, 0.25, 0.85)              # a packed document starts
SKIPPED_GRAY = (0.80, 0.80, 0.80)


# ---------------------------------------------------------------------------------------------
# exact-pixel layout


class PixelLayout:
    """Panels placed on a grid in pixels: rows of (name, width_px, height_px)."""

    def __init__(self, rows, left=90, right=60, top=80, bottom=70, hgap=250, vgap=110, title_lines=2):
        self.rects: dict[str, tuple[int, int, int, int]] = {}
        ncols = max(len(r) for r in rows)
        col_w = [max((r[c][1] for r in rows if c < len(r)), default=0) for c in range(ncols)]
        row_h = [max(p[2] for p in r) for r in rows]
        top += 18 * (title_lines - 1)
        self.width = left + sum(col_w) + hgap * (ncols - 1) + right + (hgap - 60)
        self.height = top + sum(row_h) + vgap * (len(rows) - 1) + bottom
        y = top
        for r, h in zip(rows, row_h):
            x = left
            for c, (name, pw, ph) in enumerate(r):
                self.rects[name] = (x, y, pw, ph)
                x += col_w[c] + hgap
            y += h + vgap
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        FigureCanvasAgg(self.fig)
        self.axes = {}
        for name, (x, y, w, h) in self.rects.items():
            self.axes[name] = self.fig.add_axes(self._frac(x, y, w, h))

    def _frac(self, x, y, w, h):
        return [x / self.width, 1 - (y + h) / self.height, w / self.width, h / self.height]

    def side_axes(self, name, dx=14, width=18, frac=1.0):
        """An axes just right of panel ``name`` (for a colour bar)."""
        x, y, w, h = self.rects[name]
        return self.fig.add_axes(self._frac(x + w + dx, y, width, int(h * frac)))

    def save(self, path):
        self.fig.savefig(path, dpi=DPI)
        return dict(self.rects)


def cell_scale(rows: int, cols: int, target: int = 512) -> tuple[int, int]:
    """Screen pixels per data cell (down, across): integers >= 1 making each side ~target px."""
    return max(1, target // max(rows, 1)), max(1, target // max(cols, 1))


def _rgb(codes: np.ndarray, colors: dict) -> np.ndarray:
    out = np.zeros(codes.shape + (3,), dtype=np.float32)
    for k, c in colors.items():
        out[codes == k] = c
    return out


def _legend(ax, items, loc=(1.02, 1.0)):
    ax.legend(handles=[Patch(facecolor=c, edgecolor="0.5", label=l) for l, c in items],
              loc="upper left", bbox_to_anchor=loc, fontsize=FONT - 2, frameon=False,
              borderaxespad=0.0)


def _show(ax, img, extent, title, xlabel, ylabel, **kw):
    ax.imshow(img, interpolation="nearest", aspect="auto", extent=extent, origin="upper",
              resample=False, **kw)
    ax.set_title(title, fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT - 1)
    ax.set_ylabel(ylabel, fontsize=FONT - 1)
    ax.tick_params(labelsize=FONT - 2)


def _extent(p):
    """imshow extent in data units for a pooling dict {r0, c0, fr, fc} and an image shape."""
    R, C = p["shape"]
    return (p["c0"], p["c0"] + C * p["fc"], p["r0"] + R * p["fr"], p["r0"])


def _needle_marks(ax, needle, unit=1, horizontal=False):
    if not needle:
        return
    a, b = needle[0] / unit, needle[1] / unit
    for v in (a, b):
        ax.axvline(v, color=NEEDLE, lw=0.8, ls="--")
        if horizontal:
            ax.axhline(v, color=NEEDLE, lw=0.8, ls="--")


# ---------------------------------------------------------------------------------------------
# the pictures


def branch_rgb(images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """RGB pictures of the token patterns: one per branch, and the union."""
    causal = images["causal"]
    base = np.where(causal[..., None], np.array(DARK, np.float32), np.array(FUTURE, np.float32))
    out = {}
    for name, color in (("cmp", CMP), ("slc", SLC), ("swa", SWA)):
        out[name] = np.where(images[name][..., None], np.array(color, np.float32), base)
    u = base.copy()
    cmp_, slc, swa = images["cmp"], images["slc"], images["swa"]
    u[cmp_] = CMP_DIM
    u[slc] = SLC
    u[swa] = SWA
    u[slc & swa] = BOTH
    out["union"] = u
    return out


def render_branches(path, images: dict[str, np.ndarray], pooling: dict, title: str,
                    cfg: dict, needle=None, target_px: int = 512, doc_starts=()) -> dict:
    """Token-level patterns of the three branches and their union (2 x 2 panels).

    images: bool [R, C] "cmp", "slc", "swa", "causal" (rows = queries, cols = keys);
    pooling: {r0, c0, fr, fc, shape, note}; doc_starts: first positions of packed documents
    (after the first), drawn as boundaries. Returns the panel rectangles."""
    R, C = images["slc"].shape
    sy, sx = cell_scale(R, C, target_px)
    w, h = C * sx, R * sy
    lay = PixelLayout([[("cmp", w, h), ("slc", w, h)], [("swa", w, h), ("union", w, h)]],
                      title_lines=3)
    rgb = branch_rgb(images)
    ext = _extent(pooling)
    titles = {
        "cmp": f"compressed: tokens under visible blocks (l={cfg['cmp_block']}, d={cfg['cmp_stride']})",
        "slc": f"selected: top-{cfg['sel_topn']} blocks of l'={cfg['sel_block']}",
        "swa": f"sliding window: w={cfg['window']}",
        "union": "union of the three branches",
    }
    for name, ax in lay.axes.items():
        _show(ax, rgb[name], ext, titles[name], "key position", "query position")
        _needle_marks(ax, needle)
        for d in doc_starts:   # a document starts: no branch reaches left of it from below
            ax.axvline(d - 0.5, color=DOC, lw=0.7)
            ax.axhline(d - 0.5, color=DOC, lw=0.7)
    _legend(lay.axes["slc"], [("attended", SLC), ("not attended (causal)", DARK), ("future", FUTURE)])
    _legend(lay.axes["union"], [("selected + sliding", BOTH), ("selected", SLC), ("sliding", SWA),
                                ("compressed only (coarse)", CMP_DIM), ("none", DARK), ("future", FUTURE)]
            + ([("needle", NEEDLE)] if needle else [])
            + ([("document boundary", DOC)] if len(doc_starts) else []))
    lay.fig.suptitle(title + "\n" + pooling["note"], fontsize=FONT + 1, y=1 - 12 / lay.height,
                     va="top")
    return lay.save(path)


def render_tiles(path, states: np.ndarray, waste: np.ndarray, pooling: dict, title: str,
                 totals: dict, tile_info: dict, target_px: int = 512) -> dict:
    """The selected branch's FlexAttention tiles (full / partial / skipped) and the wasted
    fraction of each computed tile (pairs computed but masked out)."""
    R, C = states.shape
    sy, sx = cell_scale(R, C, target_px)
    lay = PixelLayout([[("states", C * sx, R * sy), ("waste", C * sx, R * sy)]], title_lines=4)
    ext = _extent(pooling)
    ylabel = f"query tile ({tile_info['q_block']} packed rows)"
    xlabel = f"KV tile ({tile_info['kv_block']} keys)"
    _show(lay.axes["states"], _rgb(states, TILE_COLORS), ext, "tiles of the selected branch's BlockMask",
          xlabel, ylabel)
    _legend(lay.axes["states"], [(TILE_NAMES[k], TILE_COLORS[k]) for k in (2, 1, 0)])
    ax = lay.axes["waste"]
    masked = np.ma.masked_invalid(waste)
    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad=SKIPPED_GRAY)
    im = ax.imshow(masked, interpolation="nearest", aspect="auto", extent=ext, origin="upper",
                   cmap=cmap, vmin=0.0, vmax=1.0, resample=False)
    ax.set_title("wasted work: masked-out share of computed pairs (gray: skipped)", fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT - 1)
    ax.set_ylabel(ylabel, fontsize=FONT - 1)
    ax.tick_params(labelsize=FONT - 2)
    cb = lay.fig.colorbar(im, cax=lay.side_axes("waste"))
    cb.ax.tick_params(labelsize=FONT - 2)
    t = totals
    note = (f"computed {t['pairs_computed']:,} pairs, needed {t['pairs_needed']:,}: "
            f"{100 * t['wasted_frac']:.1f}% wasted; tiles full {t['tiles_full']}, partial "
            f"{t['tiles_partial']}, skipped {t['tiles_skipped']}")
    lay.fig.suptitle(f"{title}\n{pooling['note']}\n{note}", fontsize=FONT + 1,
                     y=1 - 12 / lay.height, va="top")
    return lay.save(path)


def render_scores(path, scores: np.ndarray, codes: np.ndarray, pooling: dict, title: str,
                  needle_blocks=None, target_px: int = 512) -> dict:
    """Selection importance p_slc per (query, selection block), and which blocks are selected."""
    R, C = scores.shape
    sy, sx = cell_scale(R, C, target_px)
    lay = PixelLayout([[("scores", C * sx, R * sy), ("selected", C * sx, R * sy)]], title_lines=3)
    ext = _extent(pooling)
    ax = lay.axes["scores"]
    pos = scores[scores > 0]
    vmax = float(pos.max()) if pos.size else 1.0
    # the colour range spans the bulk of the scores (1st percentile up), at most 4 decades
    vmin = max(vmax * 1e-4, float(np.percentile(pos, 1)) if pos.size else 0.0, 1e-12)
    vmin = min(vmin, vmax * 0.999)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=FUTURE, under=FUTURE)
    im = ax.imshow(np.ma.masked_less_equal(scores, 0), interpolation="nearest", aspect="auto",
                   extent=ext, origin="upper", resample=False, cmap=cmap,
                   norm=LogNorm(vmin=vmin, vmax=vmax))
    ax.set_title("importance p_slc (per query head, log scale)", fontsize=FONT)
    ax.set_xlabel("selection block", fontsize=FONT - 1)
    ax.set_ylabel("query position", fontsize=FONT - 1)
    ax.tick_params(labelsize=FONT - 2)
    cb = lay.fig.colorbar(im, cax=lay.side_axes("scores"))
    cb.ax.tick_params(labelsize=FONT - 2)
    _show(lay.axes["selected"], _rgb(codes, BLOCK_COLORS), ext, "selected blocks",
          "selection block", "query position")
    from .analysis import BLOCK_CODES

    _legend(lay.axes["selected"], [(BLOCK_CODES[k], BLOCK_COLORS[k]) for k in (4, 3, 2, 1, 0)]
            + ([("needle", NEEDLE)] if needle_blocks else []))
    for ax in lay.axes.values():
        _needle_marks(ax, needle_blocks)
    lay.fig.suptitle(title + "\n" + pooling["note"], fontsize=FONT + 1, y=1 - 12 / lay.height, va="top")
    return lay.save(path)


def render_gates(path, gates: np.ndarray, x: np.ndarray, title: str, note: str, needle=None,
                 first_head: int = 0) -> None:
    """Gate values per branch over positions: gates [P, G, 3], one thin line per query head of
    the group and their mean."""
    fig = Figure(figsize=(11, 7), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    import matplotlib

    G = gates.shape[1]
    cmap = matplotlib.colormaps["tab10" if G <= 10 else "viridis"]
    for b, (ax, name) in enumerate(zip(axes, ("compressed", "selected", "sliding"))):
        for g in range(G):
            ax.plot(x, gates[:, g, b], lw=0.7, alpha=0.75, color=cmap(g if G <= 10 else g / (G - 1)),
                    label=f"query head {first_head + g}" if G <= 8 else None)
        ax.plot(x, gates[:, :, b].mean(1), lw=1.0, color="black", alpha=0.8, label="mean")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"g_{('cmp', 'slc', 'swa')[b]}", fontsize=FONT)
        ax.set_title(f"{name} branch gate: mean {gates[:, :, b].mean():.3f}", fontsize=FONT - 1, loc="left")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT - 2)
        if needle:
            ax.axvspan(needle[0], needle[1], color=NEEDLE, alpha=0.25)
    axes[0].legend(fontsize=FONT - 3, loc="upper right", ncol=min(5, G + 1))
    axes[-1].set_xlabel("query position", fontsize=FONT)
    fig.suptitle(f"{title}\n{note}", fontsize=FONT + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


SPARSITY_PANELS = (("frac_cmp_keys", "compressed keys / causal keys"),
                   ("frac_slc", "selected keys / causal keys"),
                   ("frac_swa", "sliding-window keys / causal keys"),
                   ("frac_union", "selected ∪ sliding / causal keys"),
                   ("wasted_frac", "selected branch: wasted share of computed pairs"))


def render_sparsity(path, records: list[dict], title: str) -> None:
    """Per layer and KV head: the fraction of causal (query, key) pairs each branch attends."""
    fig = Figure(figsize=(4.0 * len(SPARSITY_PANELS), 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SPARSITY_PANELS))
    scopes = sorted({r["scope"] for r in records}, key=lambda s: s != "sequence")
    heads = sorted({r["kv_head"] for r in records})
    for ax, (key, label) in zip(axes, SPARSITY_PANELS):
        for scope in scopes:
            for h in heads:
                rs = sorted((r for r in records if r["scope"] == scope and r["kv_head"] == h),
                            key=lambda r: r["layer"])
                ax.plot([r["layer"] for r in rs], [r[key] for r in rs], marker="o",
                        ls="-" if scope == "sequence" else "--",
                        label=f"KV head {h} ({scope})")
        ax.set_title(label, fontsize=FONT - 1)
        ax.set_xlabel("layer", fontsize=FONT - 1)
        top = max((r[key] for r in records), default=0.0)
        ax.set_ylim(0, max(top, 1e-3) * 1.15)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT - 2)
        layers = sorted({r["layer"] for r in records})
        ax.set_xticks(layers)
    axes[0].legend(fontsize=FONT - 3)
    fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def draw(task):
    """One drawing task ("render_x", kwargs) in a worker process (imports numpy and matplotlib
    only)."""
    kind, kwargs = task
    return globals()[kind](**kwargs)
