"""Synthetic stand-ins written in the *published* on-disk formats (no network, seeded, learnable).

``write_synthetic(name, out_dir, seed=0, size="small")`` writes the dataset's folder under out_dir with
the generator its registry entry names (``DatasetSpec.synth``, defined beside the reader):

* taxibj: ``out_dir/taxibj/dataset.npz``: a daily-periodic flow field (hotspots whose intensity follows
  a 48-step day with per-hotspot phase, plus a blob drifting across the city), in/out-flow channels,
  scaled to [-1, 1]; X/Y are sliding windows of 4 + 4 consecutive steps (train from the first part of
  the series, test from the rest).
* kth: ``out_dir/kth/<action>/personXX_<action>_dY_uncomp/image_NNNN.png``: 160x120 RGB (gray) frames of
  a dark silhouette on a lit background whose motion depends on the action (walking, jogging, running
  translate at increasing speed and bounce; boxing, handclapping, handwaving move the arms periodically);
  persons in the training range (incl. 16, the default validation person) and in the test range.
* mmnist: ``out_dir/moving_mnist/train-images-idx3-ubyte.gz``: seven-segment digit glyphs (random stroke
  width, size, position and slant) with a valid idx3 header; ``mnist_test_seq.npy`` (20, n, 64, 64) uint8
  made with the official two-digit bouncing rule from separately drawn glyphs.
* custom: ``out_dir/custom/{meta.json,train.npy,test.npy}``: bouncing Gaussian blobs, (N, 8, 1, 32, 32)
  uint8, 4 -> 4.

A marker file ``SYNTHETIC.txt`` is written beside the data; ``overwrite=True`` only ever deletes a folder
that carries it. Sizes: "small" (seconds, a few MB: for tests) and "medium" (for CPU smoke sweeps and
throughput benchmarks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vmrnn.data.errors import DataError
from vmrnn.data.registry import get_dataset, synth_names

MARKER = "SYNTHETIC.txt"
SIZES = ("small", "medium")


def write_synthetic(
    name: str, out_dir: str | Path, *, seed: int = 0, size: str = "small", overwrite: bool = False
) -> Path:
    """Write a seeded synthetic dataset in the published layout under out_dir; returns its folder
    (e.g. ``out_dir/taxibj``), which `build_dataset(name, out_dir, ...)` then reads."""
    spec = get_dataset(name)
    if spec.synth is None:
        raise DataError(f"dataset {name!r} has no synthetic generator; choose one of {list(synth_names())}")
    if size not in SIZES:
        raise DataError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    folder = Path(out_dir).expanduser() / spec.folder
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise DataError(
                f"{folder} already exists and is not empty; choose another --out or pass overwrite=True (--overwrite)"
            )
        if not (folder / MARKER).is_file():
            raise DataError(f"{folder} has no {MARKER} marker: refusing to delete what may be real data")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec.synth(folder, seed, size)
    (folder / MARKER).write_text(
        f"synthetic {spec.family} data written by vmrnn.data.synth (seed={seed}, size={size}); not real data\n"
    )
    return folder
