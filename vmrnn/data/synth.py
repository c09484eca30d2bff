"""Synthetic stand-ins written in the *published* on-disk formats (no network, seeded, learnable).

``write_synthetic(name, out_dir, seed=0, size="small")`` writes

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

import gzip
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vmrnn.data import mmnist as mm
from vmrnn.data.errors import DataError
from vmrnn.data.layout import FOLDER, KTH_ACTIONS, family_of

MARKER = "SYNTHETIC.txt"
SIZES = {
    "small": {"taxibj": (48, 16), "kth_persons": (1, 2, 16, 17, 18), "kth_frames": 50, "kth_d": (1,),
              "mnist_digits": 600, "mnist_test": 32, "custom": (48, 16)},
    "medium": {"taxibj": (600, 120), "kth_persons": (1, 2, 3, 4, 5, 16, 17, 18, 19), "kth_frames": 80,
               "kth_d": (1, 2), "mnist_digits": 6000, "mnist_test": 200, "custom": (400, 80)},
}


def write_synthetic(name: str, out_dir: str | Path, *, seed: int = 0, size: str = "small",
                    overwrite: bool = False) -> Path:
    """Write a seeded synthetic dataset in the published layout under out_dir; returns its folder
    (e.g. ``out_dir/taxibj``), which `build_dataset(name, out_dir, ...)` then reads."""
    family = family_of(name)
    if size not in SIZES:
        raise DataError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    folder = Path(out_dir).expanduser() / FOLDER[family]
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise DataError(f"{folder} already exists and is not empty; choose another --out or pass "
                            "overwrite=True (--overwrite)")
        if not (folder / MARKER).is_file():
            raise DataError(f"{folder} has no {MARKER} marker: refusing to delete what may be real data")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = SIZES[size]
    {"taxibj": _taxibj, "kth": _kth, "mmnist": _mmnist, "custom": _custom}[family](folder, seed, cfg)
    (folder / MARKER).write_text(f"synthetic {family} data written by vmrnn.data.synth "
                                 f"(seed={seed}, size={size}); not real data\n")
    return folder


# --------------------------------------------------------------------------------------------- TaxiBJ

def taxibj_series(n_steps: int, seed: int) -> np.ndarray:
    """(n_steps, 2, 32, 32) flow in [0, 1] before the [-1, 1] mapping."""
    rng = np.random.default_rng([seed, 1])
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    t = np.arange(n_steps, dtype=np.float64)[:, None, None]
    field = np.zeros((n_steps, 32, 32))
    for _ in range(5):  # hotspots with a daily (48-step) cycle and a weekly modulation
        cy, cx = rng.uniform(4, 28, 2)
        w = rng.uniform(2.5, 6.0)
        amp = rng.uniform(0.4, 1.0)
        phase = rng.uniform(0, 2 * math.pi)
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w))
        daily = 0.5 * (1 + np.sin(2 * math.pi * t / 48 + phase))
        weekly = 1 + 0.2 * np.sin(2 * math.pi * t / (48 * 7))
        field += amp * spot * daily * weekly
    # a blob drifting across the city (advection the model has to extrapolate)
    vy, vx = rng.uniform(-0.6, 0.6, 2)
    cy, cx = (16 + vy * t) % 32, (16 + vx * t) % 32
    dy = np.minimum(np.abs(yy - cy), 32 - np.abs(yy - cy))
    dx = np.minimum(np.abs(xx - cx), 32 - np.abs(xx - cx))
    field += 0.6 * np.exp(-(dy ** 2 + dx ** 2) / 18.0)
    inflow = field
    outflow = 0.8 * np.roll(field, 1, axis=0) + 0.2 * field  # outflow lags inflow by one step
    out = np.stack([inflow, outflow], axis=1)
    return out / out.max()


def _taxibj(folder: Path, seed: int, cfg: dict) -> None:
    n_train, n_test = cfg["taxibj"]
    t_in = 4
    series = taxibj_series(n_train + n_test + 2 * (2 * t_in - 1), seed) * 2 - 1  # [-1, 1]
    series = series.astype(np.float32)

    def windows(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = start + np.arange(n)[:, None] + np.arange(2 * t_in)[None]
        w = series[idx]
        return w[:, :t_in], w[:, t_in:]

    x_train, y_train = windows(0, n_train)
    x_test, y_test = windows(n_train + 2 * t_in - 1, n_test)  # test steps never overlap train steps
    np.savez_compressed(folder / "dataset.npz", X_train=x_train, Y_train=y_train, X_test=x_test, Y_test=y_test)


# ------------------------------------------------------------------------------------------------ KTH

KTH_W, KTH_H = 160, 120


def kth_frame(action: str, t: int, rng_params: dict) -> Image.Image:
    """One 160x120 RGB frame of the silhouette; deterministic in its arguments."""
    bg = rng_params["bg"]
    img = Image.new("L", (KTH_W, KTH_H), bg)
    draw = ImageDraw.Draw(img)
    # a soft horizontal floor line for texture
    draw.rectangle([0, 96, KTH_W, KTH_H], fill=max(0, bg - 25))
    shade, height = rng_params["shade"], rng_params["height"]
    speed = {"walking": 1.2, "jogging": 2.2, "running": 3.4}.get(action, 0.0)
    x0 = rng_params["x0"]
    if speed:
        span = KTH_W - 30
        pos = (x0 + speed * t) % (2 * span)
        cx = 15 + (pos if pos < span else 2 * span - pos)
        bob = 2 * math.sin(t * speed * 0.8)
    else:
        cx, bob = 40 + x0 % 80, 0.0
    top = 96 - height + bob
    head = height * 0.18
    draw.ellipse([cx - head / 2, top, cx + head / 2, top + head], fill=shade)
    draw.rectangle([cx - height * 0.12, top + head, cx + height * 0.12, top + height * 0.62], fill=shade)
    leg_phase = math.sin(t * max(speed, 0.3) * 0.9)
    for side in (-1, 1):
        fx = cx + side * (4 + 8 * leg_phase * (1 if speed else 0.1))
        draw.line([cx, top + height * 0.62, fx, 96], fill=shade, width=5)
    phase = 2 * math.pi * t / rng_params["period"]
    sy = top + head + 6
    if action == "boxing":
        reach = 10 + 14 * (0.5 + 0.5 * math.sin(phase))
        draw.line([cx, sy, cx + reach, sy + 2], fill=shade, width=4)
        draw.line([cx, sy + 4, cx + 24 - reach, sy + 6], fill=shade, width=4)
    elif action == "handclapping":
        gap = 3 + 10 * (0.5 + 0.5 * math.sin(phase))
        for side in (-1, 1):
            draw.line([cx + side * 5, sy, cx + side * gap, sy + 14], fill=shade, width=4)
    elif action == "handwaving":
        ang = 0.9 * math.sin(phase)
        for side in (-1, 1):
            ex = cx + side * 18 * math.cos(ang)
            ey = sy - 18 * math.sin(ang) * side
            draw.line([cx, sy, ex, ey], fill=shade, width=4)
    else:
        for side in (-1, 1):
            draw.line([cx, sy, cx - side * 6 * leg_phase, sy + 22], fill=shade, width=4)
    return Image.merge("RGB", (img, img, img))


def _kth(folder: Path, seed: int, cfg: dict) -> None:
    for ai, action in enumerate(KTH_ACTIONS):
        for person in cfg["kth_persons"]:
            for d in cfg["kth_d"]:
                rng = np.random.default_rng([seed, 2, ai, person, d])
                params = {"bg": int(rng.integers(150, 210)), "shade": int(rng.integers(20, 70)),
                          "height": int(rng.integers(55, 75)), "x0": int(rng.integers(0, 120)),
                          "period": float(rng.uniform(7, 11))}
                vdir = folder / action / f"person{person:02d}_{action}_d{d}_uncomp"
                vdir.mkdir(parents=True)
                for t in range(cfg["kth_frames"]):
                    kth_frame(action, t, params).save(vdir / f"image_{t + 1:04d}.png", compress_level=1)


# ---------------------------------------------------------------------------------------- Moving MNIST

# seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
             8: "abcdefg", 9: "abcdfg"}


def digit_glyph(digit: int, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 uint8 seven-segment glyph with random stroke width, size, position and slant."""
    s = 4  # draw at 4x, then downsample (anti-aliasing)
    img = Image.new("L", (28 * s, 28 * s), 0)
    draw = ImageDraw.Draw(img)
    w, h = rng.uniform(9, 14) * s, rng.uniform(16, 20) * s
    x0 = (28 * s - w) / 2 + rng.uniform(-2, 2) * s
    y0 = (28 * s - h) / 2 + rng.uniform(-1.5, 1.5) * s
    width = int(rng.uniform(2.0, 3.6) * s)
    slant = rng.uniform(-0.25, 0.25)
    pts = {"tl": (x0, y0), "tr": (x0 + w, y0), "ml": (x0, y0 + h / 2), "mr": (x0 + w, y0 + h / 2),
           "bl": (x0, y0 + h), "br": (x0 + w, y0 + h)}
    pts = {k: (x + slant * (y0 + h / 2 - y), y) for k, (x, y) in pts.items()}
    seg = {"a": ("tl", "tr"), "b": ("tr", "mr"), "c": ("mr", "br"), "d": ("bl", "br"), "e": ("ml", "bl"),
           "f": ("tl", "ml"), "g": ("ml", "mr")}
    for c in _SEGMENTS[digit]:
        p, q = seg[c]
        draw.line([pts[p], pts[q]], fill=255, width=width, joint="curve")
        for k in (p, q):
            draw.ellipse([pts[k][0] - width / 2, pts[k][1] - width / 2, pts[k][0] + width / 2, pts[k][1] + width / 2],
                         fill=255)
    return np.asarray(img.resize((28, 28), Image.Resampling.BOX), dtype=np.uint8)


def digit_glyphs(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.integers(0, 10, n)
    return np.stack([digit_glyph(int(d), rng) for d in labels])


def write_idx_images(path: Path, images: np.ndarray) -> None:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, r, c = images.shape
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as f:
        f.write(struct.pack(">IIII", mm.IDX_MAGIC, n, r, c))
        f.write(images.tobytes())


def _mmnist(folder: Path, seed: int, cfg: dict) -> None:
    train = digit_glyphs(cfg["mnist_digits"], np.random.default_rng([seed, 3, 0]))
    write_idx_images(folder / mm.TRAIN_FILE, train)
    test_digits = digit_glyphs(max(100, cfg["mnist_test"] * 2), np.random.default_rng([seed, 3, 1]))
    rng = np.random.default_rng([seed, 3, 2])
    seqs = np.stack([mm.generate(rng, test_digits, 0, len(test_digits)) for _ in range(cfg["mnist_test"])], axis=1)
    np.save(folder / mm.TEST_FILE, seqs)  # (20, n, 64, 64) uint8


# ---------------------------------------------------------------------------------------------- custom

def bouncing_blobs(n: int, t: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, t, 1, size, size) uint8 sequences of two Gaussian blobs bouncing in a box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((n, t, 1, size, size))
    for i in range(n):
        for _ in range(2):
            p = rng.uniform(4, size - 4, 2)
            v = rng.uniform(-2, 2, 2)
            sigma = rng.uniform(2, 3.5)
            for k in range(t):
                blob = np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * sigma ** 2))
                out[i, k, 0] = np.maximum(out[i, k, 0], blob)
                p = p + v
                for a in range(2):
                    if p[a] < 3 or p[a] > size - 4:
                        v[a] = -v[a]
                        p[a] = min(max(p[a], 3), size - 4)
    return np.round(out * 255).astype(np.uint8)


def _custom(folder: Path, seed: int, cfg: dict) -> None:
    n_train, n_test = cfg["custom"]
    rng = np.random.default_rng([seed, 4])
    np.save(folder / "train.npy", bouncing_blobs(n_train, 8, 32, rng))
    np.save(folder / "test.npy", bouncing_blobs(n_test, 8, 32, rng))
    meta = {"in_frames": 4, "out_frames": 4, "description": "synthetic bouncing blobs (vmrnn.data.synth)"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
