"""Moving MNIST as in OpenSTL: training sequences generated on the fly, a fixed test file.

Files: ``moving_mnist/train-images-idx3-ubyte.gz`` (MNIST training digits, idx3 format: a 16-byte
big-endian header magic 2051, count, 28, 28, then uint8 pixels) and ``moving_mnist/mnist_test_seq.npy``
((20, N, 64, 64) uint8; frames 0-9 are the inputs and 10-19 the targets of sequence n).

Generation (VMRNN_SPEC 3.3): 2 digits; per digit x, y ~ U(0, 1), theta ~ U(0, 2 pi), velocity
(cos theta, sin theta) times 0.1; every frame, frame 0 included, first takes a step; a coordinate <= 0
or >= 1 is clamped and that axis's direction flips; the pixel offset is int(36 * position); the 28x28
digit is pasted with an element-wise max onto the 64x64 canvas; pixels are divided by 255. The random
numbers come from a numpy Generator seeded by (stream, seed, epoch, index), so a sample depends only on
those: data-parallel workers and resumed runs see the same sequences.

The synthetic stand-in (`write_synthetic`) replaces the MNIST digits by seven-segment glyphs.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from vmrnn.data.base import LazyMixin, NpyRows, SequenceDataset, check_fraction, npy_header, reject_unknown, u8_to_float
from vmrnn.data.errors import DataError, DataFormatError
from vmrnn.data.layout import Location
from vmrnn.data.registry import Checksum, DatasetSpec, Recipe, SourceFile, register_dataset

IN_FRAMES, OUT_FRAMES = 10, 10
N_FRAMES = IN_FRAMES + OUT_FRAMES
IMAGE_SIZE, DIGIT_SIZE = 64, 28
CANVAS = IMAGE_SIZE - DIGIT_SIZE  # 36
STEP = 0.1
N_DIGITS = 2
IDX_MAGIC = 2051
TRAIN_FILE = "train-images-idx3-ubyte.gz"
TEST_FILE = "mnist_test_seq.npy"
DEFAULT_LENGTH = 10_000
DEFAULT_VAL_LENGTH = 1_000
DEFAULT_VAL_FRACTION = 0.1
STREAMS = {"train": 0, "val": 1}


def read_idx_images(path: Path) -> np.ndarray:
    """MNIST idx3-ubyte images (gzip-compressed or not) as a (N, 28, 28) uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated file ({type(exc).__name__}: {exc})", path) from None
    if len(data) < 16:
        raise DataFormatError(f"{path}: {len(data)} bytes, too short for an idx3-ubyte header", path)
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_MAGIC:
        raise DataFormatError(f"{path}: magic number {magic}, expected {IDX_MAGIC} (idx3-ubyte images)", path)
    if (rows, cols) != (DIGIT_SIZE, DIGIT_SIZE):
        raise DataFormatError(f"{path}: images are {rows}x{cols}, expected 28x28", path)
    if n == 0:
        raise DataFormatError(f"{path}: holds no images", path)
    need = 16 + n * rows * cols
    if len(data) != need:
        raise DataFormatError(
            f"{path}: {len(data)} bytes of image data, the header ({n} images) needs {need}"
            f" ({'truncated' if len(data) < need else 'trailing bytes'})",
            path,
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, DIGIT_SIZE, DIGIT_SIZE)


def check_test_file(path: Path) -> tuple[int, ...]:
    shape, dtype = npy_header(path)
    if len(shape) != 4 or shape[0] != N_FRAMES or shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(f"{path}: shape {shape}, expected (20, N, 64, 64) (frame, sequence, H, W)", path)
    if dtype != np.uint8:
        raise DataFormatError(f"{path}: dtype {dtype}, expected uint8", path)
    if shape[1] == 0:
        raise DataFormatError(f"{path}: holds no sequences", path)
    return shape


def bounce_trajectory(
    x: float, y: float, theta: float, n_frames: int = N_FRAMES, step: float = STEP, canvas: int = CANVAS
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (top rows, left columns) of one digit over n_frames (official rule)."""
    vy, vx = math.sin(theta), math.cos(theta)
    ys, xs = np.empty(n_frames), np.empty(n_frames)
    for i in range(n_frames):
        y += vy * step
        x += vx * step
        if x <= 0:
            x, vx = 0.0, -vx
        if x >= 1.0:
            x, vx = 1.0, -vx
        if y <= 0:
            y, vy = 0.0, -vy
        if y >= 1.0:
            y, vy = 1.0, -vy
        ys[i], xs[i] = y, x
    return (canvas * ys).astype(np.int32), (canvas * xs).astype(np.int32)


def render(
    digits: list[np.ndarray],
    trajectories: list[tuple[np.ndarray, np.ndarray]],
    n_frames: int = N_FRAMES,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Max-paste each digit along its trajectory: (n_frames, size, size) uint8."""
    out = np.zeros((n_frames, size, size), dtype=np.uint8)
    tt = np.arange(n_frames)[:, None, None]
    for img, (top, left) in zip(digits, trajectories, strict=True):
        h, w = img.shape
        rr = np.asarray(top)[:, None, None] + np.arange(h)[None, :, None]
        cc = np.asarray(left)[:, None, None] + np.arange(w)[None, None, :]
        out[tt, rr, cc] = np.maximum(out[tt, rr, cc], img[None])
    return out


def generate(
    rng: np.random.Generator, digits: Any, lo: int, hi: int, n_frames: int = N_FRAMES, n_digits: int = N_DIGITS
) -> np.ndarray:
    """One sequence (n_frames, 64, 64) uint8 using digits[lo:hi]. Draw order per digit: x, y, theta, index."""
    imgs, trajs = [], []
    for _ in range(n_digits):
        x, y, theta = rng.random(), rng.random(), rng.random() * 2 * math.pi
        k = int(rng.integers(lo, hi))
        trajs.append(bounce_trajectory(x, y, theta, n_frames))
        imgs.append(np.asarray(digits[k]))
    return render(imgs, trajs, n_frames)


class MovingMNISTSource:
    family = "mmnist"
    parts = ("digits", "test")

    def __init__(self, loc: Location):
        d = loc.dataset_dir
        gz, raw = d / TRAIN_FILE, d / TRAIN_FILE[:-3]
        self.train_path = gz if gz.exists() or not raw.exists() else raw
        self.test_path = d / TEST_FILE
        missing = [p for p in (self.train_path, self.test_path) if not p.is_file()]
        if missing:
            raise loc.not_found(missing[0])
        self._digits: np.ndarray | None = None

    def describe(self, part: str | None = None) -> str:
        if part is None:
            return str(self.test_path.parent)
        return str(self.train_path if part == "digits" else self.test_path)

    def source_files(self) -> list[Path]:
        return [self.train_path, self.test_path]

    def row_info(self, part: str) -> tuple[tuple[int, ...], str]:
        return ((DIGIT_SIZE, DIGIT_SIZE) if part == "digits" else (N_FRAMES, 1, IMAGE_SIZE, IMAGE_SIZE)), "uint8"

    def part(self, part: str) -> Any:
        if part == "digits":
            if self._digits is None:
                self._digits = read_idx_images(self.train_path)
            return self._digits
        shape = check_test_file(self.test_path)
        return NpyRows(self.test_path, shape, np.uint8, axis=1, add_channel=True)


class MovingMNISTDataset(Dataset, LazyMixin):
    """Sequences generated on the fly from digits[lo:hi]; sample i of epoch e is a pure function of
    (stream, seed, e, i). The val stream ignores the epoch (a fixed set)."""

    def __init__(
        self,
        digits: Any,
        lo: int,
        hi: int,
        length: int,
        *,
        seed: int,
        stream: str,
        epoch: int = 0,
        name: str = "mmnist",
        split: str = "train",
        origin: str = "",
    ):
        self.digits, self.lo, self.hi, self.length = digits, int(lo), int(hi), int(length)
        self.seed, self.stream, self.epoch = int(seed), stream, int(epoch)
        self.name, self.split, self.origin = name, split, origin
        self.in_frames, self.out_frames = IN_FRAMES, OUT_FRAMES

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the train stream draws new sequences each epoch). With DataLoader workers,
        call it before iterating; persistent workers keep the epoch they started with."""
        if int(epoch) < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def sequence(self, i: int) -> np.ndarray:
        """Sample i as (20, 64, 64) uint8."""
        if not -self.length <= i < self.length:
            raise IndexError(f"sample {i} out of range for {self.length} samples")
        i = int(i) % self.length
        epoch = self.epoch if self.stream == "train" else 0
        rng = np.random.default_rng([STREAMS[self.stream], self.seed, epoch, int(i)])
        return generate(rng, self.digits, self.lo, self.hi)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(u8_to_float(self.sequence(int(i))[:, None]))
        return t[:IN_FRAMES], t[IN_FRAMES:]

    def __repr__(self) -> str:
        return (
            f"<MovingMNISTDataset {self.name}/{self.split}: {self.length} generated samples from digits "
            f"[{self.lo}:{self.hi}] of {self.origin}, seed {self.seed}, epoch {self.epoch}>"
        )


def digit_split(n: int, val_fraction: float | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Digit ranges (train, val): validation uses the last round(val_fraction * n) digits (default 10%)."""
    f = check_fraction(val_fraction, DEFAULT_VAL_FRACTION)
    n_val = 0 if f == 0 else max(1, round(f * n))
    if n_val >= n:
        raise DataError(f"val_fraction {f} leaves no training digits out of {n}")
    return (0, n - n_val), (n - n_val, n)


def build(
    store: Any,
    name: str,
    split: str,
    *,
    seed: int,
    val_fraction: float | None,
    length: int = DEFAULT_LENGTH,
    val_length: int = DEFAULT_VAL_LENGTH,
    epoch: int = 0,
    **kw: Any,
) -> Dataset:
    reject_unknown(kw, ("length", "val_length", "epoch"), name)
    if split == "test":
        rows = store.part("test")
        return SequenceDataset(
            rows, np.arange(len(rows)), IN_FRAMES, OUT_FRAMES, name=name, split=split, origin=store.describe("test")
        )
    digits = store.part("digits")
    (tlo, thi), (vlo, vhi) = digit_split(len(digits), val_fraction)
    n = length if split == "train" else val_length
    if int(n) <= 0 or int(n) != n:
        raise DataError(f"{'length' if split == 'train' else 'val_length'} must be a positive integer, got {n}")
    if split == "val" and vhi == vlo:
        raise DataError("mmnist val split is empty (val_fraction is 0)")
    lo, hi = (tlo, thi) if split == "train" else (vlo, vhi)
    ds = MovingMNISTDataset(
        digits, lo, hi, int(n), seed=seed, stream=split, name=name, split=split, origin=store.describe("digits")
    )
    ds.set_epoch(epoch)
    return ds


# ------------------------------------------------------------------------------------------- synthetic

SYNTH_SIZES = {"small": (600, 32), "medium": (6000, 200)}  # (training digits, test sequences)

# seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


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
    pts = {
        "tl": (x0, y0),
        "tr": (x0 + w, y0),
        "ml": (x0, y0 + h / 2),
        "mr": (x0 + w, y0 + h / 2),
        "bl": (x0, y0 + h),
        "br": (x0 + w, y0 + h),
    }
    pts = {k: (x + slant * (y0 + h / 2 - y), y) for k, (x, y) in pts.items()}
    seg = {
        "a": ("tl", "tr"),
        "b": ("tr", "mr"),
        "c": ("mr", "br"),
        "d": ("bl", "br"),
        "e": ("ml", "bl"),
        "f": ("tl", "ml"),
        "g": ("ml", "mr"),
    }
    for c in _SEGMENTS[digit]:
        p, q = seg[c]
        draw.line([pts[p], pts[q]], fill=255, width=width, joint="curve")
        for k in (p, q):
            draw.ellipse(
                [pts[k][0] - width / 2, pts[k][1] - width / 2, pts[k][0] + width / 2, pts[k][1] + width / 2], fill=255
            )
    return np.asarray(img.resize((28, 28), Image.Resampling.BOX), dtype=np.uint8)


def digit_glyphs(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.integers(0, 10, n)
    return np.stack([digit_glyph(int(d), rng) for d in labels])


def write_idx_images(path: Path, images: np.ndarray) -> None:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, r, c = images.shape
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as f:
        f.write(struct.pack(">IIII", IDX_MAGIC, n, r, c))
        f.write(images.tobytes())


def write_synthetic(folder: Path, seed: int, size: str) -> None:
    """The synthetic stand-in: glyph "digits" in the idx3 format and test sequences by the official rule."""
    n_digits, n_test = SYNTH_SIZES[size]
    train = digit_glyphs(n_digits, np.random.default_rng([seed, 3, 0]))
    write_idx_images(folder / TRAIN_FILE, train)
    test_digits = digit_glyphs(max(100, n_test * 2), np.random.default_rng([seed, 3, 1]))
    rng = np.random.default_rng([seed, 3, 2])
    seqs = np.stack([generate(rng, test_digits, 0, len(test_digits)) for _ in range(n_test)], axis=1)
    np.save(folder / TEST_FILE, seqs)  # (20, n, 64, 64) uint8


# ------------------------------------------------------------------------------------------- registry

MOVING_MNIST_PAGE = "http://www.cs.toronto.edu/~nitish/unsupervised_video/"
# MNIST itself: torchvision's mirror first (the original site often refuses scripted downloads), then the original.
MNIST_SITES = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# MNIST's training images have a well-known size, sha256 and md5; torchvision lists the md5 of mnist_test_seq.npy.
DOWNLOADS = (
    SourceFile(
        TRAIN_FILE,
        tuple(base + TRAIN_FILE for base in MNIST_SITES),
        Checksum(
            sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
            size=9912422,
        ),
        unpack="file",
        check=read_idx_images,
    ),
    SourceFile(
        TEST_FILE,
        (MOVING_MNIST_PAGE + TEST_FILE,),
        Checksum(md5="be083ec986bfe91a449d63653c411eb2"),
        unpack="file",
        check=check_test_file,
    ),
)


def looks_like(d: Path) -> bool:
    return any((d / f).exists() for f in (TRAIN_FILE, TRAIN_FILE[:-3], TEST_FILE))


SPEC = register_dataset(
    DatasetSpec(
        name="mmnist",
        family="mmnist",
        folder="moving_mnist",
        source=MovingMNISTSource,
        build=build,
        looks_like=looks_like,
        origin=(
            "Moving MNIST needs train-images-idx3-ubyte.gz (the MNIST training images) and mnist_test_seq.npy, "
            "both linked from the Moving MNIST page http://www.cs.toronto.edu/~nitish/unsupervised_video/; "
            "put them in {expected}"
        ),
        synth=write_synthetic,
        recipe=Recipe(epochs=2000, batch_size=16, lr=1e-4),
        preset="mmnist",
        smoke_preset="mmnist-tiny",
        in_frames=IN_FRAMES,
        out_frames=OUT_FRAMES,
        channels=1,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        bench_batch=16,
        bench_presets=("mmnist", "mmnist-openstl", "mmnist-tiny"),
        downloads=DOWNLOADS,
    )
)
