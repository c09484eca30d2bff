"""Benchmark and check the execution modes (`vmrnn.train.execution.MODES`) on the official preset shapes.

For each preset: one model (fixed seed), random inputs in [0, 1) at the official batch size, and for each
mode, starting from the same weights: a training step (forward, backward, Adam) and an inference rollout,
each warmed up and then timed with CUDA events (median of many), with the peak memory. Two baselines run
first in the same process, and every mode's ratios are against each of them: ``reference`` (fp32 eager,
official dataflow) and ``bf16-graphs`` (bf16 + CUDA graphs on the official dataflow with mamba_ssm's
kernel: what the fused Triton scan has to beat).

``check`` compares each mode's loss and gradients with the reference on the same weights and inputs
(drop-path off, learning rate 0 so the weights stay put); ``curve`` trains a mode and the reference for
a few hundred steps on the same synthetic sequences and compares windowed loss means.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vmrnn.data import DATASETS
from vmrnn.models import build_model
from vmrnn.train.execution import MODES, ExecutionConfig
from vmrnn.train.step import make_forecast, make_train_step


@dataclass(frozen=True)
class BenchShape:
    preset: str
    batch: int
    n_input: int
    n_output: int


# Per preset: the official single-GPU batch size (VMRNN_SPEC.md 2.2) and frame counts of its dataset, for
# every registered dataset that names one (DatasetSpec.bench_batch); the presets are the dataset's
# bench_presets (default: its preset and its smoke preset).
SHAPES: dict[str, BenchShape] = {
    preset: BenchShape(preset, spec.bench_batch, spec.in_frames, spec.out_frames)
    for spec in DATASETS.values()
    if spec.bench_batch is not None
    for preset in (spec.bench_presets or (spec.preset, spec.smoke_preset))
}


DEFAULT_MODES = ("reference", "fp32-fused-graphs", "bf16-graphs", "fast", "fast-ckpt")
# Measured in every run (first), unless --modes names them with a leading "-"; every mode's ratios are
# against each one measured.
BASELINES = ("reference", "bf16-graphs")


def resolve_modes(names: Sequence[str]) -> dict[str, ExecutionConfig]:
    """The modes to run, in order: the baselines, then `names`; "-NAME" in `names` leaves NAME out."""
    drop = {n[1:] for n in names if n.startswith("-")}
    wanted = [n for n in names if not n.startswith("-")]
    unknown = [n for n in [*wanted, *drop] if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODES)} (a leading '-' leaves a mode out)")
    order = [n for n in (*BASELINES, *wanted) if n not in drop]
    return {n: MODES[n] for n in dict.fromkeys(order)}


def validate_request(
    modes: Sequence[str], *, check: bool = False, curve_modes: Sequence[str] = (), curve_ref: str = "reference"
) -> dict[str, ExecutionConfig]:
    """The modes to run (`resolve_modes`); ValueError naming a mode or combination that does not exist."""
    table = resolve_modes(modes)
    for m in (curve_ref, *curve_modes):
        if m not in MODES:
            raise ValueError(f"unknown curve mode {m!r}; choose from {list(MODES)}")
    if check and "reference" not in table:
        raise ValueError("--check compares every mode with the reference: do not leave it out")
    return table


def _frames(shape: BenchShape, cfg, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = shape.n_input + shape.n_output
    x = torch.rand(shape.batch, t, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    return x.to(device)


def _median_ms(fn: Callable[[], Any], warmup: int, iters: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _gib(nbytes: int) -> float:
    return nbytes / 2**30


def time_mode(
    preset: str,
    shape: BenchShape,
    execution: ExecutionConfig,
    init_state: dict,
    device,
    warmup: int,
    iters: int,
    infer: bool = True,
) -> dict[str, Any]:
    """Time one mode's training step and inference rollout, from the given initial weights."""
    res: dict[str, Any] = {"mode": execution.describe()}
    model = build_model(preset).to(device)
    model.load_state_dict(init_state)
    frames = _frames(shape, model.config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    _free()
    torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t0 = time.perf_counter()
    step = make_train_step(model, optimizer, n_input=shape.n_input, execution=execution, device=device)
    step(frames)  # first call: compilation / capture
    torch.cuda.synchronize()
    res["train_first_call_s"] = round(time.perf_counter() - t0, 2)
    med, times = _median_ms(lambda: step(frames), warmup, iters)
    res["train_ms"] = round(med, 3)
    res["train_ms_min"] = round(min(times), 3)
    res["train_samples_s"] = round(shape.batch / (med / 1e3), 2)
    res["train_peak_gib"] = round(_gib(torch.cuda.max_memory_allocated(device)), 3)
    del step, optimizer
    _free()
    if infer:
        torch.cuda.reset_peak_memory_stats(device)
        model.eval()
        t0 = time.perf_counter()
        forecast = make_forecast(model, n_input=shape.n_input, execution=execution, device=device)
        forecast(frames)
        torch.cuda.synchronize()
        res["infer_first_call_s"] = round(time.perf_counter() - t0, 2)
        med, times = _median_ms(lambda: forecast(frames), warmup, iters)
        res["infer_ms"] = round(med, 3)
        res["infer_samples_s"] = round(shape.batch / (med / 1e3), 2)
        res["infer_peak_gib"] = round(_gib(torch.cuda.max_memory_allocated(device)), 3)
        del forecast
    del model, frames
    _free()
    return res


def loss_and_grads(
    preset: str, shape: BenchShape, execution: ExecutionConfig, init_state: dict, device, seed: int = 1
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step (drop-path off, lr 0: the weights do not move).

    TF32 is off for the check (cuDNN enables it for convolutions by default, and the NCHW and
    channels-last depthwise convolutions then round differently: ~1e-4 in the gradients).
    """
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _loss_and_grads(preset, shape, execution, init_state, device, seed)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _loss_and_grads(preset, shape, execution, init_state, device, seed):
    model = build_model(preset, drop_path=0.0).to(device)
    model.load_state_dict(init_state)
    model.train()
    frames = _frames(shape, model.config, device, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = make_train_step(model, opt, n_input=shape.n_input, execution=execution, device=device)
    loss = float(step(frames))
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    del step, opt, model, frames
    _free()
    return loss, grads


def compare(ref: tuple[float, dict], got: tuple[float, dict]) -> dict[str, Any]:
    (l0, g0), (l1, g1) = ref, got
    missing = sorted(set(g0) ^ set(g1))
    common = [n for n in g0 if n in g1]
    num = math.sqrt(sum((g1[n] - g0[n]).norm().item() ** 2 for n in common))
    den = math.sqrt(sum(g0[n].norm().item() ** 2 for n in common))
    # per tensor: relative to its norm, floored at 1e-2 of the whole gradient's (some gradients are zero
    # in exact arithmetic, e.g. a conv bias right before a one-channel-per-group GroupNorm)
    errs = {n: (g1[n] - g0[n]).norm().item() / max(g0[n].norm().item(), 1e-2 * den, 1e-30) for n in common}
    worst = max(errs, key=errs.get) if errs else None
    return {
        "loss_ref": l0,
        "loss": l1,
        "loss_rel_err": abs(l1 - l0) / max(abs(l0), 1e-30),
        "grad_rel_err_global": num / max(den, 1e-30),
        "grad_rel_err_worst_tensor": errs.get(worst, float("nan")),
        "worst_tensor": worst,
        "missing_grads": missing,
    }


def synthetic_sequences(n: int, shape: BenchShape, cfg, seed: int = 0) -> torch.Tensor:
    """Moving Gaussian blobs bouncing in the frame: (n, T, C, H, W) in [0, 1], deterministic."""
    g = torch.Generator().manual_seed(seed)
    t, c, s = shape.n_input + shape.n_output, cfg.in_chans, cfg.img_size
    n_blobs = 3
    pos = torch.rand(n, n_blobs, 2, generator=g) * s
    vel = (torch.rand(n, n_blobs, 2, generator=g) - 0.5) * s / 8
    sigma = (torch.rand(n, n_blobs, 1, generator=g) * 0.08 + 0.05) * s
    amp = torch.rand(n, n_blobs, c, generator=g) * 0.7 + 0.3
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    frames = []
    for _ in range(t):
        d2 = (yy[None, None] - pos[..., 0, None, None]) ** 2 + (xx[None, None] - pos[..., 1, None, None]) ** 2
        blob = torch.exp(-d2 / (2 * sigma[..., None] ** 2))  # (n, blobs, s, s)
        frames.append((blob[:, :, None] * amp[..., None, None]).sum(1).clamp(0, 1))  # (n, c, s, s)
        pos = pos + vel
        over, under = pos > s - 1, pos < 0
        vel = torch.where(over | under, -vel, vel)
        pos = pos.clamp(0, s - 1)
    return torch.stack(frames, 1)


def loss_curve(
    preset: str,
    shape: BenchShape,
    execution: ExecutionConfig,
    init_state: dict,
    device,
    steps: int,
    data: torch.Tensor,
    lr: float = 4e-4,
    seed: int = 0,
) -> list[float]:
    model = build_model(preset).to(device)
    model.load_state_dict(init_state)
    model.train()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step = make_train_step(model, opt, n_input=shape.n_input, execution=execution, device=device)
    g = torch.Generator().manual_seed(seed)
    losses = []
    data = data.to(device)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (shape.batch,), generator=g)
        losses.append(step(data[idx.to(device)]))
    out = [float(x) for x in torch.stack(losses).cpu()]
    del step, opt, model
    _free()
    return out


def window_means(xs: Sequence[float], window: int) -> list[float]:
    return [sum(xs[i : i + window]) / len(xs[i : i + window]) for i in range(0, len(xs), window)]


def curve_summary(curves: dict[str, list[float]], ref: str, window: int = 25) -> dict[str, dict[str, float]]:
    """Each curve against `curves[ref]`: the largest relative gap of `window`-step and of 100-step means, and
    the last window's means."""
    ref_w, ref_w100 = window_means(curves[ref], window), window_means(curves[ref], 100)
    out = {}
    for m, xs in curves.items():
        if m == ref:
            continue
        w, w100 = window_means(xs, window), window_means(xs, 100)
        out[m] = {
            "max_window_rel_dev": max(abs(a - b) / b for a, b in zip(w, ref_w)),
            "max_window100_rel_dev": max(abs(a - b) / b for a, b in zip(w100, ref_w100)),
            "final_window": w[-1],
            "ref_final_window": ref_w[-1],
        }
    return out


def run_bench(
    presets: Sequence[str],
    modes: Sequence[str],
    *,
    warmup: int = 3,
    iters: int = 10,
    check: bool = False,
    curve_steps: int = 0,
    curve_presets: Sequence[str] = ("taxibj",),
    curve_modes: Sequence[str] = ("fast",),
    curve_ref: str = "reference",
    infer: bool = True,
    device: str = "cuda",
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time (and with `check` compare) every mode of `modes` (see `resolve_modes`) on each preset.

    `command`: the command line that asked for this run, kept in the report."""
    table = validate_request(modes, check=check, curve_modes=curve_modes, curve_ref=curve_ref)
    if not torch.cuda.is_available():
        raise RuntimeError("vmrnn bench needs a CUDA GPU (it times with CUDA events)")
    dev = torch.device(device)
    report: dict[str, Any] = {
        "command": command,
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "warmup": warmup,
        "iters": iters,
        "modes": {n: m.describe() for n, m in table.items()},
        "baselines": [b for b in BASELINES if b in table],
        "presets": {},
    }
    try:
        import triton  # noqa: PLC0415

        report["triton"] = triton.__version__
    except ImportError:
        pass
    from vmrnn.ops import cuda_scan_available  # noqa: PLC0415

    report["mamba_ssm_kernel"] = cuda_scan_available()
    for preset in presets:
        shape = SHAPES[preset]
        torch.manual_seed(0)
        init_state = {k: v.clone() for k, v in build_model(preset).state_dict().items()}
        pres: dict[str, Any] = {"batch": shape.batch, "frames": f"{shape.n_input}->{shape.n_output}", "modes": {}}
        report["presets"][preset] = pres
        ref_grads = None
        for name, execution in table.items():
            entry: dict[str, Any] = {}
            try:
                entry.update(time_mode(preset, shape, execution, init_state, dev, warmup, iters, infer))
            except torch.OutOfMemoryError as exc:
                entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                _free()
            except Exception as exc:  # keep going: one failing mode must not hide the others
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                _free()
            if check and "error" not in entry:
                try:
                    got = loss_and_grads(preset, shape, execution, init_state, dev)
                    if name == "reference":
                        ref_grads = got
                    elif ref_grads is not None:
                        entry["check"] = compare(ref_grads, got)
                except Exception as exc:
                    entry["check"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    _free()
            pres["modes"][name] = entry
            add_ratios(pres["modes"])
            log(format_row(preset, name, entry))
        if curve_steps and preset in curve_presets:
            cfg = build_model(preset).config
            data = synthetic_sequences(256, shape, cfg)
            # The fp32 curve: the reference mode, or (to save time) an fp32 mode checked equal to it.
            curves = {curve_ref: loss_curve(preset, shape, MODES[curve_ref], init_state, dev, curve_steps, data)}
            for m in curve_modes:
                # The fp32 mode named again runs a second time: with the scan's atomic adds the two runs differ
                # in the last bits, so their gap is the noise floor of two trajectories of the same arithmetic.
                key = f"{m} (again)" if m == curve_ref else m
                curves[key] = loss_curve(preset, shape, MODES[m], init_state, dev, curve_steps, data)
            window = 25
            summary = curve_summary(curves, curve_ref, window)
            for m, sm in summary.items():
                log(
                    f"curve {preset} {m} vs {curve_ref}: {curve_steps} steps, max |window mean - ref| / ref = "
                    f"{sm['max_window_rel_dev']:.4f} ({window}-step windows), {sm['max_window100_rel_dev']:.4f} "
                    f"(100-step); last window {sm['final_window']:.5f} vs {sm['ref_final_window']:.5f}"
                )
            pres["curve"] = {
                "steps": curve_steps,
                "window": window,
                "ref": curve_ref,
                "summary": summary,
                "losses": curves,
            }
    return report


def add_ratios(entries: dict[str, dict[str, Any]]) -> None:
    """Each measured entry's ratios against each measured baseline, as entry["vs"][baseline]:
    train_speedup and infer_speedup (baseline time / this time) and train_mem_ratio (baseline peak / this)."""
    for e in entries.values():
        vs = {}
        for base in BASELINES:
            b = entries.get(base, {})
            r = {}
            if "train_ms" in e and "train_ms" in b:
                r["train_speedup"] = round(b["train_ms"] / e["train_ms"], 2)
                r["train_mem_ratio"] = round(b["train_peak_gib"] / e["train_peak_gib"], 2)
            if "infer_ms" in e and "infer_ms" in b:
                r["infer_speedup"] = round(b["infer_ms"] / e["infer_ms"], 2)
            if r:
                vs[base] = r
        if vs:
            e["vs"] = vs


def _ratio_text(e: dict[str, Any], key: str) -> str:
    return ", ".join(f"x{r[key]} vs {base}" for base, r in e.get("vs", {}).items() if key in r)


def format_row(preset: str, name: str, e: dict[str, Any]) -> str:
    if "error" in e:
        return f"{preset:<15} {name:<20} ERROR {e['error'][:300]}"
    s = (
        f"{preset:<15} {name:<20} train {e['train_ms']:9.2f} ms {e['train_samples_s']:8.1f} samp/s "
        f"{e['train_peak_gib']:7.2f} GiB {_ratio_text(e, 'train_speedup')}"
    )
    if "infer_ms" in e:
        s += f" | infer {e['infer_ms']:9.2f} ms {e['infer_peak_gib']:6.2f} GiB {_ratio_text(e, 'infer_speedup')}"
    if "check" in e:
        c = e["check"]
        if "error" in c:
            s += f" | check ERROR {c['error'][:200]}"
        else:
            s += (
                f" | loss err {c['loss_rel_err']:.1e} grad err {c['grad_rel_err_global']:.1e}"
                f" (worst {c['grad_rel_err_worst_tensor']:.1e})"
            )
    return s


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, {report['date']}"]
    if report.get("command"):
        lines.append(report["command"])
    for preset, pres in report["presets"].items():
        for name, e in pres["modes"].items():
            lines.append(format_row(preset, name, e))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
