"""Building blocks shared by the readers: row stores, sample datasets and conversions.

A *row store* is a lazily opened, picklable object that behaves like a read-only numpy array for
``store[i]`` and ``store[a:b]`` (the leading axis indexes rows: samples, frames or digits). The
source readers and the prepared (Arrow) format both produce row stores holding *the same bytes*,
and the datasets below turn rows into samples. That is why a prepared dataset gives bit-for-bit the
same samples as its source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vmrnn.data.errors import DataError, DataFormatError


def u8_to_float(a: np.ndarray) -> np.ndarray:
    """uint8 -> float32 k / 255 as a correctly rounded float32 division. For all 256 values this equals
    both float32(k / 255.0) (OpenSTL's KTH path) and float32(k) / 255 (its Moving MNIST path)."""
    return np.divide(a, np.float32(255), dtype=np.float32)


def frames_to_tensor(a: np.ndarray, *, check_range: bool = False, what: str = "") -> torch.Tensor:
    """uint8 -> /255; float -> float32 (checked to be finite and in [0, 1] when check_range)."""
    if a.dtype == np.uint8:
        out = u8_to_float(a)
    else:
        out = np.array(a, dtype=np.float32, copy=True)
        if check_range:
            if not np.isfinite(out).all():
                raise DataFormatError(f"{what}: values are not finite")
            lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
            if lo < 0.0 or hi > 1.0:
                raise DataFormatError(f"{what}: float frames must be in [0, 1], found [{lo:g}, {hi:g}]")
    return torch.from_numpy(out)


class LazyMixin:
    """Objects whose attributes named ``_lazy_*`` are per-process caches, dropped when pickled
    (so a DataLoader worker reopens its own memory map instead of receiving a copy)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: (None if k.startswith("_lazy_") else v) for k, v in self.__dict__.items()}


class NpyRows(LazyMixin):
    """Rows of a ``.npy`` file, memory-mapped on first access in each process.

    ``axis`` is the axis that indexes rows (1 for mnist_test_seq.npy's (20, N, 64, 64)); ``add_channel``
    inserts a channel axis after the time axis ((T, H, W) -> (T, 1, H, W)).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, axis: int = 0, add_channel: bool = False):
        self.path = Path(path)
        self.file_shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.axis = axis
        self.add_channel = add_channel
        self._lazy_arr = None

    def _arr(self) -> np.ndarray:
        if self._lazy_arr is None:
            self._lazy_arr = open_npy(self.path)
        return self._lazy_arr

    def __len__(self) -> int:
        return self.file_shape[self.axis]

    @property
    def row_shape(self) -> tuple[int, ...]:
        rest = tuple(s for i, s in enumerate(self.file_shape) if i != self.axis)
        return (rest[0], 1, *rest[1:]) if self.add_channel else rest

    def __getitem__(self, idx: int | slice) -> np.ndarray:
        a = self._arr()
        if isinstance(idx, slice):
            out = np.moveaxis(a[(slice(None),) * self.axis + (idx,)], self.axis, 0)
            return np.expand_dims(out, 2) if self.add_channel else out
        out = a[(slice(None),) * self.axis + (int(idx),)]
        return np.expand_dims(out, 1) if self.add_channel else out


def open_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file; any problem (truncated, not an npy, object dtype) is a DataFormatError."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npy array ({exc})", path) from None


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, checking that the file is long enough for them."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npy array ({exc})", path) from None
    if dtype.hasobject:
        raise DataFormatError(f"{path}: holds Python objects; expected a numeric array", path)
    if fortran:
        raise DataFormatError(f"{path}: Fortran-ordered arrays are not supported; save it C-ordered", path)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise DataFormatError(f"{path}: truncated ({size} bytes, the header {shape} {dtype} needs {need})", path)
    return tuple(int(s) for s in shape), dtype


class SequenceDataset(Dataset, LazyMixin):
    """Samples that are whole rows (T, C, H, W) of a row store, split into inputs and targets."""

    def __init__(
        self,
        rows: Any,
        indices: np.ndarray,
        in_frames: int,
        out_frames: int,
        *,
        name: str,
        split: str,
        check_range: bool = False,
        origin: str = "",
    ):
        self.rows = rows
        self.indices = np.asarray(indices, dtype=np.int64)
        self.in_frames, self.out_frames = int(in_frames), int(out_frames)
        self.name, self.split, self.check_range, self.origin = name, split, check_range, origin

    def __len__(self) -> int:
        return len(self.indices)

    def row_index(self, i: int) -> int:
        return int(self.indices[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        r = self.row_index(i)
        t = frames_to_tensor(self.rows[r], check_range=self.check_range, what=f"{self.origin} sample {r}")
        return t[: self.in_frames], t[self.in_frames :]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}/{self.split}: {len(self)} samples from {self.origin}>"


class WindowDataset(SequenceDataset):
    """Samples that are windows of `seq_len` consecutive rows (frames (H, W) or (C, H, W)) of a row store."""

    def __init__(self, rows: Any, starts: np.ndarray, seq_len: int, in_frames: int, out_frames: int, **kw):
        super().__init__(rows, starts, in_frames, out_frames, **kw)
        self.seq_len = int(seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        s = self.row_index(i)
        frames = self.rows[s : s + self.seq_len]
        if frames.ndim == 3:  # (T, H, W) -> (T, 1, H, W)
            frames = frames[:, None]
        t = frames_to_tensor(frames)
        return t[: self.in_frames], t[self.in_frames :]


def check_split(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; choose 'train', 'val' or 'test'")
    return split


def check_fraction(val_fraction: float | None, default: float) -> float:
    v = default if val_fraction is None else val_fraction
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not 0.0 <= v < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {v}")
    return v


def reject_unknown(kw: dict[str, Any], allowed: tuple[str, ...], name: str) -> None:
    extra = sorted(set(kw) - set(allowed))
    if extra:
        raise DataError(
            f"unknown option(s) {extra} for dataset {name!r}; allowed: {sorted(allowed) if allowed else 'none'}"
        )
