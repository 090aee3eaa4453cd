"""The compression function φ of NSA §3.3.1, eq. 7.

φ maps the l keys (or values) of one compression block, plus a learned intra-block position
embedding, to a single key (value). Block i covers tokens [i·d, i·d + l); only complete blocks
exist, so T tokens give Tc = max(0, ⌊(T − l)/d⌋ + 1) of them.

    tokens   0 ........ l-1
    block 0  [---- l ----]
    block 1      [---- l ----]          (stride d)
    block 2          [---- l ----]

With packed documents each document has its own grid from its first token; its blocks go to
slots laid out by position (masks/document.py), T // d slots in all, empty ones 0.
"""

from __future__ import annotations

import torch
from torch import nn


def num_cmp_blocks(seq_len: int, block: int, stride: int) -> int:
    """Number of complete compression blocks in a sequence of ``seq_len`` tokens."""
    if seq_len < block:
        return 0
    return (seq_len - block) // stride + 1


class Compression(nn.Module):
    """φ: a two-layer MLP over the flattened block of l vectors (plus position embedding).

    Input ``x`` [B, T, H, D] (keys or values of one branch, per KV head); output
    [B, Tc, H, D_out]. The MLP is shared across heads and blocks, as in the paper.
    """

    def __init__(self, dim: int, block: int, stride: int, hidden: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        if block % stride != 0:
            raise ValueError(f"compression stride d={stride} must divide the block length l={block}")
        self.dim, self.block, self.stride = dim, block, stride
        self.out_dim = out_dim or dim
        hidden = hidden or block * dim // 2
        self.pos_emb = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden)
        self.fc2 = nn.Linear(hidden, self.out_dim)
        self.act = nn.GELU()

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.pos_emb, std=init_std)
        nn.init.trunc_normal_(self.fc1.weight, std=init_std)
        nn.init.trunc_normal_(self.fc2.weight, std=init_std)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, block_ends: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, H, D] -> [B, Tc, H, D_out]; with documents, ``block_ends`` [B, T // d]
        (masks.document.compressed_block_ends: each slot's last token, −1 for none) ->
        [B, T // d, H, D_out], each slot φ of its block's l tokens, 0 where it holds none."""
        B, T, H, D = x.shape
        if D != self.dim:
            raise ValueError(f"Compression expects head dim {self.dim}, got {D} (input shape {tuple(x.shape)})")
        if block_ends is not None:
            return self._documents(x, block_ends)
        tc = num_cmp_blocks(T, self.block, self.stride)
        if tc == 0:
            return x.new_zeros(B, 0, H, self.out_dim)
        # [B, T, H, D] -> [B, H, D, T] -> unfold over T: [B, H, D, Tc, l] -> [B, Tc, H, l, D]
        blocks = x.permute(0, 2, 3, 1).unfold(-1, self.block, self.stride)
        return self._phi(blocks.permute(0, 3, 1, 4, 2))

    def _phi(self, blocks: torch.Tensor) -> torch.Tensor:
        """[..., l, D] -> [..., D_out]: the MLP over a block plus the position embedding."""
        return self.fc2(self.act(self.fc1((blocks + self.pos_emb).flatten(-2))))

    def _documents(self, x: torch.Tensor, block_ends: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        if block_ends.shape != (B, T // self.stride):
            raise ValueError(f"block_ends has shape {tuple(block_ends.shape)}, expected "
                             f"{(B, T // self.stride)} (one slot per stride of {self.stride} tokens)")
        used = block_ends >= 0                                           # [B, S]
        blocks = DocumentBlocks.apply(x, block_ends, self.block, self.stride)   # [B, S, l, H, D]
        out = self._phi(blocks.transpose(2, 3))                          # [B, S, H, D_out]
        return torch.where(used[..., None, None], out, 0.0)


class DocumentBlocks(torch.autograd.Function):
    """x [B, T, H, D], block_ends [B, S] (−1: empty slot) -> the blocks [B, S, l, H, D]: slot c
    holds x[e − l + 1 … e] for its end e (empty slots: any rows of x; φ's output there is
    discarded). Both directions are gathers. The backward of plain indexing would scatter-add
    into x; here each position instead reads the few slots that can hold it: the block in slot
    c starts in [c·d, c·d + d) (masks.compressed_block_ends), so position p lies only in slots
    ⌊p/d⌋ − k for k < ⌈(l + d − 1)/d⌉."""

    @staticmethod
    def forward(ctx, x, block_ends, block: int, stride: int):
        B, T = x.shape[:2]
        first = torch.where(block_ends >= 0, block_ends - (block - 1), 0)
        pos = (first[..., None] + torch.arange(block, device=x.device)).clamp(max=T - 1)
        ctx.save_for_backward(block_ends)
        ctx.block, ctx.stride, ctx.T = block, stride, T
        return x[torch.arange(B, device=x.device)[:, None, None], pos]

    @staticmethod
    def backward(ctx, grad):
        (block_ends,) = ctx.saved_tensors
        l, d, T = ctx.block, ctx.stride, ctx.T
        B, S = block_ends.shape
        p = torch.arange(T, device=grad.device)
        k = torch.arange(-(-(l + d - 1) // d), device=grad.device)
        c = p[:, None] // d - k                                          # [T, K] candidate slots
        cc = c.clamp(0, S - 1)
        end = block_ends[:, cc]                                          # [B, T, K]
        j = p[:, None] - (end - (l - 1))                                 # offset in that block
        ok = (c >= 0)[None] & (c < S)[None] & (end >= 0) & (j >= 0) & (j < l)
        g = grad[torch.arange(B, device=grad.device)[:, None, None], cc[None], j.clamp(0, l - 1)]
        return torch.where(ok[..., None, None], g, 0).sum(2), None, None, None
