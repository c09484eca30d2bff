"""Data-loading throughput: samples/s delivered by a torch DataLoader reading the prepared format.

Each dataset is read at its training shape (batch 16 for taxibj and mmnist, 4 for kth) with shuffling
and N DataLoader worker processes (default 2). Without --data-dir, a synthetic "medium" copy of each
dataset is written to a temporary folder and prepared first; with --data-dir, a dataset without a
prepared copy is prepared there first. --source also measures reading the published files directly.

    python benchmarks/data_throughput.py                          # synthetic data, prepared format
    python benchmarks/data_throughput.py --data-dir data --source # real data, prepared and source
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmrnn.data import build_dataset, prepare_dataset, write_synthetic  # noqa: E402

BATCH = {"taxibj": 16, "mmnist": 16, "kth": 4, "kth40": 4, "custom": 16}


def measure(name: str, data_dir: Path, prepared: str, workers: int, seconds: float, batch: int) -> dict:
    ds = build_dataset(name, data_dir, "train", prepared=prepared)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    # warm-up: start the workers and open their memory maps
    it = iter(loader)
    for _ in range(min(4, len(loader))):
        next(it)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += x.shape[0]
    dt = time.perf_counter() - t0
    del it, loader
    return {
        "dataset": name,
        "source": prepared,
        "batch": batch,
        "workers": workers,
        "samples": n,
        "seconds": round(dt, 2),
        "samples_per_s": round(n / dt, 1),
        "sample_shape": [list(ds[0][0].shape), list(ds[0][1].shape)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="data root (default: synthetic data in a temp dir)")
    ap.add_argument("--datasets", default="taxibj,kth,mmnist")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--size", default="medium", choices=("small", "medium"))
    ap.add_argument("--source", action="store_true", help="also measure reading the source files")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.datasets.split(",") if n]
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vmrnn-bench-")
        data_dir = Path(tmp.name)
        for family in dict.fromkeys("kth" if n == "kth40" else n for n in names):
            t = time.perf_counter()
            write_synthetic(family, data_dir, size=args.size)
            print(f"synthetic {family} ({args.size}) written in {time.perf_counter() - t:.1f} s", flush=True)
    for family in dict.fromkeys("kth" if n == "kth40" else n for n in names):
        if not (data_dir / "prepared" / family / "manifest.json").exists():
            t = time.perf_counter()
            prepare_dataset(family, data_dir)
            print(f"prepared {family} in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    print(f"{'dataset':8s} {'from':8s} {'batch':>5s} {'workers':>7s} {'samples/s':>10s}  sample")
    for n in names:
        for prepared in ("require", "never") if args.source else ("require",):
            r = measure(n, data_dir, prepared, args.workers, args.seconds, BATCH[n])
            results.append(r)
            print(
                f"{n:8s} {'prepared' if prepared == 'require' else 'source':8s} {r['batch']:5d} {r['workers']:7d} "
                f"{r['samples_per_s']:10.1f}  {r['sample_shape']}",
                flush=True,
            )
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
