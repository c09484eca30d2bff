"""Selective scan with mamba_ssm's `selective_scan_fn` semantics: `selective_scan` beside `selective_scan_ref`.

For every channel d (with group g = d // (D / G) choosing B and C):
    delta = softplus(delta + delta_bias)            (each step optional)
    h_l   = exp(delta_l * A_d) * h_{l-1} + delta_l * B_{g,l} * u_l      (h in fp32)
    y_l   = <C_{g,l}, h_l> + D_d * u_l

Backends:
- ``torch`` (`selective_scan_ref`, the reference): pure PyTorch, differentiable, vectorised over batch,
  channels and state; the sequence axis uses a log2(L)-step parallel (Hillis-Steele) scan, so there is
  no Python loop over tokens.
- ``cuda``: mamba_ssm's compiled kernel (``selective_scan_cuda``), wrapped as a ``torch.library``
  custom op with autograd and a fake implementation so ``torch.compile`` / ``torch.export`` can trace it.
- ``auto``: ``cuda`` for CUDA tensors when the kernel imports, else ``torch``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "torch", "cuda"]


class ScanBackendUnavailable(RuntimeError):
    """Raised when the CUDA scan is requested but cannot be used."""


@functools.cache
def _cuda_kernel():
    """Import mamba_ssm's compiled extension, or return the reason it is unavailable."""
    try:
        import selective_scan_cuda  # noqa: PLC0415  (compiled module shipped by mamba_ssm)
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
        return None, f"{type(exc).__name__}: {exc}"
    return selective_scan_cuda, None


def cuda_scan_available() -> bool:
    """True when mamba_ssm's CUDA selective-scan kernel imports and a GPU is present."""
    return torch.cuda.is_available() and _cuda_kernel()[0] is not None


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, dim, seqlen); got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    batch, dim, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state); got {tuple(A.shape)}")
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != seqlen:
            raise ValueError(
                f"{name} must be (batch, groups, d_state={n_state}, seqlen={seqlen}); got {tuple(t.shape)}"
            )
        if dim % t.shape[1]:
            raise ValueError(f"{name} has {t.shape[1]} groups, which does not divide dim={dim}")
    return B, C


def _parallel_linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_l = a_l * h_{l-1} + b_l along dim -2 (h_{-1} = 0), in log2(L) vectorised steps."""
    L = a.shape[-2]
    shift = 1
    while shift < L:
        # Combine each position with the one `shift` back; positions < shift are already final.
        a_prev = F.pad(a[..., :-shift, :], (0, 0, shift, 0), value=1.0)
        b_prev = F.pad(b[..., :-shift, :], (0, 0, shift, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        shift *= 2
    return b


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Pure-PyTorch selective scan (fp32 internally); returns (batch, dim, seqlen) in u's dtype."""
    B, C = _check_shapes(u, delta, A, B, C)
    dtype = u.dtype
    batch, dim, seqlen = u.shape
    groups = B.shape[1]
    uf, dt = u.float(), delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # Expand grouped B/C to one row per channel: (batch, dim, seqlen, d_state).
    Bc = B.float().repeat_interleave(dim // groups, dim=1).transpose(-1, -2)
    Cc = C.float().repeat_interleave(dim // groups, dim=1).transpose(-1, -2)
    dA = torch.exp(dt.unsqueeze(-1) * A.float().unsqueeze(1))  # (b, d, l, n)
    dBu = (dt * uf).unsqueeze(-1) * Bc
    h = _parallel_linear_scan(dA, dBu)
    y = (h * Cc).sum(-1)
    if D is not None:
        y = y + uf * D.float()[:, None]
    return y.to(dtype)


# --- CUDA backend: mamba_ssm's kernel as a custom op --------------------------------------------


def _cuda_fwd_impl(u, delta, A, B, C, D, delta_bias, delta_softplus):
    kernel, _ = _cuda_kernel()
    out, x, *_ = kernel.fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return out, x


@torch.library.custom_op("vmrnn::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    out, x = _cuda_fwd_impl(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D,
        delta_bias,
        delta_softplus,
    )
    return out, x


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus):
    batch, dim, seqlen = u.shape
    n_chunks = (seqlen + 2047) // 2048  # the kernel keeps one state snapshot per 2048 tokens
    return delta.new_empty(u.shape), u.new_empty((batch, dim, n_chunks, 2 * A.shape[1]), dtype=A.dtype)


@torch.library.custom_op("vmrnn::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    dout: Tensor,
    x: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernel, _ = _cuda_kernel()
    du, ddelta, dA, dB, dC, dD, ddb, *_ = kernel.bwd(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D,
        None,
        delta_bias,
        dout.contiguous(),
        x,
        None,
        None,
        delta_softplus,
        False,
    )
    # custom ops cannot return None: absent D / delta_bias give empty placeholders.
    if D is None:
        dD = A.new_empty(0)
    if delta_bias is None:
        ddb = A.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, ddb


@_scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, delta_bias, dout, x, delta_softplus):
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else A.new_empty(0),
        torch.empty_like(delta_bias) if delta_bias is not None else A.new_empty(0),
    )


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    _, x = output
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, x)
    ctx.delta_softplus = delta_softplus
    ctx.has_D, ctx.has_bias = D is not None, delta_bias is not None


def _scan_backward(ctx, dout, _dx):
    u, delta, A, B, C, D, delta_bias, x = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddb = _scan_bwd(u, delta, A, B, C, D, delta_bias, dout, x, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, dD if ctx.has_D else None, ddb if ctx.has_bias else None, None


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """mamba_ssm's CUDA kernel; raises ScanBackendUnavailable with the reason when it cannot run."""
    kernel, why = _cuda_kernel()
    if kernel is None:
        raise ScanBackendUnavailable(
            "the 'cuda' selective-scan backend needs mamba_ssm's compiled kernel "
            f"(pip install 'vmrnn-sweeps[cuda]' --no-build-isolation, or cluster/install_kernels.sh): {why}"
        )
    if not u.is_cuda:
        raise ScanBackendUnavailable(f"the 'cuda' selective-scan backend needs CUDA tensors; got {u.device}")
    B, C = _check_shapes(u, delta, A, B, C)
    # The kernel wants fp32 weights and matching input dtypes for u, delta, B and C.
    A = A.float()
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    delta, B, C = delta.to(u.dtype), B.to(u.dtype), C.to(u.dtype)
    out, _ = _scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return out


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: Backend = "auto",
) -> Tensor:
    """Selective scan, mamba_ssm semantics (no z gate).

    Shapes: u, delta (batch, dim, L); A (dim, N); B, C (batch, groups, N, L) or (batch, N, L);
    D, delta_bias (dim,). Returns (batch, dim, L) in u's dtype; the state is always fp32.
    """
    if backend == "auto":
        backend = "cuda" if (u.is_cuda and _cuda_kernel()[0] is not None) else "torch"
    if backend == "torch":
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "cuda":
        return selective_scan_cuda(u, delta, A, B, C, D, delta_bias, delta_softplus)
    raise ValueError(f"unknown selective-scan backend {backend!r}; choose 'auto', 'torch' or 'cuda'")
