"""Block selection of NSA §3.3.2: importance scores (eqs. 8–10, pinned overlap form) and top-n
(eqs. 11–12). Nothing here is differentiated: the selection is a discrete choice.

The pass walks the sequence in chunks of positions so that the [positions, Hq, Tc] compressed
probabilities never exist for the whole sequence at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from masks import is_forced

from . import tuning
from .config import NSAConfig

_FORCED_KEY = torch.iinfo(torch.int32).max  # above the bit pattern of any finite float32 >= 0


def overlap_weights(cfg: NSAConfig) -> list[float]:
    """Weights of the compressed blocks i = j·l'/d − (l/d − 1) … j·l'/d + l'/d − 1 in block j.

    Weight = |[i·d, i·d+l) ∩ [j·l', (j+1)·l')| / d; for l=32, d=16, l'=64: 1, 2, 2, 2, 1.
    """
    a, r = cfg.cmp_block // cfg.cmp_stride, cfg.sel_block // cfg.cmp_stride
    return [float(min(m + 1, a, r, r + a - 1 - m)) for m in range(r + a - 1)]


def pool_to_selection_blocks(p_cmp: torch.Tensor, cfg: NSAConfig, num_sel: int) -> torch.Tensor:
    """Eq. 9 (overlap form): [..., Tc] compressed scores -> [..., Ts] selection-block scores."""
    a, r = cfg.cmp_block // cfg.cmp_stride, cfg.sel_block // cfg.cmp_stride
    w = overlap_weights(cfg)
    K = len(w)
    need = (num_sel - 1) * r + K                     # padded length covering every window
    padded = F.pad(p_cmp, (a - 1, max(0, need - (a - 1) - p_cmp.shape[-1])))
    # A weighted sum of K strided slices: one fused pointwise kernel under Inductor (as a
    # matrix-vector product over unfolded windows it was a 14 ms fp32 gemv at 64k on an H100).
    span = (num_sel - 1) * r + 1
    out = w[0] * padded[..., 0:span:r]
    for m in range(1, K):
        out = out + w[m] * padded[..., m:m + span:r]
    return out


def _candidates(p_slc: torch.Tensor, pos: torch.Tensor, cfg: NSAConfig):
    """Block numbers j [Ts], and which are candidates (j·l' ≤ t) and forced, [P, Ts] each."""
    j = torch.arange(p_slc.shape[-1], device=p_slc.device)
    cur = (pos // cfg.sel_block)[:, None]
    cand = j <= cur
    return j, cand, cand & is_forced(j, cur, cfg.n_init, cfg.n_local)


def top_n(p_slc: torch.Tensor, pos: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """Eqs. 11–12: [..., P, Ts] scores at positions ``pos`` [P] -> [..., P, n] block numbers.

    Candidates are blocks with j·l' ≤ t; the n_init first and the n_local blocks ending at ⌊t/l'⌋
    are forced; the rest go by score, ties to the lower j (the key packs the score's bits above
    the reversed block number, so one integer top-k is exact). Unused slots hold −1.
    """
    Ts = p_slc.shape[-1]
    j, cand, forced = _candidates(p_slc, pos, cfg)
    p = p_slc.float()
    bits = torch.where(p > 0, p, 0.0).view(torch.int32)   # (not clamp_min: −0.0 would stay, sign bit set)
    key = torch.where(forced, _FORCED_KEY, torch.where(cand, bits, -1)).to(torch.int64)
    key = (key << 32) | (Ts - 1 - j)
    k = min(cfg.sel_topn, Ts)
    top = torch.topk(key, k, dim=-1, sorted=False).values
    idx = torch.where(top >= 0, Ts - 1 - (top & 0xFFFFFFFF), -1)
    if k < cfg.sel_topn:
        idx = F.pad(idx, (0, cfg.sel_topn - k), value=-1)
    return idx.to(torch.int32)


def top_n_by_value(p_slc: torch.Tensor, pos: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """The blocks of :func:`top_n` (tuning.TOPN_BY_VALUE), found by a float32 top-k (a radix
    select over 32-bit values: half the passes of top_n's 64-bit keys) for the n-th largest
    value v, then taken as every block above v and, of those equal to v, the lowest j until n
    (the ties rule of eqs. 11–12). Forced blocks rank as +inf, non-candidates as −1 (scores are
    ≥ 0). Returned in ascending j (the order inside a row is free); unused slots hold −1.
    """
    Ts = p_slc.shape[-1]
    j, cand, forced = _candidates(p_slc, pos, cfg)
    val = torch.where(forced, float("inf"), torch.where(cand, p_slc.float().clamp_min(0), -1.0))
    k = min(cfg.sel_topn, Ts)
    kth = torch.topk(val, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above, tie = val > kth, val == kth
    room = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    take = above | (tie & (tie.cumsum(-1, dtype=torch.int32) <= room))   # exactly k per row
    slot = torch.where(take, take.cumsum(-1, dtype=torch.int32) - 1, k)  # the rest: a spare slot
    block = torch.where(val >= 0, j, -1).expand_as(val)
    idx = torch.full((*val.shape[:-1], k + 1), -1, dtype=torch.int64, device=val.device)
    idx = idx.scatter(-1, slot.long(), block)[..., :k]
    if k < cfg.sel_topn:
        idx = F.pad(idx, (0, cfg.sel_topn - k), value=-1)
    return idx.to(torch.int32)


@torch.no_grad()
def selection_scores(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                     cfg: NSAConfig, scale: float, group: int, t0: int, t1: int,
                     num_sel: int | None = None) -> torch.Tensor:
    """Importance scores p_slc [B, Hkv, t1 − t0, Ts] of positions t0 … t1−1 (eqs. 8–10).

    q_packed [B, Hkv, T·G, Dk]; k_cmp [B, Hkv, Tc, Dk]; lse_cmp [B, Hkv, T·G] the compressed
    branch's log-sum-exp (natural log), so p_cmp = exp(scale·q·k − lse) (eq. 8). ``num_sel``:
    only the first selection blocks (default all Ts of the sequence).
    """
    B, H, TG, _ = q_packed.shape
    Tc, Ts = k_cmp.shape[2], num_sel or cfg.num_sel_blocks(TG // group)
    if Tc == 0:
        return q_packed.new_zeros(B, H, t1 - t0, Ts, dtype=torch.float32)
    pos = torch.arange(t0, t1, device=q_packed.device)
    i = torch.arange(Tc, device=q_packed.device)
    q = q_packed[:, :, t0 * group:t1 * group]
    s = torch.matmul(q, k_cmp.transpose(-1, -2)).float() * scale
    lse = lse_cmp[:, :, t0 * group:t1 * group, None].float()
    visible = (i * cfg.cmp_stride + cfg.cmp_block - 1)[None, :] <= pos.repeat_interleave(group)[:, None]
    p = torch.where(visible, torch.exp(s - lse), 0.0)             # eq. 8, per query head
    p = p.view(B, H, t1 - t0, group, Tc).sum(3)                 # eq. 10, sum over the group
    return pool_to_selection_blocks(p, cfg, Ts)                 # eq. 9


def _sliced(need: int, total: int) -> int:
    """``need`` of ``total`` columns rounded up to a multiple of ceil(total / SCORE_CAUSAL_SLICES),
    so that at most that many chunk shapes exist (each compiles its own kernels)."""
    step = -(-total // tuning.SCORE_CAUSAL_SLICES)
    return min(total, -(-need // step) * step)


def _visible_k_cmp(k_cmp: torch.Tensor, cfg: NSAConfig, t1: int) -> torch.Tensor:
    """The compressed keys that positions before t1 can see (eq. 8 gives the others 0), rounded
    up to one of tuning.SCORE_CAUSAL_SLICES lengths; all of them when that knob is 0."""
    Tc = k_cmp.shape[2]
    if not tuning.SCORE_CAUSAL_SLICES or Tc == 0:
        return k_cmp
    return k_cmp[:, :, :_sliced(cfg.num_cmp_blocks(t1), Tc)]


def _visible_sel_blocks(cfg: NSAConfig, t1: int, Ts: int) -> int:
    """How many selection blocks a chunk of positions ending before t1 ranks: with
    tuning.TOPN_CAUSAL (and SCORE_CAUSAL_SLICES > 0) its candidates j·l' ≤ t1 − 1, rounded up
    to one of SCORE_CAUSAL_SLICES lengths; else all Ts. Later blocks are never candidates, so the
    selection is the same."""
    if not (tuning.TOPN_CAUSAL and tuning.SCORE_CAUSAL_SLICES) or t1 <= 0:
        return Ts
    return _sliced((t1 - 1) // cfg.sel_block + 1, Ts)


@torch.no_grad()
def select_blocks(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                  cfg: NSAConfig, scale: float, group: int, seq_len: int) -> torch.Tensor:
    """Scores and top-n for every position, chunk by chunk: returns [B, Hkv, T, n] int32 block
    numbers. Arguments as in :func:`selection_scores`. With tuning.SCORE_KERNEL (CUDA) the
    scores of a chunk come from one Triton kernel (score_kernel.py), which keeps no per-head
    scores, so its chunks are sized by the top-n's int64 keys alone; with tuning.TOPN_KERNEL
    (CUDA) its top-n from another (topn_kernel.py)."""
    B, H, _, _ = q_packed.shape
    Tc = k_cmp.shape[2]
    Ts = cfg.num_sel_blocks(seq_len)
    fused = bool(tuning.SCORE_KERNEL) and q_packed.is_cuda and Tc > 0
    if fused:   # (where the kernel's tiles do not fit, nsa_attention has warned once)
        from . import score_kernel   # imports triton: CUDA only

        fused = score_kernel.unfit(cfg, group) is None
    if fused:
        chunk = tuning.SCORE_CHUNK_ELEMS // (2 * B * H * Ts)
        if tuning.TOPN_CAUSAL and tuning.SCORE_CAUSAL_SLICES:   # one chunk per causal slice
            chunk = min(chunk, -(-seq_len // tuning.SCORE_CAUSAL_SLICES))
    else:
        chunk = tuning.SCORE_CHUNK_ELEMS // max(1, group * max(Tc, 1) * B * H)
    chunk = max(1, min(seq_len, chunk))
    rank = top_n_by_value if tuning.TOPN_BY_VALUE else top_n
    topn_kernel = bool(tuning.TOPN_KERNEL) and q_packed.is_cuda
    if topn_kernel:   # (where a row does not fit, nsa_attention has warned once)
        from . import topn_kernel as tk   # imports triton: CUDA only

        topn_kernel = tk.unfit(Ts) is None   # the widest row, the last chunk's (the warning's test)
    out = []
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        num_sel = _visible_sel_blocks(cfg, t1, Ts)
        args = (cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, scale, group, t0, t1, num_sel)
        if fused:   # the kernel stops at each tile's last visible block by itself
            p_slc = torch.ops.nsa_flex.selection_scores(q_packed, k_cmp, lse_cmp, *args)
        else:
            p_slc = selection_scores(q_packed, _visible_k_cmp(k_cmp, cfg, t1), lse_cmp, cfg, scale,
                                     group, t0, t1, num_sel=num_sel)
        if topn_kernel:
            out.append(torch.ops.nsa_flex.top_n(p_slc, t0, cfg.sel_block, cfg.n_init, cfg.n_local,
                                                cfg.sel_topn))
        else:
            out.append(rank(p_slc, torch.arange(t0, t1, device=q_packed.device), cfg))
    return torch.cat(out, dim=2)
