"""The backward of one gated branch (nsa_flex/gating.py, eq. 5) in one Triton kernel, for CUDA.

For the branch's packed output o [B, Hkv, T·G, Dv], its gate g [B, T, Hq] and the incoming
gradient do [B, T, Hq, Dv], one pass reads each row once and writes

    d_o[b, h, r] = do[b, t, h·G + j] · g[b, t, h·G + j]      (packed: r = t·G + j; float32
                                                              product, stored in do's dtype)
    d_g[b, t, h·G + j] = Σ_d do[b, t, h·G + j, d] · o[b, h, r, d]     (float32)

It exists so that each branch's gradient is a kernel of its own (Inductor fuses the three
branches' into one when it generates them; see gating.py): the same arithmetic as the torch route
(``gating._gated_grad_torch``), which is its test's reference.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gated_grad_kernel(do_ptr, g_ptr, o_ptr, d_o_ptr, d_g_ptr, rows, T, Hkv, Dv,
                       s_do_b, s_do_t, s_do_h, s_do_d, s_g_b, s_g_t, s_g_h,
                       s_o_b, s_o_h, s_o_r, s_o_d, G: tl.constexpr, BR: tl.constexpr,
                       BD: tl.constexpr):
    """One program: BR packed rows r (position r // G, head h·G + r % G) of one (batch, KV head)."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hkv, bh % Hkv
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    d = tl.arange(0, BD)
    row_ok = r < rows
    ok = row_ok[:, None] & (d < Dv)[None, :]
    t, head = r // G, h * G + r % G
    do = tl.load(do_ptr + b * s_do_b + t[:, None] * s_do_t + head[:, None] * s_do_h
                 + d[None, :] * s_do_d, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * s_o_b + h * s_o_h + r[:, None] * s_o_r + d[None, :] * s_o_d,
                mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * s_g_b + t * s_g_t + head * s_g_h, mask=row_ok, other=0.0)
    tl.store(d_o_ptr + (bh * rows + r)[:, None] * Dv + d[None, :],
             (do * g[:, None]).to(d_o_ptr.dtype.element_ty), mask=ok)
    tl.store(d_g_ptr + (b * T + t) * (Hkv * G) + head, tl.sum(do * o, 1), mask=row_ok)


def launch(do, g, o, d_o, d_g, rows_per_program: int = 32):
    """Run the kernel: do [B, T, Hq, Dv], g [B, T, Hq] float32, o [B, Hkv, T·G, Dv] (any
    strides); writes d_o [B, Hkv, T·G, Dv] and d_g [B, T, Hq] float32 (both contiguous)."""
    B, T, Hq, Dv = do.shape
    Hkv = o.shape[1]
    rows = T * (Hq // Hkv)
    grid = (triton.cdiv(rows, rows_per_program), B * Hkv)
    _gated_grad_kernel[grid](do, g, o, d_o, d_g, rows, T, Hkv, Dv, *do.stride(), *g.stride(),
                             *o.stride(), G=Hq // Hkv, BR=rows_per_program,
                             BD=triton.next_power_of_2(Dv))
