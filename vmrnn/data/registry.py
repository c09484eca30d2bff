"""The dataset registry: one `DatasetSpec` per dataset, holding everything vmrnn knows about it.

Every list of datasets (command-line choices, training recipes, benchmark shapes, where the data lives
and comes from, synthetic stand-ins) is derived from `DATASETS`. Each reader module (``taxibj.py``,
``kth.py``, ...) defines its spec(s) and registers them when it is imported; ``vmrnn.data`` imports every
built-in reader, so the registry is complete as soon as anything under ``vmrnn.data`` is imported. A
dataset defined elsewhere (your own module, a test) registers itself the same way, in every process that
reads it (Ray workers import vmrnn.data, not your module, unless the trial imports it)::

    from vmrnn.data import DatasetSpec, Recipe, register_dataset
    register_dataset(DatasetSpec(name="mine", family="mine", folder="mine", source=MySource, build=build, ...))

See docs/DATA.md, "Adding a dataset".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrnn.data.errors import DataError

OPENSTL_RELEASE = "https://github.com/chengtan9907/OpenSTL/releases/download/v0.1.0/"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SHAPE_FIELDS = ("in_frames", "out_frames", "channels", "height", "width")


@dataclass(frozen=True)
class Recipe:
    """Defaults of the training options left unset: the official single-GPU script's settings (VMRNN_SPEC 2.2).
    The rest of the OpenSTL recipe (Adam, cosine with 5 warm-up epochs, MSE on all outputs) is the same for
    every dataset: TrainConfig's defaults."""

    epochs: int
    batch_size: int
    lr: float
    val_batch_size: int | None = None  # default: batch_size


@dataclass(frozen=True)
class Checksum:
    """What a downloaded file is checked against; None where nothing is published."""

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def method(self) -> str:
        if self.sha256:
            return "sha256" + (" and size" if self.size else "")
        if self.md5:
            return "md5" + (" and size" if self.size else "")
        return "size" if self.size else "format check after unpacking (no published digest)"


@dataclass(frozen=True)
class SourceFile:
    """One published file of a dataset.

    unpack: ``file`` (used as it is, named `name` in the dataset folder), ``zip-member`` (the archive's
    one file named `member` goes to the dataset folder) or ``zip-tree`` (the archive's folder holding the
    KTH action folders becomes the dataset folder). check: for ``file``, a reader that raises DataError
    on a malformed file (archives are checked by opening the unpacked dataset).
    """

    name: str
    urls: tuple[str, ...]
    checksum: Checksum
    unpack: str
    member: str = ""
    check: Callable[[Path], Any] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset.

    Reading. ``source(location)`` opens the published files and raises a DataError naming the file when
    they are missing or malformed. It offers ``family``, ``parts``, ``part(part)`` (a row store, see
    vmrnn.data.base), ``row_info(part)`` ((row shape, "uint8" | "float32")), ``describe(part)`` and
    ``source_files()`` (checksummed by the prepared copy). ``build(store, name, split, *, seed, val_fraction,
    **options)`` cuts a split of either store (source or prepared: they hold the same rows) into a torch
    Dataset of (inputs, targets). Datasets of one ``family`` share the reader, the ``folder`` under the data
    root and the prepared copy (kth and kth40 differ only in the window length their ``build`` cuts).

    Shape. Frames in/out and (channels, height, width) of a sample. A dataset whose shape is read from the
    data itself (``custom``: its meta.json) leaves them None and gives ``from_data(store)``, which returns the
    fields to replace (see `vmrnn.data.dataset_spec`).

    Model. ``preset`` is the default model preset, ``smoke_preset`` the tiny one of smoke runs and tests.
    With ``fit_model`` the model is sized to the frames (img_size, in_chans from the data; a preset name that
    is not a model preset gives VMRNN-B in the KTH configuration with a patch size that fits).

    Metrics are the same for every dataset (vmrnn.metrics: on the [0, 1] scale the samples are in), so the
    spec holds none.
    """

    name: str
    family: str  # the reader; names the prepared copy (prepared/<family>)
    folder: str  # the dataset's folder under the data root
    source: Callable[[Any], Any] = field(repr=False)  # Location -> row store over the published files
    build: Callable[..., Any] = field(repr=False)  # (store, name, split, *, seed, val_fraction, **options)
    looks_like: Callable[[Path], bool] = field(repr=False)  # whether a folder itself holds the files
    origin: str = field(repr=False)  # where the data comes from; {expected} = the expected path
    recipe: Recipe
    preset: str
    smoke_preset: str
    in_frames: int | None = None
    out_frames: int | None = None
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    expected_file: str = ""  # the file not-found messages name ("" = the folder)
    synth: Callable[[Path, int, str], None] | None = None  # (folder, seed, size "small"|"medium"): a stand-in
    from_data: Callable[[Any], dict[str, Any]] | None = None  # store -> shape fields read from the data
    fit_model: bool = False
    bench_batch: int | None = None  # official single-GPU batch that `vmrnn bench` times
    bench_presets: tuple[str, ...] = ()  # presets `vmrnn bench` times (default: preset, smoke_preset)
    downloads: tuple[SourceFile, ...] = ()  # the published files `vmrnn data download` fetches

    def __post_init__(self) -> None:
        for key in ("name", "family"):
            if not isinstance(getattr(self, key), str) or not _NAME_RE.match(getattr(self, key)):
                raise ValueError(f"dataset {key} {getattr(self, key)!r} must be lower-case letters, digits or _")
        if not self.folder or "/" in self.folder or self.folder in (".", ".."):
            raise ValueError(f"dataset {self.name!r}: folder {self.folder!r} must be one folder name")
        shape = [getattr(self, k) for k in _SHAPE_FIELDS]
        if None in shape and self.from_data is None:
            raise ValueError(f"dataset {self.name!r}: give {', '.join(_SHAPE_FIELDS)} or from_data")
        if any(v is not None and (not isinstance(v, int) or v < 1) for v in shape):
            raise ValueError(f"dataset {self.name!r}: {dict(zip(_SHAPE_FIELDS, shape))} must be positive integers")
        if self.bench_batch is not None and (self.bench_batch < 1 or None in shape):
            raise ValueError(f"dataset {self.name!r}: bench_batch needs a positive batch and a fixed shape")
        if not isinstance(self.recipe, Recipe):
            raise ValueError(f"dataset {self.name!r}: recipe must be a Recipe")

    @property
    def total_frames(self) -> int:
        return self.in_frames + self.out_frames

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def prepared_key(self) -> str:
        """Name of the prepared folder: one per family (kth and kth40 cut their windows at load time)."""
        return self.family


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` to the registry (again registering an equal spec is a no-op); returns it.

    Datasets of one family must agree on the folder; different families may not share one.
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    old = DATASETS.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass replace=True to replace it)")
    for other in DATASETS.values():
        if other.name == spec.name:
            continue
        if other.family == spec.family and other.folder != spec.folder:
            raise ValueError(
                f"dataset {spec.name!r}: family {spec.family!r} lives in folder {other.folder!r} "
                f"({other.name}), not {spec.folder!r}"
            )
        if other.family != spec.family and other.folder == spec.folder:
            raise ValueError(
                f"dataset {spec.name!r}: folder {spec.folder!r} already holds {other.name!r} (family {other.family!r})"
            )
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The registered spec of `name`; an unknown name is a DataError listing the known ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}") from None


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset, in registration order (the command-line choices)."""
    return tuple(DATASETS)


def synth_names() -> tuple[str, ...]:
    """One dataset per family that has a synthetic generator (the choices of `vmrnn data synth`)."""
    first: dict[str, str] = {}
    for spec in DATASETS.values():
        if spec.synth is not None:
            first.setdefault(spec.family, spec.name)
    return tuple(first.values())


def download_names() -> tuple[str, ...]:
    """One dataset per family with published files to fetch (the choices of `vmrnn data download`)."""
    first: dict[str, str] = {}
    for spec in DATASETS.values():
        if spec.downloads:
            first.setdefault(spec.family, spec.name)
    return tuple(first.values())
