"""nsa_flex/kernels.py: the KernelConfig every shape the contract admits gets is one the
kernels can run (or the shape is refused before compute), and bad configurations are refused."""

import itertools

import pytest
import torch

from nsa_flex import NSAConfig
from nsa_flex.kernels import (FlexTiles, KernelConfig, check_head_dims, choose_kernel, flex_kernel,
                              sel_kv_block)


def admitted_configs():
    """NSAConfigs over the spec's space: d | l, d | l', l ≤ l' (every l' in multiples of d)."""
    for d, a, r in itertools.product((1, 2, 3, 4, 8, 16, 32), (1, 2, 3), (1, 2, 3, 4, 5, 8)):
        if a <= r:
            yield NSAConfig(cmp_block=a * d, cmp_stride=d, sel_block=r * d, sel_topn=2, n_init=1,
                            n_local=1, window=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_admitted_shape_gets_runnable_tiles(dtype):
    for cfg in admitted_configs():
        for head in (1, 8, 15, 16, 24, 32, 64, 80, 96, 128, 160, 192, 256):
            k = flex_kernel(dtype, head, head, cfg)          # __post_init__ checks every branch
            assert k.backend == "flex"
            slc = k.slc
            assert slc.kv_block in (16, 32, 64, 128)
            # a selected block is whole tiles or straddles them (then the table's mask reads it)
            assert cfg.sel_block % slc.kv_block == 0 or slc.kv_block == 16
            for t in (k.cmp, k.slc, k.swa):
                m1, n1, m2, n2 = t.bwd[:4]
                assert n1 % m1 == 0
                assert t.fwd[0] <= t.q_block and t.fwd[1] <= t.kv_block


def test_selected_key_tile_is_the_largest_dividing_power_of_two():
    assert [sel_kv_block(NSAConfig(cmp_block=d, cmp_stride=d, sel_block=lp))
            for d, lp in [(16, 64), (16, 128), (8, 32), (16, 16), (8, 24), (3, 9), (16, 48)]] == \
        [64, 128, 32, 16, 16, 16, 16]


def test_cpu_takes_the_dense_backend():
    assert choose_kernel("cpu", torch.float32, 64, 64, NSAConfig()) == KernelConfig("dense")


def test_head_dims_above_the_limit_are_refused_before_compute():
    k = flex_kernel(torch.bfloat16, 256, 256, NSAConfig())
    check_head_dims(256, 256, k)
    with pytest.raises(ValueError, match="Dk=257.*up to 256.*KernelConfig\\('dense'\\)"):
        check_head_dims(257, 64, k)
    check_head_dims(512, 512, KernelConfig("dense"))      # the dense backend has no such limit


@pytest.mark.parametrize("bad,match", [
    (dict(backend="triton"), "backend='triton'"),
    (dict(backend="flex"), "needs tiles for 'cmp'"),
    (dict(backend="dense", score_tiles=(100, 64, 8, 3)), "rows=100 must be a power of two"),
    (dict(backend="dense", topn_tile=8), "topn_tile=8"),
    (dict(backend="dense", score_slices=0), "score_slices=0"),
])
def test_bad_kernel_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        KernelConfig(**bad)


@pytest.mark.parametrize("tiles,match", [
    (FlexTiles(16, 64, 1, (16, 128, 2, 3), (16, 64, 16, 64, 4, 3)), "fwd BLOCK_N=128"),
    (FlexTiles(16, 64, 1, (16, 64, 2, 3), (32, 64, 16, 64, 4, 3)), "bwd BLOCK_M1=32"),
    (FlexTiles(128, 128, 1, (128, 64, 8, 3), (64, 32, 64, 64, 8, 3)), "BLOCK_N1=32 must be a multiple"),
    (FlexTiles(128, 128, 0, (128, 64, 8, 3), (64, 128, 128, 64, 8, 3)), "q_splits=0"),
    (FlexTiles(48, 128, 1, (48, 64, 8, 3), (16, 128, 16, 64, 8, 3)), "fwd BLOCK_M=48"),
])
def test_bad_tiles_are_refused(tiles, match):
    k = flex_kernel(torch.bfloat16, 64, 64, NSAConfig())
    with pytest.raises(ValueError, match=match):
        k.replace(slc=tiles)


def test_kernel_options_name_every_tile():
    t = flex_kernel(torch.bfloat16, 128, 128, NSAConfig()).slc
    opts = t.kernel_options()
    assert opts == dict(fwd_BLOCK_M=16, fwd_BLOCK_N=64, fwd_num_warps=2, fwd_num_stages=3,
                        bwd_BLOCK_M1=16, bwd_BLOCK_N1=64, bwd_BLOCK_M2=16, bwd_BLOCK_N2=64,
                        bwd_num_warps=4, bwd_num_stages=3, FORCE_USE_FLEX_ATTENTION=True,
                        USE_TMA=True)
