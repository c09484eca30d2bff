"""Where each dataset lives under a data root, where it comes from, and where its prepared copy goes.

A *data root* holds one folder per dataset::

    <root>/taxibj/dataset.npz
    <root>/kth/{boxing,handclapping,handwaving,jogging,running,walking}/personXX_<action>_dY_uncomp/image_NNNN.png
    <root>/moving_mnist/{train-images-idx3-ubyte.gz,mnist_test_seq.npy}
    <root>/custom/{meta.json,train.npy,test.npy[,val.npy]}
    <root>/prepared/<key>/{manifest.json,*.arrow}        (written by `vmrnn data prepare`)

`data_dir` may also point straight at a dataset folder (e.g. ``<root>/taxibj``) or at a prepared
folder (one holding ``manifest.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmrnn.data.errors import DataError, DatasetNotFoundError

# dataset name -> family (the reader that handles it)
FAMILY = {"taxibj": "taxibj", "kth": "kth", "kth40": "kth", "mmnist": "mmnist", "custom": "custom"}
# family -> folder name under the data root
FOLDER = {"taxibj": "taxibj", "kth": "kth", "mmnist": "moving_mnist", "custom": "custom"}
KTH_ACTIONS = ("boxing", "handclapping", "handwaving", "jogging", "running", "walking")
PREPARED_DIRNAME = "prepared"

ORIGIN = {
    "taxibj": ("TaxiBJ comes from the OpenSTL release asset taxibj_dataset.zip (see OpenSTL "
               "tools/prepare_data/download_taxibj.sh); unzip it so that {expected} exists"),
    "kth": ("KTH comes from the OpenSTL release asset kth_action.zip (the PredRNN image version; see OpenSTL "
            "tools/prepare_data/download_kth.sh); unzip it so that {expected}/boxing/"
            "person01_boxing_d1_uncomp/image_0001.png and the other actions exist"),
    "mmnist": ("Moving MNIST needs train-images-idx3-ubyte.gz (the MNIST training images) and mnist_test_seq.npy, "
               "both linked from the Moving MNIST page http://www.cs.toronto.edu/~nitish/unsupervised_video/; "
               "put them in {expected}"),
    "custom": ("a custom dataset is a folder with meta.json, train.npy and test.npy (see docs/DATA.md, "
               "'Custom format'); expected at {expected}"),
}
SYNTH_HINT = "(or write a synthetic stand-in in the same layout: `vmrnn data synth --dataset {family} --out DIR`)"


def family_of(name: str) -> str:
    try:
        return FAMILY[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(FAMILY)}") from None


def prepared_key(name: str) -> str:
    """Name of the prepared folder: kth and kth40 share one (the windows are chosen at load time)."""
    return family_of(name)


def looks_like(family: str, d: Path) -> bool:
    """Whether folder `d` itself is a dataset folder of this family."""
    if family == "taxibj":
        return (d / "dataset.npz").exists()
    if family == "kth":
        return any((d / a).is_dir() for a in KTH_ACTIONS)
    if family == "mmnist":
        return any((d / f).exists() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte",
                                               "mnist_test_seq.npy"))
    if family == "custom":
        return (d / "meta.json").exists()
    raise AssertionError(family)


@dataclass(frozen=True)
class Location:
    """Result of resolving `data_dir` for one dataset."""

    family: str
    data_dir: Path          # what the user gave
    dataset_dir: Path       # the dataset folder (may not exist)
    found: bool             # whether the dataset folder exists and looks like this dataset
    prepared_dir: Path      # default prepared folder for this dataset

    def origin(self) -> str:
        return ORIGIN[self.family].format(expected=self.expected_hint()) + " " + \
            SYNTH_HINT.format(family=self.family)

    def expected_hint(self) -> Path:
        if self.family == "taxibj":
            return self.dataset_dir / "dataset.npz"
        return self.dataset_dir

    def not_found(self, what: Path | None = None) -> DatasetNotFoundError:
        expected = what or self.expected_hint()
        return DatasetNotFoundError(
            f"{self.family} data not found: expected {expected}. {self.origin()}", expected)


def locate(name: str, data_dir: str | os.PathLike) -> Location:
    family = family_of(name)
    data_dir = Path(data_dir).expanduser()
    key = prepared_key(name)
    if not data_dir.exists():
        loc = Location(family, data_dir, data_dir / FOLDER[family], False, data_dir / PREPARED_DIRNAME / key)
        raise DatasetNotFoundError(f"data directory {data_dir} does not exist (expected {loc.expected_hint()}). "
                                   f"{loc.origin()}", data_dir)
    sub = data_dir / FOLDER[family]
    if sub.is_dir():
        return Location(family, data_dir, sub, looks_like(family, sub), data_dir / PREPARED_DIRNAME / key)
    if looks_like(family, data_dir):
        return Location(family, data_dir, data_dir, True, data_dir / PREPARED_DIRNAME / key)
    return Location(family, data_dir, sub, False, data_dir / PREPARED_DIRNAME / key)
