"""The sequential pass of the chunk-parallel SS2D scan (reference: `vmrnn.ops.ss2d_scan.combine_segments_ref`)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from vmrnn.ops.triton import require_triton


@triton.jit
def _ss2d_combine_kernel(
    loc_ptr,
    sdt_ptr,
    a_ptr,
    out_ptr,
    D,
    NSEG,
    OUT_B_STRIDE,
    OUT_SEG_STRIDE,
    N: tl.constexpr,
    BD: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """The short sequential pass of the chunk-parallel scan, one program per (batch*4+k, D block).

    Segment seg maps a carry-in x to exp(A * sum(dt over seg)) * x + loc[seg] (loc: its result from
    a zero carry-in), for the states going forward and for the state adjoints going backward. The
    carry-in of every segment is written to out (forward: hc at the segment's first chunk)."""
    bk = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    k = bk % 4
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_n = tl.arange(0, N)
    ch = k * D + offs_d
    A = tl.load(a_ptr + offs_n[None, :] * (4 * D) + ch[:, None], mask=dmask[:, None], other=0.0) * 1.4426950408889634
    off2 = offs_n[None, :] * D + offs_d[:, None]
    x = tl.zeros((BD, N), dtype=tl.float32)
    for i in range(NSEG):
        if REVERSE:
            sg = NSEG - 1 - i
        else:
            sg = i
        tl.store(out_ptr + bk * OUT_B_STRIDE + sg * OUT_SEG_STRIDE + off2, x, mask=dmask[:, None])
        sdt = tl.load(sdt_ptr + (bk * NSEG + sg) * D + offs_d, mask=dmask, other=0.0)
        loc = tl.load(loc_ptr + (bk * NSEG + sg) * D * N + off2, mask=dmask[:, None], other=0.0)
        x = tl.exp2(sdt[:, None] * A) * x + loc


def ss2d_combine(
    loc: Tensor,
    sdt: Tensor,
    At: Tensor,
    out: Tensor,
    bk: int,
    d: int,
    n: int,
    nseg: int,
    out_b_stride: int,
    out_seg_stride: int,
    bd: int,
    warps: int = 1,
    reverse: bool = False,
) -> None:
    """Write the carry into every segment to `out` (row bk at `out_b_stride`, segment s at `out_seg_stride`).

    loc (bk, nseg, n, d) per-segment results from a zero carry, sdt (bk, nseg, d) per-segment sums of dt,
    At (n, 4d) the transposed A; bk = batch * 4 directions."""
    require_triton(loc)
    _ss2d_combine_kernel[(bk, triton.cdiv(d, bd))](
        loc, sdt, At, out, d, nseg, out_b_stride, out_seg_stride, N=n, BD=bd, REVERSE=reverse, num_warps=warps
    )
