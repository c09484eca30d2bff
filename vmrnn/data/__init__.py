"""Datasets in their published formats, the Arrow prepared format and synthetic stand-ins.

    from vmrnn.data import DATASETS, build_dataset
    ds = build_dataset("taxibj", "data", "train")       # (inputs (4,2,32,32), targets (4,2,32,32))

See docs/DATA.md for layouts, splits, the prepared format and the synthetic generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmrnn.data.build import StalePreparedWarning, build_dataset, open_store
from vmrnn.data.errors import DataError, DataFormatError, DatasetNotFoundError, NoWindowsError
from vmrnn.data.prepare import prepare_dataset
from vmrnn.data.synth import write_synthetic


@dataclass(frozen=True)
class DatasetSpec:
    """Shape of a dataset's samples and the model preset it is trained with."""

    name: str
    in_frames: int
    out_frames: int
    channels: int
    height: int
    width: int
    preset: str

    @property
    def total_frames(self) -> int:
        return self.in_frames + self.out_frames

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


DATASETS: dict[str, DatasetSpec] = {
    "taxibj": DatasetSpec("taxibj", 4, 4, 2, 32, 32, "taxibj"),
    "kth": DatasetSpec("kth", 10, 20, 1, 128, 128, "kth"),
    "kth40": DatasetSpec("kth40", 10, 40, 1, 128, 128, "kth"),
    "mmnist": DatasetSpec("mmnist", 10, 10, 1, 64, 64, "mmnist"),
}
NAMES = ("taxibj", "kth", "kth40", "mmnist", "custom")


def dataset_spec(name: str, data_dir: str | os.PathLike | None = None, *, prepared: object = "auto") -> DatasetSpec:
    """The DatasetSpec of `name`; for ``custom`` it is read from the dataset's meta.json and .npy shapes
    (``preset`` from meta.json, default ``"custom"``: build the model from the shapes)."""
    if name in DATASETS:
        return DATASETS[name]
    if name != "custom":
        raise DataError(f"unknown dataset {name!r}; choose one of {list(NAMES)}")
    if data_dir is None:
        raise DataError("the custom dataset's spec comes from its meta.json: pass data_dir")
    store = open_store("custom", Path(data_dir), prepared)
    meta = store.meta
    shape, _ = store.row_info("train")
    _, c, h, w = shape
    return DatasetSpec("custom", meta["in_frames"], meta["out_frames"], c, h, w, meta.get("preset", "custom"))


__all__ = [
    "DATASETS", "NAMES", "DataError", "DataFormatError", "DatasetNotFoundError", "DatasetSpec", "NoWindowsError",
    "StalePreparedWarning", "build_dataset", "dataset_spec", "open_store", "prepare_dataset", "write_synthetic",
]
