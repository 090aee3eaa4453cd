"""nsa_flex/gating.py: the gated sum (eq. 5) with a branch's output gradient written apart
(the flex backend does it for the compressed branch), against the plain expression, on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nsa_flex.gating import GatedSum, gated_grad
from masks import pack_gqa, unpack_gqa

B, T, Hq, Hkv, DV = 2, 12, 6, 2, 8


def branches(dtype, seed=0):
    """Three 'branches': each a matmul chain from its own leaf, packed [B, Hkv, T·G, Dv]."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, Hkv, T * (Hq // Hkv), DV, generator=g).to(dtype).requires_grad_()
              for _ in range(3)]
    weights = [torch.randn(DV, DV, generator=g).to(dtype) for _ in range(3)]
    gates = torch.rand(B, T, Hq, 3, generator=g).to(dtype).requires_grad_()
    return leaves, weights, gates


def gated(leaves, weights, gates, apart, dtype):
    s = GatedSum(gates, T, dtype, apart=apart)
    for c, (x, w) in enumerate(zip(leaves, weights)):
        s.add(x @ w, c)
    return s.result()


def run(apart, dtype):
    leaves, weights, gates = branches(dtype)
    o = gated(leaves, weights, gates, apart, dtype)
    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return o.detach(), [x.grad for x in leaves + [gates]]


@pytest.mark.parametrize("apart", [(0, 1, 2), (0,)], ids=["all", "cmp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_as_the_plain_sum(apart, dtype):
    o1, g1 = run(apart, dtype)
    o0, g0 = run((), dtype)
    assert o1.dtype == dtype and torch.equal(o1, o0)      # the value is the plain sum itself
    for name, a, b in zip(("cmp", "slc", "swa", "gates"), g1, g0):
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < tol, name


def test_the_sum_is_eq_5():
    leaves, weights, gates = branches(torch.float64)
    o = gated(leaves, weights, gates, (), torch.float64)
    want = sum(gates[..., c:c + 1] * unpack_gqa(leaves[c] @ weights[c], T) for c in range(3))
    assert torch.allclose(o, want, rtol=1e-14, atol=1e-14)


def test_gated_grad_is_the_packed_product():
    g = torch.Generator().manual_seed(2)
    do = torch.randn(2, 5, 6, 4, generator=g).bfloat16()
    gate = torch.rand(2, 5, 6, generator=g)
    o = torch.randn(2, 3, 10, 4, generator=g).bfloat16()
    d_o, d_g = gated_grad(do, gate, o)
    assert d_o.dtype == torch.bfloat16 and d_o.shape == (2, 3, 5 * 2, 4)
    assert torch.equal(d_o, pack_gqa((do.float() * gate[..., None]).bfloat16(), 3))
    assert torch.allclose(d_g, (do.float() * unpack_gqa(o, 5).float()).sum(-1))


def kernel_cases(device, exact_bf16):
    """The kernel (nsa_flex/gate_kernel.py) against the torch route: ragged row counts, Dv not
    a power of two, strided do/gates/o, float32 and bfloat16."""
    from nsa_flex.gate_kernel import launch
    from nsa_flex.gating import _gated_grad_torch

    def case(B, T, Hq, Hkv, Dv, dtype, seed, split=False):
        g = torch.Generator().manual_seed(seed)
        do = torch.randn(B, T + 1, Hq, Dv + 3, generator=g).to(dtype)[:, 1:, :, :Dv]  # strided
        gate = torch.rand(B, T, Hq, 3, generator=g)[..., 1]                             # strided
        o = torch.randn(B, Hkv, T * (Hq // Hkv), Dv, generator=g).to(dtype)
        if split:                       # a merged split-view output: heads outermost, as a view
            o = o.transpose(0, 1).contiguous().transpose(0, 1)
        do, gate, o = do.to(device), gate.to(device), o.to(device)
        want_o, want_g = _gated_grad_torch(do, gate, o)
        d_o = torch.full(want_o.shape, float("nan"), dtype=dtype, device=device)
        d_g = torch.full(want_g.shape, float("nan"), device=device)
        launch(do, gate, o, d_o, d_g, rows_per_program=8)
        if dtype == torch.float32 or exact_bf16:
            assert torch.equal(d_o, want_o), (B, T, Hq, Hkv, Dv, dtype)
        else:   # the interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest)
            assert torch.allclose(d_o.float(), want_o.float(), rtol=2 ** -7, atol=0), (B, T, Dv)
        assert torch.allclose(d_g, want_g, rtol=1e-5, atol=1e-5), (B, T, Hq, Hkv, Dv, dtype)

    case(1, 13, 4, 2, 16, torch.float32, 0)
    case(2, 9, 8, 1, 12, torch.bfloat16, 1)
    case(2, 7, 6, 3, 8, torch.bfloat16, 2, split=True)
    case(1, 300, 16, 2, 128, torch.bfloat16, 3)


def test_kernel_matches_the_torch_route_in_the_interpreter():
    """Under Triton's interpreter on the CPU (a subprocess: the interpreter is chosen when
    triton is first imported)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    script = "from test_gating import kernel_cases; kernel_cases('cpu', False); print('ok')"
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs CUDA")
def test_kernel_matches_the_torch_route_on_cuda():
    kernel_cases("cuda", True)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("apart", [(0, 1, 2), (0,), ()], ids=["all", "cmp", "none"])
def test_each_branch_gradient_comes_just_before_its_backward(apart):
    """The backward writes a branch's output gradient, then runs that branch's backward (its
    matmul), then the next branch's gradient: never two gradients in a row. A branch not set
    apart writes none through gated_grad; the first branch alone set apart writes its gradient
    after the other branches' backward and just before its own."""
    leaves, weights, gates = branches(torch.float32)
    o = gated(leaves, weights, gates, apart, torch.float32)
    with OpLog() as log:
        o.backward(torch.ones_like(o))
    marks = [op for op in log.ops if op in ("nsa_flex.gated_grad", "aten.mm", "aten.bmm")]
    grads = [i for i, op in enumerate(marks) if op == "nsa_flex.gated_grad"]
    assert len(grads) == len(apart)
    assert all(b - a > 1 for a, b in zip(grads, grads[1:])), marks
    if apart == (0,):   # before it the two other branches' backward, after it the first's alone
        assert grads[0] == 2 and len(marks) == 4, marks
    if grads:
        assert grads[-1] < len(marks) - 1      # the last branch's backward follows its gradient


def test_compiled_matches_eager_with_gradients_apart():
    """The autograd.Function and the opaque op inside a compiled graph (Inductor, CPU): same
    output and gradients as eager."""
    eager, comp = branches(torch.float32, seed=4), branches(torch.float32, seed=4)
    o_e = gated(*eager, (0, 1, 2), torch.float32)
    torch._dynamo.reset()
    o_c = torch.compile(lambda *a: gated(*a, (0, 1, 2), torch.float32), fullgraph=True)(*comp)
    torch._dynamo.reset()
    assert torch.allclose(o_c, o_e, rtol=1e-5, atol=1e-6)
    o_e.square().sum().backward()
    o_c.square().sum().backward()
    for a, b in zip(comp[0] + [comp[2]], eager[0] + [eager[2]]):
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 1e-5
