"""FlexAttention itself (compiled, CPU forward) consuming the BlockMasks the operator builds in
the same graph, against the dense path of the same mask_mods.

CPU FlexAttention has no backward and no LSE, so this covers the selected and sliding branches
in inference; the GPU path (all branches, gradients) is checked by tools/check_gpu.py.
"""

import pytest
import torch

from masks import pack_gqa
from nsa_flex import NSAConfig
from nsa_flex import operator as op
from torch._inductor.exc import InductorError


# The cases run in one process: the second compile sees changed shapes and ints (automatic
# dynamic shapes), which once lowered a bitwise SymInt expression to a float index. The generic
# selected BlockMask with 128-row tiles here; the GPU defaults (small tiles, narrow lists) below.
@pytest.mark.parametrize("T,Hq,Hkv,lp", [(173, 16, 1, 16), (150, 3, 3, 48)])
def test_compiled_flex_matches_dense(T, Hq, Hkv, lp):
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=lp, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, 1, T, Hq, Hkv, seed=T, reset=False, SEL_Q_BLOCK=None, SEL_NARROW_LISTS=0)


@pytest.mark.xfail(strict=True, raises=InductorError,
                   reason="torch's CPU FlexAttention template (2.13) emits C++ naming an undeclared "
                          "cur_qSplitSize<N> when a dynamic-shape recompile meets the small "
                          "selected tiles with narrow lists (the GPU defaults); each shape alone "
                          "compiles and matches, and the operator's own compile is static")
@pytest.mark.parametrize("sel_q_block", [64, 16])
def test_compiled_flex_defaults_dynamic_recompile(sel_q_block):
    torch._dynamo.reset()
    try:
        for T, Hq, Hkv, lp in [(173, 16, 1, 16), (150, 3, 3, 48)]:
            cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=lp, sel_topn=3, window=40)
            _compiled_matches_dense(cfg, 1, T, Hq, Hkv, seed=T, reset=False, SEL_Q_BLOCK=sel_q_block,
                                    SEL_NARROW_LISTS=1)
    finally:
        torch._dynamo.reset()


def _compiled_matches_dense(cfg, B, T, Hq, Hkv, seed, reset=True, **tune):
    """Selected and sliding branches: compiled FlexAttention (CPU forward, with the tuning
    knobs ``tune`` set while compiling) against the dense path. ``reset``: compile afresh when
    knobs are given (else a recompile of the previous call's graph, with dynamic shapes)."""
    G, D = Hq // Hkv, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    Ts = cfg.num_sel_blocks(T)
    idx = torch.randint(-1, Ts, (B, Hkv, T, cfg.sel_topn), generator=g).int()
    idx = torch.where(idx * cfg.sel_block <= torch.arange(T)[:, None], idx, -1)   # candidates only
    idx = torch.sort(idx, -1).values                                 # distinct, as top-n gives
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    qp = pack_gqa(q, Hkv)
    scale = D ** -0.5

    def run(use_flex):
        return (op.selected_branch(qp, k, v, idx, cfg, G, scale, use_flex),
                op.sliding_branch(qp, k, v, cfg, G, scale, use_flex))

    with torch.no_grad():
        want = run(False)
        with _tuned(**tune):
            if tune and reset:
                torch._dynamo.reset()
            got = torch.compile(lambda: run(True), fullgraph=True)()
    if tune and reset:
        torch._dynamo.reset()
    for name, a, b in zip(("selected", "sliding"), got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name


def _tuned(**kw):
    """Set nsa_flex.tuning values for one test, restoring them after."""
    import contextlib

    from nsa_flex import tuning

    @contextlib.contextmanager
    def ctx():
        old = {k: getattr(tuning, k) for k in kw}
        for k, v in kw.items():
            setattr(tuning, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(tuning, k, v)
    return ctx()


@pytest.mark.parametrize("narrow", [0, 1])
@pytest.mark.parametrize("batch", [1, 2])
def test_query_splits_and_one_position_tiles_match_dense(batch, narrow):
    """Selected branch with a one-position query tile (G = 16 rows) and query splits, sliding
    branch with query splits: compiled FlexAttention (CPU forward) equals the dense path. At
    batch 1 the chunks share k/v by broadcast; at batch 2 each chunk gets a copy. The selected
    BlockMask from the tiles, and from the block numbers (narrow lists) in the split layout."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, batch, 256, 16, 1, seed=5, SEL_Q_BLOCK=16, SEL_NARROW_LISTS=narrow,
                            SEL_NARROW_Q_LISTS=narrow, Q_SPLITS={"cmp": 4, "slc": 4, "swa": 2})


@pytest.mark.parametrize("causal_only,full_tiles", [(0, 1), (1, 0), (0, 0)])
def test_selected_mask_mod_and_full_tiles_match_dense(causal_only, full_tiles):
    """SEL_CAUSAL_ONLY (causality as the selected mask_mod, no selection table) and
    SEL_FULL_TILES=0 (every listed tile partial, no full lists), each way, with one-position
    tiles and query splits: compiled FlexAttention (CPU forward) equals the dense path of the
    selection table's mask. (The defaults, 1 and 1, run in the test above.)"""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, 2, 256, 16, 1, seed=7, SEL_Q_BLOCK=16, SEL_NARROW_LISTS=1,
                            SEL_CAUSAL_ONLY=causal_only, SEL_FULL_TILES=full_tiles,
                            Q_SPLITS={"cmp": 4, "slc": 4, "swa": 2})


@pytest.mark.parametrize("swa_kv_block", [32, 64])
def test_sliding_kv_tile_matches_dense(swa_kv_block):
    """SWA_KV_BLOCK: the sliding branch in KV tiles of 32 or 64 keys (a window of 40 spans tiles
    partly and wholly), compiled FlexAttention (CPU forward) equals the dense path."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, 1, 256, 16, 1, seed=9, SEL_Q_BLOCK=16, SWA_KV_BLOCK=swa_kv_block)


def test_sliding_kv_tile_reaches_the_branch_call_and_is_checked(monkeypatch):
    """The sliding branch's FlexAttention call gets SWA_KV_BLOCK as its KV tile (KV_BLOCK when
    None); another size is refused before any compute, naming the value and the sizes allowed."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    qp, k = torch.zeros(1, 1, 64, 16), torch.zeros(1, 4, 1, 16)
    seen = []
    real = op.attend
    monkeypatch.setattr(op, "attend", lambda *a, **kw: seen.append(kw["kv_block"]) or real(*a, **kw))
    for tile in (None, 64, 32):
        with _tuned(SWA_KV_BLOCK=tile):
            op.sliding_branch(qp, k, k, cfg, 16, 0.25, False)
    assert seen == [op.tuning.KV_BLOCK, 64, 32]
    with _tuned(SWA_KV_BLOCK=48), pytest.raises(ValueError, match="SWA_KV_BLOCK=48.*16, 32, 64, 128"):
        op.sliding_branch(qp, k, k, cfg, 16, 0.25, False)
    assert len(seen) == 3


def test_query_splits_as_views_match_dense():
    """SPLIT_VIEWS: the split queries as a strided view (batch 1), compiled FlexAttention (CPU
    forward) equals the dense path."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, 1, 256, 16, 1, seed=6, SEL_Q_BLOCK=16, SPLIT_VIEWS=1,
                            Q_SPLITS={"cmp": 4, "slc": 4, "swa": 2})


def test_selected_as_forced_plus_rest_eager_flex_matches_dense():
    """The selected branch as two FlexAttention calls (forced blocks with query splits, the
    rest) merged through their LSE, against the dense one-call path. Eager FlexAttention: the
    compiled CPU kernel returns no LSE (the forced mask's tiles are checked in test_masks)."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=4, n_init=1, n_local=2, window=40)
    T, Hq, Hkv, D = 256, 8, 2, 16
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    idx = torch.randint(-1, cfg.num_sel_blocks(T), (1, Hkv, T, cfg.sel_topn), generator=g).int()
    idx = torch.where(idx * cfg.sel_block <= torch.arange(T)[:, None], idx, -1)
    cur = (torch.arange(T) // cfg.sel_block).int()        # the forced blocks are always selected
    idx[..., 0], idx[..., 1] = 0, cur
    idx[..., 2] = torch.where(cur > 1, cur - 1, -1)
    idx[..., 3] = torch.where((idx[..., 3] > 0) & (idx[..., 3] < cur - 1), idx[..., 3], -1)
    qp = pack_gqa(q, Hkv)
    with torch.no_grad():
        want = op.selected_branch(qp, k, v, idx, cfg, Hq // Hkv, D ** -0.5, False)
        with _tuned(SEL_FORCED_STATIC=1, Q_SPLITS={"cmp": 1, "slc": 1, "swa": 1, "forced": 4}):
            got = op.selected_branch(qp, k, v, idx, cfg, Hq // Hkv, D ** -0.5, True)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("sel_q_block", [None, 64, 16])
def test_narrow_selected_lists_match_dense(sel_q_block):
    """The selected BlockMask built with narrow KV lists (masks/selected_lists.py), consumed by
    compiled FlexAttention (CPU forward), equals the dense path."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, 2, 256, 16, 1, seed=11, SEL_NARROW_LISTS=1, SEL_Q_BLOCK=sel_q_block)


def test_split_rows_and_split_mask_mod():
    """Chunk b % S of batch b // S sees exactly the rows of the whole mask it came from."""
    from masks import compressed_mask, dense_mask
    from nsa_flex.backends import effective_splits, merge_rows, split_mask_mod, split_rows

    x = torch.randn(2, 3, 64, 5)
    assert torch.equal(merge_rows(split_rows(x, 4), 4), x)
    x1 = x[:1]                                   # batch 1: the view variant, no copy either way
    v = split_rows(x1, 4, view=True)
    assert torch.equal(v, split_rows(x1, 4)) and v.data_ptr() == x1.data_ptr()
    assert torch.equal(merge_rows(v, 4), x1) and merge_rows(v, 4).data_ptr() == x1.data_ptr()
    assert torch.equal(merge_rows(split_rows(x1, 4), 4), x1)
    assert torch.equal(split_rows(x, 4, view=True), split_rows(x, 4))   # batch 2: a copy
    assert split_rows(x, 4)[1 * 2 + 1, 2, 3].equal(x[1, 2, 16 + 3])  # chunk 1 of batch 1, row 3
    assert split_rows(x, 4)[3 * 2 + 0, 1, 0].equal(x[0, 1, 48])      # chunk 3 of batch 0, row 0
    mm = compressed_mask(16, 8, 4)
    whole = dense_mask(mm, 2, 3, 64, 10, "cpu")
    parts = dense_mask(split_mask_mod(mm, 4, 16, 2), 8, 3, 16, 10, "cpu")
    assert torch.equal(merge_rows(parts, 4), whole)
    assert effective_splits(8, 64 * 128, 128) == 8
    assert effective_splits(8, 3 * 128, 128) == 3
    assert effective_splits(4, 100, 128) == 1


def test_compressed_branch_with_query_splits_eager_flex_matches_dense():
    """The compressed branch's output and LSE through split queries (eager FlexAttention, which
    evaluates the mask_mod densely; the tiles are covered by the compiled tests above)."""
    from nsa_flex import tuning

    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    T, Hq, Hkv, D = 256, 8, 2, 16
    G = Hq // Hkv
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, T, Hq, D, generator=g)
    Tc = cfg.num_cmp_blocks(T)
    kc, vc = (torch.randn(1, Tc, Hkv, D, generator=g) for _ in range(2))
    qp = pack_gqa(q, Hkv)
    default = dict(tuning.Q_SPLITS)
    with torch.no_grad():
        o0, l0 = op.compressed_branch(qp, kc, vc, cfg, G, D ** -0.5, False)
        with _tuned(Q_SPLITS={"cmp": 4, "slc": 1, "swa": 1}):
            o1, l1 = op.compressed_branch(qp, kc, vc, cfg, G, D ** -0.5, True)
    rows = torch.isfinite(l0)
    assert torch.equal(rows, torch.isfinite(l1))
    assert ((o1 - o0).norm() / o0.norm()).item() < 1e-5
    assert (l1[rows] - l0[rows]).abs().max().item() < 1e-4
    assert tuning.Q_SPLITS == default


def test_fixed_layout_gives_the_same_lists_row_major():
    """backends.fixed_layout: FlexAttention's kernels read a list at (b·H + h)·stride(1) and step
    by 1 along the last dimension. Inductor may lay out a list (a size-1 head dimension with any
    stride; here: transposed lists) as it likes inside a graph; the pinned copies are row-major with the same values, and the mask keeps its mask_mod, sizes
    and block sizes."""
    from torch.nn.attention.flex_attention import BlockMask

    from masks import block_mask_from_tiles, split_rows
    from masks.causal import causal_mask
    from nsa_flex.backends import _LISTS, fixed_layout

    def transposed(x):                            # same values, the strides of a transpose
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)

    tri = torch.tril(torch.ones(6, 4, dtype=torch.bool))
    for B, H, S in ((1, 3, 1), (2, 1, 3)):        # heads; and query splits over one head
        any_ = split_rows(tri.expand(B, H, 6, 4), S) if S > 1 else tri
        bm = block_mask_from_tiles(any_, any_, causal_mask(), 6 * 64 // S, 4 * 64, 64, 64, B * S, H)
        bm = BlockMask(bm.seq_lengths, *(transposed(getattr(bm, n)) if n.endswith("indices") else
                                         getattr(bm, n) for n in _LISTS),
                       BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod)
        assert not bm.q_indices.is_contiguous()
        got = fixed_layout(bm)
        for n in _LISTS:
            a, b = getattr(bm, n), getattr(got, n)
            assert torch.equal(a, b) and b.is_contiguous(), n
            assert b.stride(0) == H * b.stride(1) and b.stride(-1) == 1, n
        assert got.mask_mod is bm.mask_mod and got.BLOCK_SIZE == bm.BLOCK_SIZE
        assert got.seq_lengths == bm.seq_lengths
        fwd = fixed_layout(bm, backward=False)      # the query lists untouched, the KV ones pinned
        assert all(getattr(fwd, n) is getattr(bm, n) for n in _LISTS[4:])
        assert all(torch.equal(getattr(fwd, n), getattr(bm, n)) for n in _LISTS[:4])


def test_contiguous_copies_pins_row_major_strides_from_any_layout():
    """The op behind fixed_layout: from the layout seen on the GPU (a size-1 head dimension with
    stride 8192, which ``contiguous()`` would keep) and from a transposed one, row-major copies
    with the same values; torch's own checks of a custom op (fake vs real) pass; lists that a
    mask lacks stay None."""
    from nsa_flex.backends import _LISTS, contiguous_copies, fixed_layout

    base = torch.arange(8 * 64 * 16, dtype=torch.int32)
    odd = base.as_strided((8, 1, 64, 16), (1024, 8192, 16, 1))
    assert odd.is_contiguous()                                  # why clone, not contiguous()
    tr = base[: 2 * 3 * 16 * 5].view(2, 3, 5, 16).transpose(-1, -2)
    got = contiguous_copies([odd, tr])
    assert [g.stride() for g in got] == [(1024, 1024, 16, 1), (240, 80, 5, 1)]
    assert torch.equal(got[0], odd) and torch.equal(got[1], tr)
    torch.library.opcheck(contiguous_copies, ([odd, tr],))
    from torch.nn.attention.flex_attention import BlockMask

    kv_num = torch.ones(1, 1, 2, dtype=torch.int32)
    kv_idx = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=64, compute_q_blocks=False)
    out = fixed_layout(bm)
    assert all(getattr(out, n) is None for n in _LISTS if getattr(bm, n) is None)
    assert torch.equal(out.kv_indices, kv_idx)


@pytest.mark.parametrize("B,H", [(2, 2), (1, 1)])
def test_fixed_layout_compiles_inside_a_graph(B, H):
    """The pinning op (a custom op) traces under torch.compile(fullgraph=True) and gives the
    eager lists, row-major, with their shapes (also where batch and heads are 1, as for the
    sliding branch's lists)."""
    from masks import block_mask_from_tiles
    from masks.causal import causal_mask
    from nsa_flex.backends import _LISTS, fixed_layout

    def lists(tiles):
        bm = block_mask_from_tiles(tiles, tiles, causal_mask(), 384, 256, 64, 64, B, H)
        bm = fixed_layout(bm)
        return [getattr(bm, n) for n in _LISTS]

    tiles = torch.rand(B, H, 6, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    want = lists(tiles)
    torch._dynamo.reset()
    got = torch.compile(lists, fullgraph=True)(tiles)
    assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(want, got))
    assert all(b.is_contiguous() and b.stride(-1) == 1 and b.stride(0) == b[0].numel() for b in got)


@pytest.mark.parametrize("S", [1, 2])
def test_static_masks_have_one_head_that_covers_every_head(S):
    """A mask of positions (the sliding window here) gives a BlockMask of one head, which
    FlexAttention broadcasts over the heads: its tiles are exactly those where the mask_mod,
    evaluated densely for every head, has a key (full: all keys), per query split."""
    import functools
    from masks import dense_mask, sliding_window_mask, sliding_window_tiles
    from nsa_flex.backends import split_mask_mod, tiled_block_mask

    B, H, T, G, qb, kb = 2, 3, 96, 4, 16, 16
    Lq = T * G
    tiles = op._static_tiles(functools.partial(sliding_window_tiles, 40), Lq, G, T, "cpu")
    mm = sliding_window_mask(40, G)
    bm = tiled_block_mask(tiles, mm, B, H, Lq, T, qb, kb, S)
    assert bm.kv_indices.shape[:2] == (B * S, 1) and bm.q_indices.shape[:2] == (B * S, 1)
    want = dense_mask(split_mask_mod(mm, S, Lq // S, B) if S > 1 else mm, B * S, H, Lq // S, T, "cpu")
    per_tile = want.unflatten(2, (-1, qb)).unflatten(4, (-1, kb))          # [b, h, Mq, qb, Nkv, kb]
    listed, full = per_tile.any(5).any(3), per_tile.all(5).all(3)
    got = bm.to_dense().bool().expand(B * S, H, -1, -1)                    # partial + full tiles
    got_full = torch.zeros_like(got)
    for m in range(got.shape[2]):
        n = bm.full_kv_num_blocks[:, 0, m]
        for b in range(B * S):
            got_full[b, :, m, bm.full_kv_indices[b, 0, m, :n[b]]] = True
    assert torch.equal(got, listed) and torch.equal(got_full, full)
