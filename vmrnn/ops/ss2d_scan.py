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
Both are exposed as ``torch.library`` custom ops with fake implementations, so ``torch.compile``
traces through them without a graph break and CUDA graphs can capture them.
"""

from __future__ import annotations

import functools
import os

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
    return _ss2d_fwd_kernel, _ss2d_bwd_kernel


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
        u_ptr, dl_ptr, b_ptr, c_ptr, a_ptr, dsk_ptr, bias_ptr, y_ptr, hc_ptr,
        L, H, W, D, NC,
        su_b, su_l, sd_b, sd_l, sd_k, sb_b, sb_l, sb_k, sc_b, sc_l, sc_k, sy_b, sy_l, sy_k,
        N: tl.constexpr, BD: tl.constexpr, CK: tl.constexpr, U: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        pid_d = tl.program_id(2)
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
        h = tl.zeros((BD, N), dtype=tl.float32)
        jj = tl.arange(0, U)
        for c in range(NC):
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
                    cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                    dA = tl.exp2(dt[:, None] * A)
                    h = dA * h + (dt * u)[:, None] * bv[None, :]
                    y = tl.sum(h * cv[None, :], axis=1)
                    if HAS_D:
                        y = y + dsk * u
                    ybuf = tl.where(jj[None, :] == j, y[:, None], ybuf)
                lv = c * CK + s * U + jj
                lsv = tl.where(k >= 2, L - 1 - lv, lv)
                posv = tl.where((k % 2) == 1, (lsv % H) * W + lsv // H, lsv)
                tl.store(y_base[:, None] + posv[None, :] * sy_l, ybuf.to(y_ptr.dtype.element_ty),
                         mask=dmask[:, None] & (lv < L)[None, :])

    @triton.jit
    def _ss2d_bwd_kernel(
        u_ptr, dl_ptr, b_ptr, c_ptr, a_ptr, dsk_ptr, bias_ptr, hc_ptr, dy_ptr,
        du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, scr_ptr,
        L, H, W, D, NC, NBLK,
        su_b, su_l, sd_b, sd_l, sd_k, sb_b, sb_l, sb_k, sc_b, sc_l, sc_k, sy_b, sy_l, sy_k,
        N: tl.constexpr, BD: tl.constexpr, CK: tl.constexpr, U: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        pid_d = tl.program_id(2)
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
        prog = (pid_b * 4 + k) * NBLK + pid_d
        scr_base = scr_ptr + prog * (CK * BD * N) + offs_n[None, :] * BD + tl.arange(0, BD)[:, None]
        scr3 = scr_base[:, :, None]
        uu = tl.arange(0, U)

        g_carry = tl.zeros((BD, N), dtype=tl.float32)  # dA_{l+1} * dL/dh_{l+1}
        dA_acc = tl.zeros((BD, N), dtype=tl.float32)
        dD_acc = tl.zeros((BD,), dtype=tl.float32)
        db_acc = tl.zeros((BD,), dtype=tl.float32)
        for cc in range(NC):
            c = NC - 1 - cc
            # 1) rebuild the chunk's states from its stored start state (stores batched per U tokens,
            #    so the block's loads are not held behind them)
            h = tl.load(hc_base + c * D * N, mask=dmask[:, None], other=0.0)
            for s in range(CK // U):
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
                    hbuf = tl.where(uu[None, None, :] == j, h[:, :, None], hbuf)
                tl.store(scr3 + (s * U + uu)[None, None, :] * (BD * N), hbuf)
            tl.debug_barrier()
            # 2) walk back through the chunk (outputs batched per U tokens, as above)
            for ss in range(CK // U):
                s = CK // U - 1 - ss
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
        tl.store(dA_ptr + pid_b * 4 * D * N + offs_n[None, :] * (4 * D) + ch[:, None], dA_acc, mask=dmask[:, None])
        if HAS_D:
            tl.store(dD_ptr + pid_b * 4 * D + ch, dD_acc, mask=dmask)
        if HAS_BIAS:
            tl.store(dbias_ptr + pid_b * 4 * D + ch, db_acc, mask=dmask)


LAUNCH_OVERRIDE: dict[str, int] = {}  # benchmarks/gpu_checks.py sweeps launch configs through this


def launch_config(batch: int, L: int, d: int, n: int) -> tuple[int, int, int, int, int]:
    """(BD channels per program, CK checkpoint interval, U_fwd, U_bwd unroll, num_warps) for a size.

    One warp per program, a channel per lane and its N states in that lane's registers: the sums over
    N need no shuffles and nothing goes through shared memory. BD = 16 when that many programs are too
    few to give every SM two warps (long sequences at small batch, e.g. KTH), else 32.
    """
    if LAUNCH_OVERRIDE:
        o = LAUNCH_OVERRIDE
        bd, uf, ub, warps, ck = o.get("bd", 32), o.get("u", 8), o.get("ub", 4), o.get("warps", 1), o.get("ck", 64)
    else:
        lanes = batch * N_DIR * d
        bd = 32 if lanes // 32 >= 264 else 16
        uf, ub, warps = 8, 4, 1
        ck = 64 if L <= 1024 else 128
    bd = max(4, min(bd, 1 << max(d - 1, 0).bit_length()))
    ck = max(uf, min(ck, 1 << max(L - 1, 0).bit_length()))  # short sequences: one chunk
    return bd, ck, uf, ub, warps


def _strides_blc(t: Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


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
    bd, ck, unroll, _, warps = launch_config(b, L, d, n)
    nc = triton.cdiv(L, ck)
    y = torch.empty((b, L, N_DIR, d), device=u.device, dtype=u.dtype)
    hc = torch.empty((b, N_DIR, nc, n, d) if save else (1,), device=u.device, dtype=torch.float32)
    dummy = At
    grid = (b, N_DIR, triton.cdiv(d, bd))
    _kernels(u)[0][grid](
        u, delta, Bs, Cs, At, Ds if Ds is not None else dummy, delta_bias if delta_bias is not None else dummy,
        y, hc, L, h, w, d, nc,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), delta.stride(2),
        Bs.stride(0), Bs.stride(1), Bs.stride(2), Cs.stride(0), Cs.stride(1), Cs.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        N=n, BD=bd, CK=ck, U=unroll, SOFTPLUS=delta_softplus, HAS_D=Ds is not None,
        HAS_BIAS=delta_bias is not None, SAVE=save, num_warps=warps,
    )
    return y, hc


def _ss2d_bwd_triton(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w, delta_softplus):
    b, L, d = u.shape
    n = A.shape[1]
    u = u if u.stride(2) == 1 else u.contiguous()
    delta = delta if delta.stride(3) == 1 else delta.contiguous()
    Bs = Bs if Bs.stride(3) == 1 else Bs.contiguous()
    Cs = Cs if Cs.stride(3) == 1 else Cs.contiguous()
    dy = dy if dy.stride(3) == 1 else dy.contiguous()
    At = A.float().t().contiguous()  # (N, 4D)
    bd, ck, _, unroll, warps = launch_config(b, L, d, n)
    nc = triton.cdiv(L, ck)
    nblk = triton.cdiv(d, bd)
    dev = u.device
    du = torch.empty((b, L, N_DIR, d), device=dev, dtype=u.dtype)
    ddl = torch.empty((b, L, N_DIR, d), device=dev, dtype=delta.dtype)
    dBp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
    dCp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
    dAp = torch.empty((b, n, N_DIR * d), device=dev, dtype=torch.float32)
    dDp = torch.empty((b, N_DIR * d), device=dev, dtype=torch.float32)
    dbp = torch.empty((b, N_DIR * d), device=dev, dtype=torch.float32)
    scr = torch.empty((b * N_DIR * nblk, ck, n, bd), device=dev, dtype=torch.float32)
    dummy = At
    grid = (b, N_DIR, nblk)
    _kernels(u)[1][grid](
        u, delta, Bs, Cs, At, Ds if Ds is not None else dummy, delta_bias if delta_bias is not None else dummy,
        hc, dy, du, ddl, dBp, dCp, dAp, dDp, dbp, scr,
        L, h, w, d, nc, nblk,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), delta.stride(2),
        Bs.stride(0), Bs.stride(1), Bs.stride(2), Cs.stride(0), Cs.stride(1), Cs.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        N=n, BD=bd, CK=ck, U=unroll, SOFTPLUS=delta_softplus, HAS_D=Ds is not None,
        HAS_BIAS=delta_bias is not None, num_warps=warps,
    )
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
    _, ck, _, _, _ = launch_config(b, L, d, n)
    nc = -(-L // ck)
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


__all__ = ["HAS_TRITON", "from_scan_order", "launch_config", "scan_index", "ss2d_scan", "ss2d_scan_torch",
           "ss2d_scan_triton", "to_scan_order", "triton_usable"]
