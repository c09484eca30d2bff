"""Moving MNIST: the official trajectory rule, deterministic on-the-fly generation, splits, bad files."""

from __future__ import annotations

import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vmrnn.data import DATASETS, DataError, DataFormatError, DatasetNotFoundError, build_dataset, write_synthetic
from vmrnn.data.mmnist import bounce_trajectory, read_idx_images


def write_idx(path, images, magic=2051, dims=None, extra=b"", cut=0):
    n, r, c = images.shape
    raw = struct.pack(">IIII", magic, n, *(dims or (r, c))) + images.astype(np.uint8).tobytes() + extra
    data = gzip.compress(raw)
    path.write_bytes(data[: len(data) - cut] if cut else data)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """200 digits, digit k a constant 28x28 square of value k + 1 (so pixels reveal which digits were used)."""
    r = tmp_path_factory.mktemp("mm-coded")
    d = r / "moving_mnist"
    d.mkdir()
    digits = np.stack([np.full((28, 28), k + 1, np.uint8) for k in range(200)])
    write_idx(d / "train-images-idx3-ubyte.gz", digits)
    rng = np.random.default_rng(0)
    np.save(d / "mnist_test_seq.npy", rng.integers(0, 256, (20, 7, 64, 64), dtype=np.uint8))
    return r


def test_trajectory_rule_by_hand():
    # x = 0.95 moving right (theta = 0): the first step (frame 0 included) overshoots, is clamped to 1 and flips
    rows, cols = bounce_trajectory(0.95, 0.5, 0.0, 5)
    assert cols.tolist() == [36, 32, 28, 25, 21]  # int(36 * [1.0, 0.9, 0.8, 0.7, 0.6]) (0.7*36 = 25.2)
    assert rows.tolist() == [18] * 5
    # x = 0.05 moving left (theta = pi): clamped at 0, then moves right
    rows, cols = bounce_trajectory(0.05, 0.25, math.pi, 3)
    assert cols.tolist() == [0, 3, 7]  # int(36 * [0, 0.1, 0.2])
    # diagonal bounce off the bottom: y = 0.97, theta = pi/2 (down in image rows)
    rows, cols = bounce_trajectory(0.5, 0.97, math.pi / 2, 3)
    assert rows.tolist() == [36, 32, 28] and cols.tolist() == [18, 18, 18]
    assert rows.dtype == np.int32


def _expected_sequence(digits, seed_words, lo, hi):
    """Independent re-statement of the documented generation: per digit draw x, y, theta, index; every
    frame steps first; max-paste; uint8."""
    rng = np.random.default_rng(seed_words)
    out = np.zeros((20, 64, 64), np.uint8)
    for _ in range(2):
        x, y, theta = rng.random(), rng.random(), rng.random() * 2 * math.pi
        k = int(rng.integers(lo, hi))
        rows, cols = bounce_trajectory(x, y, theta, 20)
        for t in range(20):
            r, c = rows[t], cols[t]
            out[t, r : r + 28, c : c + 28] = np.maximum(out[t, r : r + 28, c : c + 28], digits[k])
    return out


def test_generation_is_a_pure_function_of_seed_epoch_index(coded):
    digits = read_idx_images(coded / "moving_mnist" / "train-images-idx3-ubyte.gz")
    ds = build_dataset("mmnist", coded, "train", seed=7, prepared="never")
    assert len(ds) == 10_000
    x, y = ds[123]
    assert x.shape == (10, 1, 64, 64) and y.shape == (10, 1, 64, 64) and x.dtype == torch.float32
    seq = np.concatenate([x, y])[:, 0]
    expect = _expected_sequence(digits, [0, 7, 0, 123], 0, 180)
    assert np.array_equal(seq, expect.astype(np.float32) / np.float32(255))
    # same (seed, epoch, index) -> same sample, in a new object and after pickling
    again = pickle.loads(pickle.dumps(build_dataset("mmnist", coded, "train", seed=7, prepared="never")))
    assert torch.equal(again[123][1], y)
    # another epoch or seed -> another sample; set_epoch back -> the same again
    ds.set_epoch(1)
    assert not torch.equal(ds[123][1], y)
    ds.set_epoch(0)
    assert torch.equal(ds[123][1], y)
    assert not torch.equal(build_dataset("mmnist", coded, "train", seed=8, prepared="never")[123][1], y)
    assert torch.equal(
        build_dataset("mmnist", coded, "train", seed=7, epoch=1, prepared="never")[5][0], (ds.set_epoch(1), ds[5][0])[1]
    )


def test_train_and_val_use_disjoint_digits(coded):
    train = build_dataset("mmnist", coded, "train", length=60, prepared="never")
    val = build_dataset("mmnist", coded, "val", prepared="never")
    assert len(val) == 1000
    tv = set(np.unique(np.concatenate([torch.cat(train[i]).mul(255).round().numpy().ravel() for i in range(60)])))
    vv = set(np.unique(np.concatenate([torch.cat(val[i]).mul(255).round().numpy().ravel() for i in range(60)])))
    assert max(tv) <= 180 and len(tv) > 20  # digits 0..179 (values 1..180)
    assert min(vv - {0}) >= 181 and max(vv) <= 200  # held-out digits 180..199
    # the val set is fixed: independent of the epoch
    v0 = val[3][0]
    val.set_epoch(5)
    assert torch.equal(val[3][0], v0)
    assert len(build_dataset("mmnist", coded, "val", val_length=50, prepared="never")) == 50
    with pytest.raises(DataError, match="empty"):
        build_dataset("mmnist", coded, "val", val_fraction=0, prepared="never")
    with pytest.raises(DataError, match="length"):
        build_dataset("mmnist", coded, "train", length=0, prepared="never")


def test_test_split_reads_mnist_test_seq(coded):
    arr = np.load(coded / "moving_mnist" / "mnist_test_seq.npy")
    ds = build_dataset("mmnist", coded, "test", prepared="never")
    assert len(ds) == 7
    x, y = ds[4]
    assert torch.equal(x[:, 0], torch.from_numpy(arr[:10, 4].astype(np.float32) / np.float32(255)))
    assert torch.equal(y[:, 0], torch.from_numpy(arr[10:, 4].astype(np.float32) / np.float32(255)))


def test_dataloader_workers_see_the_same_samples(coded):
    ds = build_dataset("mmnist", coded, "train", length=32, seed=3, prepared="never")
    ds.set_epoch(2)
    direct = torch.stack([ds[i][1] for i in range(32)])
    loaded = torch.cat([y for _, y in DataLoader(ds, batch_size=8, num_workers=2)])
    assert torch.equal(direct, loaded)


def test_synthetic_files_are_in_the_published_format(tmp_path):
    write_synthetic("mmnist", tmp_path, seed=2)
    d = tmp_path / "moving_mnist"
    raw = gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())
    magic, n, r, c = struct.unpack(">IIII", raw[:16])
    assert (magic, r, c) == (2051, 28, 28) and len(raw) == 16 + n * 784
    seq = np.load(d / "mnist_test_seq.npy")
    assert seq.dtype == np.uint8 and seq.shape[0] == 20 and seq.shape[2:] == (64, 64)
    assert DATASETS["mmnist"].in_frames == 10 and DATASETS["mmnist"].preset == "mmnist"
    x, y = build_dataset("mmnist", tmp_path, "train", prepared="never")[0]
    assert float(x.max()) > 0.5  # digits are visible


def test_missing_files_name_path_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("mmnist", tmp_path, "train")
    assert "moving_mnist" in str(e.value) and "unsupervised_video" in str(e.value)
    d = tmp_path / "moving_mnist"
    d.mkdir()
    np.save(d / "mnist_test_seq.npy", np.zeros((20, 2, 64, 64), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz"):
        build_dataset("mmnist", tmp_path, "test")


def _tree(tmp_path):
    d = tmp_path / "moving_mnist"
    d.mkdir(exist_ok=True)
    np.save(d / "mnist_test_seq.npy", np.zeros((20, 2, 64, 64), np.uint8))
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    return d


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"magic": 2049}, "magic number 2049"),
        ({"dims": (32, 32)}, "32x32"),
        ({"extra": b"xx"}, "trailing bytes"),
        ({"cut": 30}, "corrupt or truncated"),
    ],
)
def test_bad_idx_file(tmp_path, kw, pattern):
    d = _tree(tmp_path)
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8), **kw)
    with pytest.raises(DataFormatError, match=pattern) as e:
        build_dataset("mmnist", tmp_path, "train", prepared="never")
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_idx_header_count_larger_than_data(tmp_path):
    d = _tree(tmp_path)
    raw = struct.pack(">IIII", 2051, 50, 28, 28) + bytes(10 * 784)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataFormatError, match="truncated"):
        build_dataset("mmnist", tmp_path, "train", prepared="never")


@pytest.mark.parametrize(
    "arr, pattern",
    [
        (np.zeros((19, 2, 64, 64), np.uint8), r"shape \(19, 2, 64, 64\)"),
        (np.zeros((20, 2, 64, 64), np.float32), "dtype float32"),
        (np.zeros((2, 20, 64, 64), np.uint8), "expected .20, N, 64, 64"),
    ],
)
def test_bad_test_file(tmp_path, arr, pattern):
    d = _tree(tmp_path)
    np.save(d / "mnist_test_seq.npy", arr)
    with pytest.raises(DataFormatError, match=pattern) as e:
        build_dataset("mmnist", tmp_path, "test", prepared="never")
    assert "mnist_test_seq.npy" in str(e.value)


def test_truncated_test_file(tmp_path):
    d = _tree(tmp_path)
    data = (d / "mnist_test_seq.npy").read_bytes()
    (d / "mnist_test_seq.npy").write_bytes(data[:-100])
    with pytest.raises(DataFormatError, match="truncated") as e:
        build_dataset("mmnist", tmp_path, "test", prepared="never")
    assert "mnist_test_seq.npy" in str(e.value)
    (d / "mnist_test_seq.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataFormatError, match="mnist_test_seq.npy"):
        build_dataset("mmnist", tmp_path, "test", prepared="never")
