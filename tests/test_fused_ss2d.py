"""The fused SS2D layout and its four-direction scan against the reference dataflow.

- `ss2d_scan_ref` (spatial layout in / out) against the reference cross_scan -> selective_scan ->
  cross_merge, forward and gradients, in float64 where it matters.
- The Triton kernel against `ss2d_scan_ref`: on CPU through Triton's interpreter when triton is
  installed, and on the GPU (marked gpu).
- SS2D(impl="fused") against SS2D(impl="reference") on the same weights: outputs and all gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from procs import run_interpreted
from vmrnn.models import SS2D, cross_merge, cross_scan
from vmrnn.ops import selective_scan
from vmrnn.ops import ss2d_scan as fs
from vmrnn.ops.scan_plan import scan_plan

CUDA = torch.cuda.is_available()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(seed, b, h, w, d, n, extra=3, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    L = h * w
    u = torch.randn(b, L, d, generator=g)
    delta = torch.randn(b, L, 4, d, generator=g) * 0.5
    A = -torch.exp(torch.randn(4 * d, n, generator=g) * 0.5 + math.log(2.0))
    xdbl = torch.randn(b, L, 4, extra + 2 * n, generator=g)
    Ds = torch.randn(4 * d, generator=g)
    bias = torch.randn(4 * d, generator=g) * 0.3 - 2.0
    out = [u, delta, A, xdbl, Ds, bias]
    return [t.to(device=device, dtype=dtype if t is not A else torch.float32) for t in out]


def run_scan(fn, tensors, h, w, n, extra=3, softplus=True, with_d=True, with_bias=True):
    x = [t.detach().clone().requires_grad_(True) for t in tensors]
    u, delta, A, xdbl, Ds, bias = x
    y = fn(
        u,
        delta,
        A,
        xdbl[..., extra : extra + n],
        xdbl[..., extra + n :],
        Ds if with_d else None,
        bias if with_bias else None,
        h,
        w,
        softplus,
    )
    go = torch.sin(torch.arange(y.numel(), device=y.device, dtype=torch.float32)).reshape(y.shape).to(y.dtype)
    (y * go).sum().backward()
    return y.detach(), [t.grad for t in x]


def reference_dataflow(u, delta, A, Bs, Cs, Ds, bias, h, w, softplus):
    """The official dataflow: cross_scan copies, one selective scan, cross_merge (spatial out per dir)."""
    b, L, d = u.shape
    xs = cross_scan(u.transpose(1, 2).reshape(b, d, h, w)).reshape(b, 4 * d, L)
    # delta/B/C per direction, each first put in its direction's scan order
    idx = fs.scan_index(h, w)
    dts = torch.stack([delta[:, idx[k], k].transpose(1, 2) for k in range(4)], 1).reshape(b, 4 * d, L)
    Bk = torch.stack([Bs[:, idx[k], k].transpose(1, 2) for k in range(4)], 1)
    Ck = torch.stack([Cs[:, idx[k], k].transpose(1, 2) for k in range(4)], 1)
    y = selective_scan(xs, dts, A, Bk, Ck, Ds, bias, softplus, backend="torch").reshape(b, 4, d, L)
    return y


@pytest.mark.parametrize("h,w", [(3, 5), (4, 4), (1, 7)])
def test_torch_fused_scan_merges_like_cross_merge(h, w):
    """Summing the fused scan's four spatial outputs equals cross_merge of the reference scan."""
    b, d, n = 2, 6, 4
    u, delta, A, xdbl, Ds, bias = make_inputs(0, b, h, w, d, n, dtype=torch.float64)
    Bs, Cs = xdbl[..., 3 : 3 + n], xdbl[..., 3 + n :]
    y_ref = reference_dataflow(u, delta, A.double(), Bs, Cs, Ds, bias, h, w, True)
    merged_ref = cross_merge(y_ref, h, w)  # (B, D, L)
    y = fs.ss2d_scan_ref(u, delta, A.double(), Bs, Cs, Ds, bias, h, w, True)
    assert y.shape == (b, h * w, 4, d)
    assert torch.allclose(y.sum(2).transpose(1, 2), merged_ref, rtol=1e-10, atol=1e-10)


def test_scan_order_maps_are_adjoint():
    h, w = 3, 4
    x = torch.randn(2, h * w, 4, 5)
    s = fs.to_scan_order(x, h, w)
    assert s.shape == (2, 4, 5, h * w)
    assert torch.equal(fs.from_scan_order(s, h, w), x)
    # direction 1 is column-major: scan step 1 is row 1, column 0 (spatial place W)
    assert torch.equal(s[:, 1, :, 1], x[:, w, 1, :])
    assert torch.equal(s[:, 2, :, 0], x[:, h * w - 1, 2, :])


def test_bad_shapes_are_named():
    u, delta, A, xdbl, Ds, bias = make_inputs(0, 1, 2, 2, 4, 2)
    with pytest.raises(ValueError, match="grid"):
        fs.ss2d_scan_ref(u, delta, A, xdbl[..., 3:5], xdbl[..., 5:], Ds, bias, 3, 2)
    with pytest.raises(ValueError, match="delta"):
        fs.ss2d_scan_ref(u, delta[:, :, :2], A, xdbl[..., 3:5], xdbl[..., 5:], Ds, bias, 2, 2)
    with pytest.raises(ValueError, match="unknown SS2D scan backend"):
        fs.ss2d_scan(u, delta, A, xdbl[..., 3:5], xdbl[..., 5:], Ds, bias, 2, 2, backend="cuda")


# --- the Triton kernel -----------------------------------------------------------------------------

# On CPU the kernels run through Triton's interpreter (slow, but the same kernel code). The interpreter
# must be switched on before triton is imported, so these checks run in a subprocess with
# TRITON_INTERPRET=1 (this file run as a script). Without triton installed they are skipped, and the CPU
# path is the torch backend, checked above.
needs_triton_cpu = pytest.mark.skipif(not fs.HAS_TRITON, reason="triton is not installed")


CASES = [  # (b, h, w, d, n): partial channel blocks, several checkpoint chunks, a tail chunk, n = 1
    (2, 3, 5, 6, 4),
    (1, 4, 4, 40, 16),
    (1, 9, 9, 8, 4),
    (2, 1, 3, 3, 1),
]


def _interpreter_checks() -> None:
    """Every kernel case and the fused SS2D, on CPU tensors through the interpreter."""
    for case in CASES:
        for variant in ("full", "no_softplus", "no_d_no_bias"):
            _check_kernel(*case, variant, "cpu")
            print("ok", case, variant, flush=True)
    out = _ss2d_pair("triton", h=3, w=4)
    (y0, g0), (y1, g1) = out["reference"], out["fused"]
    assert rel(y1, y0) < 1e-5
    for a, r in zip(g1, g0):
        assert rel(a, r) < 1e-5
    print("ok fused SS2D", flush=True)
    # the custom ops' fake implementations must give the real outputs' shapes, dtypes and strides
    # (torch.compile relies on them; a wrong stride once broke compile on the GPU)
    b, h, w, d, n = 1, 3, 4, 6, 4
    t = make_inputs(0, b, h, w, d, n, extra=0)
    u, delta, A, xdbl, Ds, bias = [x.requires_grad_(True) for x in t]
    for plan in (None, list(scan_plan(b, h * w, d, n, ck=8, nseg=2))):  # planned in the op, or given
        args = (u, delta, A, xdbl[..., :n], xdbl[..., n:], Ds, bias, h, w, True, True, plan)
        res = torch.library.opcheck(torch.ops.vmrnn.ss2d_scan_fwd.default, args)
        assert all(v == "SUCCESS" for v in res.values()), res
        y, hc = torch.ops.vmrnn.ss2d_scan_fwd(*args)
        bargs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args[:7]) + (
            hc.detach(),
            torch.randn_like(y),
            h,
            w,
            True,
            plan,
        )
        res = torch.library.opcheck(torch.ops.vmrnn.ss2d_scan_bwd.default, bargs)
        assert all(v == "SUCCESS" for v in res.values()), res
    print("ok opcheck", flush=True)


@needs_triton_cpu
def test_triton_kernels_match_torch_on_cpu_interpreter():
    proc = run_interpreted(__file__)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 3 * len(CASES) + 2


def _check_kernel(b, h, w, d, n, variant, device, tol=2e-5):
    t = make_inputs(hash((b, h, w, d, n)) % 1000, b, h, w, d, n, device=device)
    kw = dict(softplus=variant != "no_softplus", with_d=variant != "no_d_no_bias", with_bias=variant != "no_d_no_bias")
    if variant == "no_softplus":  # delta + bias must stay positive for a decaying state
        t[1], t[5] = t[1].abs() * 0.2, t[5].abs() * 0.1
    y0, g0 = run_scan(fs.ss2d_scan_ref, t, h, w, n, **kw)
    y1, g1 = run_scan(fs.ss2d_scan_triton, t, h, w, n, **kw)
    assert rel(y1, y0) < tol
    for name, a, r in zip(["u", "delta", "A", "xdbl", "D", "bias"], g1, g0):
        if r is None:
            assert a is None, name
            continue
        assert rel(a, r) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fs.HAS_TRITON), reason="needs a GPU and triton")
@pytest.mark.parametrize(
    "b,h,w,d,n", [(2, 3, 5, 6, 4), (1, 4, 4, 40, 16), (4, 8, 8, 256, 16), (2, 32, 32, 64, 16), (1, 64, 64, 32, 16)]
)
@pytest.mark.parametrize("variant", ["full", "no_d_no_bias"])
def test_triton_kernel_matches_torch_on_gpu(b, h, w, d, n, variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_kernel(b, h, w, d, n, variant, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fs.HAS_TRITON), reason="needs a GPU and triton")
def test_triton_kernel_bf16_inputs_fp32_state():
    t = make_inputs(3, 2, 8, 8, 64, 16, device="cuda")
    y32, _ = run_scan(fs.ss2d_scan_triton, t, 8, 8, 16)
    tb = [x.bfloat16() if i not in (2,) else x for i, x in enumerate(t)]
    y16, g16 = run_scan(fs.ss2d_scan_triton, tb, 8, 8, 16)
    assert y16.dtype == torch.bfloat16 and g16[0].dtype == torch.bfloat16 and g16[2].dtype == torch.float32
    assert rel(y16.float(), y32) < 2e-2


# --- SS2D: fused layout against the reference ------------------------------------------------------


def _ss2d_pair(backend, dim=16, d_state=4, h=5, w=6, b=2, device="cpu", seed=0):
    torch.manual_seed(seed)
    m = SS2D(dim, d_state=d_state).to(device)
    x = torch.randn(b, h, w, dim, device=device)
    out = {}
    for impl in ("reference", "fused"):
        m.impl, m.fused_backend = impl, backend
        m.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.cos(y)).sum().backward()
        out[impl] = (y.detach(), [xx.grad] + [p.grad.clone() for p in m.parameters()])
    return out


def test_fused_ss2d_torch_backend_matches_reference():
    out = _ss2d_pair("torch")
    (y0, g0), (y1, g1) = out["reference"], out["fused"]
    assert rel(y1, y0) < 1e-5
    for a, r in zip(g1, g0):
        assert rel(a, r) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fs.HAS_TRITON), reason="needs a GPU and triton")
def test_fused_ss2d_triton_matches_reference_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = _ss2d_pair("triton", dim=64, d_state=16, h=8, w=8, b=4, device="cuda")
    (y0, g0), (y1, g1) = out["reference"], out["fused"]
    assert rel(y1, y0) < 1e-5
    for a, r in zip(g1, g0):
        assert rel(a, r) < 1e-4


if __name__ == "__main__":  # run by test_triton_kernels_match_torch_on_cpu_interpreter, TRITON_INTERPRET=1
    _interpreter_checks()
