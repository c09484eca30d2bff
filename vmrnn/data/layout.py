"""Where each dataset lives under a data root, where it comes from, and where its prepared copy goes.

A *data root* holds one folder per dataset family (the spec's ``folder``)::

    <root>/taxibj/dataset.npz
    <root>/kth/{boxing,handclapping,handwaving,jogging,running,walking}/personXX_<action>_dY_uncomp/image_NNNN.png
    <root>/moving_mnist/{train-images-idx3-ubyte.gz,mnist_test_seq.npy}
    <root>/custom/{meta.json,train.npy,test.npy[,val.npy]}
    <root>/prepared/<family>/{manifest.json,*.arrow}        (written by `vmrnn data prepare`)

`data_dir` may also point straight at a dataset folder (e.g. ``<root>/taxibj``) or at a prepared
folder (one holding ``manifest.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrnn.commands import vmrnn_command
from vmrnn.data.errors import DatasetNotFoundError
from vmrnn.data.registry import DatasetSpec, get_dataset, synth_names

PREPARED_DIRNAME = "prepared"


@dataclass(frozen=True)
class Location:
    """Result of resolving `data_dir` for one dataset."""

    spec: DatasetSpec
    data_dir: Path  # what the user gave
    dataset_dir: Path  # the dataset folder (may not exist)
    found: bool  # whether the dataset folder exists and looks like this dataset
    prepared_dir: Path  # default prepared folder for this dataset

    @property
    def family(self) -> str:
        return self.spec.family

    def origin(self) -> str:
        text = self.spec.origin.format(expected=self.expected_hint())
        synth = [n for n in synth_names() if get_dataset(n).family == self.family]
        if synth:
            synth_cmd = vmrnn_command(f"data synth --dataset {synth[0]} --out DIR")
            text += f" (or write a synthetic stand-in in the same layout: `{synth_cmd}`)"
        return text

    def expected_hint(self) -> Path:
        return self.dataset_dir / self.spec.expected_file if self.spec.expected_file else self.dataset_dir

    def not_found(self, what: Path | None = None) -> DatasetNotFoundError:
        expected = what or self.expected_hint()
        return DatasetNotFoundError(f"{self.family} data not found: expected {expected}. {self.origin()}", expected)

    def open_source(self) -> Any:
        """The source reader's row store over the published files."""
        if not self.found:
            raise self.not_found()
        return self.spec.source(self)


def locate(name: str, data_dir: str | os.PathLike) -> Location:
    spec = get_dataset(name)
    data_dir = Path(data_dir).expanduser()
    prepared = data_dir / PREPARED_DIRNAME / spec.prepared_key
    if not data_dir.exists():
        loc = Location(spec, data_dir, data_dir / spec.folder, False, prepared)
        raise DatasetNotFoundError(
            f"data directory {data_dir} does not exist (expected {loc.expected_hint()}). {loc.origin()}", data_dir
        )
    sub = data_dir / spec.folder
    if sub.is_dir():
        return Location(spec, data_dir, sub, spec.looks_like(sub), prepared)
    if spec.looks_like(data_dir):
        return Location(spec, data_dir, data_dir, True, prepared)
    return Location(spec, data_dir, sub, False, prepared)
