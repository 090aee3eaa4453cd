"""Block selection of NSA §3.3.2 (docs/spec.md): importance scores (eqs. 8–10, overlap form)
and top-n (eqs. 11–12). Nothing here is differentiated: the selection is a discrete choice.

Each step exists once per device: on CUDA a Triton kernel (score_kernel.py, topn_kernel.py), on
any other device the torch route written here, which is also the kernels' test reference. Both
walk the sequence in chunks of positions, each scoring and ranking only the compressed and
selection blocks its positions can see, so that the [positions, Hq, Tc] probabilities never
exist for the whole sequence at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from masks import is_forced

from .config import NSAConfig
from .kernels import KernelConfig

_FORCED_KEY = torch.iinfo(torch.int32).max  # above the bit pattern of any finite float32 >= 0


def overlap_weights(cfg: NSAConfig) -> list[float]:
    """Eq. 9 (overlap form): weights of compressed blocks i = j·l'/d − (l/d − 1) … j·l'/d + l'/d − 1
    in selection block j: |[i·d, i·d+l) ∩ [j·l', (j+1)·l')| / d; for l=32, d=16, l'=64:
    1, 2, 2, 2, 1."""
    a, r = cfg.cmp_block // cfg.cmp_stride, cfg.sel_block // cfg.cmp_stride
    return [float(min(m + 1, a, r, r + a - 1 - m)) for m in range(r + a - 1)]


def pool_to_selection_blocks(p_cmp: torch.Tensor, cfg: NSAConfig, num_sel: int) -> torch.Tensor:
    """Eq. 9: [..., Tc] compressed scores (block i at index i) -> [..., Ts] selection-block scores."""
    a, r = cfg.cmp_block // cfg.cmp_stride, cfg.sel_block // cfg.cmp_stride
    w = overlap_weights(cfg)
    need = (num_sel - 1) * r + len(w)                # padded length covering every window
    padded = F.pad(p_cmp, (a - 1, max(0, need - (a - 1) - p_cmp.shape[-1])))
    span = (num_sel - 1) * r + 1                     # a weighted sum of strided slices
    out = w[0] * padded[..., 0:span:r]
    for m in range(1, len(w)):
        out = out + w[m] * padded[..., m:m + span:r]
    return out


def top_n(p_slc: torch.Tensor, pos: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """Eqs. 11–12: [..., P, Ts] scores at (document) positions ``pos`` (broadcastable to [..., P])
    -> [..., P, n] int32 block numbers, −1 in unused slots.

    Candidates are blocks with j·l' ≤ t; the n_init first and the n_local blocks ending at ⌊t/l'⌋
    are forced; the rest go by score, ties to the lower j: one integer top-k over keys that pack
    the score's bits above the reversed block number."""
    Ts = p_slc.shape[-1]
    j = torch.arange(Ts, device=p_slc.device)
    cur = (pos // cfg.sel_block)[..., None]
    cand = j <= cur
    forced = cand & is_forced(j, cur, cfg.n_init, cfg.n_local)
    p = p_slc.float()
    bits = torch.where(p > 0, p, 0.0).view(torch.int32)   # (not clamp_min: −0.0 keeps its sign bit)
    key = torch.where(forced, _FORCED_KEY, torch.where(cand, bits, -1)).to(torch.int64)
    key = (key << 32) | (Ts - 1 - j)
    k = min(cfg.sel_topn, Ts)
    top = torch.topk(key, k, dim=-1, sorted=False).values
    idx = torch.where(top >= 0, Ts - 1 - (top & 0xFFFFFFFF), -1)
    if k < cfg.sel_topn:
        idx = F.pad(idx, (0, cfg.sel_topn - k), value=-1)
    return idx.to(torch.int32)


@torch.no_grad()
def selection_scores(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                     cfg: NSAConfig, scale: float, group: int, t0: int, t1: int,
                     num_sel: int | None = None, doc_start=None, cmp_ends=None) -> torch.Tensor:
    """Importance scores p_slc [B, Hkv, t1 − t0, Ts] of positions t0 … t1−1 (eqs. 8–10), torch route.

    q_packed [B, Hkv, T·G, Dk]; k_cmp [B, Hkv, Tc, Dk]; lse_cmp [B, Hkv, T·G] the compressed
    branch's log-sum-exp (natural log), so p_cmp = exp(scale·q·k̃ − lse) (eq. 8). ``num_sel``:
    only the first selection blocks (default all Ts of the sequence). With documents (doc_start
    [B, T], cmp_ends [B, ≥ Tc]) slot c holds a block of the document whose first slot is
    ⌊s0/d⌋, and block numbers count within the position's document."""
    B, H, TG, _ = q_packed.shape
    Tc, Ts = k_cmp.shape[2], num_sel or cfg.num_sel_blocks(TG // group)
    if Tc == 0:
        return q_packed.new_zeros(B, H, t1 - t0, Ts, dtype=torch.promote_types(q_packed.dtype, torch.float32))
    device = q_packed.device
    pos = torch.arange(t0, t1, device=device)
    i = torch.arange(Tc, device=device)
    q = q_packed[:, :, t0 * group:t1 * group]
    ctype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(ctype), k_cmp.to(ctype).transpose(-1, -2)) * scale
    lse = lse_cmp[:, :, t0 * group:t1 * group, None].to(ctype)
    rows = pos.repeat_interleave(group)
    if doc_start is None:
        visible = ((i * cfg.cmp_stride + cfg.cmp_block - 1)[None, :] <= rows[:, None])[None, None]
    else:
        end = cmp_ends[:, None, None, :Tc]
        visible = (end <= rows[None, None, :, None]) & (end >= doc_start[:, None, rows, None])
    p = torch.where(visible, torch.exp(s - lse), 0.0)            # eq. 8, per query head
    p = p.view(B, H, t1 - t0, group, Tc).sum(3)                 # eq. 10, sum over the group
    if doc_start is not None:   # slot ⌊s0/d⌋ + i -> block i of the position's document
        slot = (doc_start[:, None, t0:t1, None] // cfg.cmp_stride).long() + i
        p = torch.where(slot < Tc, p.gather(-1, slot.clamp(max=Tc - 1).expand_as(p)), 0.0)
    return pool_to_selection_blocks(p, cfg, Ts)                 # eq. 9


def _sliced(need: int, total: int, slices: int) -> int:
    """``need`` of ``total`` columns rounded up to a multiple of ceil(total / slices), so that at
    most ``slices`` chunk shapes exist (each compiles its own kernels)."""
    step = -(-total // slices)
    return min(total, -(-need // step) * step)


@torch.no_grad()
def select_blocks(q_packed: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor,
                  cfg: NSAConfig, scale: float, group: int, seq_len: int, kernel: KernelConfig,
                  doc_start=None, cmp_ends=None) -> torch.Tensor:
    """Scores and top-n for every position, chunk by chunk: [B, Hkv, T, n] int32 block numbers
    (of each position's document). Arguments as in :func:`selection_scores`. A chunk ending
    before t1 scores only the compressed blocks complete by then and ranks only the selection
    blocks j·l' < t1 (later ones are never candidates), both rounded up to one of
    kernel.score_slices lengths."""
    B, H, _, _ = q_packed.shape
    Tc = k_cmp.shape[2]
    Ts = cfg.num_sel_blocks(seq_len)
    on_gpu = q_packed.is_cuda
    if on_gpu:   # the scoring kernel keeps no per-head scores: chunks sized by p_slc alone
        chunk = kernel.score_chunk_elems // (2 * B * H * Ts)
    else:
        chunk = kernel.score_chunk_elems // max(1, group * max(Tc, 1) * B * H)
    chunk = max(1, min(seq_len, chunk, -(-seq_len // kernel.score_slices)))
    if on_gpu:
        from . import score_kernel, topn_kernel  # noqa: F401  (register the CUDA operators)
    out = []
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        num_sel = _sliced((t1 - 1) // cfg.sel_block + 1, Ts, kernel.score_slices)
        seen = _sliced(cfg.num_cmp_blocks(t1), Tc, kernel.score_slices) if Tc else 0
        k_seen = k_cmp[:, :, :seen]
        if on_gpu:
            p_slc = torch.ops.nsa_flex.selection_scores(
                q_packed, k_seen, lse_cmp, cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, scale,
                group, t0, t1, num_sel, list(kernel.score_tiles), doc_start, cmp_ends)
            out.append(torch.ops.nsa_flex.top_n(p_slc, t0, cfg.sel_block, cfg.n_init, cfg.n_local,
                                                cfg.sel_topn, kernel.topn_tile, doc_start))
        else:
            p_slc = selection_scores(q_packed, k_seen, lse_cmp, cfg, scale, group, t0, t1,
                                     num_sel, doc_start, cmp_ends)
            pos = torch.arange(t0, t1, device=q_packed.device)
            if doc_start is not None:
                pos = (pos - doc_start[:, t0:t1])[:, None]
            out.append(top_n(p_slc, pos, cfg))
    return torch.cat(out, dim=2)
