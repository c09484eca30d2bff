"""TaxiBJ reader on synthetic data in the published format, its validation split and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmrnn.data import (
    DATASETS,
    DataError,
    DataFormatError,
    DatasetNotFoundError,
    build_dataset,
    taxibj,
    write_synthetic,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("taxibj-root")
    write_synthetic("taxibj", r, seed=3)
    return r


def _arrays(root):
    with np.load(root / "taxibj" / "dataset.npz") as z:
        return {k: z[k] for k in z.files}


def test_samples_are_the_published_arrays_mapped_to_unit_range(root):
    a = _arrays(root)
    test = build_dataset("taxibj", root, "test", prepared="never")
    assert len(test) == len(a["X_test"])
    for i in (0, len(test) - 1):
        x, y = test[i]
        assert x.dtype == torch.float32 and x.shape == (4, 2, 32, 32) and y.shape == (4, 2, 32, 32)
        assert torch.equal(x, torch.from_numpy(((a["X_test"][i] + 1) / 2).astype(np.float32)))
        assert torch.equal(y, torch.from_numpy(((a["Y_test"][i] + 1) / 2).astype(np.float32)))
        assert 0.0 <= float(x.min()) and float(y.max()) <= 1.0
    spec = DATASETS["taxibj"]
    assert (spec.in_frames, spec.out_frames, spec.channels, spec.height, spec.width, spec.preset) == (
        4,
        4,
        2,
        32,
        32,
        "taxibj",
    )


def test_data_dir_may_be_the_dataset_folder(root):
    a = build_dataset("taxibj", root / "taxibj", "test", prepared="never")
    b = build_dataset("taxibj", root, "test", prepared="never")
    assert len(a) == len(b) and torch.equal(a[3][1], b[3][1])


def test_validation_is_a_seeded_contiguous_block_with_guard(root):
    n = len(_arrays(root)["X_train"])
    train = build_dataset("taxibj", root, "train", prepared="never", seed=5)
    val = build_dataset("taxibj", root, "val", prepared="never", seed=5)
    vi, ti = val.indices, train.indices
    assert len(vi) == round(0.1 * n)
    assert np.array_equal(vi, np.arange(vi[0], vi[0] + len(vi)))  # contiguous
    assert set(ti).isdisjoint(range(vi[0] - 7, vi[-1] + 8))  # guard of 7 on both sides
    assert len(ti) + len(vi) + len(set(range(vi[0] - 7, vi[-1] + 8)) & set(range(n)) - set(vi)) == n
    # deterministic per seed; samples are the right rows
    again = build_dataset("taxibj", root, "val", prepared="never", seed=5)
    assert np.array_equal(again.indices, vi)
    starts = {int(build_dataset("taxibj", root, "val", prepared="never", seed=s).indices[0]) for s in range(8)}
    assert len(starts) > 1
    a = _arrays(root)
    assert torch.equal(val[0][0], torch.from_numpy(((a["X_train"][vi[0]] + 1) / 2).astype(np.float32)))


def test_val_fraction_zero_means_full_training_set(root):
    n = len(_arrays(root)["X_train"])
    assert len(build_dataset("taxibj", root, "train", val_fraction=0, prepared="never")) == n
    with pytest.raises(DataError, match="empty"):
        build_dataset("taxibj", root, "val", val_fraction=0, prepared="never")
    with pytest.raises(DataError, match="val_fraction"):
        build_dataset("taxibj", root, "val", val_fraction=1.5, prepared="never")


def test_bad_options(root):
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("taxibj", root, "valid")
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset("taxibj2", root, "train")
    with pytest.raises(DataError, match="unknown option"):
        build_dataset("taxibj", root, "train", length=3)
    with pytest.raises(DataError, match="seed"):
        build_dataset("taxibj", root, "train", seed=-1)


def test_missing_dataset_names_path_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("taxibj", tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "taxibj" / "dataset.npz") in msg and "taxibj_dataset.zip" in msg
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_dataset("taxibj", tmp_path / "nope", "train")
    (tmp_path / "taxibj").mkdir()
    with pytest.raises(DatasetNotFoundError, match="dataset.npz"):
        build_dataset("taxibj", tmp_path, "test")


def _write(tmp_path, **arrays):
    d = tmp_path / "taxibj"
    d.mkdir(exist_ok=True)
    np.savez(d / "dataset.npz", **arrays)
    return d / "dataset.npz"


def _good(n=3):
    rng = np.random.default_rng(0)
    keys = taxibj.KEYS["train"] + taxibj.KEYS["test"]
    return {k: rng.uniform(-1, 1, (n, 4, 2, 32, 32)).astype(np.float64) for k in keys}


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: a.pop("Y_test"), "missing key"),
        (lambda a: a.__setitem__("X_test", a["X_test"][:, :3]), r"shape \(3, 3, 2, 32, 32\)"),
        (lambda a: a.__setitem__("X_test", (a["X_test"] * 100).astype(np.int32)), "dtype int32"),
        (lambda a: a.__setitem__("Y_test", a["Y_test"][:2]), "has 3 samples but Y_test has 2"),
        (lambda a: a.__setitem__("X_test", a["X_test"] * 300), "normalised"),
        (lambda a: a["Y_test"].__setitem__((1, 2, 0, 5, 5), np.nan), "NaN"),
        (lambda a: a.__setitem__("X_test", a["X_test"][:0]), "empty"),
    ],
)
def test_bad_arrays_raise_naming_the_file(tmp_path, mutate, pattern):
    arrays = _good()
    mutate(arrays)
    path = _write(tmp_path, **arrays)
    with pytest.raises(DataFormatError, match=pattern) as e:
        build_dataset("taxibj", tmp_path, "test", prepared="never")
    assert str(path) in str(e.value)


def test_corrupt_and_truncated_npz(tmp_path):
    path = _write(tmp_path, **_good(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the zip directory is gone
    with pytest.raises(DataFormatError, match="npz") as e:
        build_dataset("taxibj", tmp_path, "train", prepared="never")
    assert str(path) in str(e.value)
    path.write_bytes(b"not a zip at all" * 100)
    with pytest.raises(DataFormatError, match=str(path)):
        build_dataset("taxibj", tmp_path, "train", prepared="never")
    # a compressed member whose bytes are corrupted (directory intact)
    np.savez_compressed(path, **_good(4))
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=str(path)):
        build_dataset("taxibj", tmp_path, "train", prepared="never")
