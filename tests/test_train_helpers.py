"""Shared helpers for the tests/test_train_*.py files (no tests here)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from vmrnn.train.config import TrainConfig


def write_taxibj(root: Path) -> Path:
    """Synthetic TaxiBJ in the published layout (64 training samples, less validation, and 16 test samples);
    returns the data root."""
    from vmrnn.data import write_synthetic

    if not (root / "taxibj" / "dataset.npz").exists():
        write_synthetic("taxibj", root, seed=0, size="small")
    return root


def tiny_cfg(data_dir: Path, **kw) -> TrainConfig:
    """A tiny VMRNN-B on synthetic TaxiBJ: a few seconds per epoch on one CPU core."""
    d = dict(
        dataset="taxibj",
        data_dir=str(data_dir),
        preset="taxibj-tiny",
        epochs=3,
        batch_size=4,
        val_batch_size=4,
        lr=3e-3,
        warmup_epochs=1,
        max_train_batches=3,
        tracking=False,
        seed=7,
    )
    d.update(kw)
    return TrainConfig.from_dict(d)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def strip_times(history: list[dict]) -> list[dict]:
    drop = ("epoch_time_s", "train_time_s", "samples_per_s")
    return [{k: v for k, v in h.items() if k not in drop} for h in history]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- multi-process workers (spawned)


def _init_gloo(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def eval_worker(rank: int, world: int, init_file: str, data_root: str, state_path: str, out_path: str) -> None:
    """Score a fixed model on the val split with `world` gloo processes; rank 0 writes the metrics."""
    import json

    import torch.distributed as dist

    from vmrnn.data import build_dataset
    from vmrnn.models import build_model
    from vmrnn.train.distributed import DistEnv
    from vmrnn.train.loop import evaluate, make_eval_loader

    if world > 1:
        _init_gloo(rank, world, init_file)
    try:
        env = DistEnv(rank, world, 0, torch.device("cpu"))
        model = build_model("taxibj-tiny")
        model.load_state_dict(torch.load(state_path, weights_only=True))
        ds = build_dataset("taxibj", data_root, "val")
        out = evaluate(model, make_eval_loader(ds, 2, env), n_input=4, env=env, n_future=4)
        if rank == 0:
            Path(out_path).write_text(json.dumps(out))
    finally:
        if world > 1:
            dist.destroy_process_group()


def ddp_train_worker(rank: int, world: int, init_file: str, cfg_dict: dict, out_path: str) -> None:
    """The plain core under DDP (what torchrun runs); rank 0 saves the final weights and history."""
    import torch.distributed as dist

    from vmrnn.train.loop import train

    os.environ["LOCAL_RANK"] = str(rank)
    _init_gloo(rank, world, init_file)
    try:
        res = train(TrainConfig.from_dict(cfg_dict), resume=False)
        if rank == 0:
            from vmrnn.train.checkpoint import load_state

            torch.save({"model": load_state(res.checkpoint)["model"], "history": res.history}, out_path)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 180.0) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes; fail if any fails or times out."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
