"""TaxiBJ in the OpenSTL format: ``taxibj/dataset.npz`` with X_train, Y_train, X_test, Y_test.

Each array is (N, 4, 2, 32, 32) (4 frames of 2-channel 32x32 in/out flow) with values in [-1, 1]; a
sample is ``(v + 1) / 2`` computed in the stored dtype and cast to float32 (as OpenSTL does), inputs
from X and targets from Y. Rows of the store are the concatenation (N, 8, 2, 32, 32) float32.

The synthetic stand-in (`write_synthetic`) is a daily-periodic flow field with a drifting blob.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from vmrnn.data.base import SequenceDataset, check_fraction, reject_unknown
from vmrnn.data.errors import DataError, DataFormatError
from vmrnn.data.layout import Location
from vmrnn.data.registry import OPENSTL_RELEASE, Checksum, DatasetSpec, Recipe, SourceFile, register_dataset

IN_FRAMES, OUT_FRAMES = 4, 4
FRAME_SHAPE = (2, 32, 32)
ROW_SHAPE = (IN_FRAMES + OUT_FRAMES, *FRAME_SHAPE)
KEYS = {"train": ("X_train", "Y_train"), "test": ("X_test", "Y_test")}
# Values are expected in [-1, 1]. MinMax scaling fitted on the training period can overshoot a little on
# the test period, so values are accepted (unchanged, as in OpenSTL) up to this bound; beyond it the
# file is almost certainly not normalised (e.g. raw flow counts).
SANITY_BOUND = 1.5
DEFAULT_VAL_FRACTION = 0.1
GUARD = IN_FRAMES + OUT_FRAMES - 1  # samples on each side of the val block dropped from train
_VAL_TAG = 0x7A_B1


class TaxiBJSource:
    """The published file, read and converted once per process (on first use of a part)."""

    family = "taxibj"
    parts = ("train", "test")

    def __init__(self, loc: Location):
        self.path = loc.dataset_dir / "dataset.npz"
        if not self.path.is_file():
            raise loc.not_found(self.path)
        self._cache: dict[str, np.ndarray] = {}

    def describe(self, part: str | None = None) -> str:
        return str(self.path)

    def source_files(self) -> list[Path]:
        return [self.path]

    def row_info(self, part: str) -> tuple[tuple[int, ...], str]:
        return ROW_SHAPE, "float32"

    def part(self, part: str) -> np.ndarray:
        if part not in self._cache:
            self._cache[part] = load_part(self.path, part)
        return self._cache[part]


def load_part(path: Path, part: str) -> np.ndarray:
    """Read X_<part> and Y_<part>, check them and return (N, 8, 2, 32, 32) float32 in [0, 1]."""
    kx, ky = KEYS[part]
    with open(path, "rb") as f:  # our own handle: np.load leaks its file if the zip directory is corrupt
        arrays = _read_npz(path, f, (kx, ky))
    for k, a in arrays.items():
        if a.ndim != 5 or a.shape[1:] != (IN_FRAMES, *FRAME_SHAPE):
            raise DataFormatError(f"{path}: {k} has shape {a.shape}, expected (N, 4, 2, 32, 32)", path)
        if not np.issubdtype(a.dtype, np.floating):
            raise DataFormatError(f"{path}: {k} has dtype {a.dtype}, expected floating point values in [-1, 1]", path)
        if a.shape[0] == 0:
            raise DataFormatError(f"{path}: {k} is empty", path)
    x, y = arrays[kx], arrays[ky]
    if x.shape[0] != y.shape[0]:
        raise DataFormatError(f"{path}: {kx} has {x.shape[0]} samples but {ky} has {y.shape[0]}", path)
    out = np.empty((x.shape[0], *ROW_SHAPE), dtype=np.float32)
    for k, a, sl in ((kx, x, slice(0, IN_FRAMES)), (ky, y, slice(IN_FRAMES, None))):
        for s in range(0, a.shape[0], 1024):  # chunked: no full-size temporaries
            chunk = a[s : s + 1024]
            if not np.isfinite(chunk).all():
                raise DataFormatError(f"{path}: {k} holds NaN or infinite values", path)
            lo, hi = float(chunk.min()), float(chunk.max())
            if lo < -SANITY_BOUND or hi > SANITY_BOUND:
                raise DataFormatError(
                    f"{path}: {k} has values in [{lo:g}, {hi:g}]; TaxiBJ values must be "
                    "normalised to [-1, 1] (is this raw flow data?)",
                    path,
                )
            out[s : s + 1024, sl] = (chunk + 1) / 2
    return out


def _read_npz(path: Path, f: Any, keys: tuple[str, str]) -> dict[str, np.ndarray]:
    try:
        npz = np.load(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npz archive ({exc})", path) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataFormatError(
            f"{path}: expected an .npz archive with keys X_train, Y_train, X_test, Y_test, found a single array", path
        )
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise DataFormatError(
                f"{path}: missing key(s) {missing}; found {sorted(npz.files)}; expected "
                f"X_train, Y_train, X_test, Y_test",
                path,
            )
        arrays = {}
        for k in keys:
            try:
                arrays[k] = npz[k]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError) as exc:
                raise DataFormatError(
                    f"{path}: cannot read {k} ({type(exc).__name__}: {exc}); the archive is corrupt or truncated", path
                ) from None
    return arrays


def val_split(n: int, seed: int, val_fraction: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of the training samples.

    Validation is one contiguous block of round(val_fraction * n) samples (default 10%) at a position
    drawn from the seed. TaxiBJ samples are sliding windows over consecutive time steps, so neighbours
    share frames: the GUARD (7) samples on either side of the block are dropped from training so that no
    training sample shares a frame with a validation sample.
    """
    f = check_fraction(val_fraction, DEFAULT_VAL_FRACTION)
    if f == 0.0:
        return np.arange(n), np.zeros(0, np.int64)
    n_val = max(1, round(f * n))
    rng = np.random.default_rng([_VAL_TAG, seed])
    start = int(rng.integers(0, n - n_val + 1))
    val = np.arange(start, start + n_val)
    train = np.concatenate([np.arange(0, max(0, start - GUARD)), np.arange(min(n, start + n_val + GUARD), n)])
    return train, val


def build(store: Any, name: str, split: str, *, seed: int, val_fraction: float | None, **kw: Any) -> SequenceDataset:
    reject_unknown(kw, (), name)
    part = "test" if split == "test" else "train"
    rows = store.part(part)
    n = len(rows)
    if split == "test":
        idx = np.arange(n)
    else:
        train, val = val_split(n, seed, val_fraction)
        idx = train if split == "train" else val
        if len(idx) == 0:
            why = "val_fraction is 0" if split == "val" else f"only {n} training samples"
            raise DataError(f"taxibj {split} split is empty ({why}) in {store.describe(part)}")
    return SequenceDataset(rows, idx, IN_FRAMES, OUT_FRAMES, name=name, split=split, origin=store.describe(part))


# ------------------------------------------------------------------------------------------- synthetic

SYNTH_SAMPLES = {"small": (64, 16), "medium": (600, 120)}  # (train, test) samples; small: 2 workers x batch 16


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
    field += 0.6 * np.exp(-(dy**2 + dx**2) / 18.0)
    inflow = field
    outflow = 0.8 * np.roll(field, 1, axis=0) + 0.2 * field  # outflow lags inflow by one step
    out = np.stack([inflow, outflow], axis=1)
    return out / out.max()


def write_synthetic(folder: Path, seed: int, size: str) -> None:
    """The synthetic stand-in: ``folder/dataset.npz`` of windows over `taxibj_series`."""
    n_train, n_test = SYNTH_SAMPLES[size]
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


# ------------------------------------------------------------------------------------------- registry


def looks_like(d: Path) -> bool:
    return (d / "dataset.npz").exists()


SPEC = register_dataset(
    DatasetSpec(
        name="taxibj",
        family="taxibj",
        folder="taxibj",
        source=TaxiBJSource,
        build=build,
        looks_like=looks_like,
        origin=(
            "TaxiBJ comes from the OpenSTL release asset taxibj_dataset.zip (see OpenSTL "
            "tools/prepare_data/download_taxibj.sh); unzip it so that {expected} exists"
        ),
        expected_file="dataset.npz",
        synth=write_synthetic,
        recipe=Recipe(epochs=200, batch_size=16, lr=4e-4),
        preset="taxibj",
        smoke_preset="taxibj-tiny",
        in_frames=IN_FRAMES,
        out_frames=OUT_FRAMES,
        channels=FRAME_SHAPE[0],
        height=FRAME_SHAPE[1],
        width=FRAME_SHAPE[2],
        bench_batch=16,
        # No digest of OpenSTL's archive is published: it is checked by unpacking it and opening it with the reader.
        downloads=(
            SourceFile(
                "taxibj_dataset.zip",
                (OPENSTL_RELEASE + "taxibj_dataset.zip",),
                Checksum(),
                unpack="zip-member",
                member="dataset.npz",
            ),
        ),
    )
)
