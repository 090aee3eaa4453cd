"""An independent float64 reference of docs/spec.md, written plainly: token-level masks, explicit
interval overlaps, and a Python top-n. Shares no code with the operator."""

from __future__ import annotations

import math

import torch


def _masked_softmax_attend(s, mask, v):
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))  # no key: output 0
    return p @ v, p


def reference_top_n(score: list[float], t: int, cfg) -> set[int]:
    """Eqs. 11–12 for the query at t over its row of block scores: the candidates j·l' ≤ t, the
    forced ones (the n_init first, the n_local ending at ⌊t/l'⌋) and then the best by score, ties
    to the lower j, n in all (every candidate where there are fewer)."""
    lp, n = cfg.sel_block, cfg.sel_topn
    cur = t // lp
    cands = [j for j in range(len(score)) if j * lp <= t]
    forced = [j for j in cands if j < cfg.n_init or cur - cfg.n_local < j <= cur]
    rest = sorted((j for j in cands if j not in forced), key=lambda j: (-score[j], j))
    return set(forced + rest[: max(0, n - len(forced))])


def reference_nsa(q, k, v, k_cmp, v_cmp, gates, cfg, k_swa=None, v_swa=None):
    """Returns (o [B,T,Hq,Dv] float64, selected: list[list[list[set]]] indexed [b][kv_head][t])."""
    q, k, v, k_cmp, v_cmp, gates = (x.double() for x in (q, k, v, k_cmp, v_cmp, gates))
    k_swa = k if k_swa is None else k_swa.double()
    v_swa = v if v_swa is None else v_swa.double()
    B, T, Hq, Dk = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    Tc = k_cmp.shape[1]
    l, d, lp = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(Dk)
    Ts = (T + lp - 1) // lp
    t_ = torch.arange(T)[:, None]
    s_ = torch.arange(T)[None, :]
    cmp_visible = torch.tensor([[i * d + l - 1 <= t for i in range(Tc)] for t in range(T)],
                               dtype=torch.bool).reshape(T, Tc)
    window = (s_ <= t_) & (s_ > t_ - cfg.window)
    overlap = torch.zeros(Tc, Ts, dtype=torch.float64)
    for i in range(Tc):
        for j in range(Ts):
            lo, hi = max(i * d, j * lp), min(i * d + l, (j + 1) * lp)
            overlap[i, j] = max(0, hi - lo) / d
    outs = torch.zeros(B, T, Hq, v.shape[-1], dtype=torch.float64)
    selected = []
    for b in range(B):
        sel_b = []
        for kh in range(Hkv):
            heads = range(kh * G, (kh + 1) * G)
            p_cmp = {}
            o_cmp = {}
            for h in heads:
                s = (q[b, :, h] @ k_cmp[b, :, kh].T) * scale
                o_cmp[h], p_cmp[h] = _masked_softmax_attend(s, cmp_visible, v_cmp[b, :, kh])
            score = sum(p_cmp[h] for h in heads) @ overlap          # [T, Ts]
            sel_mask = torch.zeros(T, T, dtype=torch.bool)
            sel_t = []
            for t in range(T):
                chosen = reference_top_n(score[t].tolist(), t, cfg)
                sel_t.append(chosen)
                for j in chosen:
                    sel_mask[t, j * lp: min(T, (j + 1) * lp)] = True
            sel_mask &= s_ <= t_
            sel_b.append(sel_t)
            for h in heads:
                s_slc = (q[b, :, h] @ k[b, :, kh].T) * scale
                o_slc, _ = _masked_softmax_attend(s_slc, sel_mask, v[b, :, kh])
                s_swa = (q[b, :, h] @ k_swa[b, :, kh].T) * scale
                o_swa, _ = _masked_softmax_attend(s_swa, window, v_swa[b, :, kh])
                g = gates[b, :, h]
                outs[b, :, h] = g[:, 0:1] * o_cmp[h] + g[:, 1:2] * o_slc + g[:, 2:3] * o_swa
        selected.append(sel_b)
    return outs, selected
