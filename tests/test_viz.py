"""The mask visualiser (nsa_flex.viz, tools/visualize_masks.py), on CPU.

The command line end to end on the debug flavor; a picture read back pixel by pixel against a
hand-made selection; the analysis against the operator's own results; the projections it
recomputes against what the model feeds the operator; checkpoints; inputs; error messages.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nsa_flex.kernels import KernelConfig

pytest.importorskip("matplotlib")
pytest.importorskip("torchtitan")

from matplotlib.image import imread  # noqa: E402

from masks import compressed_mask, dense_mask, selected_mask, selection_table  # noqa: E402
from masks.readback import computed_mask  # noqa: E402
from nsa_flex import NSAConfig  # noqa: E402
from nsa_flex import operator as op  # noqa: E402
from nsa_flex.selection import top_n  # noqa: E402
from nsa_flex.viz import analysis as A  # noqa: E402
from nsa_flex.viz import figures as F  # noqa: E402
from nsa_flex.viz import model_io as M  # noqa: E402
from nsa_flex.viz.cli import main, run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_debug_writes_index_pngs_and_stats(tmp_path):
    out = tmp_path / "viz"
    proc = subprocess.run([sys.executable, "tools/visualize_masks.py", "--flavor", "debug",
                           "--seq-len", "1024", "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[viz" in proc.stdout and "layer 1 KV head 1" in proc.stdout  # progress
    index = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected = {f"L{l:02d}_H{h}_{k}.png" for l in (0, 1) for h in (0, 1)
                for k in ("branches", "tiles", "scores", "gates")} | {"sparsity.png"}
    assert set(pngs) == expected
    for name in expected:
        assert f"src='{name}'" in index
        assert imread(out / name).shape[0] > 100
    assert "stats.csv" in index and "full resolution" in index
    lines = (out / "stats.csv").read_text().splitlines()
    assert lines[0].startswith("layer,kv_head,scope") and len(lines) == 1 + 4
    import json

    recs = json.loads((out / "stats.json").read_text())["records"]
    for r in recs:
        assert r["pairs_missed"] == 0 and r["full_tiles_not_full"] == 0
        assert 0 < r["frac_swa"] <= r["frac_union"] <= 1 and 0 < r["frac_slc"] <= r["frac_union"]
        assert 1 <= r["sel_share_2"] <= 2 and 1 <= r["sel_share_8"] <= 8
    assert "sel_share_4" in lines[0] and "selections shared" in proc.stdout


def test_selection_sharing_counts_distinct_blocks_of_runs():
    from nsa_flex.viz.analysis import selection_sharing

    same = torch.tensor([[0, 3, 5, -1]] * 8)                 # every position: blocks 0, 3, 5
    assert selection_sharing(same) == {"sel_share_2": 2.0, "sel_share_4": 4.0, "sel_share_8": 8.0}
    apart = torch.arange(16).view(8, 2)                       # no block twice
    assert selection_sharing(apart) == {"sel_share_2": 1.0, "sel_share_4": 1.0, "sel_share_8": 1.0}
    # positions 0-1 share one of two blocks (3 distinct of 4), 2-3 share none; -1 is no block
    x = torch.tensor([[0, 1], [1, 2], [4, -1], [5, -1]])
    assert selection_sharing(x, runs=(2,)) == {"sel_share_2": 6 / 5}
    assert selection_sharing(x, 1, 3, runs=(2,)) == {"sel_share_2": 3 / 3}   # positions 1-2
    assert math.isnan(selection_sharing(x, runs=(8,))["sel_share_8"])      # no whole run of 8
    # brute force on random selections: runs' blocks one by one over their distinct blocks
    g = torch.Generator().manual_seed(0)
    r = torch.randint(-1, 12, (37, 5), generator=g)
    got = selection_sharing(r, 3, 37, runs=(4,))["sel_share_4"]
    runs = [r[a:a + 4] for a in range(3, 3 + (34 // 4) * 4, 4)]
    want = sum(int((u >= 0).sum()) for u in runs) / sum(len(set(u[u >= 0].tolist())) for u in runs)
    assert abs(got - want) < 1e-12


def test_long_input_is_cropped_and_pooled_and_says_so(tmp_path):
    res = run(["--flavor", "debug", "--seq-len", "2048", "--layers", "1", "--heads", "0",
               "--query-range=-1536:", "--max-pixels", "256", "--out", str(tmp_path), "--jobs", "1",
               "--input", "needle"])
    fig = res["figures"][0]
    assert "max-pooled 6×8 per pixel" in fig["notes"]["branches"]  # 1536 rows, 2048 keys -> 256
    assert "cropped to the query range" in fig["notes"]["branches"]
    index = (tmp_path / "index.html").read_text()
    assert "max-pooled" in index and "cropped to queries 512–2047" in index
    assert "needle in a haystack" in index
    img = imread(tmp_path / "L01_H0_branches.png")
    assert img.shape[0] < 1800 and img.shape[1] < 1800  # 4 panels of 256 cells, not 2048
    scopes = {r["scope"] for r in res["records"]}
    assert scopes == {"sequence", "query_range"}


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such file or directory"),
    (["--layers", "5"], "layer 5 does not exist: flavor 'debug' has 2 layers (0–1)"),
    (["--layers", "0,x"], "expected 'all' or numbers"),
    (["--heads", "2"], "KV head 2 does not exist: flavor 'debug' has 2 KV heads (0–1)"),
    (["--flavor", "huge"], "unknown flavor 'huge'"),
    (["--query-range", "900:100"], "is empty"),
    (["--nsa", "window"], "expected KEY=VALUE"),
])
def test_clear_errors(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_checkpoint_folder_without_checkpoints_is_an_error(tmp_path, capsys):
    (tmp_path / "checkpoint").mkdir()
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no DCP checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a picture against a known selection

CFG = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=4, n_init=1, n_local=2, window=48)


def hand_made_selection(T: int, cfg: NSAConfig) -> torch.Tensor:
    """[T, n]: block 0, the current and previous block, and one block chosen by a formula."""
    idx = torch.full((T, cfg.sel_topn), -1, dtype=torch.int32)
    for t in range(T):
        cur = t // cfg.sel_block
        blocks = sorted({0, cur, max(cur - 1, 0), (3 * t // 7) % (cur + 1)})
        idx[t, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return idx


def read_cells(png: Path, rect, rows: int, cols: int) -> np.ndarray:
    """Brightness [rows, cols] at each cell's centre of the panel at rect (x, y, w, h)."""
    img = imread(png)[..., :3]
    x, y, w, h = rect
    ys = (y + (np.arange(rows) + 0.5) * h / rows).astype(int)
    xs = (x + (np.arange(cols) + 0.5) * w / cols).astype(int)
    return img[ys][:, xs].mean(-1)


@pytest.mark.parametrize("max_px", [256, 64])
def test_selected_pattern_pixels_match_a_known_selection(tmp_path, max_px):
    T = 256
    idx = hand_made_selection(T, CFG)
    p = A.pooling_for(0, T, 0, T, max_px)
    imgs = A.branch_images(idx, CFG, T, p)
    pinfo = dict(r0=p.r0, c0=p.c0, fr=p.fr, fc=p.fc, shape=p.shape, note=p.describe())
    cfg_d = dict(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=4, window=48)
    png = tmp_path / "sel.png"
    rects = F.render_branches(png, {k: v.numpy() for k, v in imgs.items()}, pinfo, "test", cfg_d)

    # expected: (t, s) lit iff s's block is in idx[t] and s <= t, then max-pooled
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    table = torch.zeros(T, T // 32, dtype=torch.bool)
    for row in range(T):
        table[row, idx[row][idx[row] >= 0].long()] = True
    dense = table[t, s // 32] & (s <= t)
    expected = A.pool_max(dense, p.fr, p.fc).numpy()
    R, C = expected.shape
    assert (R, C) == (T // p.fr, T // p.fc)
    bright = read_cells(png, rects["slc"], R, C)
    assert (bright[expected] > 0.5).all(), "a selected cell is dark"
    assert (bright[~expected] < 0.25).all(), "an unselected cell is lit"
    assert expected.mean() > 0.05 and (~expected).mean() > 0.3  # both kinds were checked
    # the sliding-window panel likewise
    win = A.pool_max((s <= t) & (s > t - 48), p.fr, p.fc).numpy()
    bw = read_cells(png, rects["swa"], R, C)
    assert (bw[win] > 0.4).all() and (bw[~win] < 0.25).all()


# ---------------------------------------------------------------------------------------------
# the analysis against the operator


def random_head(T=300, Hq=4, Hkv=2, Dk=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tc = CFG.num_cmp_blocks(T)
    q = torch.randn(1, T, Hq, Dk, generator=g)
    k = torch.randn(1, T, Hkv, Dk, generator=g)
    v = torch.randn(1, T, Hkv, 8, generator=g)
    kc = torch.randn(1, Tc, Hkv, Dk, generator=g) * 2
    vc = torch.randn(1, Tc, Hkv, 8, generator=g)
    gates = torch.rand(1, T, Hq, 3, generator=g)
    return q, k, v, kc, vc, gates


def test_analysis_reproduces_the_operator():
    T, G = 300, 2
    q, k, v, kc, vc, gates = random_head(T)
    dense = KernelConfig("dense")
    _, idx_op = op._nsa(q, k, v, kc, vc, gates, CFG, None, None, True, dense)  # [1,T,Hkv,n]
    qp_all = op.pack_gqa(q, 2)
    _, lse_op = op.compressed_branch(qp_all, kc, vc, CFG, G, CFG.softmax_scale(16), dense)
    for h in range(2):
        hi = A.head_inputs(q, kc, gates, CFG, h)
        lse = A.compressed_lse(hi.qp, hi.k_cmp, CFG, G, hi.scale, max_elems=1000)  # many chunks
        torch.testing.assert_close(lse, lse_op[:, h:h + 1], rtol=1e-5, atol=1e-5)
        an = A.analyse_head(hi)
        assert torch.equal(an.idx.sort(-1).values, idx_op[0, :, h].sort(-1).values)
        # the scores, topped the operator's way, give the same selection
        p = A.selection_scores(hi.qp, hi.k_cmp, an.lse, CFG, hi.scale, G, 100, 260)
        again = top_n(p, torch.arange(100, 260), CFG)[0, 0]
        assert torch.equal(again.sort(-1).values, an.idx[100:260].sort(-1).values)
        # per-position counts against dense masks
        table4 = selection_table(an.idx[None, None], CFG.num_sel_blocks(T))
        sel = dense_mask(selected_mask(table4, 32, 1), 1, 1, T, T)[0, 0]
        assert torch.equal(an.counts["slc"], sel.sum(-1))
        vis = dense_mask(compressed_mask(16, 8, 1), 1, 1, T, CFG.num_cmp_blocks(T))[0, 0]
        assert torch.equal(an.counts["cmp_keys"], vis.sum(-1))
        t = torch.arange(T)
        assert torch.equal(an.counts["swa"], torch.clamp(t + 1, max=48))
        assert torch.equal(an.counts["causal"], t + 1)
        # the tiles: nothing needed is skipped, full tiles are wholly needed, and the pairs
        # FlexAttention attends with this BlockMask are exactly the needed ones
        tw = an.tiles
        tot = tw.totals()
        assert tot["pairs_missed"] == 0 and tot["full_tiles_not_full"] == 0
        bm = A.selected_block_mask(an.idx[None, None], table4, CFG, G)
        assert tot["pairs_needed"] == int(computed_mask(bm).sum()) == G * int(an.counts["slc"].sum())
        assert tot["pairs_computed"] == int(tw.area[tw.states > 0].sum())
        assert tot["tiles_full"] + tot["tiles_partial"] + tot["tiles_skipped"] == tw.states.numel()


def test_pooled_images_equal_pooled_dense_masks():
    T = 300
    q, k, v, kc, vc, gates = random_head(T, seed=3)
    hi = A.head_inputs(q, kc, gates, CFG, 1)
    an = A.analyse_head(hi)
    p = A.pooling_for(40, 290, 0, 290, 64)
    imgs = A.branch_images(an.idx, CFG, T, p)
    t = torch.arange(40, 290)[:, None]
    s = torch.arange(0, 290)[None, :]
    table4 = selection_table(an.idx[None, None], CFG.num_sel_blocks(T))
    sel = selected_mask(table4, 32, 1)(0, 0, t, s)
    assert torch.equal(imgs["slc"], A.pool_max(sel, p.fr, p.fc))
    assert torch.equal(imgs["causal"], A.pool_max(s <= t, p.fr, p.fc))


# ---------------------------------------------------------------------------------------------
# the model side


@pytest.fixture(scope="module")
def debug_model():
    args = M.model_args("debug", {}, 256, vocab_size=512)
    return M.build_model(args, torch.device("cpu"), torch.float32, seed=0)


def test_recomputed_tensors_are_what_the_model_feeds_the_operator(debug_model, monkeypatch):
    import nsa_flex.model.model as mm

    seen = []
    real = mm.nsa_attention

    def spy(q, k, v, k_cmp, v_cmp, gates, cfg, **kw):
        seen.append(dict(q=q, k=k, k_cmp=k_cmp, gates=gates))
        return real(q, k, v, k_cmp, v_cmp, gates, cfg, **kw)

    monkeypatch.setattr(mm, "nsa_attention", spy)
    tokens = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    captured = M.capture_attention_inputs(debug_model, tokens, [0, 1], stop=False)
    assert len(seen) == 2
    for i in (0, 1):
        x, freqs, pos = captured[i]
        mine = M.attention_tensors(debug_model.layers[str(i)].attention, x, freqs, pos)
        for name in ("q", "k", "k_cmp", "gates"):
            torch.testing.assert_close(mine[name], seen[i][name], rtol=0, atol=0)


def test_capture_stops_after_the_last_requested_layer(debug_model):
    tokens = torch.zeros(1, 64, dtype=torch.long)
    captured = M.capture_attention_inputs(debug_model, tokens, [0])
    assert set(captured) == {0}


def test_checkpoint_round_trip(tmp_path, debug_model):
    import warnings

    import torch.distributed.checkpoint as dcp

    step = tmp_path / "checkpoint" / "step-7"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(debug_model.state_dict()), checkpoint_id=str(step))  # torchtitan's flat layout
    for given in (tmp_path, tmp_path / "checkpoint", step):
        assert M.resolve_checkpoint(given) == step
    prefix, shapes = M.checkpoint_model_keys(step)
    assert prefix == "" and tuple(shapes["tok_embeddings.weight"]) == (512, 128)
    other = M.build_model(M.model_args("debug", {}, 256, vocab_size=512), torch.device("cpu"),
                          torch.float32, seed=5, checkpoint=step, ckpt_layout=(prefix, shapes))
    for (n, a), b in zip(debug_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    # a model that does not fit the checkpoint is refused with the reason
    for nsa, message in (({"cmp_hidden": 64}, "does not fit this model"),
                         ({"kv_mode": "shared"}, "weights this model lacks.*kv_mode='separate'")):
        with pytest.raises(M.VizError, match=message):
            M.build_model(M.model_args("debug", nsa, 256, vocab_size=512), torch.device("cpu"),
                          torch.float32, checkpoint=step, ckpt_layout=(prefix, shapes))


def test_needle_input():
    from nsa_flex.data.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    seq = M.make_input("needle", tok, 600, needle_depth=0.5)
    assert len(seq.tokens) == 600
    a, b = seq.needle
    assert 250 < a < 350
    assert "secret passkey is" in tok.decode(seq.tokens[a:b])
    assert tok.decode(seq.tokens[-12:]).rstrip().endswith("passkey is")


@pytest.mark.parametrize("G", [1, 4, 16])
def test_tiles_are_the_operators(G):
    """The tiles picture reads the BlockMask the operator's flex backend builds for the selected
    branch (its tile sizes and states), and the pairs it attends are the selection's."""
    from masks.readback import tile_states
    from nsa_flex.kernels import flex_kernel
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    T = 200
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, cfg.num_sel_blocks(T), (1, 1, T, cfg.sel_topn), generator=g)
    idx = torch.where(idx * cfg.sel_block <= torch.arange(T)[:, None], idx, -1).int()
    idx = torch.sort(idx, -1).values
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    table4 = selection_table(idx, cfg.num_sel_blocks(T))
    tiles = flex_kernel(torch.bfloat16, 64, 64, cfg).slc
    mask_mod = op.selected_mask_mod(idx, cfg, G, flex_kernel(torch.bfloat16, 64, 64, cfg))
    ours = op.selected_block_mask_of(idx, mask_mod, cfg, G, tiles)(1)
    viz = A.selected_block_mask(idx, table4, cfg, G, 64)
    assert viz.BLOCK_SIZE == ours.BLOCK_SIZE == (tiles.q_block, tiles.kv_block)
    assert torch.equal(tile_states(viz), tile_states(ours))
    want = dense_mask(selected_mask(table4, cfg.sel_block, G), 1, 1, T * G, T)
    assert torch.equal(computed_mask(viz), want) and torch.equal(computed_mask(ours), want)


def test_documents_analysis_reproduces_the_operator_and_crosses_nothing():
    """With packed documents the analysis takes the operator's selection (each document's own
    block numbering) and no branch reaches a key of another document."""
    T = 300
    q, k, v, _, _, gates = random_head(T)
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 1, 120, 9, 130]))[None]
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(1, T // CFG.cmp_stride, 2, d, generator=g) for d in (16, 8))
    _, idx_op = op._nsa(q, k, v, kc, vc, gates, CFG, None, None, True, KernelConfig("dense"), ids)
    for h in range(2):
        hi = A.head_inputs(q, kc, gates, CFG, h, ids)
        an = A.analyse_head(hi)
        assert torch.equal(an.idx.sort(-1).values, idx_op[0, :, h].sort(-1).values)
        assert an.cross_document == 0
        assert an.tiles.totals()["pairs_missed"] == 0
        # the same analysis without the document mask does cross
        plain = A.analyse_head(A.head_inputs(q, kc[:, :CFG.num_cmp_blocks(T)], gates, CFG, h))
        assert plain.counts["slc"].sum() != an.counts["slc"].sum()


def test_cli_draws_document_boundaries(tmp_path):
    out = tmp_path / "viz"
    proc = subprocess.run([sys.executable, "tools/visualize_masks.py", "--flavor", "debug",
                           "--nsa", "attn_mask_type=block_causal", "--input", "corpus:7",
                           "--seq-len", "800", "--layers", "0", "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert all(r["documents"] > 1 and r["cross_document_pairs"] == 0 for r in stats["records"])
    assert stats["meta"]["documents"].split(",")[0].isdigit()
    assert (out / "L00_H0_branches.png").stat().st_size > 10_000


def test_text_file_input_is_read_and_repeated(tmp_path):
    from nsa_flex.data.tokenizer import load_tokenizer
    from nsa_flex.viz.model_io import make_input
    f = tmp_path / "in.txt"
    f.write_text("def f(x):\n    return x + 1\n")
    tok = load_tokenizer("embedded")
    seq = make_input(str(f), tok, 100)
    assert len(seq.tokens) == 100 and "repeated" in seq.description
    with pytest.raises(ValueError, match="nor an existing text file"):
        make_input(str(tmp_path / "missing.txt"), tok, 100)
