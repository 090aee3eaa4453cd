"""Every BlockMask builder against the spec's token-level mask, written plainly here.

For each builder, the pairs FlexAttention attends — read back from the KV-side lists used by
the forward and from the transposed query-side lists used by the backward, partial tiles through
the mask_mod, full tiles without it — must equal the spec's dense mask, in the packed-GQA layout
(row r = position r // G), for odd T, several G and block sizes, with and without documents.
"""

import itertools

import pytest
import torch

import masks as M

SIZES = [(37, 1, 16, 16), (53, 2, 16, 32), (45, 4, 32, 16), (29, 16, 64, 16), (70, 3, 32, 32),
         (61, 16, 16, 64), (40, 6, 16, 32)]


def spec_rows(T, G):
    """Position of each packed row."""
    return torch.arange(T * G) // G


def check_block_mask(bm, spec):
    assert torch.equal(M.computed_mask(bm), spec.expand_as(M.computed_mask(bm))), \
        "forward (KV-side) lists differ from the spec"
    assert torch.equal(M.computed_mask(bm, transposed=True), spec.expand_as(M.computed_mask(bm))), \
        "backward (Q-side) lists differ"


def static(any_all, mask_mod, T, G, QB, KB, kv_len, batch=1):
    q_lo, q_hi = M.tile_positions(T * G, QB, G)
    k_lo, k_hi = M.tile_keys(kv_len, KB)
    a, al = any_all(q_lo, q_hi, k_lo, k_hi)
    return M.block_mask_from_tiles(a, al, mask_mod, T * G, kv_len, QB, KB, batch, 1)


def random_docs(B, T, seed, count=4):
    """doc_ids [B, T] with up to ``count`` documents per row, one of them of length 1."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = sorted(set(torch.randint(1, T, (count - 1,), generator=gen).tolist()))
        if cuts and cuts[0] + 1 < T:
            cuts.append(cuts[0] + 1)                        # a document of one token
        ids = (torch.arange(T)[:, None] >= torch.tensor(sorted(set(cuts)))[None, :]).sum(-1)
        rows.append(ids * 3 + 7)                            # any integers: a change starts one
    return torch.stack(rows)


def spec_start(doc_ids):
    """Each position's document start, written plainly."""
    B, T = doc_ids.shape
    start = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(1, T):
            start[b, t] = start[b, t - 1] if doc_ids[b, t] == doc_ids[b, t - 1] else t
    return start


def test_document_structure():
    ids = torch.tensor([[5, 5, 5, 9, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4]])
    assert M.document_starts(ids).tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 4, 4, 4, 11, 11, 11, 11, 11, 11]]
    assert M.document_ends(ids).tolist() == [[2, 2, 2, 3, 10, 10, 10, 10, 10, 10, 10, 16, 16, 16, 16, 16, 16]]
    # l = 4, d = 2: document [4, 11) has blocks at 4, 6 (ending 7, 9); [11, 17) at 11, 13 (14, 16)
    ends = M.compressed_block_ends(ids, 4, 2)
    assert ends.tolist() == [[-1, -1, 7, 9, -1, 14, 16, -1]]
    tok = torch.tensor([[3, 1, 4, 0, 0, 5, 9, 0]])      # EOS = 0 ends a document
    assert M.doc_ids_from_eos(tok, 0).tolist() == [[0, 0, 0, 0, 1, 2, 2, 2]]


@pytest.mark.parametrize("l,d", [(4, 2), (8, 4), (6, 3), (16, 16), (3, 1)])
def test_compressed_slots_hold_every_documents_blocks(l, d):
    """Slot ⌊s0/d⌋ + i holds block i of each document; no two blocks share a slot."""
    T = 97
    for seed in range(4):
        ids = random_docs(2, T, seed)
        ends = M.compressed_block_ends(ids, l, d)
        start = spec_start(ids)
        for b in range(2):
            want = {}
            for s0 in sorted(set(start[b].tolist())):
                L = int((start[b] == s0).sum())
                for i in range(max(0, (L - l) // d + 1)):
                    slot = s0 // d + i
                    assert slot not in want
                    want[slot] = s0 + i * d + l - 1
            got = {c: e for c, e in enumerate(ends[b].tolist()) if e >= 0}
            assert got == want


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


def _doc_tiles(doc_ids, T, G, QB, KB, kv_len):
    start = M.document_starts(doc_ids)
    q_lo, q_hi = M.tile_positions(T * G, QB, G)
    k_lo, k_hi = M.tile_keys(kv_len, KB)
    return start, q_lo, q_hi, k_lo, k_hi, start[:, q_lo], start[:, q_hi]


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("w", [1, 7, 40])
def test_sliding_window_in_documents(T, G, QB, KB, w):
    B = 2
    ids = random_docs(B, T, seed=T + w)
    start, q_lo, q_hi, k_lo, k_hi, s_lo, s_hi = _doc_tiles(ids, T, G, QB, KB, T)
    t = spec_rows(T, G)
    s = torch.arange(T)
    spec = ((s[None, :] <= t[:, None]) & (s[None, :] > t[:, None] - w))[None]
    spec = (spec & (s[None, None, :] >= spec_start(ids)[:, t, None]))[:, None]
    a1, l1 = M.sliding_window_tiles(w, q_lo, q_hi, k_lo, k_hi)
    a2, l2 = M.document_tiles(s_lo, s_hi, k_lo, k_hi)
    bm = M.block_mask_from_tiles(a1 & a2, l1 & l2, M.sliding_window_mask(w, G, start), T * G, T,
                                 QB, KB, B, 1)
    check_block_mask(bm, spec)


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("l,d", [(8, 4), (4, 2), (6, 6)])
def test_compressed_visibility_in_documents(T, G, QB, KB, l, d):
    B = 2
    ids = random_docs(B, T, seed=T * l + d)
    ends = M.compressed_block_ends(ids, l, d)
    start, q_lo, q_hi, k_lo, k_hi, s_lo, s_hi = _doc_tiles(ids, T, G, QB, KB, ends.shape[1])
    st = spec_start(ids)
    spec = torch.zeros(B, 1, T * G, ends.shape[1], dtype=torch.bool)
    for b, r, c in itertools.product(range(B), range(T * G), range(ends.shape[1])):
        t, e = r // G, int(ends[b, c])
        spec[b, 0, r, c] = e >= 0 and st[b, t] <= e - l + 1 and e <= t   # the block in t's document
    a, al = M.compressed_document_tiles(ends, q_lo, q_hi, s_lo, s_hi, KB)
    bm = M.block_mask_from_tiles(a, al, M.compressed_document_mask(ends, start, G), T * G,
                                 ends.shape[1], QB, KB, B, 1)
    check_block_mask(bm, spec)


def random_selection(B, H, T, n, Ts, lp, seed, pos=None):
    """Distinct candidate block numbers per position (j·l' ≤ t, t counted in its document)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(T) if pos is None else pos                # [T] or [B, T]
    idx = torch.randint(-1, Ts, (B, H, T, n), generator=gen)
    cap = pos[..., None] if pos.dim() == 1 else pos[:, None, :, None]
    idx = torch.where(idx * lp <= cap, idx, -1)
    idx[..., 0] = 0                                              # the first block serves every position
    idx = torch.sort(idx, -1).values
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    return idx


def spec_selected(idx, lp, G, starts=None):
    """[B, H, T·G, T]: key s visible to row r (position t) iff its block, counted from t's
    document start, is selected and start ≤ s ≤ t."""
    B, H, T, _ = idx.shape
    spec = torch.zeros(B, H, T * G, T, dtype=torch.bool)
    for b, h, r in itertools.product(range(B), range(H), range(T * G)):
        t = r // G
        s0 = 0 if starts is None else int(starts[b, t])
        for j in idx[b, h, t].tolist():
            if j >= 0:
                spec[b, h, r, s0 + j * lp: min(t + 1, s0 + (j + 1) * lp)] = True
    return spec


@pytest.mark.parametrize("T,G,QB,KB", SIZES)
@pytest.mark.parametrize("lp", [16, 24, 32, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_selected_lists(T, G, QB, KB, lp, docs):
    """The builder's lists, read back through the selection table's mask_mod, attend exactly the
    selected keys; each query tile lists only tiles its positions' blocks touch."""
    B, H, n = 2, 2, 3
    ids = random_docs(B, T, seed=T + lp) if docs else None
    start = M.document_starts(ids) if docs else None
    pos = None if not docs else torch.arange(T) - spec_start(ids)
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T * 7 + lp, pos=pos)
    mm = M.selected_mask(M.selection_table(idx, Ts), lp, G, start)
    bm = M.selected_block_mask(idx, lp, G, QB, KB, mm, doc_start=start)
    spec = spec_selected(idx, lp, G, None if not docs else spec_start(ids))
    check_block_mask(bm, spec)
    assert_row_major(bm)
    if not docs and lp % KB == 0:      # aligned blocks: nothing listed that no position needs
        states = M.tile_states(bm)
        for m in range(states.shape[2]):
            rows = spec[:, :, m * QB:(m + 1) * QB]
            for c in range(states.shape[3]):
                touched = rows[..., c * KB:(c + 1) * KB].any(-1).any(-1)
                assert torch.equal(states[:, :, m, c] > 0, touched)


# one position per query tile (G divisible by QB)
ONE_POSITION_SIZES = [(37, 16, 16, 16), (45, 32, 16, 16), (53, 16, 16, 32), (29, 4, 4, 16)]


@pytest.mark.parametrize("T,G,QB,KB", ONE_POSITION_SIZES)
def test_one_position_tiles_need_only_causality(T, G, QB, KB):
    """With one position per query tile and blocks aligned to the KV tiles, the lists hold only
    that position's selected blocks, so causality alone as the mask_mod (the operator's flex
    route) computes the same pairs as the selection table's. With several positions per tile,
    or with documents (blocks not aligned to tiles), it does not."""
    lp = 32 if KB <= 32 else KB
    B, H, n = 2, 2, 3
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T * 3 + G)
    got = M.selected_block_mask(idx, lp, G, QB, KB, M.causal_mask(G))
    check_block_mask(got, spec_selected(idx, lp, G))
    T, G, lp, n = 64, 4, 8, 2                    # two positions per tile: causality is not enough
    idx = random_selection(1, 1, T, n, T // lp, lp, seed=1)
    several = M.selected_block_mask(idx, lp, G, 2 * G, lp, M.causal_mask(G))
    assert not torch.equal(M.computed_mask(several), spec_selected(idx, lp, G))


@pytest.mark.parametrize("T,G,QB,KB,lp,S", [(64, 16, 16, 16, 16, 4), (48, 16, 16, 32, 64, 3),
                                             (40, 4, 16, 16, 32, 2), (36, 8, 8, 16, 16, 6)])
@pytest.mark.parametrize("full_width", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_selected_lists_split_into_query_chunks(T, G, QB, KB, lp, S, full_width, docs):
    """Chunk c of the split mask (batch entry c·B + b) lists what the unsplit mask lists for
    its query tiles, the query-side lists numbered within the chunk."""
    from nsa_flex.backends import split_mask_mod
    B, H, n = 2, 2, 3
    ids = random_docs(B, T, seed=T + S) if docs else None
    start = M.document_starts(ids) if docs else None
    pos = None if not docs else torch.arange(T) - spec_start(ids)
    Ts = -(-T // lp)
    idx = random_selection(B, H, T, n, Ts, lp, seed=T + S, pos=pos)
    mm = M.selected_mask(M.selection_table(idx, Ts), lp, G, start)
    whole = M.selected_block_mask(idx, lp, G, QB, KB, mm, start, full_width=full_width)
    split = M.selected_block_mask(idx, lp, G, QB, KB, split_mask_mod(mm, S, T * G // S, B), start,
                                  full_width=full_width, q_splits=S)
    rows = -(-T * G // QB) // S
    assert split.kv_num_blocks.shape[:3] == (S * B, H, rows)
    if full_width:
        assert split.kv_indices.shape[-1] == -(-T // KB)
    for transposed in (False, True):
        got, want = M.tile_states(split, transposed), M.tile_states(whole, transposed)
        for c in range(S):
            assert torch.equal(got[c * B:(c + 1) * B], want[:, :, c * rows:(c + 1) * rows]), (c, transposed)
    spec = M.computed_mask(whole)                        # [B, H, T·G, T]
    check_block_mask(split, torch.cat(spec.chunk(S, dim=2), dim=0))
    bad = -(-T * G // QB) + 1                            # more chunks than query tiles
    with pytest.raises(ValueError, match=f"q_splits={bad}"):
        M.selected_block_mask(idx, lp, G, QB, KB, mm, q_splits=bad)


def test_selection_table_ignores_unused_slots():
    idx = torch.tensor([[[[2, -1, 0]]]])
    assert M.selection_table(idx, 4).tolist() == [[[[True, False, True, False]]]]


def test_forced_blocks_rule():
    """The n_init first blocks and the n_local ending at the current one (given j ≤ cur)."""
    got = [bool(M.is_forced(torch.tensor(j), torch.tensor(5), 1, 2)) for j in range(6)]
    assert got == [True, False, False, False, True, True]
    assert not any(bool(M.is_forced(torch.tensor(j), torch.tensor(5), 0, 0)) for j in range(6))


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 7, 8, 5)
    p = M.pack_gqa(x, 2)
    assert p.shape == (2, 2, 28, 5)
    assert torch.equal(p[1, 1, 3 * 4 + 2], x[1, 3, 1 * 4 + 2])   # row t·G + g of KV head k
    assert torch.equal(M.unpack_gqa(p, 7), x)


def test_split_rows_is_a_view_at_batch_one_and_merges_back():
    x = torch.randn(1, 3, 24, 5)
    s = M.split_rows(x, 4)
    assert s.shape == (4, 3, 6, 5) and s.data_ptr() == x.data_ptr()
    assert torch.equal(s[2, 1], x[0, 1, 12:18])
    assert torch.equal(M.merge_rows(s, 4), x)
    y = torch.randn(2, 3, 24, 5)
    assert torch.equal(M.split_rows(y, 4)[2 * 2 + 1], y[1, :, 12:18])
    assert torch.equal(M.merge_rows(M.split_rows(y, 4), 4), y)


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
        assert getattr(bm, name).stride()[-1] == 1, name


def _selected_lists(idx, lp, G, QB, KB, S, start):
    table = M.selection_table(idx, -(-idx.shape[2] // lp))
    bm = M.selected_block_mask(idx, lp, G, QB, KB, M.selected_mask(table, lp, G, start), start,
                               q_splits=S)
    return bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("docs", [False, True])
def test_selected_lists_compiled_equal_eager(device, docs):
    """The builder compiled by Inductor (as inside the operator's graph) lists what it lists
    eagerly: the counts, and each list up to its count. (On a GPU this separates a miscompiled
    mask build from a kernel reading good lists wrongly.)"""
    T, G, QB, KB, lp, n, S = 512, 16, 16, 32, 64, 6, 4
    ids = random_docs(1, T, seed=5).to(device) if docs else None
    start = M.document_starts(ids) if docs else None
    pos = None if not docs else (torch.arange(T) - spec_start(ids.cpu())).to(device)
    idx = random_selection(1, 2, T, n, -(-T // lp), lp, seed=3, pos=None if pos is None else pos.cpu())
    idx = idx.to(device)
    want = _selected_lists(idx, lp, G, QB, KB, S, start)
    if device == "cuda":   # as the operator's compile does (torch 2.11 needs the codegen fix)
        from nsa_flex import patches
        patches.install()
    torch._dynamo.reset()
    got = torch.compile(_selected_lists, fullgraph=True, dynamic=False)(idx, lp, G, QB, KB, S, start)
    for k in range(0, 4, 2):
        (wn, wi), (gn, gi) = want[k:k + 2], got[k:k + 2]
        assert torch.equal(gn, wn), k
        assert gi.shape == wi.shape, k
        valid = torch.arange(wi.shape[-1], device=device) < wn[..., None]
        assert torch.equal(torch.where(valid, gi, -1), torch.where(valid, wi, -1)), k
