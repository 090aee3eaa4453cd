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
SCORE_CHUNK_ELEMS = 1 << 28
# Extra FlexAttention kernel options per branch ("cmp", "slc", "swa"), merged over the defaults
# below. Keys: fwd_BLOCK_M, fwd_BLOCK_N, fwd_num_stages, fwd_num_warps, bwd_BLOCK_M1, bwd_BLOCK_N1,
# bwd_BLOCK_M2, bwd_BLOCK_N2, bwd_num_stages, bwd_num_warps.
KERNEL_OPTIONS: dict[str, dict] = {"cmp": {}, "slc": {}, "swa": {}}


def kernel_options(branch: str, dtype: torch.dtype, qk_dim: int, kv_block: int) -> dict:
    """FlexAttention kernel options for one branch call.

    - float32: Inductor's sm90 default forward tile for head dims it has no entry for (64x64,
      3 stages) needs more shared memory than the card has at Dk=192, so use 32x32, 2 stages.
    - a KV tile below 128 (the selected branch with l' = 64): a forward tile of at most 64 keys;
      the backward tile comes from :func:`install_flex_backward_configs`.
    """
    opts: dict = {}
    if dtype == torch.float32:
        opts.update(fwd_BLOCK_M=32, fwd_BLOCK_N=32, fwd_num_stages=2, fwd_num_warps=4)
    elif kv_block < 128:
        opts.update(fwd_BLOCK_N=min(64, kv_block))
    opts.update(KERNEL_OPTIONS.get(branch, {}))
    return opts or None


# A 64x64 FlexAttention backward tile for bf16/fp16 on CUDA. Inductor filters its backward configs
# by the BlockMask's sparse block sizes *before* kernel options apply, and on sm90 at D <= 128 its
# only default (BLOCK_N1 = 128) cannot run a 64-key sparse block (NoValidChoicesError). Adding this
# candidate lets the selected branch use l' = 64 tiles; where several candidates fit, Inductor
# benchmarks them once at compile time.
EXTRA_BWD_CONFIG = (64, 64, 64, 64)  # BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2


def install_flex_backward_configs() -> bool:
    """Add EXTRA_BWD_CONFIG to Inductor's CUDA flex backward candidates (idempotent).

    Returns False where this torch lacks the heuristic it extends; the selected branch then uses
    128-key tiles.
    """
    global SEL_KV_BLOCK
    try:
        from torch._inductor.template_heuristics import triton as heuristics
        cls = heuristics.CUDAConfigHeuristic
        original = cls.get_flex_attn_bwd_configs
    except (ImportError, AttributeError):
        if SEL_KV_BLOCK is None:
            SEL_KV_BLOCK = 128
        return False
    if getattr(original, "_nsa_flex_extra", False):
        return True

    def get_flex_attn_bwd_configs(self, head_dim, dtype):
        configs = list(original(self, head_dim, dtype))
        if dtype != torch.float32:
            m1, n1, m2, n2 = EXTRA_BWD_CONFIG
            if not any((c.block_m1, c.block_n1, c.block_m2, c.block_n2) == EXTRA_BWD_CONFIG for c in configs):
                configs.append(heuristics.FlexBwDConfig(m1, n1, m2, n2, 3 if head_dim <= 128 else 2, 4))
        return configs

    get_flex_attn_bwd_configs._nsa_flex_extra = True
    cls.get_flex_attn_bwd_configs = get_flex_attn_bwd_configs
    return True
