"""Data-parallel VMRNN with the plain-PyTorch core under torchrun: correctness and weak scaling.

  # correctness: N ranks with per-rank batch b must follow 1 rank with batch N*b (same seed, same data)
  torchrun --standalone --nproc_per_node 1 benchmarks/ddp_scaling.py check --preset taxibj \
      --global-batch 32 --out one.json
  torchrun --standalone --nproc_per_node 2 benchmarks/ddp_scaling.py check --preset taxibj \
      --global-batch 32 --out two.json
  python benchmarks/ddp_scaling.py compare one.json two.json

  # weak scaling: fixed per-rank batch, samples/s of the whole group
  torchrun --standalone --nproc_per_node 4 benchmarks/ddp_scaling.py speed --preset kth --batch 4 --out kth4.json

NCCL on GPUs (keep NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 set on
machines where NVLink multicast must stay off), gloo on CPU. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmrnn.metrics import MetricAccumulator  # noqa: E402
from vmrnn.models import build_model  # noqa: E402
from vmrnn.train.distributed import current_env, init_from_env  # noqa: E402
from vmrnn.train.execution import MODES, resolve_execution  # noqa: E402
from vmrnn.train.step import make_forecast, make_train_step  # noqa: E402

FRAMES = {
    "taxibj": (4, 4),
    "kth": (10, 20),
    "mmnist": (10, 10),
    "mmnist-openstl": (10, 10),
    "taxibj-tiny": (4, 4),
    "kth-tiny": (4, 4),
    "mmnist-tiny": (3, 3),
}


def waves(n: int, t: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Smooth travelling waves in [0, 1]: a learnable, seeded stand-in for real sequences."""
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(n, 1, c, 1, 1, 3, generator=g) * 0.6 + 0.1  # (kx, ky, omega) per sample and channel
    phase = torch.rand(n, 1, c, 1, 1, generator=g) * 2 * math.pi
    ax = torch.arange(size, dtype=torch.float32)
    y, x = ax.view(1, 1, 1, size, 1), ax.view(1, 1, 1, 1, size)
    ts = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1)
    return 0.5 + 0.5 * torch.sin(k[..., 0] * x + k[..., 1] * y + k[..., 2] * ts * 3 + phase)


def setup(args):
    started = init_from_env()
    env = current_env(args.device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (prepare_model also broadcasts them)
    model = build_model(args.preset, drop_path=0.0)
    model = env.prepare_model(model)
    n_in, n_out = FRAMES[args.preset]
    return started, env, model, n_in, n_out


def check(args) -> dict:
    started, env, model, n_in, n_out = setup(args)
    cfg = (model.module if hasattr(model, "module") else model).config
    if args.global_batch % env.world_size:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {env.world_size} ranks")
    b = args.global_batch // env.world_size
    lo, hi = env.rank * b, (env.rank + 1) * b
    # fp32 by default: the comparison is about the reduction, not precision (fp32-graphs: the captured step)
    execution = resolve_execution(args.execution, device_type=env.device.type, world_size=env.world_size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = make_train_step(
        model, opt, n_input=n_in, execution=execution, device=env.device, grad_sync=env.gradient_sync(model)
    )
    losses = []
    for i in range(args.steps):
        frames = waves(args.global_batch, n_in + n_out, cfg.in_chans, cfg.img_size, seed=1000 + i)
        loss = step(frames[lo:hi].to(env.device)).detach().reshape(1)
        if env.distributed:  # the loss of the global batch = the mean of equal-sized local means
            dist.all_reduce(loss)
            loss /= env.world_size
        losses.append(float(loss))
    # Validation metrics: each rank scores its shard; the reduced result must equal one process's.
    forecast = make_forecast(model, n_input=n_in, execution=execution, device=env.device)
    val = waves(args.val_samples, n_in + n_out, cfg.in_chans, cfg.img_size, seed=7)
    acc = MetricAccumulator(mode="standard", n_frames=n_out, device=env.device)
    model.eval()
    for j in range(env.rank, args.val_samples, env.world_size):
        x = val[j : j + 1].to(env.device)
        acc.update(forecast(x)[:, n_in - 1 :].clamp(0, 1), x[:, n_in:])
    if env.distributed:
        acc.all_reduce()
    metrics = {k: v for k, v in acc.compute().items() if isinstance(v, (int, float))}
    out = {
        "mode": "check",
        "execution": execution.describe(),
        "preset": args.preset,
        "world_size": env.world_size,
        "per_rank_batch": b,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "losses": losses,
        "val": metrics,
        "device": str(env.device),
    }
    if started:
        dist.destroy_process_group()
    return out


def speed(args) -> dict:
    started, env, model, n_in, n_out = setup(args)
    cfg = (model.module if hasattr(model, "module") else model).config
    execution = resolve_execution(
        args.execution,
        {"checkpoint_steps": args.checkpoint_steps or None},
        device_type=env.device.type,
        world_size=env.world_size,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    # Under torchrun (even one rank) the step all-reduces its gradients; run without torchrun it is plain `fast`.
    grad_sync = env.gradient_sync(model)
    step = make_train_step(model, opt, n_input=n_in, execution=execution, device=env.device, grad_sync=grad_sync)
    frames = torch.rand(args.batch, n_in + n_out, cfg.in_chans, cfg.img_size, cfg.img_size, device=env.device)
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(frames)
    times = []
    for _ in range(args.iters):
        sync()
        if env.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        step(frames)
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    out = {
        "mode": "speed",
        "preset": args.preset,
        "world_size": env.world_size,
        "per_rank_batch": args.batch,
        "execution": execution.describe(),
        "data_parallel": grad_sync is not None,
        "step_ms": round(ms, 2),
        "samples_per_s": round(env.world_size * args.batch / (ms / 1e3), 2),
        "device": str(env.device),
        "gpu": torch.cuda.get_device_name() if env.device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    if started:
        dist.destroy_process_group()
    return out


def compare(one: dict, many: dict) -> dict:
    """Largest relative difference of the loss trajectories and of the validation metrics."""
    if len(one["losses"]) != len(many["losses"]):
        raise SystemExit("the two runs have different step counts")
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], many["losses"]))
    val_diff = max(abs(one["val"][k] - many["val"][k]) / max(abs(one["val"][k]), 1e-12) for k in one["val"])
    return {
        "world_sizes": [one["world_size"], many["world_size"]],
        "max_loss_rel_diff": loss_diff,
        "max_val_rel_diff": val_diff,
        "first_loss": one["losses"][0],
        "last_loss": one["losses"][-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("check", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--preset", default="taxibj", choices=sorted(FRAMES))
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
    c = sub.choices["check"]
    c.add_argument("--global-batch", type=int, default=8)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--val-samples", type=int, default=8)
    c.add_argument("--execution", default="reference", choices=list(MODES))
    s = sub.choices["speed"]
    s.add_argument("--batch", type=int, default=4, help="per rank")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--iters", type=int, default=10)
    s.add_argument("--checkpoint-steps", action="store_true")
    s.add_argument("--execution", default="fast", choices=list(MODES))
    cmp = sub.add_parser("compare")
    cmp.add_argument("one")
    cmp.add_argument("many")
    args = ap.parse_args(argv)
    if args.what == "compare":
        print(json.dumps(compare(json.loads(Path(args.one).read_text()), json.loads(Path(args.many).read_text()))))
        return 0
    out = check(args) if args.what == "check" else speed(args)
    if out and int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v for k, v in out.items() if k != "losses"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
