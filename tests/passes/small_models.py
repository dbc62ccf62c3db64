"""Small hand-built models the per-pass tests share. They use default `nn.Linear` init, so the
linears matter to the output far more than in the zoo's random models, whose residual streams
hide most of a layer's error (BERT with every block linear binarized still keeps 32 dB)."""

import torch
import torch.nn.functional as F


class Ffn(torch.nn.Module):
    """norm -> up -> gelu -> down, 64 -> 128 -> 64 by default."""

    def __init__(self, d: int = 64, hidden: int = 128):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class FfnBlocks(torch.nn.Module):
    """Two `Ffn` blocks named "blocks.0", "blocks.1". With `residual`, pre-norm residual blocks
    (a transformer's MLP half); without, the output is the blocks' own output, so its SQNR is
    the pass's error itself."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.blocks = torch.nn.ModuleList([Ffn(), Ffn()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x) if self.residual else b(x)
        return x


class WeightIsAnInput(torch.nn.Module):
    """A linear whose weight is a graph input, not a constant: no weight pass may touch it."""

    def forward(self, x, w):
        return F.linear(x, w)


class MaskedAttention(torch.nn.Module):
    """One SDPA over 2 heads of 8 with a constant mask buffer (boolean, or an additive bias)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("mask", mask)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
