"""Synthetic data: published layouts, seeded determinism, learnable dynamics, safe overwrite."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from vmrnn.data import DataError, build_dataset, write_synthetic
from vmrnn.data.synth import MARKER


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("synth")
    for name in ("taxibj", "kth", "mmnist", "custom"):
        write_synthetic(name, r, seed=1)
    return r


@pytest.mark.parametrize("name", ["taxibj", "kth", "mmnist", "custom"])
def test_seeded_and_small(root, tmp_path, name):
    a = root / {"mmnist": "moving_mnist"}.get(name, name)
    b = write_synthetic(name, tmp_path / "b", seed=1)
    c = write_synthetic(name, tmp_path / "c", seed=2)
    assert b == tmp_path / "b" / {"mmnist": "moving_mnist"}.get(name, name)
    assert digest(a) == digest(b) != digest(c)
    assert sum(p.stat().st_size for p in a.rglob("*") if p.is_file()) < 8 * 2**20
    assert (a / MARKER).is_file()


def test_layouts(root):
    tmp_path = root
    with np.load(tmp_path / "taxibj" / "dataset.npz") as z:
        assert sorted(z.files) == ["X_test", "X_train", "Y_test", "Y_train"]
        assert z["X_train"].shape[1:] == (4, 2, 32, 32) and -1 <= z["X_train"].min() and z["Y_test"].max() <= 1
    persons = {int(p.name[6:8]) for p in (tmp_path / "kth" / "walking").iterdir()}
    assert persons & set(range(1, 16)) and 16 in persons and persons & set(range(17, 26))
    assert (tmp_path / "moving_mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert (tmp_path / "custom" / "meta.json").is_file()


def test_taxibj_dynamics_are_learnable(root):
    ds = build_dataset("taxibj", root, "train", val_fraction=0, prepared="never")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    persistence = (y - x[:, -1:]).square().mean()  # predict "the last input frame"
    shuffled = (y - x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0)), -1:]).square().mean()
    assert persistence < 0.5 * shuffled  # frames follow from their past


def test_kth_frames_move(root):
    ds = build_dataset("kth", root, "test", prepared="never")
    for i in (0, len(ds) - 1):
        x, _ = ds[i]
        assert (x[1:] - x[:-1]).abs().amax() > 0.2  # the silhouette moves


def test_overwrite_only_synthetic_folders(tmp_path):
    write_synthetic("custom", tmp_path)
    with pytest.raises(DataError, match="already exists"):
        write_synthetic("custom", tmp_path)
    write_synthetic("custom", tmp_path, seed=3, overwrite=True)
    real = tmp_path / "r" / "taxibj"
    real.mkdir(parents=True)
    (real / "dataset.npz").write_bytes(b"precious")
    with pytest.raises(DataError, match="refusing"):
        write_synthetic("taxibj", tmp_path / "r", overwrite=True)
    assert (real / "dataset.npz").read_bytes() == b"precious"
    with pytest.raises(DataError, match="unknown size"):
        write_synthetic("custom", tmp_path / "x", size="huge")
