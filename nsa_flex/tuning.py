"""GPU tuning knobs, all in one place. None of them changes results beyond rounding."""

from __future__ import annotations

import torch

# Packed-GQA query tile (rows = positions x G) of every branch's BlockMask.
Q_BLOCK = 128
# KV tile of the sliding and compressed branches.
KV_BLOCK = 128
# KV tile of the selected branch; None = the largest power of two dividing l', within [16, 128].
SEL_KV_BLOCK = None
# Scoring pass: at most this many fp32 score elements (positions x Hq x Tc) live at once.
SCORE_CHUNK_ELEMS = 1 << 27
# Extra FlexAttention kernel options per branch ("cmp", "slc", "swa"), merged over the defaults
# below. Keys: fwd_BLOCK_M, fwd_BLOCK_N, fwd_num_stages, fwd_num_warps, bwd_BLOCK_M1, bwd_BLOCK_N1,
# bwd_BLOCK_M2, bwd_BLOCK_N2, bwd_num_stages, bwd_num_warps.
KERNEL_OPTIONS: dict[str, dict] = {"cmp": {}, "slc": {}, "swa": {}}


def kernel_options(branch: str, dtype: torch.dtype, qk_dim: int, kv_block: int) -> dict:
    """FlexAttention kernel options for one branch call.

    - float32: Inductor's sm90 default forward tile for head dims it has no entry for (64x64,
      3 stages) needs more shared memory than the card has at Dk=192, so use 32x32, 2 stages.
    - a KV tile below 128 (the selected branch with l' = 64): sm90's default backward tile at
      D <= 128 reads 128 keys per step, which a 64-key sparse block cannot feed; use 64x64.
    """
    opts: dict = {}
    if dtype == torch.float32:
        opts.update(fwd_BLOCK_M=32, fwd_BLOCK_N=32, fwd_num_stages=2, fwd_num_warps=4)
    elif kv_block < 128:
        n = min(64, kv_block)
        opts.update(bwd_BLOCK_M1=64, bwd_BLOCK_N1=n, bwd_BLOCK_M2=64, bwd_BLOCK_N2=n,
                    bwd_num_stages=2 if qk_dim > 128 else 3, bwd_num_warps=4,
                    fwd_BLOCK_N=min(64, kv_block))
    opts.update(KERNEL_OPTIONS.get(branch, {}))
    return opts or None
