"""Check the compiled CUDA kernels against the PyTorch reference, on this machine's GPU.

    python -m vmrnn.ops.check_kernels [--causal-conv1d] [--tol 1e-3] [--seed 0]

For mamba_ssm's selective scan it runs a few small fp32 scans through
``vmrnn.ops.selective_scan(..., backend="cuda")`` and ``backend="torch"`` and compares the outputs
and the gradients of every input (u, delta, A, B, C, D, delta_bias). With ``--causal-conv1d`` it
also compares ``causal_conv1d_fn`` with a grouped ``conv1d``. The error printed is the max relative
error ``max|cuda - torch| / max|torch|`` of each tensor; a package PASSes when all of its errors are
at most ``--tol``. Each package's elapsed time (import + comparisons) is printed.

Exit status: 0 all PASS; 1 a comparison FAILed; 2 no CUDA GPU is visible; 3 a requested kernel
is missing or does not import (build it with ``cluster/install_kernels.sh``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vmrnn.ops.selective_scan import _cuda_kernel, selective_scan

EXIT_PASS, EXIT_FAIL, EXIT_NO_GPU, EXIT_MISSING = 0, 1, 2, 3
BUILD_HINT = (
    "build it for this GPU with `bash cluster/install_kernels.sh` "
    "(add --with-causal-conv1d for causal_conv1d), then re-run this check"
)


@dataclass
class CaseResult:
    name: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (both in float64); 0 when both are all zero."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(got.shape)} vs {tuple(ref.shape)}")
    diff = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


# --- selective scan --------------------------------------------------------------------------

# (name, batch, dim, d_state, seqlen, groups, with D and delta_bias, delta_softplus)
# seqlen 2100 crosses the kernel's 2048-token chunk, so its chunked path is covered too.
SCAN_CASES = (
    ("L=37 groups=1 D+bias softplus", 2, 8, 4, 37, 1, True, True),
    ("L=64 groups=2 plain", 2, 8, 16, 64, 2, False, False),
    ("L=2100 groups=1 D+bias softplus", 1, 4, 4, 2100, 1, True, True),
)


def _scan_inputs(batch, dim, d_state, seqlen, groups, with_d, device, gen):
    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.rand(*shape, generator=gen) * scale + shift).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    inputs = {
        "u": randn(batch, dim, seqlen),
        "delta": rand(batch, dim, seqlen, scale=0.5, shift=0.05),
        "A": -rand(dim, d_state, scale=1.0, shift=0.5),  # negative real part, as in Mamba
        "B": randn(batch, groups, d_state, seqlen),
        "C": randn(batch, groups, d_state, seqlen),
    }
    if with_d:
        inputs["D"] = randn(dim)
        inputs["delta_bias"] = rand(dim, scale=0.2, shift=-0.1)
    return inputs


def _run_scan(inputs: dict[str, torch.Tensor], backend: str | Callable, softplus: bool, upstream: torch.Tensor):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    scan = backend if callable(backend) else functools.partial(selective_scan, backend=backend)
    out = scan(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        D=leaves.get("D"),
        delta_bias=leaves.get("delta_bias"),
        delta_softplus=softplus,
    )
    (out * upstream).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def check_selective_scan(device: str = "cuda", candidate: str | Callable = "cuda", seed: int = 0) -> list[CaseResult]:
    """Compare `candidate` (a backend name, or a function with selective_scan's signature) with
    backend "torch": the forward output and the gradient of every input."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for name, batch, dim, d_state, seqlen, groups, with_d, softplus in SCAN_CASES:
        inputs = _scan_inputs(batch, dim, d_state, seqlen, groups, with_d, device, gen)
        upstream = torch.randn(batch, dim, seqlen, generator=gen).to(device)
        out_c, grads_c = _run_scan(inputs, candidate, softplus, upstream)
        out_r, grads_r = _run_scan(inputs, "torch", softplus, upstream)
        case = CaseResult(name)
        case.errors["forward"] = max_rel_error(out_c, out_r)
        for key in inputs:
            if grads_c[key] is None or grads_r[key] is None:
                raise AssertionError(
                    f"{name}: no gradient for {key} "
                    f"({candidate}: {grads_c[key] is not None}, torch: {grads_r[key] is not None})"
                )
            case.errors[f"d{key}"] = max_rel_error(grads_c[key], grads_r[key])
        results.append(case)
    return results


# --- causal conv1d ---------------------------------------------------------------------------


def _conv1d_reference(x, weight, bias, activation):
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def check_causal_conv1d(conv_fn: Callable, device: str = "cuda", seed: int = 0) -> list[CaseResult]:
    """Compare `conv_fn(x, weight, bias, activation=...)` with a grouped, left-padded conv1d."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for name, batch, dim, seqlen, width, activation in (
        ("L=37 width=4 silu", 2, 8, 37, 4, "silu"),
        ("L=64 width=3 linear", 2, 16, 64, 3, None),
    ):
        base = {
            "x": torch.randn(batch, dim, seqlen, generator=gen),
            "weight": torch.randn(dim, width, generator=gen),
            "bias": torch.randn(dim, generator=gen),
        }
        upstream = torch.randn(batch, dim, seqlen, generator=gen).to(device)
        outs, grads = [], []
        for fn in (conv_fn, _conv1d_reference):
            leaves = {k: v.to(device).requires_grad_(True) for k, v in base.items()}
            out = fn(leaves["x"], leaves["weight"], leaves["bias"], activation=activation)
            (out * upstream).sum().backward()
            outs.append(out.detach())
            grads.append({k: v.grad for k, v in leaves.items()})
        case = CaseResult(name)
        case.errors["forward"] = max_rel_error(outs[0], outs[1])
        for key in base:
            case.errors[f"d{key}"] = max_rel_error(grads[0][key], grads[1][key])
        results.append(case)
    return results


# --- reporting -------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _report(package: str, cases: Sequence[CaseResult], tol: float, elapsed: float) -> bool:
    ok = True
    for case in cases:
        status = "PASS" if case.worst <= tol else "FAIL"
        ok &= status == "PASS"
        errs = "  ".join(f"{k} {v:.1e}" for k, v in case.errors.items())
        print(f"[{package}] {case.name}: {errs}  -> {status}")
    worst = max((c.worst for c in cases), default=0.0)
    verdict = "PASS" if ok else "FAIL"
    print(f"[{package}] {verdict}: max rel error {worst:.2e} (tolerance {tol:.0e}), elapsed {elapsed:.2f} s")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmrnn.ops.check_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--causal-conv1d", action="store_true", help="also check causal_conv1d's kernel")
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative error allowed (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start_all = time.perf_counter()
    print(
        f"torch {torch.__version__} (built with CUDA {torch.version.cuda}); "
        f"mamba_ssm {_version('mamba_ssm')}; causal_conv1d {_version('causal_conv1d')}"
    )
    if not torch.cuda.is_available():
        print(
            "FAIL: no CUDA GPU is visible to torch (torch.cuda.is_available() is False): the CUDA kernels "
            "can only be checked on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    major, minor = torch.cuda.get_device_capability()
    print(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} visible")

    status = EXIT_PASS

    # mamba_ssm's selective scan
    start = time.perf_counter()
    kernel, why = _cuda_kernel()
    if kernel is None:
        print(
            f"FAIL [mamba_ssm]: the compiled kernel `selective_scan_cuda` does not import ({why}); {BUILD_HINT}.",
            file=sys.stderr,
        )
        return EXIT_MISSING
    print(
        f"[mamba_ssm] selective_scan_cuda imported from {getattr(kernel, '__file__', '?')} "
        f"in {time.perf_counter() - start:.2f} s"
    )
    try:
        cases = check_selective_scan("cuda", "cuda", args.seed)
        torch.cuda.synchronize()
    except Exception as exc:  # e.g. "no kernel image is available": built for another GPU architecture
        print(
            f"FAIL [mamba_ssm]: running the kernel raised {type(exc).__name__}: {exc}; {BUILD_HINT}.", file=sys.stderr
        )
        return EXIT_FAIL
    if not _report("mamba_ssm", cases, args.tol, time.perf_counter() - start):
        status = EXIT_FAIL

    if args.causal_conv1d:
        start = time.perf_counter()
        try:
            from causal_conv1d import causal_conv1d_fn  # noqa: PLC0415
        except Exception as exc:  # ImportError, or an undefined-symbol error from an ABI mismatch
            print(
                f"FAIL [causal_conv1d]: `causal_conv1d` does not import ({type(exc).__name__}: {exc}); {BUILD_HINT}.",
                file=sys.stderr,
            )
            return EXIT_MISSING
        print(f"[causal_conv1d] imported in {time.perf_counter() - start:.2f} s")
        try:
            cases = check_causal_conv1d(causal_conv1d_fn, "cuda", args.seed)
            torch.cuda.synchronize()
        except Exception as exc:
            print(
                f"FAIL [causal_conv1d]: running the kernel raised {type(exc).__name__}: {exc}; {BUILD_HINT}.",
                file=sys.stderr,
            )
            return EXIT_FAIL
        if not _report("causal_conv1d", cases, args.tol, time.perf_counter() - start):
            status = EXIT_FAIL

    verdict = "PASS" if status == EXIT_PASS else "FAIL"
    print(f"{verdict}: kernel check finished in {time.perf_counter() - start_all:.2f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
