"""GPU checks and kernel timings for docs/GPU_CHECKS.md and docs/PERFORMANCE.md (run on the device).

  python benchmarks/gpu_checks.py presets --out presets.json    # fwd/bwd per preset, cuda scan
  python benchmarks/gpu_checks.py scans --out scans.json        # SS2D layouts and scan kernels, per shape
  python benchmarks/gpu_checks.py scan_variants --out v.json     # segmented-scan plans: check, time, pick
  python benchmarks/gpu_checks.py profile --out p.json           # GPU time per kernel of one training step
  python benchmarks/gpu_checks.py bwd_parts --out b.json          # what each part of the scan backward costs
  python benchmarks/gpu_checks.py epilogue --out e.json           # the SS2D epilogue op against torch: check, time

Launch plans are explicit arguments (`vmrnn.ops.scan_plan.scan_plan(..., ck=..., bd=...)` passed as
`ss2d_scan_triton(..., plan=...)`); nothing global changes how the kernels run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmrnn.models import SS2D, build_model, rollout_loss, set_scan_backend  # noqa: E402
from vmrnn.models.ss2d import cross_merge, cross_scan  # noqa: E402
from vmrnn.ops import cuda_scan_available, selective_scan  # noqa: E402
from vmrnn.ops import ss2d_scan as fs  # noqa: E402
from vmrnn.ops.scan_plan import scan_plan  # noqa: E402

PRESETS = {"taxibj": (16, 4, 4), "kth": (4, 10, 20), "mmnist": (16, 10, 10), "mmnist-openstl": (16, 10, 10)}
# SS2D shapes (batch, H, W, model dim) met in the presets' blocks
SHAPES = {
    "taxibj": (16, 8, 8, 128),
    "kth": (4, 64, 64, 128),
    "mmnist-l0": (16, 32, 32, 128),
    "mmnist-l1": (16, 16, 16, 256),
    "mmnist-l2": (16, 8, 8, 512),
}


def timed(fn, warmup=2, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def gpu_ms(fn, iters=5):
    """GPU time of one call (the sum of its kernels' durations, from torch.profiler): unlike the wall time
    of a call, not hidden behind the host's launch overhead on small shapes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return us / 1e3 / iters


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def presets(out):
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda_scan": cuda_scan_available(),
        "presets": {},
    }
    for name, (batch, n_in, n_out) in PRESETS.items():
        torch.manual_seed(0)
        model = build_model(name).cuda().train()
        set_scan_backend(model, "cuda")
        c = model.config
        frames = torch.rand(batch, n_in + n_out, c.in_chans, c.img_size, c.img_size, device="cuda")

        def fb():
            loss = rollout_loss(model(frames, n_in), frames, n_in)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        torch.cuda.reset_peak_memory_stats()
        ms = timed(fb, warmup=1, iters=3)
        peak = torch.cuda.max_memory_allocated() / 2**30
        loss = float(fb())
        ok = all(torch.isfinite(p).all() for p in model.parameters())
        res["presets"][name] = {
            "batch": batch,
            "frames": f"{n_in}->{n_out}",
            "fwd_bwd_ms": round(ms, 2),
            "peak_gib": round(peak, 3),
            "loss": loss,
            "finite": bool(ok),
        }
        print(name, res["presets"][name], flush=True)
        del model, frames
        torch.cuda.empty_cache()
    json.dump(res, open(out, "w"), indent=1)


def scans(out, sweep):
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, (b, h, w, dim) in SHAPES.items():
        torch.manual_seed(0)
        m = SS2D(dim).cuda()
        x = torch.randn(b, h, w, dim, device="cuda")
        r = {}
        # 1) SS2D layouts, fp32 and bf16, forward and forward+backward; fused vs reference numerics
        outs = {}
        for impl, backend in (("reference", "cuda"), ("fused", "triton")):
            m.impl, m.scan_backend, m.fused_backend = impl, backend if impl == "reference" else "auto", backend
            for prec in ("fp32", "bf16"):
                m.scan_fp32_inputs = prec == "fp32"
                ctx = (
                    torch.autocast("cuda", torch.bfloat16) if prec == "bf16" else torch.autocast("cuda", enabled=False)
                )
                xx = x.clone().requires_grad_(True)

                def f():
                    with ctx:
                        return m(xx)

                def fb():
                    with ctx:
                        y = m(xx)
                    y.float().square().sum().backward()

                key = f"{impl}-{prec}"
                with torch.no_grad():
                    r[key + "-fwd_ms"] = round(timed(f), 3)
                r[key + "-fwdbwd_ms"] = round(timed(fb), 3)
                m.zero_grad()
                xx.grad = None
                with ctx:
                    y = m(xx)
                (y.float() * torch.cos(y.float())).sum().backward()
                outs[key] = (y.float().detach(), [xx.grad.float()] + [p.grad.float().clone() for p in m.parameters()])
        for prec in ("fp32", "bf16"):
            (y0, g0), (y1, g1) = outs[f"reference-{prec}"], outs[f"fused-{prec}"]
            r[f"fused_vs_ref_{prec}_out"] = rel(y1, y0)
            r[f"fused_vs_ref_{prec}_grad_worst"] = max(rel(a, c) for a, c in zip(g1, g0))
        (y0, g0), (y1, g1) = outs["reference-fp32"], outs["fused-bf16"]
        r["fused_bf16_vs_ref_fp32_out"] = rel(y1, y0)
        r["fused_bf16_vs_ref_fp32_grad_worst"] = max(rel(a, c) for a, c in zip(g1, g0))
        # 2) the scans alone: mamba on scan-ordered copies (+ the copies) vs the fused kernel
        d, n, L = 2 * dim, 16, h * w
        for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            g = torch.Generator(device="cuda").manual_seed(1)
            u = torch.randn(b, L, d, device="cuda", generator=g).to(dt).requires_grad_(True)
            delta = (torch.randn(b, L, 4, d, device="cuda", generator=g) * 0.5 - 1).to(dt).requires_grad_(True)
            A = -torch.exp(m.A_log.detach().float()).requires_grad_(True)
            xdbl = torch.randn(b, L, 4, 2 * n, device="cuda", generator=g).to(dt).requires_grad_(True)
            Ds, bias = m.skip.detach().float(), m.dt_bias.detach().float().reshape(-1)
            Bs, Cs = xdbl[..., :n], xdbl[..., n:]

            def mamba_path():
                xs = cross_scan(u.transpose(1, 2).reshape(b, d, h, w)).reshape(b, 4 * d, L)
                dts = fs.to_scan_order(delta, h, w).reshape(b, 4 * d, L)
                y = selective_scan(
                    xs, dts, A, fs.to_scan_order(Bs, h, w), fs.to_scan_order(Cs, h, w), Ds, bias, True, backend="cuda"
                )
                return cross_merge(y.reshape(b, 4, d, L), h, w)

            def fused_path(plan=None):
                return fs.ss2d_scan_triton(u, delta, A, Bs, Cs, Ds, bias, h, w, True, plan=plan).sum(2)

            for pname, fn in (("mamba", mamba_path), ("fused", fused_path)):
                with torch.no_grad():
                    r[f"scan-{pname}-{prec}-fwd_ms"] = round(timed(fn), 3)
                r[f"scan-{pname}-{prec}-fwdbwd_ms"] = round(timed(lambda: fn().float().square().sum().backward()), 3)
            y_m = mamba_path().float()
            y_f = fused_path().float().transpose(1, 2)
            r[f"scan-fused_vs_mamba_{prec}"] = rel(y_f, y_m)
            if sweep and prec == "bf16":
                for bd, warps in ((8, 1), (16, 2), (16, 4), (32, 4), (64, 4)):
                    if bd > d:
                        continue
                    plan = scan_plan(b, L, d, n, bd=bd, warps=warps, u_fwd=4, ck=64 if L <= 1024 else 128)
                    try:
                        with torch.no_grad():
                            tf = timed(lambda: fused_path(plan))
                        tb = timed(lambda: fused_path(plan).float().square().sum().backward())
                        r[f"sweep-bd{bd}-w{warps}"] = (round(tf, 3), round(tb, 3))
                    except Exception as exc:  # noqa: BLE001
                        r[f"sweep-bd{bd}-w{warps}"] = str(exc)[:200]
        res["shapes"][name] = r
        print(name, json.dumps(r), flush=True)
        del m, x
        torch.cuda.empty_cache()
    json.dump(res, open(out, "w"), indent=1)


# scan_plan choices per variant ({}: the default plan of each shape): chunk length and backward unroll of the
# segmented plan (long sequences), segments of short sequences (8x8 grids), the backward's rebuild block (sub),
# then du / dB / dC as partials summed afterwards (atomic0, the deterministic path); `--only` picks by key
SEG_VARIANTS = [
    {},
    dict(ck=64, u_bwd=8),
    dict(ck=128),
    dict(ck=32),
    dict(ck=64, nseg=1),
    dict(ck=64, bd=16, nseg=1),
    dict(ck=32, nseg=2),
    dict(ck=16, nseg=4),
    dict(ck=8, nseg=8),
    dict(ck=16, bd=16, nseg=4),
    dict(ck=8, bd=16, nseg=8),
    dict(sub=64),
    dict(sub=32),
    dict(sub=16),
    dict(sub=8),
    dict(sub=4),
    dict(sub=2, u_bwd=2),
    dict(ck=64, u_bwd=8, sub=8),
    dict(ck=128, sub=4),
    dict(atomic=0),
]
# SS2D scan shapes (batch, H, W, scan channels D = 2x the block's model dim in SHAPES)
SEG_SHAPES = {
    "kth": (4, 64, 64, 256),
    "mmnist-l0": (16, 32, 32, 256),
    "mmnist-l1": (16, 16, 16, 512),
    "taxibj": (16, 8, 8, 256),
    "mmnist-l2": (16, 8, 8, 512),
}


def scan_variants(out, only="", shapes=""):
    """Check each plan against the torch reference (fp32, small shape, segmented and not) and time it at
    the presets' SS2D shapes (bf16, forward and forward+backward, wall and GPU time). Prints the fastest
    (sum of the GPU times over the shapes timed) on the last line."""
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    best, best_t = None, float("inf")
    for choices in SEG_VARIANTS:
        key = "-".join(f"{k}{v}" for k, v in choices.items()) or "default"
        if only and not any(o == key or (o != "default" and o in key) for o in only.split(",")):
            continue
        r = {}
        try:
            # correctness first: fp32, 2x32x32 grid, D=64, segments
            g = torch.Generator(device="cuda").manual_seed(sum(choices.values()))
            b, h, w, d, n = 2, 32, 32, 64, 16
            L = h * w
            t = [
                torch.randn(b, L, d, device="cuda", generator=g),
                torch.randn(b, L, 4, d, device="cuda", generator=g) * 0.5,
                -torch.exp(torch.randn(4 * d, n, device="cuda", generator=g) * 0.5 - 0.7),
                torch.randn(b, L, 4, 2 * n, device="cuda", generator=g),
                torch.randn(4 * d, device="cuda", generator=g),
                torch.randn(4 * d, device="cuda", generator=g) * 0.3 - 2.0,
            ]
            go = torch.randn(b, L, 4, d, device="cuda", generator=g)
            errs = []
            for nseg in (4, 1):  # segmented and one walk
                plan = scan_plan(b, L, d, n, **{**choices, "nseg": nseg, "ck": choices.get("ck", 64)})
                outs = []
                for backend in ("torch", "triton"):
                    x = [a.clone().requires_grad_(True) for a in t]
                    bc = (x[3][..., :n], x[3][..., n:])
                    y = fs.ss2d_scan(*x[:3], *bc, *x[4:], h, w, True, backend=backend, plan=plan)
                    (y * go).sum().backward()
                    outs.append([y.detach()] + [a.grad for a in x])
                errs.append(max(rel(a, c) for a, c in zip(outs[1], outs[0])))
            r["max_rel_err"] = max(errs)
            if not r["max_rel_err"] < 1e-4:
                raise RuntimeError(f"wrong: rel err {errs}")
            total = 0.0
            for name, (b, h, w, d) in SEG_SHAPES.items():
                if shapes and name not in shapes.split(","):
                    continue
                L = h * w
                u = torch.randn(b, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                delta = (torch.randn(b, L, 4, d, device="cuda") * 0.5).bfloat16().requires_grad_(True)
                A = -torch.exp(torch.randn(4 * d, n, device="cuda") * 0.5).requires_grad_(True)
                bc = torch.randn(b, L, 4, 2 * n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                Ds = torch.ones(4 * d, device="cuda", requires_grad=True)
                bias = (torch.zeros(4 * d, device="cuda") - 2).requires_grad_(True)
                go = torch.randn(b, L, 4, d, device="cuda", dtype=torch.bfloat16)

                plan = scan_plan(b, L, d, n, **choices)

                def f():
                    return fs.ss2d_scan_triton(u, delta, A, bc[..., :n], bc[..., n:], Ds, bias, h, w, True, plan=plan)

                with torch.no_grad():
                    tf = timed(f)
                tb = timed(lambda: f().backward(go))
                r[name] = {
                    "plan": list(plan),
                    "fwd_ms": round(tf, 3),
                    "fwdbwd_ms": round(tb, 3),
                    "fwdbwd_gpu_ms": round(gpu_ms(lambda: f().backward(go)), 3),
                }
                total += r[name]["fwdbwd_gpu_ms"]
            r["score_ms"] = round(total, 3)
            if total < best_t:
                best, best_t = key, total
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["variants"][key] = r
        print(key, json.dumps(r), flush=True)
        json.dump(res, open(out, "w"), indent=1)
    res["best"] = best
    json.dump(res, open(out, "w"), indent=1)
    print(f"fastest (GPU time summed over the shapes): {best}")


def _kernel_group(name: str) -> str:
    n = name.lower()
    for key, group in (
        ("_ss2d_bwd", "scan backward"),
        ("_ss2d_fwd", "scan forward"),
        ("_ss2d_combine", "scan segment combine"),
        ("gemm", "GEMM"),
        ("nvjet", "GEMM"),
        ("cutlass", "GEMM"),
        ("conv", "convolution"),
        ("norm", "normalisation"),
        ("reduce", "reductions"),
        ("elementwise", "elementwise"),
        ("copy", "copies"),
        ("cat", "copies"),
    ):
        if key in n:
            return group
    return "other"


def profile(out, preset_names, mode):
    """GPU time per kernel (and per kernel group) of one training step, from torch.profiler, in an eager
    mode (`bf16-fused` runs the kernels of `fast` without the graph, so each kernel is seen by name)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from vmrnn.bench import SHAPES as BENCH_SHAPES
    from vmrnn.bench import _frames
    from vmrnn.train.execution import MODES
    from vmrnn.train.step import make_train_step

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mode": mode, "presets": {}}
    for name in preset_names:
        shape = BENCH_SHAPES[name]
        torch.manual_seed(0)
        model = build_model(name).cuda().train()
        frames = _frames(shape, model.config, "cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        step = make_train_step(model, opt, n_input=shape.n_input, execution=MODES[mode], device="cuda")
        for _ in range(2):
            step(frames)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(frames)
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
        total = sum(sum(v) for v in kernels.values())
        groups: dict[str, float] = {}
        for k, v in kernels.items():
            groups[_kernel_group(k)] = groups.get(_kernel_group(k), 0.0) + sum(v)
        top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:25]
        r = {
            "kernel_ms": round(total, 3),
            "launches": sum(len(v) for v in kernels.values()),
            "groups_ms": {g: round(t, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:120], "ms": round(sum(v), 3), "calls": len(v)} for k, v in top],
        }
        res["presets"][name] = r
        print(name, json.dumps({k: r[k] for k in ("kernel_ms", "launches", "groups_ms")}), flush=True)
        del model, step, opt, frames
        torch.cuda.empty_cache()
        json.dump(res, open(out, "w"), indent=1)


# Parts of the scan backward taken out (timing only: the results are wrong) by rewriting the kernel's source:
# (what is replaced, what replaces it).
BWD_PARTS = {
    "full": [],
    "no_dB_dC_sums": [
        ("dBp = tl.sum(g * dtu[:, None], axis=0)", "dBp = bv"),
        ("dCp = tl.sum(hl * dy[:, None], axis=0)", "dCp = cv"),
    ],
    "no_state_rebuild": [
        ("tl.store(scr3 + (s * U + uu)[None, None, :] * (BD * N), hbuf)", "pass"),
        ("hl = tl.load(scr_base + (s * U + j) * BD * N)", "hl = g_carry * 0.5"),
    ],
    "no_outputs_per_token": [
        ("tl.store(du_base[:, None]", "if False: tl.store(du_base[:, None]"),
        ("tl.store(ddl_base[:, None]", "if False: tl.store(ddl_base[:, None]"),
        ("tl.store(dB_base[:, None]", "if False: tl.store(dB_base[:, None]"),
        ("tl.store(dC_base[:, None]", "if False: tl.store(dC_base[:, None]"),
    ],
}


def bwd_parts(out):
    """Time the scan backward kernel at the presets' long-sequence shapes (bf16 inputs) with parts of it taken
    out, to see what each part costs: the cross-lane sums of dB / dC, the rebuilt states' scratch round trip,
    the per-token output stores."""
    import importlib.util
    import inspect

    import vmrnn.ops.triton.ss2d_scan_bwd as bwd_mod
    from vmrnn.ops.triton.ss2d_scan_fwd import ss2d_scan_fwd

    src = inspect.getsource(bwd_mod)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    mods = {}
    for part, edits in BWD_PARTS.items():
        text = src
        for old, new in edits:
            if old not in text:
                raise RuntimeError(f"{part}: {old!r} is not in the kernel source")
            text = text.replace(old, new)
        path = Path("/tmp") / f"ss2d_bwd_{part}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"ss2d_bwd_{part}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[part] = mod
    n = 16
    for name, (b, h, w, d) in {**SEG_SHAPES, "taxibj": (16, 8, 8, 256)}.items():
        L = h * w
        g = torch.Generator(device="cuda").manual_seed(0)
        u = torch.randn(b, L, d, device="cuda", generator=g).bfloat16()
        delta = (torch.randn(b, L, 4, d, device="cuda", generator=g) * 0.5).bfloat16()
        A = -torch.exp(torch.randn(4 * d, n, device="cuda", generator=g) * 0.5)
        bc = torch.randn(b, L, 4, 2 * n, device="cuda", generator=g).bfloat16()
        Ds = torch.ones(4 * d, device="cuda")
        bias = torch.zeros(4 * d, device="cuda") - 2
        dy = torch.randn(b, L, 4, d, device="cuda", generator=g).bfloat16()
        plan = scan_plan(b, L, d, n)
        args = (u, delta, A, bc[..., :n], bc[..., n:], Ds, bias)
        r = {"plan": list(plan)}
        try:
            r["fwd_ms"] = round(timed(lambda: ss2d_scan_fwd(*args, h, w, True, True, plan)), 3)
            _, hc = ss2d_scan_fwd(*args, h, w, True, True, plan)
            for part, mod in mods.items():
                r[f"bwd_{part}_ms"] = round(timed(lambda: mod.ss2d_scan_bwd(*args, hc, dy, h, w, True, plan)), 3)
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["shapes"][name] = r
        print(name, json.dumps(r), flush=True)
        json.dump(res, open(out, "w"), indent=1)


def epilogue(out):
    """The SS2D epilogue (sum of the four directions, out_norm, SiLU gate) at the SS2D shapes: the Triton op
    against the torch composition, fp32 outputs and gradients, then forward+backward GPU time in bf16."""
    from vmrnn.ops.merge_norm_gate import merge_norm_gate

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, (b, h, w, d) in SEG_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        base = [
            torch.randn(b, h * w, 4, d, device="cuda", generator=g),
            torch.randn(b, h, w, 2 * d, device="cuda", generator=g),
            torch.randn(d, device="cuda", generator=g),
            torch.randn(d, device="cuda", generator=g),
        ]
        go = torch.randn(b, h, w, d, device="cuda", generator=g)
        r = {}
        try:
            for dtype in (torch.float32, torch.bfloat16):
                runs = {}
                for backend in ("torch", "triton"):
                    x = [base[0].to(dtype), base[1].to(dtype), base[2], base[3]]
                    x = [t.clone().requires_grad_(True) for t in x]

                    def f(x=x, backend=backend, dtype=dtype):
                        # bf16 as in the model: under autocast (the torch LayerNorm runs in fp32 there)
                        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
                            return merge_norm_gate(x[0], x[1][..., d:], x[2], x[3], 1e-5, backend=backend)

                    (f().float() * go).sum().backward()
                    runs[backend] = [f().detach()] + [t.grad.clone() for t in x]
                    if dtype == torch.bfloat16:
                        gob = go.to(dtype)
                        r[f"{backend}_fwdbwd_gpu_ms"] = round(
                            gpu_ms(lambda f=f, gob=gob: (o := f()).backward(gob.to(o.dtype))), 4
                        )
                key = "fp32_max_rel_err" if dtype == torch.float32 else "bf16_max_rel_err"
                r[key] = max(rel(a, c) for a, c in zip(runs["triton"], runs["torch"]))
            if not r["fp32_max_rel_err"] < 1e-4:
                raise RuntimeError(f"wrong: fp32 rel err {r['fp32_max_rel_err']}")
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["shapes"][name] = r
        print(name, json.dumps(r), flush=True)
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["presets", "scans", "scan_variants", "profile", "bwd_parts", "epilogue"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", default="", help="scan_variants: comma-separated keys (or parts of keys)")
    ap.add_argument("--shapes", default="", help="scan_variants: comma-separated SEG_SHAPES names (default all)")
    ap.add_argument("--presets", default="taxibj,kth,mmnist", help="profile: comma-separated presets")
    ap.add_argument("--mode", default="bf16-fused", help="profile: an eager execution mode")
    a = ap.parse_args()
    unknown = set(filter(None, a.shapes.split(","))) - set(SEG_SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {sorted(SEG_SHAPES)}")
    if a.what == "profile":
        profile(a.out, a.presets.split(","), a.mode)
    elif a.what == "bwd_parts":
        bwd_parts(a.out)
    elif a.what == "epilogue":
        epilogue(a.out)
    elif a.what == "scan_variants":
        scan_variants(a.out, a.only, a.shapes)
    else:
        presets(a.out) if a.what == "presets" else scans(a.out, a.sweep)
