"""FlexAttention itself (compiled, CPU forward) consuming the BlockMasks the flex backend builds
in the same graph, against the dense backend of the same mask_mods.

CPU FlexAttention has no backward, so this covers the selected and sliding branches in
inference, with and without documents, query splits and one-position tiles; the GPU path (all
branches, gradients) is checked by tests/test_gpu.py and tools/check_gpu.py.
"""

import dataclasses

import pytest
import torch

from masks import pack_gqa
from nsa_flex import NSAConfig
from nsa_flex import operator as op
from nsa_flex.backends import effective_splits
from nsa_flex.kernels import KernelConfig, flex_kernel


def _compiled_matches_dense(cfg, B, T, Hq, Hkv, seed, docs=False, **tiles):
    """Selected and sliding branches: compiled FlexAttention (CPU forward, the flex backend's
    BlockMasks, ``tiles`` replacing fields of its selected/sliding FlexTiles) against the dense
    backend."""
    G, D = Hq // Hkv, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    d = None
    pos = torch.arange(T)
    if docs:
        cuts = torch.randint(1, T, (B, 3), generator=g)
        ids = (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1)
        d = op.Documents.of(ids, cfg)
        pos = (torch.arange(T) - d.start)[:, None]
    Ts = cfg.num_sel_blocks(T)
    idx = torch.randint(-1, Ts, (B, Hkv, T, cfg.sel_topn), generator=g).int()
    cap = pos[..., None] if pos.dim() == 1 else pos[..., None]
    idx = torch.where(idx * cfg.sel_block <= cap, idx, -1)           # candidates only
    idx = torch.sort(idx, -1).values                                 # distinct, as top-n gives
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    qp = pack_gqa(q, Hkv)
    scale = D ** -0.5
    flex = flex_kernel(torch.float32, D, D, cfg)
    flex = flex.replace(slc=dataclasses.replace(flex.slc, **tiles.get("slc", {})),
                        swa=dataclasses.replace(flex.swa, **tiles.get("swa", {})))
    dense = KernelConfig("dense")

    def run(kernel):
        return (op.selected_branch(qp, k, v, idx, cfg, G, scale, kernel, d),
                op.sliding_branch(qp, k, v, cfg, G, scale, kernel, d))

    with torch.no_grad():
        want = run(dense)
        torch._dynamo.reset()
        got = torch.compile(lambda: run(flex), fullgraph=True, dynamic=False)()
        torch._dynamo.reset()
    for name, a, b in zip(("selected", "sliding"), got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name


@pytest.mark.parametrize("T,Hq,Hkv,lp,B", [(173, 16, 1, 16, 1), (150, 3, 3, 48, 2), (130, 6, 2, 24, 1)])
def test_compiled_flex_matches_dense(T, Hq, Hkv, lp, B):
    """The defaults (16-row selected tiles, narrow lists), G of 16, 1 and 3, blocks aligned
    and not aligned (l' = 24, 48) to the 16-key tiles."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=lp, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, B, T, Hq, Hkv, seed=T)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("docs", [False, True])
def test_query_splits_and_one_position_tiles_match_dense(batch, docs):
    """Selected branch with one-position query tiles (G = 16 rows) and query splits, sliding
    branch with query splits: at batch 1 the chunks share k/v by broadcast (the queries a
    strided view), at batch 2 each chunk gets a copy; with documents the masks read them."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    _compiled_matches_dense(cfg, batch, 256, 16, 1, seed=5, docs=docs,
                            slc={"q_splits": 4}, swa={"q_splits": 2, "q_block": 64, "kv_block": 64,
                                                     "fwd": (32, 32, 4, 2)})


def test_effective_splits():
    assert effective_splits(8, 3 * 128, 128) == 3
    assert effective_splits(4, 100, 128) == 1


def test_compressed_branch_with_query_splits_eager_flex_matches_dense():
    """The compressed branch's output and LSE through split queries (eager FlexAttention, which
    evaluates the mask_mod densely), with and without documents."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_topn=3, window=40)
    T, Hq, Hkv, D = 256, 8, 2, 16
    G = Hq // Hkv
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, T, Hq, D, generator=g)
    qp = pack_gqa(q, Hkv)
    flex = flex_kernel(torch.float32, D, D, cfg)
    flex = flex.replace(cmp=dataclasses.replace(flex.cmp, q_splits=4))
    for docs in (None, torch.tensor([[0] * 100 + [1] * 5 + [2] * 151])):
        d = None if docs is None else op.Documents.of(docs, cfg)
        Tc = op.num_cmp_slots(cfg, T, docs is not None)
        kc, vc = (torch.randn(1, Tc, Hkv, D, generator=g) for _ in range(2))
        with torch.no_grad():
            o0, l0 = op.compressed_branch(qp, kc, vc, cfg, G, D ** -0.5, KernelConfig("dense"), d)
            o1, l1 = op.compressed_branch(qp, kc, vc, cfg, G, D ** -0.5, flex, d)
        rows = torch.isfinite(l0)
        assert torch.equal(rows, torch.isfinite(l1))
        assert ((o1 - o0).norm() / o0.norm()).item() < 1e-5
        assert (l1[rows] - l0[rows]).abs().max().item() < 1e-4


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
    from masks import dense_mask, sliding_window_mask, sliding_window_tiles
    from nsa_flex.backends import split_mask_mod, tiled_block_mask

    from masks import tile_keys, tile_positions

    B, H, T, G, qb, kb = 2, 3, 96, 4, 16, 16
    Lq = T * G
    any_, all_ = sliding_window_tiles(40, *tile_positions(Lq, qb, G), *tile_keys(T, kb))
    mm = sliding_window_mask(40, G)
    bm = tiled_block_mask(any_, all_, mm, B, Lq, T, qb, kb, S)
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
