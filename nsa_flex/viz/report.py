"""The visualiser's outputs besides the pictures: statistics (JSON, CSV) and index.html."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

STAT_FIELDS = [
    "layer", "kv_head", "scope", "q_lo", "q_hi", "positions", "causal_pairs",
    "frac_cmp_keys", "frac_cmp_tokens", "frac_slc", "frac_swa", "frac_union",
    "gate_cmp", "gate_slc", "gate_swa",
    "tiles_full", "tiles_partial", "tiles_skipped", "pairs_computed", "pairs_needed",
    "wasted_frac", "pairs_missed", "full_tiles_not_full", "sel_share_2", "sel_share_4", "sel_share_8",
]

FIELD_HELP = {
    "scope": "'sequence': every query position; 'query_range': the positions of --query-range",
    "q_lo, q_hi": "first and last query position of the scope",
    "causal_pairs": "(query, key) pairs with key <= query: the work of dense causal attention",
    "frac_cmp_keys": "compressed keys attended / causal pairs (one compressed key per block)",
    "frac_cmp_tokens": "tokens covered by the visible compressed blocks / causal pairs",
    "frac_slc": "keys of the selected blocks (causal) / causal pairs",
    "frac_swa": "sliding-window keys / causal pairs",
    "frac_union": "keys read at token resolution by the selected or the sliding branch / causal pairs",
    "gate_cmp, gate_slc, gate_swa": "mean gate value over the scope's positions and the group's query heads",
    "tiles_full, tiles_partial, tiles_skipped": "FlexAttention tiles of the selected branch's BlockMask "
                                                "(packed-GQA rows x keys) in the scope's query tiles",
    "pairs_computed": "(row, key) pairs in the tiles FlexAttention runs (full and partial tiles)",
    "pairs_needed": "(row, key) pairs the selection really attends (rows = positions x group heads)",
    "wasted_frac": "(computed − needed) / computed",
    "pairs_missed, full_tiles_not_full": "consistency checks of the BlockMask: both must be 0",
    "sel_share_2, sel_share_4, sel_share_8": "blocks selected by runs of 2, 4, 8 consecutive positions "
                                             "counted one by one / the run's distinct blocks: 1 = no "
                                             "overlap, P = the same blocks (what a P-position query "
                                             "tile would save in K/V reads)",
}


def write_stats(out: Path, records: list[dict], meta: dict) -> None:
    (out / "stats.json").write_text(json.dumps({"meta": meta, "fields": FIELD_HELP,
                                                "records": records}, indent=1))
    with open(out / "stats.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STAT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; } td.l, th.l { text-align: left; }
.meta td { text-align: left; }
figure { margin: 0.8em 0; } figcaption { font-size: 0.9em; color: #444; }
img { max-width: 100%; border: 1px solid #ddd; background: white; }
.note { background: #fff6d6; border: 1px solid #e8d58a; padding: 0.5em 0.8em; }
.row { display: flex; flex-wrap: wrap; gap: 1em; } .row figure { flex: 1 1 45%; }
"""

LEGEND = """
<ul>
<li><b>branches</b>: for each query position (rows) the keys (columns) each branch attends.
 Compressed (blue): the tokens summarised by the compressed blocks the query can see (whole blocks
 in the past; attended at block resolution). Selected (amber): the keys of the top-n selection
 blocks of this KV head's group, causal inside the current block. Sliding (green): the last w keys.
 Union: white where the selected and sliding branches overlap, dim blue where only the compressed
 branch covers a key. Dark: causal keys no branch reads; black: the future.</li>
<li><b>tiles</b>: the selected branch's FlexAttention BlockMask in the packed-GQA layout (a row is a
 (position, query head) pair of the group): full tiles run without the mask, partial tiles evaluate
 the mask per pair, skipped tiles are not loaded. Right: the share of each computed tile's pairs that
 the mask discards (wasted work).</li>
<li><b>scores</b>: the importance p_slc of each selection block for each query (eqs. 8–10, the
 group's compressed attention probabilities pooled onto selection blocks, shown per query head), and
 which blocks the top-n keeps: chosen by score, forced initial, forced local.</li>
<li><b>gates</b>: the sigmoid gates of the three branches (eq. 5) for each query head of the group.</li>
</ul>
"""


def _table(records: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for r in records:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_index(out: Path, meta: dict, records: list[dict], figures: list[dict], notes: list[str]) -> Path:
    """index.html: run description, statistics, then per layer and KV head its pictures."""
    e = html.escape
    meta_rows = "".join(f"<tr><th class=l>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in meta.items())
    cols = ["layer", "kv_head", "scope", "frac_cmp_keys", "frac_cmp_tokens", "frac_slc", "frac_swa",
            "frac_union", "gate_cmp", "gate_slc", "gate_swa", "tiles_full", "tiles_partial",
            "tiles_skipped", "wasted_frac"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>NSA masks: {e(str(meta.get('flavor', '')))}</title><style>{CSS}</style></head><body>",
        "<h1>NSA masks: what each branch attends to</h1>",
        f"<table class=meta>{meta_rows}</table>",
        "".join(f"<p class=note>{e(n)}</p>" for n in notes),
        LEGEND,
        "<h2>Sparsity per layer and KV head</h2>",
        "<p>Fractions are of the causal (query, key) pairs of the scope (dense causal attention = 1). "
        "Data: <a href='stats.json'>stats.json</a> (with field descriptions), "
        "<a href='stats.csv'>stats.csv</a>.</p>",
        "<figure><a href='sparsity.png'><img src='sparsity.png' alt='sparsity'></a></figure>",
        _table(records, cols),
    ]
    layer = None
    for f in figures:
        if f["layer"] != layer:
            layer = f["layer"]
            parts.append(f"<h2>Layer {layer}</h2>")
        parts.append(f"<h3>KV head {f['kv_head']} (query heads {f['q_heads']})</h3><div class=row>")
        for kind, caption in (("branches", "token-level pattern of each branch and their union"),
                              ("tiles", "selected branch: FlexAttention tiles and wasted work"),
                              ("scores", "selection importance scores and the selected blocks"),
                              ("gates", "gate values per branch")):
            src = f["files"][kind]
            note = f.get("notes", {}).get(kind, "")
            parts.append(f"<figure><a href='{e(src)}'><img src='{e(src)}' alt='{kind}' loading='lazy'></a>"
                         f"<figcaption>{e(caption)}{': ' + e(note) if note else ''}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
