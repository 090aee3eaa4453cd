"""What each NSA branch attends to, for one layer and one KV head (no drawing here).

Every quantity comes from the operator's own pieces: the compressed-branch log-sum-exp from the
dense path of ``nsa_flex.backends`` under ``masks.compressed_mask`` (split into row chunks so that
long sequences fit), the selection from ``nsa_flex.selection.select_blocks``, the selected
branch's BlockMask from ``operator.selected_branch_block_mask`` (the one its FlexAttention call
gets) read back with ``masks.readback.tile_states``, and the token patterns from the branches' mask_mods. Long
sequences never produce a dense T x T tensor: masks are evaluated in row chunks and either
reduced to counts or max-pooled to the picture size on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from masks import (compressed_document_mask, compressed_mask, heads_first, pack_gqa,
                   selected_mask, selection_table, sliding_window_mask)
from masks.readback import FULL, PARTIAL, SKIPPED, tile_states
from nsa_flex.backends import dense_attention
from nsa_flex.config import NSAConfig
from nsa_flex.kernels import KernelConfig, flex_kernel
from nsa_flex.operator import Documents, selected_block_mask_of
from nsa_flex.selection import select_blocks, selection_scores

__all__ = [
    "SKIPPED", "PARTIAL", "FULL", "BLOCK_CODES", "HeadInputs", "HeadAnalysis", "Pooling",
    "head_inputs", "compressed_lse", "selection_scores", "analyse_head", "branch_images",
    "score_images", "tile_images", "pool_max", "pooling_for",
]

# Per (query, selection block) state in the selection picture; max-pooling keeps the highest.
BLOCK_CODES = {0: "not a candidate (future block)", 1: "candidate, not selected",
               2: "forced: local", 3: "forced: initial", 4: "selected by score"}


def _elems_budget(device: torch.device) -> int:
    """Elements of one chunk of mask evaluation (bool/int work, not float scores)."""
    return 1 << 27 if device.type == "cuda" else 1 << 23


# ---------------------------------------------------------------------------------------------
# inputs of one KV head


@dataclass
class HeadInputs:
    """One layer's tensors restricted to one KV head, in the operator's packed layout."""

    qp: torch.Tensor       # [1, 1, T*G, Dk] packed queries of the group (RoPE applied)
    k_cmp: torch.Tensor    # [1, 1, Tc, Dk] compressed keys (heads first)
    gates: torch.Tensor    # [T, G, 3] float32, order (cmp, slc, swa)
    cfg: NSAConfig
    group: int
    scale: float
    docs: Documents | None = None   # packed documents (start [1, T], cmp_ends [1, T // d])

    @property
    def doc_start(self):
        return None if self.docs is None else self.docs.start

    @property
    def seq_len(self) -> int:
        return self.qp.shape[2] // self.group


def head_inputs(q: torch.Tensor, k_cmp: torch.Tensor, gates: torch.Tensor, cfg: NSAConfig,
                kv_head: int, doc_ids: torch.Tensor | None = None) -> HeadInputs:
    """q [1, T, Hq, Dk], k_cmp [1, Tc, Hkv, Dk], gates [1, T, Hq, 3] -> KV head ``kv_head``;
    with ``doc_ids`` [1, T] k_cmp holds T // d slots (the operator's document layout)."""
    Hq, Hkv = q.shape[2], k_cmp.shape[2]
    G = Hq // Hkv
    sl = slice(kv_head * G, (kv_head + 1) * G)
    return HeadInputs(
        qp=pack_gqa(q[:, :, sl], 1), k_cmp=heads_first(k_cmp[:, :, kv_head:kv_head + 1]),
        gates=gates[0, :, sl].float(), cfg=cfg, group=G, scale=cfg.softmax_scale(q.shape[-1]),
        docs=None if doc_ids is None else Documents.of(doc_ids, cfg))


# ---------------------------------------------------------------------------------------------
# compressed branch and selection


@torch.no_grad()
def compressed_lse(qp, k_cmp, cfg: NSAConfig, group: int, scale: float,
                   max_elems: int | None = None, docs: Documents | None = None) -> torch.Tensor:
    """The compressed branch's log-sum-exp [B, H, T*G] (natural log, −inf where no block is
    visible): ``backends.dense_attention`` under ``masks.compressed_mask``, as the operator's
    CPU path computes it, evaluated over chunks of query rows (rows are independent)."""
    B, H, TG, _ = qp.shape
    Tc = k_cmp.shape[2]
    if Tc == 0:
        return qp.new_full((B, H, TG), float("-inf"), dtype=torch.float32)
    mask_mod = (compressed_mask(cfg.cmp_block, cfg.cmp_stride, group) if docs is None
                else compressed_document_mask(docs.cmp_ends, docs.start, group))
    v = qp.new_zeros(B, H, Tc, 1)  # the LSE does not depend on the values
    kv = torch.arange(Tc, device=qp.device)
    chunk = max(1, (max_elems or _elems_budget(qp.device)) // (Tc * B * H))
    out = []
    for r0 in range(0, TG, chunk):
        rows = torch.arange(r0, min(TG, r0 + chunk), device=qp.device)
        mask = mask_mod(0, 0, rows[:, None], kv[None, :])
        out.append(dense_attention(qp[:, :, r0:r0 + len(rows)], k_cmp, v, mask, scale)[1])
    return torch.cat(out, dim=-1)


# ---------------------------------------------------------------------------------------------
# pooling


@dataclass(frozen=True)
class Pooling:
    """A picture of rows [r0, r1) x cols [c0, c1), each pixel max-pooling fr x fc cells."""

    r0: int
    r1: int
    c0: int
    c1: int
    fr: int
    fc: int

    @property
    def shape(self) -> tuple[int, int]:
        return -(-(self.r1 - self.r0) // self.fr), -(-(self.c1 - self.c0) // self.fc)

    @property
    def pooled(self) -> bool:
        return self.fr > 1 or self.fc > 1

    def describe(self, rows: str = "queries", cols: str = "keys") -> str:
        base = f"{rows} {self.r0}–{self.r1 - 1} × {cols} {self.c0}–{self.c1 - 1}"
        if not self.pooled:
            return base + ", full resolution"
        return base + f", max-pooled {self.fr}×{self.fc} per pixel"


def pooling_for(r0: int, r1: int, c0: int, c1: int, max_px: int) -> Pooling:
    """The smallest pooling factors that fit the picture into max_px x max_px."""
    fr = max(1, math.ceil((r1 - r0) / max_px))
    fc = max(1, math.ceil((c1 - c0) / max_px))
    return Pooling(r0, r1, c0, c1, fr, fc)


def pool_max(x: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    """Max-pool the last two dims of x by (fr, fc) (zero padding; bool means any)."""
    R, C = x.shape[-2:]
    pr, pc = (-R) % fr, (-C) % fc
    y = x.to(torch.int16) if x.dtype == torch.bool else x
    if pr or pc:
        y = torch.nn.functional.pad(y, (0, pc, 0, pr))
    y = y.reshape(*y.shape[:-2], (R + pr) // fr, fr, (C + pc) // fc, fc).amax(dim=(-3, -1))
    return y.bool() if x.dtype == torch.bool else y


def _pool_sum(x: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    R, C = x.shape[-2:]
    pr, pc = (-R) % fr, (-C) % fc
    y = torch.nn.functional.pad(x, (0, pc, 0, pr)) if pr or pc else x
    return y.reshape((R + pr) // fr, fr, (C + pc) // fc, fc).sum(dim=(1, 3))


def _row_chunks(p: Pooling, width: int, budget: int):
    """Row chunks [a, b) of p's rows, aligned to its row pooling, of about ``budget`` cells."""
    step = max(1, budget // max(1, width * p.fr)) * p.fr
    for a in range(p.r0, p.r1, step):
        yield a, min(p.r1, a + step)


# ---------------------------------------------------------------------------------------------
# token-level masks of the three branches


def _visible(cfg: NSAConfig, Tc: int, pos: torch.Tensor, docs: Documents | None = None):
    """[P, Tc] compressed keys visible to each position (the compressed mask_mod)."""
    i = torch.arange(Tc, device=pos.device)
    if docs is None:
        return compressed_mask(cfg.cmp_block, cfg.cmp_stride, 1)(0, 0, pos[:, None], i[None, :])
    return compressed_document_mask(docs.cmp_ends, docs.start, 1)(0, 0, pos[:, None], i[None, :])


def _num_visible(cfg: NSAConfig, Tc: int, pos: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
    """Compressed blocks visible to each position [P]."""
    if Tc == 0:
        return torch.zeros_like(pos)
    return _visible(cfg, Tc, pos, docs).sum(-1)


def _branch_masks(table4: torch.Tensor, cfg: NSAConfig, Tc: int, pos: torch.Tensor,
                  keys: torch.Tensor, docs: Documents | None = None) -> dict[str, torch.Tensor]:
    """Token masks [P, K] of positions ``pos`` over ``keys``: the compressed branch's coverage
    (the tokens its visible blocks summarise), the selected blocks, the sliding window,
    causality, and (with documents) the query's own document."""
    t, s = pos[:, None], keys[None, :]
    start = None if docs is None else docs.start
    if Tc == 0:
        cmp_ = torch.zeros_like(s <= t)
    else:   # the tokens of each visible block: [e − l + 1, e] for its last token e
        if docs is None:
            e = torch.arange(Tc, device=pos.device) * cfg.cmp_stride + cfg.cmp_block - 1
        else:
            e = docs.cmp_ends[0, :Tc]
        vis = _visible(cfg, Tc, pos, docs)                                    # [P, Tc]
        first = torch.where(vis, e - cfg.cmp_block + 1, torch.iinfo(torch.int32).max).amin(-1)
        last = torch.where(vis, e, -1).amax(-1)
        cmp_ = (s >= first[:, None]) & (s <= last[:, None])
    own = (s <= t) if start is None else (s <= t) & (s >= start[0, pos][:, None])
    return {
        "cmp": cmp_,
        "slc": selected_mask(table4, cfg.sel_block, 1, start)(0, 0, t, s),
        "swa": sliding_window_mask(cfg.window, 1, start)(0, 0, t, s),
        "causal": s <= t,
        "own": own,
    }


@torch.no_grad()
def branch_images(idx: torch.Tensor, cfg: NSAConfig, seq_len: int, pooling: Pooling,
                  table4: torch.Tensor | None = None, docs: Documents | None = None,
                  Tc: int | None = None) -> dict[str, torch.Tensor]:
    """Max-pooled token patterns over ``pooling`` (rows = query positions, cols = keys).

    idx [T, n] selected block numbers (−1 unused) of one KV head. Returns bool [R, C] images
    "cmp", "slc", "swa", "causal" (a pixel is lit when any (query, key) pair in it is)."""
    device = idx.device
    if table4 is None:
        table4 = selection_table(idx[None, None], cfg.num_sel_blocks(seq_len))
    if Tc is None:
        Tc = cfg.num_cmp_blocks(seq_len) if docs is None else docs.cmp_ends.shape[1]
    keys = torch.arange(pooling.c0, pooling.c1, device=device)
    parts: dict[str, list] = {"cmp": [], "slc": [], "swa": [], "causal": []}
    for a, b in _row_chunks(pooling, len(keys), _elems_budget(device)):
        m = _branch_masks(table4, cfg, Tc, torch.arange(a, b, device=device), keys, docs)
        for name in parts:
            parts[name].append(pool_max(m[name], pooling.fr, pooling.fc))
    return {name: torch.cat(v, 0) for name, v in parts.items()}


def block_codes(idx: torch.Tensor, cfg: NSAConfig, pos: torch.Tensor, num_sel: int) -> torch.Tensor:
    """[P, Ts] int8 codes of BLOCK_CODES for positions ``pos`` (counted in their document) from
    their selection idx [P, n]."""
    j = torch.arange(num_sel, device=idx.device)
    cur = (pos // cfg.sel_block)[:, None]
    cand = j <= cur
    table = selection_table(idx, num_sel)
    local = cand & (j > cur - cfg.n_local)
    init = cand & (j < cfg.n_init)
    code = torch.zeros(idx.shape[0], num_sel, dtype=torch.int8, device=idx.device)
    code[cand] = 1
    code[table & local] = 2
    code[table & init] = 3
    code[table & ~local & ~init] = 4
    return code


@torch.no_grad()
def score_images(h: HeadInputs, lse: torch.Tensor, idx: torch.Tensor, pooling: Pooling):
    """Max-pooled importance scores p_slc and selection codes over ``pooling`` (rows = query
    positions, cols = selection blocks). Scores are normalised per query by the group size, so
    that a query's scores over its candidate blocks sum to at most l'/d."""
    T = h.seq_len
    Ts = h.cfg.num_sel_blocks(T)
    Tc = h.k_cmp.shape[2]
    cols = pooling.c1 - pooling.c0
    budget = max(1, _elems_budget(h.qp.device) // max(1, Tc * h.group)) * cols
    scores, codes = [], []
    for a, b in _row_chunks(pooling, cols, budget):
        docs = () if h.docs is None else (h.docs.start, h.docs.cmp_ends)
        p = selection_scores(h.qp, h.k_cmp, lse, h.cfg, h.scale, h.group, a, b, None, *docs)[0, 0] / h.group
        scores.append(pool_max(p[:, pooling.c0:pooling.c1], pooling.fr, pooling.fc))
        pos = torch.arange(a, b, device=idx.device)
        if h.docs is not None:
            pos = pos - h.docs.start[0, a:b]
        c = block_codes(idx[a:b], h.cfg, pos, Ts)
        codes.append(pool_max(c[:, pooling.c0:pooling.c1], pooling.fr, pooling.fc))
    return torch.cat(scores, 0), torch.cat(codes, 0)


# ---------------------------------------------------------------------------------------------
# the selected branch's BlockMask: tiles computed, pairs needed


@dataclass
class TileWork:
    """The selected branch's BlockMask for one KV head (packed-GQA rows x keys)."""

    states: torch.Tensor   # [Mq, Nkv] int8 SKIPPED / PARTIAL / FULL
    needed: torch.Tensor   # [Mq, Nkv] int64 (row, key) pairs the mask attends in each tile
    area: torch.Tensor     # [Mq, Nkv] int64 in-bounds pairs of each tile
    q_block: int
    kv_block: int
    group: int

    @property
    def computed(self) -> torch.Tensor:
        """Pairs FlexAttention evaluates per tile: the whole tile unless skipped."""
        return torch.where(self.states != SKIPPED, self.area, 0)

    def totals(self, m0: int = 0, m1: int | None = None) -> dict:
        st, need, comp = self.states[m0:m1], self.needed[m0:m1], self.computed[m0:m1]
        full_wrong = ((st == FULL) & (need != self.area[m0:m1])).sum().item()
        missed = torch.where(st == SKIPPED, need, 0).sum().item()
        c, n = comp.sum().item(), need.sum().item()
        return {"tiles_full": int((st == FULL).sum()), "tiles_partial": int((st == PARTIAL).sum()),
                "tiles_skipped": int((st == SKIPPED).sum()), "pairs_computed": int(c),
                "pairs_needed": int(n), "wasted_frac": (c - n) / c if c else 0.0,
                "pairs_missed": int(missed), "full_tiles_not_full": int(full_wrong)}


def selected_block_mask(idx4: torch.Tensor, table4: torch.Tensor, cfg: NSAConfig, group: int,
                        head_dim: int = 128, docs: Documents | None = None):
    """The selected branch's BlockMask of one KV head (idx4 [1, 1, T, n] block numbers, table4
    their selection_table), the one ``operator.selected_branch`` gives FlexAttention on a GPU
    in bf16 (without query splits)."""
    tiles = flex_kernel(torch.bfloat16, head_dim, head_dim, cfg).slc
    start = None if docs is None else docs.start
    return selected_block_mask_of(idx4, selected_mask(table4, cfg.sel_block, group, start), cfg,
                                  group, tiles, docs)(1)


@dataclass
class HeadAnalysis:
    """Everything the pictures and statistics of one (layer, KV head) need."""

    idx: torch.Tensor                  # [T, n] int32 selected blocks, −1 unused
    lse: torch.Tensor                  # [1, 1, T*G] compressed-branch LSE
    tiles: TileWork
    counts: dict[str, torch.Tensor]    # per position [T] int64: keys each branch attends
    table4: torch.Tensor = field(repr=False)
    cross_document: int = 0            # (query, key) pairs any branch takes from another document


@torch.no_grad()
def analyse_head(h: HeadInputs) -> HeadAnalysis:
    """Selection, BlockMask tiles and per-position key counts of one KV head."""
    cfg, G, T = h.cfg, h.group, h.seq_len
    device = h.qp.device
    Tc, Ts = h.k_cmp.shape[2], cfg.num_sel_blocks(T)
    lse = compressed_lse(h.qp, h.k_cmp, cfg, G, h.scale, docs=h.docs)
    docs = () if h.docs is None else (h.docs.start, h.docs.cmp_ends)
    idx4 = select_blocks(h.qp, h.k_cmp, lse, cfg, h.scale, G, T, KernelConfig("dense"), *docs)  # [1, 1, T, n]
    table4 = selection_table(idx4, Ts)                                   # [1, 1, T, Ts]
    bm = selected_block_mask(idx4, table4, cfg, G, h.qp.shape[-1], h.docs)
    states = tile_states(bm)[0, 0]
    QB, KB = bm.BLOCK_SIZE
    Mq, Nkv = states.shape

    # per-position key counts of every branch and per-tile needed pairs, in position chunks
    needed = torch.zeros(Mq, Nkv, dtype=torch.int64, device=device)
    counts = {k: torch.zeros(T, dtype=torch.int64, device=device)
              for k in ("causal", "cmp_keys", "cmp_tokens", "slc", "swa", "union")}
    keys = torch.arange(T, device=device)
    step = max(1, _elems_budget(device) // T)
    pad = Nkv * KB - T
    cross = 0
    for a in range(0, T, step):
        pos = torch.arange(a, min(T, a + step), device=device)
        m = _branch_masks(table4, cfg, Tc, pos, keys, h.docs)
        cross += int(((m["cmp"] | m["slc"] | m["swa"]) & ~m["own"]).sum())
        counts["causal"][pos] = m["own"].sum(-1)
        counts["cmp_keys"][pos] = _num_visible(cfg, Tc, pos, h.docs)
        counts["cmp_tokens"][pos] = m["cmp"].sum(-1)
        counts["slc"][pos] = m["slc"].sum(-1)
        counts["swa"][pos] = m["swa"].sum(-1)
        counts["union"][pos] = (m["slc"] | m["swa"]).sum(-1)
        per_tile = torch.nn.functional.pad(m["slc"], (0, pad)).view(len(pos), Nkv, KB).sum(-1)
        for g in range(G):  # packed row t*G + g lies in query tile (t*G + g) // QB
            needed.index_add_(0, (pos * G + g) // QB, per_tile)
    rows = torch.clamp(torch.arange(1, Mq + 1, device=device) * QB, max=T * G) - torch.arange(Mq, device=device) * QB
    cols = torch.clamp(torch.arange(1, Nkv + 1, device=device) * KB, max=T) - torch.arange(Nkv, device=device) * KB
    tiles = TileWork(states=states, needed=needed, area=rows[:, None] * cols[None, :],
                     q_block=QB, kv_block=KB, group=G)
    return HeadAnalysis(idx=idx4[0, 0], lse=lse, tiles=tiles, counts=counts, table4=table4,
                        cross_document=cross)


@torch.no_grad()
def tile_images(tw: TileWork, m0: int, m1: int, max_px: int):
    """Pooled tile states (max: FULL > PARTIAL > SKIPPED) and wasted fraction of the computed
    pairs (NaN where nothing is computed) for query tiles m0..m1−1 and all KV tiles."""
    p = pooling_for(m0, m1, 0, tw.states.shape[1], max_px)
    st = pool_max(tw.states[m0:m1].to(torch.int16), p.fr, p.fc).to(torch.int8)
    comp = _pool_sum(tw.computed[m0:m1].double(), p.fr, p.fc)
    need = _pool_sum(torch.where(tw.states[m0:m1] != SKIPPED, tw.needed[m0:m1], 0).double(), p.fr, p.fc)
    waste = torch.where(comp > 0, (comp - need) / comp.clamp_min(1), float("nan"))
    return p, st, waste


SHARE_RUNS = (2, 4, 8)


def selection_sharing(idx: torch.Tensor, t0: int = 0, t1: int | None = None,
                      runs: tuple[int, ...] = SHARE_RUNS) -> dict:
    """How much consecutive positions' selections overlap, for positions t0..t1−1 of one KV head
    (idx [T, n] block numbers, −1 unused): for runs of P positions (aligned to t0; a last partial
    run is left out), ``sel_share_P`` = the blocks the P positions select one by one / the distinct
    blocks of the run. 1 where no two select the same block, P where all select the same ones. It
    is the factor by which a query tile of P positions (the group's heads each) would read fewer
    K/V blocks than P one-position tiles; the selected branch now runs one-position tiles."""
    x = idx[t0:t1]
    out = {}
    for P in runs:
        m = x.shape[0] // P * P
        if m == 0:
            out[f"sel_share_{P}"] = float("nan")
            continue
        r = x[:m].reshape(m // P, P * x.shape[1]).sort(-1).values
        distinct = (r[:, :1] >= 0).sum() + ((r[:, 1:] != r[:, :-1]) & (r[:, 1:] >= 0)).sum()
        out[f"sel_share_{P}"] = (r >= 0).sum().item() / max(1, distinct.item())
    return out


def sparsity(counts: dict[str, torch.Tensor], t0: int = 0, t1: int | None = None) -> dict:
    """Fractions of the causal (query, key) pairs of positions t0..t1−1 each branch attends.

    cmp_keys counts compressed keys (one per block), cmp_tokens the tokens those blocks
    summarise; union is the tokens read at full resolution by the selected or sliding branch."""
    c = {k: v[t0:t1].sum().item() for k, v in counts.items()}
    causal = max(1, c["causal"])
    return {"frac_cmp_keys": c["cmp_keys"] / causal, "frac_cmp_tokens": c["cmp_tokens"] / causal,
            "frac_slc": c["slc"] / causal, "frac_swa": c["swa"] / causal,
            "frac_union": c["union"] / causal, "causal_pairs": int(c["causal"])}
