"""SS2D: the 2-D selective-scan mixer of VMamba, as VMRNN uses it.

Four scan orders over the H x W token grid (row-major, column-major, and both reversed) share one
selective-scan call with grouped B/C; their outputs are merged back to row-major and summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmrnn.ops import selective_scan
from vmrnn.ops.merge_norm_gate import merge_norm_gate
from vmrnn.ops.ss2d_scan import ss2d_scan

N_DIRECTIONS = 4
SS2D_IMPLS = ("reference", "fused")


def cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, L): row-major, column-major, and the two reversed."""
    b, d, h, w = x.shape
    rows = x.reshape(b, d, h * w)
    cols = x.transpose(2, 3).reshape(b, d, h * w)
    fwd = torch.stack([rows, cols], dim=1)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """(B, 4, D, L) -> (B, D, L): undo each scan order, back to row-major, and sum."""
    b, _, d, _ = y.shape
    rev = y[:, 2:4].flip(-1)
    rows = y[:, 0] + rev[:, 0]
    cols = y[:, 1] + rev[:, 1]
    cols = cols.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, h * w)
    return rows + cols


class SS2D(nn.Module):
    """Selective-scan 2-D mixer on channels-last input (B, H, W, C) -> (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 3,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        inner = expand * dim
        rank = math.ceil(dim / 16)
        self.dim, self.inner, self.rank, self.d_state = dim, inner, rank, d_state
        self.scan_backend = "auto"  # "auto" | "torch" | "cuda"; see vmrnn.models.set_scan_backend
        # Execution knobs (vmrnn.train.step.configure_model sets them; the defaults are the reference):
        # impl "reference" = the official dataflow; "fused" = channels-last conv + the fused 4-direction
        # scan (vmrnn.ops.ss2d_scan), whose backend is fused_backend ("auto" | "triton" | "torch").
        self.impl = "reference"
        self.fused_backend = "auto"
        # fused impl: the cross-merge, out_norm and SiLU gate as one op (vmrnn.ops.merge_norm_gate, same backend)
        self.fused_norm = False
        self.scan_fp32_inputs = True  # reference impl: upcast the scan inputs (official); False keeps bf16

        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.dwconv = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=True)
        # Per-direction projections, stacked so one einsum serves all four directions.
        self.x_proj = nn.Parameter(torch.empty(N_DIRECTIONS, rank + 2 * d_state, inner))
        self.dt_proj = nn.Parameter(torch.empty(N_DIRECTIONS, inner, rank))
        self.dt_bias = nn.Parameter(torch.empty(N_DIRECTIONS, inner))
        self.A_log = nn.Parameter(torch.empty(N_DIRECTIONS * inner, d_state))
        self.skip = nn.Parameter(torch.empty(N_DIRECTIONS * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        for p in (self.A_log, self.skip):
            p._no_weight_decay = True  # as in Mamba: SSM decay rates and skips are not regularised
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The official initialisation of the SSM tensors (Linear/Conv keep PyTorch defaults)."""
        dt_min, dt_max, floor = self._dt_range
        bound = 1.0 / math.sqrt(self.inner)  # what nn.Linear's default init gives each direction
        self.x_proj.uniform_(-bound, bound)
        self.dt_proj.uniform_(-(self.rank**-0.5), self.rank**-0.5)
        dt = torch.exp(
            torch.rand(N_DIRECTIONS, self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(N_DIRECTIONS * self.inner, 1)
        )
        self.skip.fill_(1.0)

    def scan(self, x: Tensor) -> Tensor:
        """The SSM core: (B, D, H, W) -> (B, H, W, D) in fp32, before out_norm."""
        b, d, h, w = x.shape
        L = h * w
        xs = cross_scan(x)  # (B, 4, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj)
        dts, Bs, Cs = torch.split(x_dbl, [self.rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj)
        if self.scan_fp32_inputs:
            xs, dts, Bs, Cs = xs.float(), dts.float(), Bs.float(), Cs.float()
        else:  # bf16 u/delta/B/C into the kernel (fp32 state, fp32 A/D/bias); output in fp32 for the merge
            dts, Bs, Cs = dts.to(xs.dtype), Bs.to(xs.dtype), Cs.to(xs.dtype)
        y = selective_scan(
            xs.reshape(b, -1, L),
            dts.reshape(b, -1, L),
            -torch.exp(self.A_log.float()),
            Bs,
            Cs,
            self.skip.float(),
            delta_bias=self.dt_bias.float().reshape(-1),
            delta_softplus=True,
            backend=self.scan_backend,
        ).reshape(b, N_DIRECTIONS, d, L)
        return cross_merge(y.float(), h, w).transpose(1, 2).reshape(b, h, w, d)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            return self.forward_fused(x)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.dwconv(x.permute(0, 3, 1, 2)))
        y = self.out_norm(self.scan(x).to(z.dtype))
        return self.out_proj(y * F.silu(z))

    def forward_fused(self, x: Tensor) -> Tensor:
        """The same function as `forward`, laid out for speed (the reference stays above).

        Channels-last throughout: the depthwise conv runs on a channels-last (B, D, H, W) tensor, the
        four x_proj projections are one GEMM over the spatial tokens, the four dt projections one GEMM
        with a block-diagonal weight, and the scan reads and writes every direction at the tokens'
        spatial places (vmrnn.ops.ss2d_scan): no cross-scan copies, no cross-merge un-permutes.
        """
        b, h, w, _ = x.shape
        d, r, n, L = self.inner, self.rank, self.d_state, h * w
        xi, z = self.in_proj(x).split(d, dim=-1)
        xi = xi.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        u = F.silu(self.dwconv(xi)).permute(0, 2, 3, 1).reshape(b, L, d)  # a view when channels-last
        x_dbl = F.linear(u, self.x_proj.reshape(-1, d)).view(b, L, N_DIRECTIONS, r + 2 * n)
        dt_w = torch.block_diag(*self.dt_proj.transpose(1, 2).unbind(0))  # (4R, 4D)
        delta = torch.matmul(x_dbl[..., :r].reshape(b, L, N_DIRECTIONS * r), dt_w.to(x_dbl.dtype))
        y = ss2d_scan(
            u,
            delta.view(b, L, N_DIRECTIONS, d),
            -torch.exp(self.A_log.float()),
            x_dbl[..., r : r + n],
            x_dbl[..., r + n :],
            self.skip.float(),
            self.dt_bias.float().reshape(-1),
            h,
            w,
            True,
            backend=self.fused_backend,
        )
        if self.fused_norm:
            n = self.out_norm
            return self.out_proj(merge_norm_gate(y, z, n.weight, n.bias, n.eps, backend=self.fused_backend))
        y = y.sum(2, dtype=torch.float32).view(b, h, w, d)  # the cross-merge: sum of the 4 directions
        y = self.out_norm(y.to(z.dtype))
        return self.out_proj(y * F.silu(z))
