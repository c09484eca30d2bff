"""Per-token pieces shared by the SS2D scan kernels (inlined where they are called)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scan_position(l, L, H, W, k):
    """The spatial place of scan step l in direction k (0 row-major, 1 column-major, 2 and 3 reversed)."""
    ls = tl.where(k >= 2, L - 1 - l, l)
    return tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)


@triton.jit
def softplus(x):
    """log1p(exp(x)), log1p by Goldberg's trick; x itself above 20 (as torch)."""
    e = tl.exp(tl.minimum(x, 20.0))
    e1 = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
