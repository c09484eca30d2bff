"""The SS2D epilogue op (`vmrnn.ops.merge_norm_gate`): the Triton kernels against the torch reference.

On CPU the kernels run in Triton's interpreter, in a subprocess with TRITON_INTERPRET=1 (as
tests/test_fused_ss2d.py does); on the GPU directly (marked gpu). SS2D with ``fused_norm`` is checked
against SS2D without it on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from procs import run_interpreted
from vmrnn.models import SS2D
from vmrnn.ops import merge_norm_gate as mng
from vmrnn.ops.ss2d_scan import HAS_TRITON

CUDA = torch.cuda.is_available()
HERE = Path(__file__).resolve()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(backend, t, d, dtype=torch.float32):
    y, zz, w, b, go = t
    x = [a.detach().clone().requires_grad_(True) for a in (y.to(dtype), zz.to(dtype), w, b)]
    z = x[1][..., d:]  # a strided view, as SS2D's split of its in_proj output
    out = mng.merge_norm_gate(x[0], z, x[2], x[3], 1e-5, backend=backend)
    (out.float() * go).sum().backward()
    return [out.detach()] + [a.grad for a in x]


def inputs(seed, b, h, w, d, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = (
        torch.randn(b, h * w, 4, d, generator=g) + 0.3,
        torch.randn(b, h, w, 2 * d, generator=g),
        torch.randn(d, generator=g),
        torch.randn(d, generator=g),
        torch.randn(b, h, w, d, generator=g),
    )
    return [a.to(device) for a in t]


# (b, h, w, d): D not a power of two, token counts not a multiple of the kernels' row block
SHAPES = [(2, 3, 5, 24), (1, 8, 8, 64), (3, 7, 3, 40)]


def check_op(device: str) -> None:
    for shape in SHAPES:
        t = inputs(sum(shape), *shape, device=device)
        got, want = run("triton", t, shape[-1]), run("torch", t, shape[-1])
        for name, a, r in zip(["out", "y", "z", "weight", "bias"], got, want):
            assert rel(a, r) < 1e-5, (shape, name, rel(a, r))
        print("ok fp32", shape, flush=True)
    # bf16 activations: the reference rounds the merged tokens and the gate to bf16; the op keeps fp32 inside
    shape = SHAPES[1]
    t = inputs(7, *shape, device=device)
    got, want = run("triton", t, shape[-1], torch.bfloat16), run("torch", t, shape[-1])
    for name, a, r in zip(["out", "y", "z", "weight", "bias"], got, want):
        assert rel(a, r) < 2e-2, (name, rel(a, r))
    print("ok bf16", flush=True)


def check_ss2d(device: str) -> None:
    torch.manual_seed(0)
    m = SS2D(16, d_state=4).to(device)
    m.impl = "fused"
    x = torch.randn(2, 4, 5, 16, device=device)
    outs = []
    for fused_norm, backend in ((False, "torch"), (True, "triton")):
        m.fused_norm, m.fused_backend = fused_norm, backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = m(xi)
            (y * torch.cos(y)).sum().backward()
        ops = {e.name for e in prof.events()}
        # the op runs both ways exactly when fused_norm is set
        assert ({"vmrnn::merge_norm_gate_fwd", "vmrnn::merge_norm_gate_bwd"} <= ops) == fused_norm, sorted(ops)
        assert not fused_norm or "aten::layer_norm" not in ops
        outs.append([y.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()])
    errs = [rel(a, r) for a, r in zip(outs[1], outs[0])]
    assert max(errs) < 1e-4, errs
    print("ok ss2d", flush=True)


def test_reference_is_the_ss2d_composition():
    """The torch backend of SS2D with fused_norm is the same computation as without it: equal, not close."""
    torch.manual_seed(0)
    m = SS2D(16, d_state=4)
    m.impl, m.fused_backend = "fused", "torch"
    x = torch.randn(2, 4, 5, 16)
    m.fused_norm = False
    a = m(x)
    m.fused_norm = True
    assert torch.equal(m(x), a)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 6, 4, 8), torch.zeros(2, 2, 2, 8)), r"z must hold batch x L = 2 x 6 tokens of D=8"),
        ((torch.zeros(2, 6, 8), torch.zeros(2, 2, 3, 8)), r"y must be \(batch, L, directions, D\)"),
    ],
)
def test_bad_shapes_get_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message):
        mng.merge_norm_gate(*args, torch.ones(8), torch.zeros(8), backend="torch")
    y, z = torch.zeros(2, 6, 4, 8), torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match="the LayerNorm weight must be"):
        mng.merge_norm_gate(y, z, torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match="unknown SS2D epilogue backend 'cuda'"):
        mng.merge_norm_gate(y, z, torch.ones(8), torch.zeros(8), 1e-5, "cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_epilogue_matches_torch_on_cpu_interpreter():
    proc = run_interpreted(str(HERE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == len(SHAPES) + 2


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a GPU and triton")
def test_triton_epilogue_matches_torch_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    check_op("cuda")
    check_ss2d("cuda")


if __name__ == "__main__":  # run by test_triton_epilogue_matches_torch_on_cpu_interpreter
    check_op("cpu")
    check_ss2d("cpu")
