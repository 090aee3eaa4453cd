"""Does FlexAttention's backward read narrow query-side lists right?

The selected branch's BlockMask can carry partial query-side lists only kv_block·G/q_block wide
(``masks.selected_block_mask(..., narrow_q=True)``) instead of one column per query tile. This
builds both from one random selection (T = 1024, Hkv = 2, G = 16, D = 64, l' = 64, n = 8; one
position per 16-row query tile), checks that they list the same query tiles, then runs one
compiled FlexAttention fwd+bwd (float32) with each — and with the narrow lists zero-padded to the
full width — against dense masked softmax attention, for 1 and 4 query splits:

    python tools/check_narrow_q.py --out narrow_q.json      # CUDA

On an H100 (torch 2.11) the narrow lists gave dK/dV errors of 8-22 (relative) while the same
lists padded gave 6e-7 to 2e-6: the backward assumes lists as wide as the query tile count. On a
machine without CUDA only the list comparison runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: E402

from masks import dense_mask, selected_block_mask, selected_mask, selection_table  # noqa: E402
from masks.packing import merge_rows, split_rows  # noqa: E402
from nsa_flex import tuning  # noqa: E402
from nsa_flex.backends import split_mask_mod  # noqa: E402

T, HKV, G, D, SEL, N, KB, QB = 1024, 2, 16, 64, 64, 8, 64, 16


def random_selection(device):
    """[1, Hkv, T, n] distinct block numbers (−1 unused): the first and the current block always,
    the rest random among the blocks a position can see."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, T // SEL, (1, HKV, T, N), generator=g)
    cur = torch.arange(T) // SEL
    idx[..., 0], idx[..., 1] = 0, cur
    idx = torch.where(idx <= cur[:, None], idx, -1)
    idx = torch.sort(idx, -1).values
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    return idx.int().to(device)


def padded(bm: BlockMask, width: int) -> BlockMask:
    """The same mask with its partial query-side lists zero-padded to ``width`` columns."""
    q_idx = F.pad(bm.q_indices, (0, width - bm.q_indices.shape[-1])).contiguous()
    return BlockMask(bm.seq_lengths, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                     bm.full_kv_indices, bm.q_num_blocks, q_idx, bm.full_q_num_blocks,
                     bm.full_q_indices, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tuning.install_flex_backward_configs()
    idx = random_selection(device)
    mm = selected_mask(selection_table(idx, T // SEL), SEL, G)
    if cuda:
        gen = torch.Generator(device=device).manual_seed(1)
        q = torch.randn(1, HKV, T * G, D, device=device, generator=gen)
        k, v, go = (torch.randn(*s, device=device, generator=gen)
                    for s in ((1, HKV, T, D), (1, HKV, T, D), (1, HKV, T * G, D)))
        allowed = dense_mask(mm, 1, HKV, T * G, T, device)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        s = (leaves[0] @ leaves[1].transpose(-1, -2)) * D ** -0.5
        out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ leaves[2]
        out.backward(go)
        want = (out.detach(), *(t.grad for t in leaves))
        flex = torch.compile(flex_attention, fullgraph=True)
    rows = []
    for S in (1, 4):
        m = split_mask_mod(mm, S, T * G // S, 1) if S > 1 else mm
        wide, narrow = (selected_block_mask(idx, SEL, G, QB, KB, m, narrow_q=nq, q_splits=S)
                        for nq in (False, True))
        same = torch.equal(wide.q_num_blocks, narrow.q_num_blocks)
        for r in range(wide.q_num_blocks.numel()):
            c = int(wide.q_num_blocks.flatten()[r])
            same &= torch.equal(wide.q_indices.flatten(0, -2)[r, :c].sort().values,
                                narrow.q_indices.flatten(0, -2)[r, :c].sort().values)
        row = {"q_splits": S, "same_query_lists": bool(same),
               "widths": {"wide": wide.q_indices.shape[-1], "narrow": narrow.q_indices.shape[-1]}}
        if cuda:
            masks = {"wide": wide, "narrow": narrow,
                     "narrow_padded": padded(narrow, wide.q_indices.shape[-1])}
            for name, bm in masks.items():
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                qs = split_rows(leaves[0], S) if S > 1 else leaves[0]
                o = flex(qs, leaves[1], leaves[2], block_mask=bm,
                         kernel_options=tuning.kernel_options("slc", torch.float32, D, KB, QB))
                o = merge_rows(o, S) if S > 1 else o
                o.backward(go)
                got = (o.detach(), *(t.grad for t in leaves))
                row[name] = {n: ((a - b).norm() / b.norm()).item()
                             for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
