"""Datasets in their published formats, the Arrow prepared format and synthetic stand-ins.

    from vmrnn.data import DATASETS, build_dataset
    ds = build_dataset("taxibj", "data", "train")       # (inputs (4,2,32,32), targets (4,2,32,32))

Every dataset is one `DatasetSpec` in the registry (vmrnn.data.registry), defined by its reader module;
importing this package imports every built-in reader, so `DATASETS` is complete. See docs/DATA.md for
layouts, splits, the prepared format, the synthetic generator and how to add a dataset.
"""

from __future__ import annotations

# The built-in readers register their datasets when imported (in this order: the command-line choices).
# isort: off
from vmrnn.data import taxibj, kth, mmnist, custom  # noqa: F401

# isort: on
from vmrnn.data.build import StalePreparedWarning, build_dataset, dataset_spec, open_store
from vmrnn.data.errors import DataError, DataFormatError, DatasetNotFoundError, NoWindowsError
from vmrnn.data.prepare import prepare_dataset
from vmrnn.data.registry import (
    DATASETS,
    DatasetSpec,
    Recipe,
    dataset_names,
    download_names,
    get_dataset,
    register_dataset,
    synth_names,
)
from vmrnn.data.synth import write_synthetic

__all__ = [
    "DATASETS",
    "DataError",
    "DataFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "NoWindowsError",
    "Recipe",
    "StalePreparedWarning",
    "build_dataset",
    "dataset_names",
    "dataset_spec",
    "download_names",
    "get_dataset",
    "open_store",
    "prepare_dataset",
    "register_dataset",
    "synth_names",
    "write_synthetic",
]
