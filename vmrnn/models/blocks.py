"""The VSS block and the VMRNN recurrent cell."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vmrnn.models.ss2d import SS2D

State = tuple[Tensor, Tensor]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)
        # A per-sample keep mask drawn ahead by the caller (vmrnn.train.step, for activation checkpointing
        # inside a CUDA graph, where the RNG state cannot be saved and restored); None: draw here.
        self.fixed_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if self.fixed_mask is not None:
            mask = self.fixed_mask.to(x.dtype).reshape((x.shape[0],) + (1,) * (x.dim() - 1))
        else:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))) on (B, L, C) tokens of an H x W grid.

    With ``fuse_hidden`` the block also takes the recurrent hidden state: the SS2D input becomes
    Linear([LN(x), LN(hx)]) with one LayerNorm shared by both (as the official code does).
    Only the first block of a cell fuses; the others have no such layer (the official model carries an
    unused one, which our checkpoint loader drops).
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        drop_path: float = 0.0,
        d_state: int = 16,
        fuse_hidden: bool = False,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state=d_state)
        self.fuse = nn.Linear(2 * dim, dim) if fuse_hidden else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hx: Tensor | None = None) -> Tensor:
        b, L, c = x.shape
        h, w = self.resolution
        a = self.norm(x)
        if self.fuse is not None:
            if hx is None:
                raise ValueError("this block fuses the hidden state: pass hx")
            a = self.fuse(torch.cat([a, self.norm(hx)], dim=-1))
        return x + self.drop_path(self.mixer(a.reshape(b, h, w, c)).reshape(b, L, c))


class VMRNNCell(nn.Module):
    """`depth` VSS blocks and the single-gate LSTM-style update of VMRNN.

    o = blocks(x, h); f = sigmoid(o); c' = f * (c + tanh(o)); h' = f * tanh(c').
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        drop_path: float | Sequence[float] = 0.0,
        d_state: int = 16,
    ) -> None:
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [float(drop_path)] * depth
        if len(rates) != depth:
            raise ValueError(f"got {len(rates)} drop-path rates for depth {depth}")
        self.blocks = nn.ModuleList(
            VSSBlock(dim, resolution, rates[i], d_state, fuse_hidden=(i == 0)) for i in range(depth)
        )

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if state is None:
            # States follow the input's dtype/device (the official code forces fp32).
            hx, cx = torch.zeros_like(x), torch.zeros_like(x)
        else:
            hx, cx = state
        o = self.blocks[0](x, hx)
        for block in self.blocks[1:]:
            o = block(o)
        f = torch.sigmoid(o)
        c = f * (cx + torch.tanh(o))
        h = f * torch.tanh(c)
        return h, (h, c)
