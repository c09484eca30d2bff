"""The torch selective scan against an independent step-by-step recurrence (forward and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vmrnn.ops import ScanBackendUnavailable, cuda_scan_available, selective_scan


def stepwise_scan(u, delta, A, B, C, D, delta_bias, softplus):
    """Literal recurrence, one token and one channel-group at a time (written for the test)."""
    batch, dim, L = u.shape
    groups = B.shape[1]
    per = dim // groups
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    if softplus:
        dt = F.softplus(dt)
    ys = []
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    for t in range(L):
        Bt = B[:, :, :, t].repeat_interleave(per, dim=1)  # (batch, dim, N)
        Ct = C[:, :, :, t].repeat_interleave(per, dim=1)
        h = torch.exp(dt[:, :, t, None] * A[None]) * h + dt[:, :, t, None] * Bt * u[:, :, t, None]
        y = (h * Ct).sum(-1)
        if D is not None:
            y = y + D[None] * u[:, :, t]
        ys.append(y)
    return torch.stack(ys, dim=-1)


def random_inputs(seed, batch, groups, per, N, L, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    dim = groups * per
    t = dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=torch.randn(batch, dim, L, generator=g) * 0.5,
        A=-torch.exp(torch.randn(dim, N, generator=g) * 0.5 + math.log(2.0)),
        B=torch.randn(batch, groups, N, L, generator=g),
        C=torch.randn(batch, groups, N, L, generator=g),
        D=torch.randn(dim, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.3 - 2.0,
    )
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    "seed,batch,groups,per,N,L",
    [
        (0, 2, 4, 3, 5, 17),
        (1, 1, 1, 8, 16, 64),
        (2, 3, 4, 2, 4, 1),
        (3, 2, 2, 5, 7, 100),
        (4, 1, 4, 4, 16, 129),
    ],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_scan_matches_stepwise_recurrence(seed, batch, groups, per, N, L, softplus):
    x = random_inputs(seed, batch, groups, per, N, L)
    if not softplus:  # delta must stay positive for a meaningful decay
        x["delta"] = x["delta"].detach().abs().requires_grad_(True)
        x["delta_bias"] = x["delta_bias"].detach().abs().mul(0.1).requires_grad_(True)
    out = selective_scan(**x, delta_softplus=softplus, backend="torch")
    ref = stepwise_scan(*(x[k].double() for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")), softplus)
    assert out.shape == (batch, groups * per, L) and out.dtype == torch.float32
    assert rel_err(out.double(), ref) < 1e-5

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(x.values()), grad_out, materialize_grads=True)
    xd = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    ref = stepwise_scan(*(xd[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")), softplus)
    ref_grads = torch.autograd.grad(ref, list(xd.values()), grad_out.double(), materialize_grads=True)
    for name, g, rg in zip(x, grads, ref_grads):
        assert rel_err(g.double(), rg) < 1e-5, name


def test_optional_D_and_bias_and_ungrouped_B():
    x = random_inputs(7, 2, 1, 6, 4, 9, requires_grad=False)
    B3, C3 = x["B"][:, 0], x["C"][:, 0]  # (batch, N, L): one group
    out = selective_scan(x["u"], x["delta"].abs(), x["A"], B3, C3, backend="torch")
    ref = stepwise_scan(
        x["u"].double(), x["delta"].abs().double(), x["A"].double(), x["B"].double(), x["C"].double(), None, None, False
    )
    assert rel_err(out.double(), ref) < 1e-5


def test_half_precision_input_keeps_dtype_and_fp32_state():
    x = random_inputs(3, 1, 4, 2, 4, 33, requires_grad=False)
    out16 = selective_scan(
        x["u"].bfloat16(),
        x["delta"].bfloat16(),
        x["A"],
        x["B"].bfloat16(),
        x["C"].bfloat16(),
        x["D"],
        x["delta_bias"],
        True,
        backend="torch",
    )
    out32 = selective_scan(**x, delta_softplus=True, backend="torch")
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16.float(), out32) < 3e-2  # bf16 inputs, fp32 state


@pytest.mark.parametrize("bad", ["u_rank", "A_dim", "B_len", "groups"])
def test_bad_shapes_are_named(bad):
    x = random_inputs(0, 2, 4, 2, 3, 5, requires_grad=False)
    if bad == "u_rank":
        x["u"] = x["u"][0]
    elif bad == "A_dim":
        x["A"] = x["A"][:3]
    elif bad == "B_len":
        x["B"] = x["B"][..., :4]
    else:
        x["B"] = torch.randn(2, 3, 3, 5)
    with pytest.raises(ValueError, match=r"must|does not divide"):
        selective_scan(**x, backend="torch")


def test_unknown_backend_and_unavailable_cuda_are_clear():
    x = random_inputs(0, 1, 1, 2, 2, 3, requires_grad=False)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(**x, backend="triton")
    if not cuda_scan_available():
        with pytest.raises(ScanBackendUnavailable, match="cuda"):
            selective_scan(**x, backend="cuda")


def test_auto_uses_torch_on_cpu():
    x = random_inputs(5, 1, 2, 2, 3, 8, requires_grad=False)
    assert torch.equal(selective_scan(**x, backend="auto"), selective_scan(**x, backend="torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_scan_available(), reason="needs a GPU and mamba_ssm's compiled kernel")
@pytest.mark.parametrize("L", [64, 1024, 4096])
def test_cuda_scan_matches_torch_scan(L):
    x = {k: v.detach().cuda().requires_grad_(True) for k, v in random_inputs(11, 2, 4, 16, 16, L).items()}
    out_c = selective_scan(**x, delta_softplus=True, backend="cuda")
    out_t = selective_scan(**x, delta_softplus=True, backend="torch")
    assert rel_err(out_c, out_t) < 1e-5
    go = torch.randn_like(out_c)
    gc = torch.autograd.grad(out_c, list(x.values()), go)
    gt = torch.autograd.grad(out_t, list(x.values()), go)
    for name, a, b in zip(x, gc, gt):
        assert rel_err(a, b) < 1e-4, name
