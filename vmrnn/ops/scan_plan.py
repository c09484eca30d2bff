"""Launch planning of the Triton SS2D scan: how many channels, tokens and segments each program takes.

One warp per program, a channel per lane and its N states in that lane's registers: the sums over N
need no shuffles and nothing goes through shared memory. A plan is computed from the sizes (and, for
the backward's atomics, `torch.are_deterministic_algorithms_enabled()`) by `scan_plan`;
`vmrnn.ops.ss2d_scan.ss2d_scan(..., plan=...)` takes an explicit one (tests force segments on small shapes,
benchmarks/gpu_checks.py sweeps plans).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

N_DIR = 4
# The chunk-parallel scan splits each sequence into segments until about this many programs (one warp
# each) run: 132 SMs x ~32 resident warps. Fewer programs leave the SMs waiting on each token's latency.
TARGET_PROGRAMS = 4096
# Segmented plans: the chunk length CK (also the interval of the saved states) and the backward's unroll U.
# Chosen by a sweep on the H100 (benchmarks/gpu_checks.py scan_variants; docs/PERFORMANCE.md). Sequences too
# short for enough CK-chunks (TaxiBJ's 8x8 grid) take shorter chunks, down to MIN_SEG_CK tokens.
SEG_CK = 64
SEG_UB = 4
MIN_SEG_CK = 8
# The backward rebuilds a chunk's states REBUILD_BLOCK tokens at a time (it keeps each block's start state on a
# first walk through the chunk), so the rebuilt states go through a scratch buffer a few KB per warp, which the
# caches hold, rather than CK x 2 KB per warp. Measured on the H200: KTH scan forward+backward -9% at 4 tokens.
REBUILD_BLOCK = 4
# The backward adds du and dB / dC (summed over the directions and channel blocks) into place with fp32 atomics
# unless torch.use_deterministic_algorithms(True) is on: measured on the H200, the scan forward+backward -6.5% on
# KTH and Moving MNIST, -10% on TaxiBJ, against writing partials and summing them afterwards (bit-reproducible).


class ScanPlan(NamedTuple):
    """Launch plan. nseg > 1: the chunk-parallel scan, nseg segments of cps chunks of ck tokens (the
    state buffer then holds nc = nseg * cps chunk start states)."""

    bd: int  # channels per program
    ck: int  # tokens per chunk (the interval of the stored states)
    u_fwd: int  # forward unroll: tokens whose outputs are stored together
    u_bwd: int  # backward unroll
    warps: int
    nseg: int  # segments run in parallel (1: one program walks the whole sequence)
    cps: int  # chunks per segment
    sub: int  # backward: tokens whose rebuilt states go through the scratch at once (divides ck)
    atomic: int = 0  # backward: 1 adds du and dB / dC into place with fp32 atomics; 0 writes partials, summed after
    # (the order of the atomic adds varies from run to run: results differ in the last bits)

    @property
    def nc(self) -> int:
        return self.nseg * self.cps


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_plan(
    batch: int,
    L: int,
    d: int,
    n: int,
    *,
    bd: int | None = None,
    ck: int | None = None,
    nseg: int | None = None,
    u_fwd: int | None = None,
    u_bwd: int | None = None,
    warps: int | None = None,
    sub: int | None = None,
    atomic: bool | None = None,
) -> ScanPlan:
    """How the Triton scan runs a size; each keyword fixes one choice and the rest follow from it.

    When batch x 4 directions x D/32 programs are too few to fill the GPU (KTH's 64x64 grid at B=4,
    Moving MNIST's 32x32, TaxiBJ's 8x8 in chunks of 16 tokens), the sequence is cut into nseg segments that
    run in parallel from a zero state, a short sequential pass carries the states across the segments
    (the recurrence is diagonal, so segment s maps a carried state x to exp(A sum dt) x + its own end
    state), and each segment is replayed from its true start state. The backward does the same for the
    state adjoint, walking the other way. Without segments BD = 16 when that many programs are too few
    to give every SM two warps, else 32; with segments 32. `atomic` defaults to on unless
    `torch.are_deterministic_algorithms_enabled()`.
    """
    lanes = batch * N_DIR * d
    u_fwd = 8 if u_fwd is None else u_fwd
    warps = 1 if warps is None else warps
    seg_ck = SEG_CK if ck is None else ck
    if nseg is None:
        base = batch * N_DIR * _cdiv(d, 32)
        nseg = 1
        while nseg * 2 <= _cdiv(L, seg_ck) and base * nseg * 2 <= TARGET_PROGRAMS:
            nseg *= 2
        if nseg == 1 and ck is None and base < TARGET_PROGRAMS // 4:
            # shorter than two chunks and far from full: segments of shorter chunks, to half the target
            # (each costs a pass and a combine step: at 1024 programs one walk measured faster)
            while L >= nseg * 2 * MIN_SEG_CK and base * nseg * 2 <= TARGET_PROGRAMS // 2:
                nseg *= 2
            seg_ck = max(MIN_SEG_CK, 1 << (_cdiv(L, nseg) - 1).bit_length())
    nseg = max(1, nseg)
    if nseg > 1:
        bd = 32 if bd is None else bd
        ck = seg_ck
        u_bwd = SEG_UB if u_bwd is None else u_bwd
    else:
        bd = (32 if lanes // 32 >= 264 else 16) if bd is None else bd
        ck = (64 if L <= 1024 else 128) if ck is None else ck
        u_bwd = 4 if u_bwd is None else u_bwd
    bd = max(4, min(bd, 1 << max(d - 1, 0).bit_length()))
    ck = max(u_fwd, u_bwd, min(ck, 1 << max(L - 1, 0).bit_length()))  # short sequences: one chunk
    nc = _cdiv(L, ck)
    nseg = max(1, min(nseg, nc))
    cps = _cdiv(nc, nseg)
    nseg = _cdiv(nc, cps)
    sub = max(u_bwd, min(REBUILD_BLOCK if sub is None else sub, ck))
    if ck % sub or sub % u_bwd:
        raise ValueError(f"scan plan: sub={sub} must divide the chunk length {ck} and be a multiple of u_bwd={u_bwd}")
    if atomic is None:
        atomic = not torch.are_deterministic_algorithms_enabled()
    return ScanPlan(bd, ck, u_fwd, u_bwd, warps, nseg, cps, sub, int(bool(atomic)))


__all__ = ["MIN_SEG_CK", "N_DIR", "REBUILD_BLOCK", "SEG_CK", "SEG_UB", "TARGET_PROGRAMS", "ScanPlan", "scan_plan"]
