"""The SS2D scan with cross-scan and cross-merge fused in: one Triton kernel per direction set.

The reference SS2D builds four scan-ordered copies of its input (row-major, column-major and both
reversed: `cross_scan`), runs one selective scan over the (B, 4*D, L) stack, and un-permutes and sums the
four outputs (`cross_merge`). Here the scan reads every token straight from the *spatial* channels-last
tensors and writes its output back to the token's spatial place, so no scan-ordered copy ever exists:

    u      (B, L, D)      the SS2D input after conv + SiLU, row-major tokens, channels last
    delta  (B, L, 4, D)   per-direction dt (before bias / softplus), at each token's spatial place
    Bs, Cs (B, L, 4, N)   per-direction B and C (strided views of the x_proj output are fine)
    A      (4D, N) fp32, Ds (4D,), delta_bias (4D,)
 -> y      (B, L, 4, D)   y[:, p, k] = direction k's scan output at the token in spatial place p

Direction k visits spatial place pos_k(l) at scan step l: k=0 row-major l; k=1 column-major
(l % H) * W + l // H; k=2 and k=3 the same walks reversed (l -> L-1-l).

Backends: ``torch`` (gathers to scan order, runs `selective_scan_torch`, scatters back: the reference
beside the kernel, and the CPU path) and ``triton``. The Triton forward keeps the state (BD channels x
N) in registers, walks the tokens in order and stores the state every CK tokens; the backward restarts
each CK-chunk from its stored state, keeps the chunk's states in a small scratch buffer (L2-resident),
and walks back through the chunk. State and all arithmetic are fp32 whatever the input dtype.

Long sequences at small batch (KTH: 64x64 tokens at B=4, only 128 programs of one warp) run
chunk-parallel (`scan_plan`): the sequence is cut into segments that run from a zero state at once; a
short sequential pass (`_ss2d_combine_kernel`, torch reference `combine_segments_torch`) carries the
states across segments (the recurrence is diagonal, so a segment maps a carried state x to
exp(A * sum dt) * x + its own end state); the segments are then replayed from their true start states.
The backward does the same for the state adjoint, walking the other way.
Both are exposed as ``torch.library`` custom ops with fake implementations, so ``torch.compile``
traces through them without a graph break and CUDA graphs can capture them.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from vmrnn.ops.selective_scan import selective_scan_torch

try:  # Triton is optional: without it (CPU machines) the torch backend is used.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None
    HAS_TRITON = False

N_DIR = 4
LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: Tensor) -> bool:
    """Triton compiles for CUDA tensors; CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set
    before triton is imported: the CPU tests do that in a subprocess)."""
    return HAS_TRITON and (t.is_cuda or _interpreting())


@functools.cache
def _patch_interpreter() -> None:
    # Triton 3.6's interpreter turns 1-element arrays into ints with int(), an error from NumPy 2.4 on.
    from triton.runtime import interpreter as ti  # noqa: PLC0415

    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched


def _kernels(t: Tensor):
    if not triton_usable(t):
        raise RuntimeError("the Triton SS2D scan needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported, to interpret it on CPU)")
    if _interpreting():
        _patch_interpreter()
    return _ss2d_fwd_kernel, _ss2d_bwd_kernel, _ss2d_combine_kernel


# --- index maps ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _scan_index_cpu(h: int, w: int) -> Tensor:
    """(4, L): spatial place of scan step l for each direction."""
    L = h * w
    rows = torch.arange(L)
    cols = torch.arange(L).reshape(h, w).t().reshape(-1)  # column-major walk: step w*H + h -> place h*W + w
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def scan_index(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    return _scan_index_cpu(h, w).to(device)


def to_scan_order(x: Tensor, h: int, w: int) -> Tensor:
    """(B, L, K, C) spatial (K = 4, or 1 for an input shared by the four directions) -> (B, 4, C, L)."""
    idx = scan_index(h, w, x.device)
    b, L, kk, c = x.shape
    out = [x[:, idx[k], k if kk > 1 else 0, :] for k in range(N_DIR)]  # each (B, L, C) in scan order
    return torch.stack(out, dim=1).transpose(2, 3)


def from_scan_order(y: Tensor, h: int, w: int) -> Tensor:
    """(B, 4, C, L) scan order -> (B, L, 4, C) spatial: the adjoint of `to_scan_order` for K = 4."""
    idx = scan_index(h, w, y.device)
    inv = torch.argsort(idx, dim=1)  # spatial place -> scan step
    return torch.stack([y[:, k, :, inv[k]] for k in range(N_DIR)], dim=1).permute(0, 3, 1, 2)


def _check(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, h: int, w: int) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, L, D); got {tuple(u.shape)}")
    b, L, d = u.shape
    if L != h * w:
        raise ValueError(f"u has {L} tokens but the grid is {h}x{w}")
    if delta.shape != (b, L, N_DIR, d):
        raise ValueError(f"delta must be (batch, L, 4, D) = {(b, L, N_DIR, d)}; got {tuple(delta.shape)}")
    n = A.shape[-1]
    if A.shape != (N_DIR * d, n):
        raise ValueError(f"A must be (4*D, N) = {(N_DIR * d, n)}; got {tuple(A.shape)}")
    for name, t in (("Bs", Bs), ("Cs", Cs)):
        if t.shape != (b, L, N_DIR, n):
            raise ValueError(f"{name} must be (batch, L, 4, N) = {(b, L, N_DIR, n)}; got {tuple(t.shape)}")


def ss2d_scan_torch(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Tensor | None,
                    delta_bias: Tensor | None, h: int, w: int, delta_softplus: bool = True) -> Tensor:
    """Reference: gather to scan order, `selective_scan_torch`, scatter back. Returns (B, L, 4, D)."""
    _check(u, delta, A, Bs, Cs, h, w)
    b, L, d = u.shape
    xs = to_scan_order(u.unsqueeze(2), h, w).reshape(b, N_DIR * d, L)
    dts = to_scan_order(delta, h, w).reshape(b, N_DIR * d, L)
    y = selective_scan_torch(xs, dts, A, to_scan_order(Bs, h, w), to_scan_order(Cs, h, w), Ds,
                             delta_bias, delta_softplus)
    return from_scan_order(y.reshape(b, N_DIR, d, L), h, w)


# --- Triton kernels --------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _ss2d_fwd_kernel(
        u_ptr, dl_ptr, b_ptr, c_ptr, a_ptr, dsk_ptr, bias_ptr, y_ptr, hc_ptr, hl_ptr, sdt_ptr,
        L, H, W, D, NC, NSEG, CPS,
        su_b, su_l, sd_b, sd_l, sd_k, sb_b, sb_l, sb_k, sc_b, sc_l, sc_k, sy_b, sy_l, sy_k,
        N: tl.constexpr, BD: tl.constexpr, CK: tl.constexpr, U: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
        MODE: tl.constexpr,
    ):
        # MODE 0: one program walks the whole sequence (NSEG = 1, CPS = NC) from a zero state.
        # MODE 1: segment pass of the chunk-parallel scan: program (.., seg) walks its CPS chunks from a
        #         zero state and stores only its end state (hl) and the sum of its dt (sdt); no output.
        # MODE 2: replay: program (.., seg) starts from the true segment start state, which
        #         _ss2d_combine_kernel wrote into hc at chunk seg * CPS, and writes y (and hc if SAVE).
        pid_b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        pid_d = tl.program_id(2) // NSEG
        seg = tl.program_id(2) % NSEG
        offs_d = pid_d * BD + tl.arange(0, BD)
        dmask = offs_d < D
        offs_n = tl.arange(0, N)
        ch = k * D + offs_d
        # A arrives transposed, (N, 4D): channels contiguous, so every (BD, N) tile keeps a channel's N
        # states in one thread and the sums over N need no shuffles.
        A = tl.load(a_ptr + offs_n[None, :] * (4 * D) + ch[:, None], mask=dmask[:, None], other=0.0) * 1.4426950408889634
        if HAS_D:
            dsk = tl.load(dsk_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
        u_base = u_ptr + pid_b * su_b + offs_d
        d_base = dl_ptr + pid_b * sd_b + k * sd_k + offs_d
        b_base = b_ptr + pid_b * sb_b + k * sb_k + offs_n
        c_base = c_ptr + pid_b * sc_b + k * sc_k + offs_n
        y_base = y_ptr + pid_b * sy_b + k * sy_k + offs_d
        hc_base = hc_ptr + ((pid_b * 4 + k) * NC) * D * N + offs_n[None, :] * D + offs_d[:, None]
        if MODE == 2:
            h = tl.load(hc_base + (seg * CPS) * D * N, mask=dmask[:, None], other=0.0)
        else:
            h = tl.zeros((BD, N), dtype=tl.float32)
        dt_sum = tl.zeros((BD,), dtype=tl.float32)
        jj = tl.arange(0, U)
        for ci in range(CPS):
            c = seg * CPS + ci
            if SAVE:
                tl.store(hc_base + c * D * N, h, mask=dmask[:, None])
            for s in range(CK // U):
                # The U outputs of this block are stored together after it: with no store between them,
                # the compiler issues the block's loads early instead of one memory round trip a token.
                ybuf = tl.zeros((BD, U), dtype=tl.float32)
                for j in tl.static_range(U):
                    l = c * CK + s * U + j
                    valid = l < L
                    ls = tl.where(k >= 2, L - 1 - l, l)
                    pos = tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)  # spatial place of step l
                    m = dmask & valid
                    u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                    dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        dt = dt + bias
                    if SOFTPLUS:
                        # softplus = log1p(exp(x)), log1p by Goldberg's trick; x itself above 20 (as torch)
                        e = tl.exp(tl.minimum(dt, 20.0))
                        e1 = 1.0 + e
                        dt = tl.where(dt > 20.0, dt, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
                    dt = tl.where(m, dt, 0.0)
                    nm = (offs_n < N) & valid
                    bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                    dA = tl.exp2(dt[:, None] * A)
                    h = dA * h + (dt * u)[:, None] * bv[None, :]
                    if MODE == 1:
                        dt_sum += dt
                    else:
                        cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                        y = tl.sum(h * cv[None, :], axis=1)
                        if HAS_D:
                            y = y + dsk * u
                        ybuf = tl.where(jj[None, :] == j, y[:, None], ybuf)
                if MODE != 1:
                    lv = c * CK + s * U + jj
                    lsv = tl.where(k >= 2, L - 1 - lv, lv)
                    posv = tl.where((k % 2) == 1, (lsv % H) * W + lsv // H, lsv)
                    tl.store(y_base[:, None] + posv[None, :] * sy_l, ybuf.to(y_ptr.dtype.element_ty),
                             mask=dmask[:, None] & (lv < L)[None, :])
        if MODE == 1:
            sidx = (pid_b * 4 + k) * NSEG + seg
            tl.store(hl_ptr + sidx * D * N + offs_n[None, :] * D + offs_d[:, None], h, mask=dmask[:, None])
            tl.store(sdt_ptr + sidx * D + offs_d, dt_sum, mask=dmask)

    @triton.jit
    def _ss2d_combine_kernel(loc_ptr, sdt_ptr, a_ptr, out_ptr, D, NSEG, OUT_B_STRIDE, OUT_SEG_STRIDE,
                             N: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
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

    @triton.jit
    def _ss2d_bwd_kernel(
        u_ptr, dl_ptr, b_ptr, c_ptr, a_ptr, dsk_ptr, bias_ptr, hc_ptr, dy_ptr,
        du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, scr_ptr, gl_ptr, sdt_ptr, gin_ptr,
        L, H, W, D, NC, NBLK, NSEG, CPS,
        su_b, su_l, sd_b, sd_l, sd_k, sb_b, sb_l, sb_k, sc_b, sc_l, sc_k, sy_b, sy_l, sy_k,
        N: tl.constexpr, BD: tl.constexpr, CK: tl.constexpr, U: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
        RECOMP: tl.constexpr,
    ):
        # RECOMP: keep only every U-th state of a chunk in the scratch buffer and rebuild each U-token
        # sub-chunk in registers just before walking back through it (one more exp per state, a U-th
        # of the scratch traffic: the per-chunk scratch of all resident programs no longer fits in L2).
        # MODE 0: one program walks the whole sequence back (NSEG = 1, CPS = NC).
        # MODE 1: segment pass of the chunk-parallel backward: program (.., seg) walks its segment back
        #         from a zero state adjoint and stores only the adjoint it carries out (gl) and sum(dt).
        # MODE 2: program (.., seg) walks its segment back from the true carried adjoint (gin, written
        #         by _ss2d_combine_kernel); dA / dD / dbias partials per (batch, segment).
        pid_b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        pid_d = tl.program_id(2) // NSEG
        seg = tl.program_id(2) % NSEG
        offs_d = pid_d * BD + tl.arange(0, BD)
        dmask = offs_d < D
        offs_n = tl.arange(0, N)
        ch = k * D + offs_d
        A_nat = tl.load(a_ptr + offs_n[None, :] * (4 * D) + ch[:, None], mask=dmask[:, None], other=0.0)
        A = A_nat * 1.4426950408889634
        if HAS_D:
            dsk = tl.load(dsk_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
        u_base = u_ptr + pid_b * su_b + offs_d
        d_base = dl_ptr + pid_b * sd_b + k * sd_k + offs_d
        b_base = b_ptr + pid_b * sb_b + k * sb_k + offs_n
        c_base = c_ptr + pid_b * sc_b + k * sc_k + offs_n
        dy_base = dy_ptr + pid_b * sy_b + k * sy_k + offs_d
        # du, ddelta: contiguous (B, L, 4, D); dB, dC partials: contiguous (B, L, 4, NBLK, N) fp32.
        du_base = du_ptr + pid_b * L * 4 * D + k * D + offs_d
        ddl_base = ddl_ptr + pid_b * L * 4 * D + k * D + offs_d
        dB_base = dB_ptr + pid_b * L * 4 * NBLK * N + k * NBLK * N + pid_d * N + offs_n
        dC_base = dC_ptr + pid_b * L * 4 * NBLK * N + k * NBLK * N + pid_d * N + offs_n
        hc_base = hc_ptr + ((pid_b * 4 + k) * NC) * D * N + offs_n[None, :] * D + offs_d[:, None]
        prog = ((pid_b * 4 + k) * NBLK + pid_d) * NSEG + seg
        if RECOMP:
            scr_base = scr_ptr + prog * ((CK // U) * BD * N) + offs_n[None, :] * BD + tl.arange(0, BD)[:, None]
        else:
            scr_base = scr_ptr + prog * (CK * BD * N) + offs_n[None, :] * BD + tl.arange(0, BD)[:, None]
        scr3 = scr_base[:, :, None]
        uu = tl.arange(0, U)
        sidx = (pid_b * 4 + k) * NSEG + seg
        off2 = offs_n[None, :] * D + offs_d[:, None]

        if MODE == 2:
            g_carry = tl.load(gin_ptr + sidx * D * N + off2, mask=dmask[:, None], other=0.0)
        else:
            g_carry = tl.zeros((BD, N), dtype=tl.float32)  # dA_{l+1} * dL/dh_{l+1}
        if MODE == 1:
            dt_sum = tl.zeros((BD,), dtype=tl.float32)
            for cc in range(CPS):
                c = seg * CPS + CPS - 1 - cc
                for ss in range(CK // U):
                    s = CK // U - 1 - ss
                    for jj in tl.static_range(U):
                        j = U - 1 - jj
                        l = c * CK + s * U + j
                        valid = l < L
                        ls = tl.where(k >= 2, L - 1 - l, l)
                        pos = tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)
                        m = dmask & valid
                        dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                        if HAS_BIAS:
                            dt = dt + bias
                        if SOFTPLUS:
                            e = tl.exp(tl.minimum(dt, 20.0))
                            e1 = 1.0 + e
                            dt = tl.where(dt > 20.0, dt, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
                        dt = tl.where(m, dt, 0.0)
                        nm = (offs_n < N) & valid
                        cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                        dy = tl.load(dy_base + pos * sy_l, mask=m, other=0.0).to(tl.float32)
                        g_carry = tl.exp2(dt[:, None] * A) * (g_carry + cv[None, :] * dy[:, None])
                        dt_sum += dt
            tl.store(gl_ptr + sidx * D * N + off2, g_carry, mask=dmask[:, None])
            tl.store(sdt_ptr + sidx * D + offs_d, dt_sum, mask=dmask)
        else:
            dA_acc = tl.zeros((BD, N), dtype=tl.float32)
            dD_acc = tl.zeros((BD,), dtype=tl.float32)
            db_acc = tl.zeros((BD,), dtype=tl.float32)
            for cc in range(CPS):
                c = seg * CPS + CPS - 1 - cc
                # 1) rebuild the chunk's states from its stored start state (stores batched per U tokens,
                #    so the block's loads are not held behind them)
                h = tl.load(hc_base + c * D * N, mask=dmask[:, None], other=0.0)
                for s in range(CK // U):
                    if RECOMP:  # only the sub-chunk start states go to the scratch buffer
                        tl.store(scr_base + s * BD * N, h)
                    hbuf = tl.zeros((BD, N, U), dtype=tl.float32)
                    for j in tl.static_range(U):
                        l = c * CK + s * U + j
                        valid = l < L
                        ls = tl.where(k >= 2, L - 1 - l, l)
                        pos = tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)  # spatial place of step l
                        m = dmask & valid
                        u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                        dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                        if HAS_BIAS:
                            dt = dt + bias
                        if SOFTPLUS:
                            # softplus = log1p(exp(x)), log1p by Goldberg's trick; x itself above 20 (as torch)
                            e = tl.exp(tl.minimum(dt, 20.0))
                            e1 = 1.0 + e
                            dt = tl.where(dt > 20.0, dt, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
                        dt = tl.where(m, dt, 0.0)
                        nm = (offs_n < N) & valid
                        bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                        h = tl.exp2(dt[:, None] * A) * h + (dt * u)[:, None] * bv[None, :]
                        if not RECOMP:
                            hbuf = tl.where(uu[None, None, :] == j, h[:, :, None], hbuf)
                    if not RECOMP:
                        tl.store(scr3 + (s * U + uu)[None, None, :] * (BD * N), hbuf)
                tl.debug_barrier()
                # 2) walk back through the chunk (outputs batched per U tokens, as above)
                for ss in range(CK // U):
                    s = CK // U - 1 - ss
                    if RECOMP:  # rebuild this sub-chunk's U states in registers from its start state
                        h = tl.load(scr_base + s * BD * N)
                        hbuf = tl.zeros((BD, N, U), dtype=tl.float32)
                        for j in tl.static_range(U):
                            l = c * CK + s * U + j
                            valid = l < L
                            ls = tl.where(k >= 2, L - 1 - l, l)
                            pos = tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)
                            m = dmask & valid
                            u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                            dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                            if HAS_BIAS:
                                dt = dt + bias
                            if SOFTPLUS:
                                e = tl.exp(tl.minimum(dt, 20.0))
                                e1 = 1.0 + e
                                dt = tl.where(dt > 20.0, dt, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
                            dt = tl.where(m, dt, 0.0)
                            nm = (offs_n < N) & valid
                            bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                            h = tl.exp2(dt[:, None] * A) * h + (dt * u)[:, None] * bv[None, :]
                            hbuf = tl.where(uu[None, None, :] == j, h[:, :, None], hbuf)
                    dubuf = tl.zeros((BD, U), dtype=tl.float32)
                    ddbuf = tl.zeros((BD, U), dtype=tl.float32)
                    dBbuf = tl.zeros((N, U), dtype=tl.float32)
                    dCbuf = tl.zeros((N, U), dtype=tl.float32)
                    for jj in tl.static_range(U):
                        j = U - 1 - jj
                        l = c * CK + s * U + j
                        valid = l < L
                        ls = tl.where(k >= 2, L - 1 - l, l)
                        pos = tl.where((k % 2) == 1, (ls % H) * W + ls // H, ls)  # spatial place of step l
                        m = dmask & valid
                        u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                        draw = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                        if HAS_BIAS:
                            draw = draw + bias
                        if SOFTPLUS:
                            # softplus = log1p(exp(x)), log1p by Goldberg's trick; x itself above 20 (as torch)
                            e = tl.exp(tl.minimum(draw, 20.0))
                            e1 = 1.0 + e
                            dt = tl.where(draw > 20.0, draw, tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0)))
                        else:
                            dt = draw
                        dt = tl.where(m, dt, 0.0)
                        nm = (offs_n < N) & valid
                        bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                        cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                        dy = tl.load(dy_base + pos * sy_l, mask=m, other=0.0).to(tl.float32)
                        dA = tl.exp2(dt[:, None] * A)
                        if RECOMP:
                            hl = tl.sum(tl.where(uu[None, None, :] == j, hbuf, 0.0), axis=2)
                        else:
                            hl = tl.load(scr_base + (s * U + j) * BD * N)
                        g = g_carry + cv[None, :] * dy[:, None]
                        dtu = dt * u
                        hp = hl - dtu[:, None] * bv[None, :]  # = dA_l * h_{l-1}, no division
                        ghp = g * hp
                        gb = tl.sum(g * bv[None, :], axis=1)
                        ddt = tl.sum(ghp * A_nat, axis=1) + gb * u
                        dA_acc += ghp * dt[:, None]
                        du = gb * dt
                        if HAS_D:
                            du += dsk * dy
                            dD_acc += dy * u
                        dBp = tl.sum(g * dtu[:, None], axis=0)
                        dCp = tl.sum(hl * dy[:, None], axis=0)
                        if SOFTPLUS:
                            ddt = ddt * tl.sigmoid(draw)
                        ddt = tl.where(m, ddt, 0.0)
                        db_acc += ddt
                        sel = uu[None, :] == j
                        dubuf = tl.where(sel, du[:, None], dubuf)
                        ddbuf = tl.where(sel, ddt[:, None], ddbuf)
                        dBbuf = tl.where(sel, dBp[:, None], dBbuf)
                        dCbuf = tl.where(sel, dCp[:, None], dCbuf)
                        g_carry = dA * g
                    lv = c * CK + s * U + uu
                    lsv = tl.where(k >= 2, L - 1 - lv, lv)
                    posv = tl.where((k % 2) == 1, (lsv % H) * W + lsv // H, lsv)
                    vm = (lv < L)[None, :]
                    om = dmask[:, None] & vm
                    tl.store(du_base[:, None] + posv[None, :] * (4 * D), dubuf.to(du_ptr.dtype.element_ty), mask=om)
                    tl.store(ddl_base[:, None] + posv[None, :] * (4 * D), ddbuf.to(ddl_ptr.dtype.element_ty), mask=om)
                    nmv = (offs_n < N)[:, None] & vm
                    tl.store(dB_base[:, None] + posv[None, :] * (4 * NBLK * N), dBbuf, mask=nmv)
                    tl.store(dC_base[:, None] + posv[None, :] * (4 * NBLK * N), dCbuf, mask=nmv)
                tl.debug_barrier()
            pb = pid_b * NSEG + seg  # partials per (batch, segment), summed on the host side
            tl.store(dA_ptr + pb * 4 * D * N + offs_n[None, :] * (4 * D) + ch[:, None], dA_acc, mask=dmask[:, None])
            if HAS_D:
                tl.store(dD_ptr + pb * 4 * D + ch, dD_acc, mask=dmask)
            if HAS_BIAS:
                tl.store(dbias_ptr + pb * 4 * D + ch, db_acc, mask=dmask)


LAUNCH_OVERRIDE: dict[str, int] = {}  # benchmarks/gpu_checks.py sweeps launch configs through this
# The chunk-parallel scan splits each sequence into segments until about this many programs (one warp
# each) run: 132 SMs x ~32 resident warps. Fewer programs leave the SMs waiting on each token's latency.
TARGET_PROGRAMS = 4096
# Segmented plans (long sequences): the chunk length CK (also the interval of the saved states), the
# backward's unroll U, and whether the backward rebuilds each U-token sub-chunk in registers instead of
# spilling every state of a chunk to a scratch buffer (the bwd kernel's RECOMP). Chosen by a sweep on
# the H100 (benchmarks/gpu_checks.py scan_variants; docs/PERFORMANCE.md); the environment variables
# VMRNN_SS2D_CK / _UB / _RECOMP override them (for such sweeps).
SEG_CK = int(os.environ.get("VMRNN_SS2D_CK", "64"))
SEG_UB = int(os.environ.get("VMRNN_SS2D_UB", "4"))
RECOMPUTE_BWD_STATES = os.environ.get("VMRNN_SS2D_RECOMP", "0") == "1"


class ScanPlan(NamedTuple):
    """Launch plan. nseg > 1: the chunk-parallel scan, nseg segments of cps chunks of ck tokens (the
    state buffer then holds nc = nseg * cps chunk start states)."""

    bd: int
    ck: int
    u_fwd: int
    u_bwd: int
    warps: int
    nseg: int
    cps: int
    recomp: bool = False

    @property
    def nc(self) -> int:
        return self.nseg * self.cps


def combine_segments_torch(loc: Tensor, sdt: Tensor, A: Tensor, reverse: bool = False) -> Tensor:
    """Reference of `_ss2d_combine_kernel`: loc (B*4, S, N, D) per-segment results from a zero carry,
    sdt (B*4, S, D) per-segment sums of dt, A (4D, N) -> the carry into each segment, (B*4, S, N, D)."""
    bk, nseg, n, d = loc.shape
    a = A.float().reshape(N_DIR, d, n).transpose(1, 2).repeat(bk // N_DIR, 1, 1)  # (B*4, N, D)
    x = torch.zeros_like(loc[:, 0])
    out = torch.empty_like(loc)
    for i in range(nseg):
        s = nseg - 1 - i if reverse else i
        out[:, s] = x
        x = torch.exp(sdt[:, s, None, :] * a) * x + loc[:, s]
    return out


def scan_plan(batch: int, L: int, d: int, n: int) -> ScanPlan:
    """How the Triton scan runs a size (see `launch_config` for the per-program layout).

    When batch x 4 directions x D/32 programs are too few to fill the GPU (long sequences at small
    batch: KTH's 64x64 grid at B=4, Moving MNIST's 32x32), the sequence is cut into nseg segments that
    run in parallel from a zero state (MODE 1), a short sequential pass carries the states across the
    segments (`_ss2d_combine_kernel`: the recurrence is diagonal, so segment s maps a carried state x to
    exp(A sum dt) x + its own end state), and each segment is replayed from its true start state (MODE
    2). The backward does the same for the state adjoint, walking the other way.
    """
    o = LAUNCH_OVERRIDE
    lanes = batch * N_DIR * d
    uf, warps = o.get("u", 8), o.get("warps", 1)
    ck = o.get("ck", SEG_CK)
    nc = -(-L // ck)
    base = batch * N_DIR * -(-d // 32)
    nseg = 1
    if "nseg" in o:
        nseg = max(1, o["nseg"])
    else:
        while nseg * 2 <= nc and base * nseg * 2 <= TARGET_PROGRAMS:
            nseg *= 2
    if nseg > 1:
        bd = o.get("bd", 32)
        ub = o.get("ub", SEG_UB)
    else:
        bd = o.get("bd", 32 if lanes // 32 >= 264 else 16)
        ck = o.get("ck", 64 if L <= 1024 else 128)
        ub = o.get("ub", 4)
    bd = max(4, min(bd, 1 << max(d - 1, 0).bit_length()))
    ck = max(uf, ub, min(ck, 1 << max(L - 1, 0).bit_length()))  # short sequences: one chunk
    nc = -(-L // ck)
    nseg = max(1, min(nseg, nc))
    cps = -(-nc // nseg)
    nseg = -(-nc // cps)
    recomp = bool(o.get("recomp", RECOMPUTE_BWD_STATES and nseg > 1))
    return ScanPlan(bd, ck, uf, ub, warps, nseg, cps, recomp)


def launch_config(batch: int, L: int, d: int, n: int) -> tuple[int, int, int, int, int]:
    """(BD channels per program, CK checkpoint interval, U_fwd, U_bwd unroll, num_warps) for a size.

    One warp per program, a channel per lane and its N states in that lane's registers: the sums over
    N need no shuffles and nothing goes through shared memory. Without segments, BD = 16 when that
    many programs are too few to give every SM two warps, else 32; with segments (`scan_plan`) 32.
    """
    return tuple(scan_plan(batch, L, d, n)[:5])


def _ss2d_fwd_triton(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save):
    b, L, d = u.shape
    n = A.shape[1]
    if u.stride(2) != 1:
        u = u.contiguous()
    if delta.stride(3) != 1:
        delta = delta.contiguous()
    if Bs.stride(3) != 1:
        Bs = Bs.contiguous()
    if Cs.stride(3) != 1:
        Cs = Cs.contiguous()
    At = A.float().t().contiguous()  # (N, 4D)
    p = scan_plan(b, L, d, n)
    bd, ck, nseg, cps, nc = p.bd, p.ck, p.nseg, p.cps, p.nc
    nblk = triton.cdiv(d, bd)
    dev = u.device
    y = torch.empty((b, L, N_DIR, d), device=dev, dtype=u.dtype)
    chunked = nseg > 1
    hc = torch.empty((b, N_DIR, nc, n, d) if (save or chunked) else (1,), device=dev, dtype=torch.float32)
    dummy = At
    hl = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    sdt = torch.empty((b * N_DIR * nseg, d), device=dev, dtype=torch.float32) if chunked else dummy
    grid = (b, N_DIR, nblk * nseg)
    fwd, _, comb = _kernels(u)

    def launch(mode, save_states):
        fwd[grid](
            u, delta, Bs, Cs, At, Ds if Ds is not None else dummy,
            delta_bias if delta_bias is not None else dummy, y, hc, hl, sdt, L, h, w, d, nc, nseg, cps,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), delta.stride(2),
            Bs.stride(0), Bs.stride(1), Bs.stride(2), Cs.stride(0), Cs.stride(1), Cs.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            N=n, BD=bd, CK=ck, U=p.u_fwd, SOFTPLUS=delta_softplus, HAS_D=Ds is not None,
            HAS_BIAS=delta_bias is not None, SAVE=save_states, MODE=mode, num_warps=p.warps,
        )

    if not chunked:
        launch(0, save)
        return y, hc
    launch(1, False)
    comb[(b * N_DIR, nblk)](hl, sdt, At, hc, d, nseg, nc * d * n, cps * d * n, N=n, BD=bd, REVERSE=False,
                            num_warps=p.warps)
    launch(2, save)
    return y, (hc if save else hc.new_empty((1,)))


def _ss2d_bwd_triton(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w, delta_softplus):
    b, L, d = u.shape
    n = A.shape[1]
    u = u if u.stride(2) == 1 else u.contiguous()
    delta = delta if delta.stride(3) == 1 else delta.contiguous()
    Bs = Bs if Bs.stride(3) == 1 else Bs.contiguous()
    Cs = Cs if Cs.stride(3) == 1 else Cs.contiguous()
    dy = dy if dy.stride(3) == 1 else dy.contiguous()
    At = A.float().t().contiguous()  # (N, 4D)
    p = scan_plan(b, L, d, n)
    bd, ck, nseg, cps, nc = p.bd, p.ck, p.nseg, p.cps, p.nc
    nblk = triton.cdiv(d, bd)
    dev = u.device
    du = torch.empty((b, L, N_DIR, d), device=dev, dtype=u.dtype)
    ddl = torch.empty((b, L, N_DIR, d), device=dev, dtype=delta.dtype)
    dBp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
    dCp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
    dAp = torch.empty((b * nseg, n, N_DIR * d), device=dev, dtype=torch.float32)
    dDp = torch.empty((b * nseg, N_DIR * d), device=dev, dtype=torch.float32)
    dbp = torch.empty((b * nseg, N_DIR * d), device=dev, dtype=torch.float32)
    scr = torch.empty((b * N_DIR * nblk * nseg, ck // p.u_bwd if p.recomp else ck, n, bd), device=dev,
                      dtype=torch.float32)
    dummy = At
    chunked = nseg > 1
    gl = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    gin = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    sdt = torch.empty((b * N_DIR * nseg, d), device=dev, dtype=torch.float32) if chunked else dummy
    grid = (b, N_DIR, nblk * nseg)
    _, bwd, comb = _kernels(u)

    def launch(mode):
        bwd[grid](
            u, delta, Bs, Cs, At, Ds if Ds is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            hc, dy, du, ddl, dBp, dCp, dAp, dDp, dbp, scr, gl, sdt, gin,
            L, h, w, d, nc, nblk, nseg, cps,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), delta.stride(2),
            Bs.stride(0), Bs.stride(1), Bs.stride(2), Cs.stride(0), Cs.stride(1), Cs.stride(2),
            dy.stride(0), dy.stride(1), dy.stride(2),
            N=n, BD=bd, CK=ck, U=p.u_bwd, SOFTPLUS=delta_softplus, HAS_D=Ds is not None,
            HAS_BIAS=delta_bias is not None, MODE=mode, RECOMP=p.recomp, num_warps=p.warps,
        )

    if chunked:
        launch(1)
        comb[(b * N_DIR, nblk)](gl, sdt, At, gin, d, nseg, nseg * d * n, d * n, N=n, BD=bd, REVERSE=True,
                                num_warps=p.warps)
        launch(2)
    else:
        launch(0)
    du = du.sum(2, dtype=torch.float32).to(u.dtype)
    dB = dBp.sum(3).to(Bs.dtype)
    dC = dCp.sum(3).to(Cs.dtype)
    return du, ddl, dAp.sum(0).t().contiguous(), dB, dC, dDp.sum(0), dbp.sum(0)


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("vmrnn::ss2d_scan_fwd", mutates_args=())
def _op_fwd(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Tensor | None,
            delta_bias: Tensor | None, h: int, w: int, delta_softplus: bool, save: bool
            ) -> tuple[Tensor, Tensor]:
    return _ss2d_fwd_triton(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save)


@_op_fwd.register_fake
def _op_fwd_fake(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save):
    b, L, d = u.shape
    n = A.shape[1]
    nc = scan_plan(b, L, d, n).nc
    y = u.new_empty((b, L, N_DIR, d))
    hc = u.new_empty((b, N_DIR, nc, n, d) if save else (1,), dtype=torch.float32)
    return y, hc


@torch.library.custom_op("vmrnn::ss2d_scan_bwd", mutates_args=())
def _op_bwd(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Tensor | None,
            delta_bias: Tensor | None, hc: Tensor, dy: Tensor, h: int, w: int, delta_softplus: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    du, ddl, dA, dB, dC, dD, db = _ss2d_bwd_triton(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w,
                                                   delta_softplus)
    return du, ddl, dA, dB, dC, dD, db


@_op_bwd.register_fake
def _op_bwd_fake(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w, delta_softplus):
    d4 = A.shape[0]
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape, dtype=torch.float32),
            Bs.new_empty(Bs.shape), Cs.new_empty(Cs.shape), A.new_empty((d4,), dtype=torch.float32),
            A.new_empty((d4,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save = inputs
    _, hc = output
    ctx.save_for_backward(u, delta, A, Bs, Cs, Ds, delta_bias, hc)
    ctx.h, ctx.w, ctx.softplus = h, w, delta_softplus
    ctx.has_D, ctx.has_bias = Ds is not None, delta_bias is not None
    ctx.dtypes = (A.dtype, Ds.dtype if Ds is not None else None, delta_bias.dtype if delta_bias is not None else None)


def _backward(ctx, dy, _dhc):
    u, delta, A, Bs, Cs, Ds, delta_bias, hc = ctx.saved_tensors
    du, ddl, dA, dB, dC, dD, db = _op_bwd(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, ctx.h, ctx.w, ctx.softplus)
    a_t, d_t, b_t = ctx.dtypes
    return (du, ddl, dA.to(a_t), dB, dC, dD.to(d_t) if ctx.has_D else None,
            db.to(b_t) if ctx.has_bias else None, None, None, None, None)


_op_fwd.register_autograd(_backward, setup_context=_setup_context)


def ss2d_scan_triton(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Tensor | None,
                     delta_bias: Tensor | None, h: int, w: int, delta_softplus: bool = True) -> Tensor:
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' SS2D scan needs the triton package")
    _check(u, delta, A, Bs, Cs, h, w)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, Bs, Cs, Ds, delta_bias))
    y, _ = _op_fwd(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save)
    return y


def ss2d_scan(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Tensor | None,
              delta_bias: Tensor | None, h: int, w: int, delta_softplus: bool = True,
              backend: str = "auto") -> Tensor:
    """The fused four-direction SS2D scan, spatial layout in and out (see the module docstring).

    backend: ``triton`` (the kernel), ``torch`` (the reference), ``auto`` (triton where it can run).
    """
    if backend == "auto":
        backend = "triton" if (u.is_cuda and HAS_TRITON) else "torch"
    if backend == "triton":
        return ss2d_scan_triton(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus)
    if backend == "torch":
        return ss2d_scan_torch(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus)
    raise ValueError(f"unknown SS2D scan backend {backend!r}; choose 'auto', 'torch' or 'triton'")


__all__ = ["HAS_TRITON", "combine_segments_torch", "from_scan_order", "launch_config", "scan_plan", "scan_index", "ss2d_scan", "ss2d_scan_torch",
           "ss2d_scan_triton", "to_scan_order", "triton_usable"]
