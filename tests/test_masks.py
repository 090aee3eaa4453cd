"""Every BlockMask builder against the spec's token-level mask, written plainly here.

For each builder, the pairs FlexAttention attends — read back from the KV-side lists used by
the forward and from the transposed query-side lists used by the backward, partial tiles through
the mask_mod, full tiles without it — must equal the spec's dense mask, in the packed-GQA layout
(row r = position r // G), for odd T, several G and block sizes.
"""

import itertools

import pytest
import torch

import masks as M
from masks.readback import PARTIAL

SIZES = [(37, 1, 16, 16), (53, 2, 16, 32), (45, 4, 32, 16), (29, 16, 64, 16), (70, 3, 32, 32)]


def spec_rows(T, G):
    """Position of each packed row."""
    return torch.arange(T * G) // G


def check_block_mask(bm, spec):
    assert torch.equal(M.computed_mask(bm), spec), "forward (KV-side) lists differ from the spec"
    assert torch.equal(M.computed_mask(bm, transposed=True), spec), "backward (Q-side) lists differ"


def static(any_all, mask_mod, T, G, QB, KB, kv_len):
    q_lo, q_hi = M.tile_positions(T * G, QB, G)
    k_lo, k_hi = M.tile_keys(kv_len, KB)
    a, al = any_all(q_lo, q_hi, k_lo, k_hi)
    return M.block_mask_from_tiles(a, al, mask_mod, T * G, kv_len, QB, KB, 1, 1)


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("w", [1, 5, 16, 40])
def test_sliding_window(T, G, QB, KB, w):
    t = spec_rows(T, G)[:, None]
    s = torch.arange(T)[None, :]
    spec = ((s <= t) & (s > t - w))[None, None]
    bm = static(lambda *b: M.sliding_window_tiles(w, *b), M.sliding_window_mask(w, G), T, G, QB, KB, T)
    check_block_mask(bm, spec)


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("l,d", [(8, 4), (16, 16), (4, 2)])
def test_compressed_visibility(T, G, QB, KB, l, d):
    Tc = max(0, (T - l) // d + 1)
    spec = torch.tensor([[i * d + l - 1 <= t for i in range(Tc)] for t in spec_rows(T, G).tolist()])
    spec = spec.reshape(T * G, Tc)[None, None]
    bm = static(lambda *b: M.compressed_tiles(l, d, *b), M.compressed_mask(l, d, G), T, G, QB, KB, Tc)
    check_block_mask(bm, spec)


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
def test_causal(T, G, QB, KB):
    spec = (torch.arange(T)[None, :] <= spec_rows(T, G)[:, None])[None, None]
    check_block_mask(static(M.causal_tiles, M.causal_mask(G), T, G, QB, KB, T), spec)


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("lp", [8, 16, 24, 64])
def test_selected_blocks_from_indices(T, G, QB, KB, lp):
    B, H, n = 2, 2, 3
    Ts = -(-T // lp)
    gen = torch.Generator().manual_seed(T * 100 + lp)
    idx = torch.randint(-1, Ts, (B, H, T, n), generator=gen)
    # only blocks a position may select (j·l' ≤ t), as the operator produces
    idx = torch.where(idx * lp <= torch.arange(T)[:, None], idx, -1)
    table = M.selection_table(idx, Ts)
    spec = torch.zeros(B, H, T * G, T, dtype=torch.bool)
    for b, h, r in itertools.product(range(B), range(H), range(T * G)):
        t = r // G
        for j in idx[b, h, t].tolist():
            if j >= 0:
                spec[b, h, r, j * lp: min(t + 1, (j + 1) * lp)] = True
    a, al = M.selected_tiles(table, lp, G, QB, KB)
    bm = M.block_mask_from_tiles(a, al, M.selected_mask(table, lp, G), T * G, T, QB, KB, B, H)
    check_block_mask(bm, spec)
    # the KV list of a query tile is the union of its positions' blocks, nothing more
    states = M.tile_states(bm)
    needed = spec.view(B, H, T * G, T)
    for m in range(states.shape[2]):
        rows = needed[:, :, m * QB:(m + 1) * QB]
        for c in range(states.shape[3]):
            touched = rows[..., c * KB:(c + 1) * KB].any(-1).any(-1)
            assert torch.equal(states[:, :, m, c] > 0, touched)


# one position per query tile (G divisible by QB): the backward's partial lists are narrow too
ONE_POSITION_SIZES = [(37, 16, 16, 16), (45, 32, 16, 16), (53, 16, 16, 32), (29, 4, 4, 16)]


@pytest.mark.parametrize("T,G,QB,KB", SIZES + ONE_POSITION_SIZES)
@pytest.mark.parametrize("lp", [16, 32, 64])
def test_narrow_selected_lists_equal_the_generic_ones(T, G, QB, KB, lp):
    """selected_block_mask (narrow KV lists, sorted pairs for the query side) lists the same
    tiles in the same states as selected_tiles + block_mask_from_tiles, both directions."""
    if lp % KB:
        pytest.skip("the narrow builder needs kv_block | l'")
    B, H, n = 2, 3, 4
    Ts = -(-T // lp)
    gen = torch.Generator().manual_seed(T * 7 + lp)
    idx = torch.randint(-1, Ts, (B, H, T, n), generator=gen)
    idx = torch.where(idx * lp <= torch.arange(T)[:, None], idx, -1)
    idx[1, 2, :, 0] = 0                        # some tiles where every position shares a block
    idx = torch.sort(idx, -1).values           # distinct blocks per position, as top-n gives
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    table = M.selection_table(idx, Ts)
    a, al = M.selected_tiles(table, lp, G, QB, KB)
    mm = M.selected_mask(table, lp, G)
    want = M.block_mask_from_tiles(a, al, mm, T * G, T, QB, KB, B, H)
    got = M.selected_block_mask(idx, lp, G, QB, KB, mm)
    for transposed in (False, True):
        assert torch.equal(M.tile_states(got, transposed), M.tile_states(want, transposed))
    assert got.kv_indices.shape[-1] == positions_per_tile_w(QB, G, n, lp // KB)
    Mq = -(-T * G // QB)
    assert got.q_indices.shape[-1] == Mq
    narrow = M.selected_block_mask(idx, lp, G, QB, KB, mm, narrow_q=True)
    assert narrow.q_indices.shape[-1] == (KB * G // QB if G % QB == 0 else Mq)
    assert narrow.full_q_indices.shape[-1] == Mq
    padded = M.selected_block_mask(idx, lp, G, QB, KB, mm, full_width=True, narrow_q=True)
    assert padded.q_indices.shape[-1] == Mq
    for bm in (got, narrow, padded):
        assert_row_major(bm)
    for bm in (narrow, padded):
        for transposed in (False, True):
            assert torch.equal(M.tile_states(bm, transposed), M.tile_states(want, transposed))
        check_block_mask(bm, M.computed_mask(want))
    check_block_mask(got, M.computed_mask(want))


@pytest.mark.parametrize("T,G,QB,KB", SIZES + ONE_POSITION_SIZES)
@pytest.mark.parametrize("lp", [16, 32])
def test_selected_lists_without_full_tiles(T, G, QB, KB, lp):
    """full_tiles=False: the tiles the default lists, all partial, no full lists; FlexAttention
    computes the same pairs (both directions), the mask_mod evaluated everywhere."""
    if lp % KB:
        pytest.skip("the narrow builder needs kv_block | l'")
    B, H, n = 2, 2, 3
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T + lp)
    table = M.selection_table(idx, Ts)
    mm = M.selected_mask(table, lp, G)
    want = M.selected_block_mask(idx, lp, G, QB, KB, mm)
    got = M.selected_block_mask(idx, lp, G, QB, KB, mm, full_tiles=False, narrow_q=True)
    assert got.full_kv_num_blocks is None and got.full_q_indices is None
    assert got.q_indices.shape[-1] == -(-T * G // QB)     # narrow_q needs full tiles
    for transposed in (False, True):
        st = M.tile_states(want, transposed)
        assert torch.equal(M.tile_states(got, transposed), torch.where(st > 0, PARTIAL, 0).to(st.dtype))
    check_block_mask(got, M.computed_mask(want))
    assert_row_major(got)
    if T * G % (2 * QB) == 0:
        chunks = M.selected_block_mask(idx, lp, G, QB, KB, mm, full_tiles=False, q_splits=2)
        assert chunks.full_q_num_blocks is None and chunks.kv_num_blocks.shape[0] == 2 * B


@pytest.mark.parametrize("T,G,QB,KB", ONE_POSITION_SIZES)
@pytest.mark.parametrize("full_tiles", [True, False])
def test_one_position_tiles_need_only_causality(T, G, QB, KB, full_tiles):
    """With one position per query tile, the narrow lists hold only that position's selected
    blocks, so causality alone as the mask_mod (the operator's SEL_CAUSAL_ONLY) computes the
    same pairs as the selection table's mask_mod. With several positions per tile it does not
    (a tile lists the union of its positions' blocks)."""
    lp = 32 if KB <= 32 else KB
    B, H, n = 2, 2, 3
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T * 3 + G)
    table = M.selection_table(idx, Ts)
    want = M.dense_mask(M.selected_mask(table, lp, G), B, H, T * G, T)
    got = M.selected_block_mask(idx, lp, G, QB, KB, M.causal_mask(G), full_tiles=full_tiles)
    check_block_mask(got, want)
    T, G, lp, n = 64, 4, 8, 2                    # two positions per tile: causality is not enough
    idx = random_selection(1, 1, T, n, T // lp, lp, seed=1)
    want = M.dense_mask(M.selected_mask(M.selection_table(idx, T // lp), lp, G), 1, 1, T * G, T)
    several = M.selected_block_mask(idx, lp, G, 2 * G, lp, M.causal_mask(G), full_tiles=full_tiles)
    assert not torch.equal(M.computed_mask(several), want)


def random_selection(B, H, T, n, Ts, lp, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, Ts, (B, H, T, n), generator=gen)
    idx = torch.where(idx * lp <= torch.arange(T)[:, None], idx, -1)
    idx[:, :, :, 0] = 0                        # the first block serves every position
    idx = torch.sort(idx, -1).values
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    return idx


@pytest.mark.parametrize("T,G,QB,KB,lp,S", [(64, 16, 16, 16, 16, 4), (48, 16, 16, 32, 64, 3),
                                             (40, 4, 16, 16, 32, 2), (36, 8, 8, 16, 16, 6)])
@pytest.mark.parametrize("narrow_q", [False, True])
@pytest.mark.parametrize("full_width", [False, True])
def test_selected_lists_split_into_query_chunks(T, G, QB, KB, lp, S, narrow_q, full_width):
    """Chunk c of the split mask (batch entry c·B + b) lists what the unsplit mask lists for
    its query tiles, the query-side lists numbered within the chunk."""
    B, H, n = 2, 2, 3
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T + S)
    table = M.selection_table(idx, Ts)
    mm = M.selected_mask(table, lp, G)
    whole = M.selected_block_mask(idx, lp, G, QB, KB, mm, full_width=full_width, narrow_q=narrow_q)
    from nsa_flex.backends import split_mask_mod
    split = M.selected_block_mask(idx, lp, G, QB, KB, split_mask_mod(mm, S, T * G // S, B),
                                  full_width=full_width, narrow_q=narrow_q, q_splits=S)
    rows = -(-T * G // QB) // S
    assert split.kv_num_blocks.shape[:3] == (S * B, H, rows)
    for transposed in (False, True):
        got, want = M.tile_states(split, transposed), M.tile_states(whole, transposed)
        for c in range(S):
            assert torch.equal(got[c * B:(c + 1) * B], want[:, :, c * rows:(c + 1) * rows]), (c, transposed)
    spec = M.computed_mask(whole)                        # [B, H, T·G, T]
    chunks = torch.cat(spec.chunk(S, dim=2), dim=0)      # the split layout
    check_block_mask(split, chunks)
    assert_row_major(split)
    bad = -(-T * G // QB) + 1                            # more chunks than query tiles
    with pytest.raises(ValueError, match=f"q_splits={bad}"):
        M.selected_block_mask(idx, lp, G, QB, KB, mm, q_splits=bad)


def positions_per_tile_w(QB, G, n, R):
    from masks.selected import positions_per_tile
    return positions_per_tile(QB, G) * n * R


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("lp,n_init,n_local", [(8, 1, 2), (16, 1, 1), (16, 0, 2), (8, 2, 0), (24, 1, 3)])
def test_forced_blocks(T, G, QB, KB, lp, n_init, n_local):
    """The static part of the selected branch; its tiles skip nothing needed and list nothing
    unneeded."""
    spec = torch.zeros(T * G, T, dtype=torch.bool)
    for r in range(T * G):
        t = r // G
        for s in range(t + 1):
            spec[r, s] = s // lp < n_init or s // lp > t // lp - n_local
    bm = static(lambda *b: M.forced_blocks_tiles(lp, n_init, n_local, *b),
                M.forced_blocks_mask(lp, n_init, n_local, G), T, G, QB, KB, T)
    check_block_mask(bm, spec[None, None])
    states = M.tile_states(bm)[0, 0]
    for m, c in itertools.product(range(states.shape[0]), range(states.shape[1])):
        assert (states[m, c] > 0) == bool(spec[m * QB:(m + 1) * QB, c * KB:(c + 1) * KB].any())


def test_forced_blocks_plus_the_rest_is_the_selection():
    """without_forced drops exactly the blocks that forced_blocks_mask covers."""
    lp, n_init, n_local, T = 8, 1, 2, 70
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, -(-T // lp), (1, 1, T, 5), generator=gen)
    idx = torch.where(idx * lp <= torch.arange(T)[:, None], idx, -1)
    rest = M.without_forced(idx, lp, n_init, n_local)
    for t in range(T):
        cur = t // lp
        kept = {j for j in rest[0, 0, t].tolist() if j >= 0}
        assert kept == {j for j in idx[0, 0, t].tolist() if j >= n_init and cur - n_local >= j >= 0}


def test_selection_table_ignores_unused_slots():
    idx = torch.tensor([[[[2, -1, 0]]]])
    assert M.selection_table(idx, 4).tolist() == [[[[True, False, True, False]]]]


@pytest.mark.parametrize("T,G,QB,KB", SIZES[:3])
def test_document_composition(T, G, QB, KB):
    gen = torch.Generator().manual_seed(T)
    cuts = torch.sort(torch.randint(1, T, (3,), generator=gen)).values
    doc = (torch.arange(T)[:, None] >= cuts[None, :]).sum(-1)[None]          # [1, T]
    w = 9
    t = spec_rows(T, G)
    spec = ((torch.arange(T)[None, :] <= t[:, None]) & (torch.arange(T)[None, :] > t[:, None] - w)
            & (doc[0][t][:, None] == doc[0][None, :]))[None, None]
    q_lo, q_hi = M.tile_positions(T * G, QB, G)
    k_lo, k_hi = M.tile_keys(T, KB)
    a1, l1 = M.sliding_window_tiles(w, q_lo, q_hi, k_lo, k_hi)
    a2, l2 = M.document_tiles(doc, q_lo, q_hi, k_lo, k_hi)
    mm = M.and_document(M.sliding_window_mask(w, G), doc, G)
    bm = M.block_mask_from_tiles(a1 & a2, l1 & l2, mm, T * G, T, QB, KB, 1, 1)
    check_block_mask(bm, spec)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 7, 8, 5)
    p = M.pack_gqa(x, 2)
    assert p.shape == (2, 2, 28, 5)
    assert torch.equal(p[1, 1, 3 * 4 + 2], x[1, 3, 1 * 4 + 2])   # row t·G + g of KV head k
    assert torch.equal(M.unpack_gqa(p, 7), x)


def test_block_mask_lists_equal_torchs_own():
    """block_mask_from_tiles builds its lists and their transposes by prefix counts; they must be
    exactly what BlockMask.from_kv_blocks (argsort and transposes) makes from the same tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    gen = torch.Generator().manual_seed(1)
    any_ = torch.rand(2, 3, 9, 7, generator=gen) < 0.5
    all_ = any_ & (torch.rand(2, 3, 9, 7, generator=gen) < 0.5)
    bm = M.block_mask_from_tiles(any_, all_, M.causal_mask(1), 9 * 16, 7 * 16, 16, 16, 2, 3)
    full, partial = all_, any_ & ~all_

    def torch_ordered(t):
        return (t.sum(-1, dtype=torch.int32),
                torch.argsort(t.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32))

    ref = BlockMask.from_kv_blocks(*torch_ordered(partial), *torch_ordered(full), BLOCK_SIZE=16,
                                   mask_mod=M.causal_mask(1), seq_lengths=(9 * 16, 7 * 16))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(bm, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert_row_major(bm)


def assert_row_major(bm):
    """Every list row-major, as FlexAttention's kernels read them (a list built from a transposed
    tile map once kept its transposed strides: the GPU backward then read the wrong entries)."""
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        if getattr(bm, name) is None:    # a mask without full tiles
            continue
        assert getattr(bm, name).is_contiguous(), name
        assert getattr(bm, name).stride()[-1] == 1, name


def _selected_lists(idx, lp, G, QB, KB, narrow_q, S):
    table = M.selection_table(idx, -(-idx.shape[2] // lp))
    bm = M.selected_block_mask(idx, lp, G, QB, KB, M.selected_mask(table, lp, G), narrow_q=narrow_q,
                               q_splits=S)
    return (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
            bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("narrow_q", [False, True])
def test_selected_lists_compiled_equal_eager(device, narrow_q):
    """The builder compiled by Inductor (as inside the operator's graph) lists what it lists
    eagerly: the counts, and each list up to its count. (On a GPU this separates a miscompiled
    mask build from a kernel reading good lists wrongly.)"""
    T, G, QB, KB, lp, n, S = 512, 16, 16, 32, 64, 6, 4
    idx = random_selection(1, 2, T, n, -(-T // lp), lp, seed=3).to(device)
    want = _selected_lists(idx, lp, G, QB, KB, narrow_q, S)
    torch._dynamo.reset()
    got = torch.compile(_selected_lists, fullgraph=True, dynamic=False)(idx, lp, G, QB, KB, narrow_q, S)
    for k in range(0, 8, 2):
        (wn, wi), (gn, gi) = want[k:k + 2], got[k:k + 2]
        assert torch.equal(gn, wn), k
        assert gi.shape == wi.shape, k
        valid = torch.arange(wi.shape[-1], device=device) < wn[..., None]
        assert torch.equal(torch.where(valid, gi, -1), torch.where(valid, wi, -1)), k
