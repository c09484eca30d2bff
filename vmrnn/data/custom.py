"""The generic "custom" format: a folder with ``meta.json``, ``train.npy``, ``test.npy`` and optionally
``val.npy``.

* ``meta.json``: ``{"in_frames": 10, "out_frames": 10}``, plus optional ``"preset"`` (a model preset
  name, default ``"custom"``) and ``"description"``; no other keys.
* each ``.npy``: (N, T, C, H, W) with T = in_frames + out_frames and the same (C, H, W) in every file;
  uint8 (divided by 255) or float16/32/64 already in [0, 1] (checked per sample; NaN or values outside
  [0, 1] raise). Files are memory-mapped, never loaded whole.
* validation: ``val.npy`` when present, otherwise a seeded random 10% (``val_fraction``) of the training
  sequences (the sequences are assumed independent).

The frame counts, the frame shape and the model preset are read from the data (`shape_from_data`); the
model is sized to the frames. The synthetic stand-in (`write_synthetic`) is bouncing Gaussian blobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vmrnn.data.base import NpyRows, SequenceDataset, check_fraction, npy_header, reject_unknown
from vmrnn.data.errors import DataError, DataFormatError
from vmrnn.data.layout import Location
from vmrnn.data.registry import DatasetSpec, Recipe, register_dataset

META_KEYS_REQUIRED = ("in_frames", "out_frames")
META_KEYS_OPTIONAL = ("preset", "description", "name")
DTYPES = (np.uint8, np.float16, np.float32, np.float64)
DEFAULT_VAL_FRACTION = 0.1
_VAL_TAG = 0xC5_70


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})", path) from None
    if not isinstance(meta, dict):
        raise DataFormatError(f'{path}: expected a JSON object like {{"in_frames": 10, "out_frames": 10}}', path)
    missing = [k for k in META_KEYS_REQUIRED if k not in meta]
    extra = sorted(set(meta) - set(META_KEYS_REQUIRED) - set(META_KEYS_OPTIONAL))
    if missing or extra:
        raise DataFormatError(
            f"{path}: missing keys {missing} / unknown keys {extra}; allowed: "
            f"{list(META_KEYS_REQUIRED + META_KEYS_OPTIONAL)}",
            path,
        )
    for k in META_KEYS_REQUIRED:
        v = meta[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataFormatError(f"{path}: {k} must be a positive integer, got {v!r}", path)
    for k in META_KEYS_OPTIONAL:
        if k in meta and not isinstance(meta[k], str):
            raise DataFormatError(f"{path}: {k} must be a string, got {meta[k]!r}", path)
    return meta


class CustomSource:
    family = "custom"

    def __init__(self, loc: Location):
        d = loc.dataset_dir
        self.dir = d
        self.meta_path = d / "meta.json"
        if not self.meta_path.is_file():
            raise loc.not_found(self.meta_path)
        self.meta = read_meta(self.meta_path)
        t = self.meta["in_frames"] + self.meta["out_frames"]
        self.headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for part in ("train", "test", "val"):
            p = d / f"{part}.npy"
            if not p.exists():
                if part != "val":
                    raise loc.not_found(p)
                continue
            shape, dtype = npy_header(p)
            if len(shape) != 5 or shape[1] != t:
                raise DataFormatError(
                    f"{p}: shape {shape}, expected (N, {t}, C, H, W) "
                    f"(T = in_frames + out_frames from {self.meta_path.name})",
                    p,
                )
            if dtype.type not in DTYPES:
                raise DataFormatError(f"{p}: dtype {dtype}, expected uint8 or float16/32/64", p)
            if dtype.byteorder == ">":
                raise DataFormatError(f"{p}: big-endian data is not supported", p)
            if shape[0] == 0:
                raise DataFormatError(f"{p}: holds no sequences", p)
            self.headers[part] = (shape, dtype)
        frames = {part: s[2:] for part, (s, _) in self.headers.items()}
        if len(set(frames.values())) != 1:
            raise DataFormatError(f"{d}: the .npy files disagree on (C, H, W): {frames}", d)
        self.parts = tuple(self.headers)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.headers["train"][0][2:]  # type: ignore[return-value]

    def describe(self, part: str | None = None) -> str:
        return str(self.dir / f"{part}.npy") if part else str(self.dir)

    def source_files(self) -> list[Path]:
        return [self.meta_path] + [self.dir / f"{p}.npy" for p in self.parts]

    def row_info(self, part: str) -> tuple[tuple[int, ...], str]:
        shape, dtype = self.headers[part]
        return shape[1:], ("uint8" if dtype == np.uint8 else "float32")

    def part(self, part: str) -> NpyRows:
        shape, dtype = self.headers[part]
        return NpyRows(self.dir / f"{part}.npy", shape, dtype)


def val_split(n: int, seed: int, val_fraction: float | None) -> tuple[np.ndarray, np.ndarray]:
    f = check_fraction(val_fraction, DEFAULT_VAL_FRACTION)
    if f == 0:
        return np.arange(n), np.zeros(0, np.int64)
    n_val = max(1, round(f * n))
    if n_val >= n:
        raise DataError(f"val_fraction {f} leaves no training sequences out of {n}")
    perm = np.random.default_rng([_VAL_TAG, seed]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def build(store: Any, name: str, split: str, *, seed: int, val_fraction: float | None, **kw: Any) -> SequenceDataset:
    reject_unknown(kw, (), name)
    meta = store.meta
    has_val = "val" in store.parts
    part = "train" if split == "train" or (split == "val" and not has_val) else split
    rows = store.part(part)
    if part != "train" or has_val:
        idx = np.arange(len(rows))
    else:
        train, val = val_split(len(rows), seed, val_fraction)
        idx = train if split == "train" else val
        if len(idx) == 0:
            raise DataError(f"custom {split} split is empty (val_fraction is 0 and there is no val.npy)")
    return SequenceDataset(
        rows,
        idx,
        meta["in_frames"],
        meta["out_frames"],
        name=name,
        split=split,
        check_range=True,
        origin=store.describe(part),
    )


def shape_from_data(store: Any) -> dict[str, Any]:
    """Frames and (C, H, W) from the store's meta.json and train rows; the preset from meta.json (default
    ``"custom"``: VMRNN-B sized to the frames)."""
    meta = store.meta
    shape, _ = store.row_info("train")
    _, c, h, w = shape
    return {
        "in_frames": meta["in_frames"],
        "out_frames": meta["out_frames"],
        "channels": c,
        "height": h,
        "width": w,
        "preset": meta.get("preset", "custom"),
    }


# ------------------------------------------------------------------------------------------- synthetic

SYNTH_SIZES = {"small": (48, 16), "medium": (400, 80)}  # (train, test) sequences


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
                blob = np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * sigma**2))
                out[i, k, 0] = np.maximum(out[i, k, 0], blob)
                p = p + v
                for a in range(2):
                    if p[a] < 3 or p[a] > size - 4:
                        v[a] = -v[a]
                        p[a] = min(max(p[a], 3), size - 4)
    return np.round(out * 255).astype(np.uint8)


def write_synthetic(folder: Path, seed: int, size: str) -> None:
    """The synthetic stand-in: (N, 8, 1, 32, 32) uint8 bouncing blobs, 4 -> 4."""
    n_train, n_test = SYNTH_SIZES[size]
    rng = np.random.default_rng([seed, 4])
    np.save(folder / "train.npy", bouncing_blobs(n_train, 8, 32, rng))
    np.save(folder / "test.npy", bouncing_blobs(n_test, 8, 32, rng))
    meta = {"in_frames": 4, "out_frames": 4, "description": "synthetic bouncing blobs (vmrnn.data.synth)"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- registry


def looks_like(d: Path) -> bool:
    return (d / "meta.json").exists()


SPEC = register_dataset(
    DatasetSpec(
        name="custom",
        family="custom",
        folder="custom",
        source=CustomSource,
        build=build,
        looks_like=looks_like,
        origin=(
            "a custom dataset is a folder with meta.json, train.npy and test.npy (see docs/DATA.md, "
            "'Custom format'); expected at {expected}"
        ),
        synth=write_synthetic,
        recipe=Recipe(epochs=100, batch_size=16, lr=1e-4),
        preset="custom",
        smoke_preset="kth-tiny",
        fit_model=True,
        from_data=shape_from_data,  # frames and (C, H, W) come from meta.json and the .npy shapes
    )
)
