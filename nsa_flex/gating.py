"""The gated sum of the branches (NSA eq. 5), o_t = Σ_c g_t^c · o_t^c, in float32 (float64 for
float64 inputs).

Each branch's output o^c arrives packed ([B, Hkv, T·G, Dv], masks/packing.py); the sum is
unpacked to [B, T, Hq, Dv] and cast to the query's dtype.

Memory (the flex backend sets the compressed branch apart): the backward of the plain expression is one fused kernel that
writes every branch's output gradient g^c · do at once (1 GiB each at 64k with Hq = 64, bf16),
all alive while the first branch's FlexAttention backward runs. For a branch set apart, its term
enters the sum without autograd (the value is the plain sum, same rounding), and a node whose
forward adds nothing (zeros) is added right after the branch (:meth:`GatedSum.add`); its
backward writes that branch's packed gradient through an opaque op (:func:`gated_grad`), which
Inductor cannot merge with the others'. The autograd engine runs the most recent ready node
first, so that gradient is computed after the later branches' backward, just before its own
branch's. For the compressed branch alone: at 64k that lowers the peak by 1 GiB at no measurable
cost, while the other two branches' FlexAttention backward kernels ran slower with their
gradient from the op (docs/performance.md).
"""

from __future__ import annotations

import torch

from masks import pack_gqa, unpack_gqa


def _gated_grad_torch(do, g, o):
    """The torch route of :func:`gated_grad` (CPU, and the reference of the kernel's test)."""
    B, T, Hq, Dv = do.shape
    Hkv = o.shape[1]
    ctype = g.dtype
    d_o = pack_gqa((do.to(ctype) * g[..., None]).to(do.dtype), Hkv)
    d_g = (do.to(ctype) * unpack_gqa(o, T).to(ctype)).sum(-1)
    return d_o, d_g


@torch.library.custom_op("nsa_flex::gated_grad", mutates_args=())
def gated_grad(do: torch.Tensor, g: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of g · unpack(o) for an incoming do, in one pass: o's, packed
    (pack_gqa(do · g) in do's dtype, the product in float32), and g's (Σ over Dv of do · o,
    float32). do [B, T, Hq, Dv]; g [B, T, Hq] float32; o [B, Hkv, T·G, Dv]. A Triton kernel on
    CUDA (reads do, o and g once, writes straight into the packed layout), torch ops elsewhere."""
    if not do.is_cuda:
        return _gated_grad_torch(do, g, o)
    from .gate_kernel import launch
    B, T, Hq, Dv = do.shape
    d_o = do.new_empty(o.shape)
    d_g = torch.empty(B, T, Hq, dtype=torch.float32, device=do.device)
    launch(do, g, o, d_o, d_g)
    return d_o, d_g


@gated_grad.register_fake
def _(do, g, o):
    return do.new_empty(o.shape), g.new_empty(g.shape, dtype=torch.float32)


class _GradOnly(torch.autograd.Function):
    """Forward: zeros [B, T, Hq, Dv] (adds nothing). Backward: the gradients of g · unpack(o),
    by :func:`gated_grad`."""

    @staticmethod
    def forward(ctx, o, g, seq_len: int):
        ctx.save_for_backward(o, g)
        B, Hkv, TG, Dv = o.shape
        return o.new_zeros(B, seq_len, TG // seq_len * Hkv, Dv)

    @staticmethod
    def backward(ctx, do):
        o, g = ctx.saved_tensors
        d_o, d_g = gated_grad(do, g, o)
        return d_o, d_g, None


class GatedSum:
    """Σ_c g^c · unpack(o^c) in float32, cast to ``dtype``. ``gates`` [B, T, Hq, C]; add the
    branches in order, each right after it is computed; :meth:`result` gives the sum. The
    gradients of the branches in ``apart`` (gate indices) come from their own nodes."""

    def __init__(self, gates: torch.Tensor, seq_len: int, dtype: torch.dtype,
                 apart: tuple[int, ...] = ()):
        self.g = gates.to(torch.promote_types(gates.dtype, torch.float32))
        self.seq_len, self.dtype, self.apart = seq_len, dtype, apart
        self.terms: list[tuple[torch.Tensor, int, bool]] = []
        self.grad_nodes: list[torch.Tensor] = []

    def add(self, o: torch.Tensor, c: int) -> None:
        """Branch c's packed output o [B, Hkv, T·G, Dv]."""
        apart = c in self.apart and torch.is_grad_enabled()
        self.terms.append((o, c, apart))
        if apart:
            self.grad_nodes.append(_GradOnly.apply(o, self.g[..., c], self.seq_len))

    def result(self) -> torch.Tensor:
        o = None
        for out, c, apart in self.terms:
            g = self.g[..., c:c + 1]
            if apart:   # its gradient comes from its node in grad_nodes
                out, g = out.detach(), g.detach()
            term = g * unpack_gqa(out, self.seq_len).to(g.dtype)
            o = term if o is None else o + term
        o = o.to(self.dtype)
        for z in self.grad_nodes:
            o = o + z
        return o
