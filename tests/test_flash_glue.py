"""The operator's glue for FlexAttention's FLASH backend (tuning.FLASH), on CPU.

flash-attn-4's kernels need a Hopper-class GPU, so here FlexAttention is replaced by a stand-in
that records what it is handed and answers as the FLASH lowering of torch 2.11 does (an LSE ln 2
times the true one); the kernels themselves are checked on the GPU (tools/check_gpu.py,
tools/bench_branches.py against the Triton backend).
"""

import math

import pytest
import torch
from torch.nn.attention import flex_attention as flex

from nsa_flex import backends


def _stand_in(calls):
    def flex_attention(q, k, v, block_mask=None, scale=None, kernel_options=None, return_aux=None):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
                      "options": kernel_options, "kv_blocks": tuple(block_mask.kv_num_blocks.shape)})
        B, H, L, _ = q.shape
        out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype)
        lse = torch.full((B, H, L), math.log(2.0))   # the true LSE is 1 in every row
        return (out, flex.AuxOutput(lse=lse)) if return_aux is not None else out
    return flex_attention


@pytest.mark.parametrize("flash", [True, False])
def test_flash_call_gets_kv_per_query_chunk_and_its_lse_rescaled(flash, monkeypatch):
    calls = []
    monkeypatch.setattr(backends._flex, "flex_attention", _stand_in(calls))
    monkeypatch.setitem(backends._FLASH_LSE_SCALE, torch.device("cpu"), math.log(2.0))
    q, k, v = torch.randn(1, 2, 1024, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 8)
    everything = lambda qb, kb: (torch.ones(1024 // qb, -(-300 // kb), dtype=torch.bool),) * 2
    out, lse = backends.attend(q, k, v, lambda b, h, qi, ki: qi >= 0, everything, 0.25,
                               use_flex=True, q_block=128, kv_block=128, need_lse=True, q_splits=4,
                               kernel_options={"BACKEND": "FLASH"} if flash else None)
    (call,) = calls
    assert call["q"] == (4, 2, 256, 16) and call["kv_blocks"][0] == 4     # 4 chunks as batch entries
    # FLASH broadcasts no KV batch: one copy per chunk; Triton's kernels broadcast a batch of 1
    assert call["k"] == ((4, 2, 300, 16) if flash else (1, 2, 300, 16))
    assert call["v"] == ((4, 2, 300, 8) if flash else (1, 2, 300, 8))
    assert out.shape == (1, 2, 1024, 8) and lse.shape == (1, 2, 1024)
    # FLASH's LSE divided by the measured scale; Triton's as it comes
    torch.testing.assert_close(lse, torch.full_like(lse, 1.0 if flash else math.log(2.0)))


def test_flash_lse_scale_must_be_measured_before_a_trace(monkeypatch):
    monkeypatch.setattr(backends, "_FLASH_LSE_SCALE", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="measure_flash_lse_scale"):
        backends.flash_lse_scale(torch.device("cpu"))
    backends._FLASH_LSE_SCALE[torch.device("cpu")] = 1.0
    assert backends.flash_lse_scale("cpu") == 1.0                   # "cpu" and its device agree
