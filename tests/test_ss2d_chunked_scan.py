"""The chunk-parallel (segmented) Triton SS2D scan against the torch references.

`vmrnn.ops.scan_plan.scan_plan` cuts long sequences into segments that run in parallel; a short
sequential pass (`vmrnn.ops.triton.ss2d_combine`, reference `combine_segments_ref`) carries the states
(forward) and the state adjoints (backward) across segments. These checks pass explicit plans
(`ss2d_scan(..., plan=...)`) with many segments of several chunks, tail chunks and a partial last segment
on small shapes, and compare outputs and every gradient with `ss2d_scan_ref` (gather to scan order +
`selective_scan_ref`). On CPU they run in Triton's interpreter, in a subprocess with TRITON_INTERPRET=1
(as tests/test_fused_ss2d.py does).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from procs import run_interpreted
from vmrnn.ops import ss2d_scan as fs
from vmrnn.ops.scan_plan import MIN_SEG_CK, SEG_CK, TARGET_PROGRAMS, ScanPlan, scan_plan

CUDA = torch.cuda.is_available()
HERE = Path(__file__).resolve()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(seed, b, h, w, d, n, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    L = h * w
    u = torch.randn(b, L, d, generator=g)
    delta = torch.randn(b, L, 4, d, generator=g) * 0.5
    A = -torch.exp(torch.randn(4 * d, n, generator=g) * 0.5 + math.log(0.5))  # slow decay: carries matter
    xbc = torch.randn(b, L, 4, 2 * n, generator=g)
    Ds = torch.randn(4 * d, generator=g)
    bias = torch.randn(4 * d, generator=g) * 0.3 - 2.0
    return [t.to(device) for t in (u, delta, A, xbc, Ds, bias)]


def run(backend, t, h, w, n, plan=None):
    x = [a.detach().clone().requires_grad_(True) for a in t]
    u, delta, A, xbc, Ds, bias = x
    y = fs.ss2d_scan(u, delta, A, xbc[..., :n], xbc[..., n:], Ds, bias, h, w, True, backend=backend, plan=plan)
    go = torch.sin(torch.arange(y.numel(), device=y.device, dtype=torch.float32)).reshape(y.shape)
    (y * go).sum().backward()
    return y.detach(), [a.grad for a in x]


# (b, h, w, d, n, plan choices): several chunks per segment, tails, a partial last segment, partial D blocks
CASES = [
    (1, 8, 8, 8, 4, dict(ck=8, nseg=4)),  # 8 chunks, 4 segments of 2
    (2, 5, 7, 6, 4, dict(ck=8, nseg=2)),  # L=35: tail chunk, 5 chunks -> segments of 3 (one padded)
    (1, 6, 6, 40, 2, dict(ck=8, nseg=5, bd=16)),  # D blocks of 16 with a partial one, 5 segments
    (1, 8, 8, 8, 4, dict(ck=16, nseg=2, u_bwd=8)),  # two segments of two chunks, backward unrolled by 8
    (1, 8, 8, 8, 4, dict(ck=16, nseg=2, sub=4)),  # the backward rebuilds blocks of 4 tokens
    (2, 5, 7, 6, 4, dict(ck=16, nseg=2, sub=8)),  # L=35: blocks past the end of the sequence
    (1, 6, 6, 8, 4, dict(ck=16, nseg=1, sub=4)),  # one walk, blocks of 4
    (1, 6, 6, 40, 2, dict(ck=8, nseg=5, bd=16, atomic=False)),  # du, dB, dC as partials over 3 D blocks, summed
    (2, 5, 7, 6, 4, dict(ck=8, nseg=1, atomic=False)),  # one walk, partials, a tail chunk
]


def check_case(b, h, w, d, n, choices, device, tol=2e-5):
    t = inputs(b * 100 + h * 10 + w, b, h, w, d, n, device)
    plan = scan_plan(b, h * w, d, n, **choices)
    assert plan.nseg > 1 or choices.get("nseg") == 1, plan
    y1, g1 = run("triton", t, h, w, n, plan)
    y0, g0 = run("torch", t, h, w, n, plan)  # the reference has no launch: the plan changes nothing there
    assert rel(y1, y0) < tol, rel(y1, y0)
    for name, a, r in zip(["u", "delta", "A", "BC", "D", "bias"], g1, g0):
        assert rel(a, r) < tol, (name, rel(a, r))


def check_combine(device):
    g = torch.Generator().manual_seed(5)
    bk, nseg, n, d = 8, 5, 4, 12
    loc = torch.randn(bk, nseg, n, d, generator=g).to(device)
    sdt = torch.rand(bk, nseg, d, generator=g).to(device)
    A = -torch.rand(4 * d, n, generator=g).to(device)
    At = A.t().contiguous()
    from vmrnn.ops.triton.ss2d_combine import ss2d_combine  # noqa: PLC0415  (imports triton)

    for reverse in (False, True):
        out = torch.full_like(loc, float("nan"))
        ss2d_combine(loc, sdt, At, out, bk, d, n, nseg, nseg * d * n, d * n, bd=8, warps=4, reverse=reverse)
        ref = fs.combine_segments_ref(loc, sdt, A, reverse)
        assert not out.isnan().any()
        assert rel(out, ref) < 1e-6, rel(out, ref)


def _interpreter_checks() -> None:
    check_combine("cpu")
    print("ok combine", flush=True)
    for case in CASES:
        check_case(*case, "cpu")
        print("ok", case, flush=True)


def test_combine_reference_is_the_sequential_recurrence():
    """combine_segments_ref: the carry into segment s equals running the recurrence over 0..s-1."""
    g = torch.Generator().manual_seed(0)
    loc, sdt, A = (
        torch.randn(4, 3, 2, 5, generator=g),
        torch.rand(4, 3, 5, generator=g),
        -torch.rand(20, 2, generator=g),
    )
    out = fs.combine_segments_ref(loc, sdt, A)
    a = A.reshape(4, 5, 2).transpose(1, 2)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert torch.allclose(out[:, 2], torch.exp(sdt[:, 1, None] * a) * loc[:, 0] + loc[:, 1])
    back = fs.combine_segments_ref(loc, sdt, A, reverse=True)
    assert torch.allclose(back[:, 0], torch.exp(sdt[:, 1, None] * a) * loc[:, 2] + loc[:, 1])


def test_scan_plan_segments_when_programs_are_few():
    assert scan_plan(128, 64, 256, 16).nseg == 1  # 8x8 grid, 4096 programs: no segments
    taxibj = scan_plan(16, 64, 256, 16)  # TaxiBJ: 512 programs, shorter than two chunks -> short chunks
    assert taxibj.nseg > 1 and taxibj.ck >= MIN_SEG_CK and taxibj.nseg * taxibj.cps * taxibj.ck >= 64
    assert 16 * 4 * (256 // taxibj.bd) * taxibj.nseg <= TARGET_PROGRAMS
    assert scan_plan(16, 64, 512, 16).nseg == 1  # 8x8 grid, 1024 programs: one walk (measured faster)
    assert scan_plan(16, 256, 512, 16).ck == SEG_CK  # two chunks or more: chunks of SEG_CK
    kth = scan_plan(4, 4096, 256, 16)  # KTH: 128 programs -> segmented
    assert kth.nseg > 1 and kth.nseg * kth.cps * kth.ck >= 4096 and kth.bd == 32
    assert 4 * 4 * (256 // kth.bd) * kth.nseg <= TARGET_PROGRAMS


def test_scan_plan_choices_are_explicit_arguments():
    """Each keyword fixes one choice and the rest follow; the same sizes always give the same plan."""
    auto = scan_plan(2, 35, 6, 4)
    assert auto == scan_plan(2, 35, 6, 4)
    forced = scan_plan(2, 35, 6, 4, ck=8, nseg=2)
    assert forced == ScanPlan(bd=8, ck=8, u_fwd=8, u_bwd=4, warps=1, nseg=2, cps=3, sub=4, atomic=1)
    assert forced.nc == 6 and forced.nc * forced.ck >= 35  # 5 chunks -> segments of 3 (one padded)
    assert scan_plan(1, 36, 40, 2, ck=8, nseg=5, bd=16).bd == 16
    assert scan_plan(4, 4096, 256, 16, nseg=1).nseg == 1  # segments can be turned off
    assert scan_plan(1, 9, 8, 4).ck == 16  # short sequences: one chunk
    assert scan_plan(2, 35, 6, 4, ck=16).nseg == 2  # a chunk length given: segments of whole chunks
    assert scan_plan(4, 4096, 256, 16, sub=8).sub == 8
    assert scan_plan(4, 4096, 256, 16).atomic == 1 and scan_plan(4, 4096, 256, 16, atomic=False).atomic == 0
    torch.use_deterministic_algorithms(True)
    try:  # bit-reproducible runs get the partials, summed in a fixed order
        assert scan_plan(4, 4096, 256, 16).atomic == 0
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="sub=12 must divide the chunk length 64"):
        scan_plan(4, 4096, 256, 16, sub=12)


def test_reference_ignores_the_launch_plan():
    t = inputs(0, 1, 4, 4, 6, 2)
    y0, g0 = run("torch", t, 4, 4, 2)
    y1, g1 = run("torch", t, 4, 4, 2, scan_plan(1, 16, 6, 2, ck=8, nseg=2))
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.skipif(not fs.HAS_TRITON, reason="triton is not installed")
def test_chunked_triton_scan_matches_torch_on_cpu_interpreter():
    proc = run_interpreted(str(HERE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == len(CASES) + 1


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fs.HAS_TRITON), reason="needs a GPU and triton")
@pytest.mark.parametrize("case", CASES + [(2, 32, 32, 64, 16, {}), (1, 64, 64, 32, 16, {}), (4, 64, 64, 256, 16, {})])
def test_chunked_triton_scan_matches_torch_on_gpu(case):
    torch.backends.cuda.matmul.allow_tf32 = False
    *shape, choices = case
    if not choices and scan_plan(shape[0], shape[1] * shape[2], shape[3], shape[4]).nseg == 1:
        choices = {"nseg": 4}
    check_case(*shape, choices, "cuda", tol=5e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fs.HAS_TRITON), reason="needs a GPU and triton")
def test_combine_kernel_on_gpu():
    check_combine("cuda")


if __name__ == "__main__":  # run by test_chunked_triton_scan_matches_torch_on_cpu_interpreter
    _interpreter_checks()
