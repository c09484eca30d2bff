"""`build_dataset`: pick the prepared copy or the source files, then cut the requested split with the
dataset's reader (from the registry); `dataset_spec`: a dataset's spec with the shape its data declares."""

from __future__ import annotations

import dataclasses
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vmrnn.commands import vmrnn_command
from vmrnn.data.base import check_split
from vmrnn.data.errors import DataError, DatasetNotFoundError
from vmrnn.data.layout import locate
from vmrnn.data.prepare import MANIFEST, PreparedStore
from vmrnn.data.registry import DatasetSpec, get_dataset
from vmrnn.data.remote import local_data_dir

PREPARED_MODES = ("auto", "never", "require")


class StalePreparedWarning(UserWarning):
    """A prepared copy exists but no longer matches the source; the source is read instead."""


def _mode(prepared: Any) -> tuple[str, Path | None]:
    if prepared is True:
        return "require", None
    if prepared is False or prepared is None:
        return "never", None
    if isinstance(prepared, str) and prepared in PREPARED_MODES:
        return prepared, None
    if isinstance(prepared, (str, os.PathLike)):
        return "require", Path(prepared)
    raise DataError(f"prepared must be 'auto', 'never', 'require', a bool or a folder, got {prepared!r}")


def _prepare_command(name: str, data_dir: str | os.PathLike) -> str:
    """The `vmrnn data prepare` line for this dataset and folder, as the user's shell runs it."""
    return vmrnn_command(f"data prepare --dataset {name} --data-dir {shlex.quote(str(data_dir))}")


def open_store(name: str, data_dir: str | os.PathLike, prepared: Any = "auto") -> Any:
    """The row store for dataset `name`: a PreparedStore or the source reader.

    prepared: "auto" (default) uses ``<data_dir>/prepared/<key>/`` when it exists and its manifest
    matches the source checksums (or the source is absent), else reads the source; "never" (or False)
    always reads the source; "require" (or True) insists on the prepared copy; a path names the
    prepared folder explicitly (implies "require"). `data_dir` may itself be a prepared folder, or an
    object-store URI (s3://, gs://) of prepared data, cached once per node (see vmrnn.data.remote).
    """
    family = get_dataset(name).family
    mode, explicit = _mode(prepared)
    data_dir = local_data_dir(
        data_dir, get_dataset(name).prepared_key
    )  # s3:// etc.: a node-local copy of the prepared files
    if mode != "never" and explicit is None and (data_dir / MANIFEST).is_file():
        return PreparedStore(data_dir, family)
    try:
        loc = locate(name, data_dir)
    except DatasetNotFoundError:
        if explicit is not None and (explicit / MANIFEST).is_file():
            return PreparedStore(explicit, family)
        raise
    pdir = explicit or loc.prepared_dir
    has_prepared = (pdir / MANIFEST).is_file()
    if mode == "never" or (mode == "auto" and not has_prepared):
        if not loc.found and mode == "auto":
            raise DatasetNotFoundError(f"{loc.not_found()} (no prepared copy at {pdir} either)", loc.expected_hint())
        return loc.open_source()
    if not has_prepared:
        raise DatasetNotFoundError(
            f"no prepared copy of {name} at {pdir} ({MANIFEST} missing); run `{_prepare_command(name, data_dir)}`",
            pdir / MANIFEST,
        )
    store = PreparedStore(pdir, family)
    if not loc.found:  # only the prepared copy is here (e.g. copied to a worker node): trust its own checks
        return store
    src = loc.open_source()
    ok, reason = store.matches(src)
    if ok:
        return store
    if mode == "auto":
        warnings.warn(
            f"prepared copy {pdir} is stale ({reason}); reading the source files instead. "
            f"Run `{_prepare_command(name, data_dir)}` to refresh it.",
            StalePreparedWarning,
            stacklevel=3,
        )
        return src
    raise DataError(
        f"prepared copy {pdir} does not match the source ({reason}); run `{_prepare_command(name, data_dir)}` again"
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def build_dataset(
    name: str,
    data_dir: str | os.PathLike,
    split: str,
    *,
    seed: int = 0,
    val_fraction: float | None = None,
    prepared: Any = "auto",
    **kw: Any,
) -> Dataset:
    """A torch Dataset of (inputs (T_in, C, H, W), targets (T_out, C, H, W)) float32 pairs in [0, 1].

    name: a registered dataset (taxibj, kth, kth40, mmnist, custom, ...). split: train | val | test (val is a
    documented hold-out of the training data, never the test set; see docs/DATA.md). seed and val_fraction
    choose the hold-out (val_fraction=0: no hold-out, train is the full official training set). Extra options:
    kth/kth40 ``val_persons``; mmnist ``length`` (train samples per epoch, default 10,000),
    ``val_length`` (default 1,000) and ``epoch``.
    """
    spec = get_dataset(name)
    check_split(split)
    seed = _check_seed(seed)
    store = open_store(name, data_dir, prepared)
    return spec.build(store, name, split, seed=seed, val_fraction=val_fraction, **kw)


def dataset_spec(name: str, data_dir: str | os.PathLike | None = None, *, prepared: Any = "auto") -> DatasetSpec:
    """The registered spec of `name`; a dataset whose shape comes from its data (``custom``: meta.json and
    the .npy shapes) gets it filled in from the data under `data_dir`."""
    spec = get_dataset(name)
    if spec.from_data is None:
        return spec
    if data_dir is None:
        raise DataError(f"the {name} dataset's shape comes from its data: pass data_dir")
    return dataclasses.replace(spec, **spec.from_data(open_store(name, Path(data_dir), prepared)))
