"""The compression φ (eq. 7) against a plain per-block loop, and the operator's import weight."""

import copy
import subprocess
import sys

import pytest
import torch

from nsa_flex import Compression, NSAConfig


@pytest.mark.parametrize("T,l,d", [(50, 8, 4), (33, 16, 16), (7, 8, 4), (64, 32, 16)])
def test_compression_matches_per_block_loop(T, l, d):
    torch.manual_seed(T)
    phi = Compression(dim=6, block=l, stride=d, hidden=20)
    phi.init_weights(0.3)
    x = torch.randn(2, T, 3, 6)
    y = phi(x)
    Tc = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=max(l, 16)).num_cmp_blocks(T)
    assert y.shape == (2, Tc, 3, 6)
    ref = copy.deepcopy(phi).double()      # the loop in float64: only φ's float32 rounding differs
    for i in range(Tc):
        for h in range(3):
            block = x[:, i * d:i * d + l, h].double() + ref.pos_emb    # [2, l, 6]
            want = ref.fc2(ref.act(ref.fc1(block.flatten(1))))
            torch.testing.assert_close(y[:, i, h].double(), want, rtol=1e-5, atol=1e-5)


def test_position_embedding_and_weights_get_gradients():
    phi = Compression(dim=4, block=8, stride=4)
    phi.init_weights()
    phi(torch.randn(1, 20, 2, 4)).square().sum().backward()
    for name, p in phi.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_operator_import_needs_torch_only():
    code = ("import sys; import nsa_flex, masks; from nsa_flex import NSAConfig, nsa_attention; "
            "bad = [m for m in ('torchtitan', 'datasets', 'tiktoken') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_documents_compress_their_own_blocks():
    """With documents, slot ⌊s0/d⌋ + i holds φ of block i of each document (its own grid from
    its first token), the other slots 0; the same values as φ run on each document alone."""
    from masks import compressed_block_ends
    torch.manual_seed(0)
    l, d = 8, 4
    phi = Compression(dim=6, block=l, stride=d, hidden=20)
    phi.init_weights(0.3)
    lengths = [3, 1, 21, 8, 30]
    T = sum(lengths)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].repeat(2, 1)
    x = torch.randn(2, T, 3, 6)
    ends = compressed_block_ends(ids, l, d)
    y = phi(x, ends)
    assert y.shape == (2, T // d, 3, 6)
    want = torch.zeros_like(y)
    s0 = 0
    for L in lengths:
        alone = phi(x[:, s0:s0 + L])
        want[:, s0 // d:s0 // d + alone.shape[1]] = alone
        s0 += L
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_ends has shape"):
        phi(x, ends[:, 1:])


@pytest.mark.parametrize("l,d", [(32, 16), (6, 3), (9, 4), (8, 8), (5, 2), (4, 1)])
def test_document_blocks_backward_gathers_what_indexing_scatters(l, d):
    """DocumentBlocks' gather-only backward equals autograd through plain indexing, for packed
    documents of random lengths (some shorter than a block, one of length 1)."""
    from masks import compressed_block_ends
    from nsa_flex.compression import DocumentBlocks

    g = torch.Generator().manual_seed(l * 10 + d)
    T, B = 157, 2
    ids = torch.stack([torch.cumsum(torch.rand(T, generator=g) < 0.04, 0) for _ in range(B)])
    ids[1, 40] = ids[1, 39] + 1            # a document of length 1 (ids stay non-decreasing)
    ids[1, 41:] += 2
    ends = compressed_block_ends(ids, l, d)
    x = torch.randn(B, T, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    first = torch.where(ends >= 0, ends - (l - 1), 0)
    pos = (first[..., None] + torch.arange(l)).clamp(max=T - 1)
    ref = x[torch.arange(B)[:, None, None], pos]
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g) * (ends >= 0)[..., None, None, None]
    out = DocumentBlocks.apply(x, ends, l, d)
    assert torch.equal(out, ref)
    (want,) = torch.autograd.grad((ref * w).sum(), x)
    (got,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
