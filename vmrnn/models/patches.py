"""Patch layers: frame <-> token grid, and resolution changes inside VMRNN-D."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, L, E): a p x p strided conv, row-major tokens, LayerNorm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchInflate(nn.Module):
    """(B, L, E) tokens of a g x g grid -> (B, C_in, g*p, g*p) with transposed convs.

    floor(p / 4) groups of [ConvT(E->E, x2), GroupNorm(16), LeakyReLU(0.2)], then ConvT(E->C_in, x2):
    the official layout, exact for p in {2, 4, 8}.
    """

    def __init__(self, grid: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid = grid
        layers: list[nn.Module] = []
        for _ in range(patch_size // 4):
            layers += [
                nn.ConvTranspose2d(embed_dim, embed_dim, 3, stride=2, padding=1, output_padding=1),
                nn.GroupNorm(16, embed_dim),
                nn.LeakyReLU(0.2),
            ]
        self.up = nn.Sequential(*layers)
        self.out = nn.ConvTranspose2d(embed_dim, in_chans, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, L, e = x.shape
        x = x.transpose(1, 2).reshape(b, e, self.grid, self.grid)
        return self.out(self.up(x))


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): 2x2 neighbours to channels, LayerNorm(4C), Linear(4C->2C)."""

    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.proj = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.reshape(b, r, r, c)
        # Channel order (row, col parity): (0,0), (1,0), (0,1), (1,1), as the official layer.
        x = x.reshape(b, r // 2, 2, r // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, -1, 4 * c)
        return self.proj(self.norm(x))


class PatchExpanding(nn.Module):
    """(B, H*W, C) -> (B, 2H*2W, C/2): Linear(C->2C), channels (p1, p2, C/2) to pixels, LayerNorm."""

    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.proj = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = self.proj(x).reshape(b, r, r, 2, 2, c // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 4 * r * r, c // 2)
        return self.norm(x)
