"""The prepared (Arrow) format: bit-exact with the source, checksummed, lazily memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vmrnn.data import (
    DataError,
    DataFormatError,
    DatasetNotFoundError,
    StalePreparedWarning,
    build_dataset,
    dataset_spec,
    prepare_dataset,
    write_synthetic,
)
from vmrnn.data.arrowio import ArrowRows

FAMILIES = ("taxibj", "kth", "mmnist", "custom")
OPTS = {"mmnist": {"length": 64, "val_length": 32}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("prepared-root")
    for name in FAMILIES:
        write_synthetic(name, r, seed=11)
        prepare_dataset(name, r, workers=0)
    return r


def _same(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb), i


@pytest.mark.parametrize("name", ["taxibj", "kth", "kth40", "mmnist", "custom"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_prepared_samples_equal_source_samples_bit_for_bit(root, name, split):
    kw = OPTS.get(name, {})
    src = build_dataset(name, root, split, prepared="never", seed=4, **kw)
    prep = build_dataset(name, root, split, prepared="require", seed=4, **kw)
    auto = build_dataset(name, root, split, seed=4, **kw)
    rows = getattr(prep, "rows", None) or getattr(prep, "digits", None)
    assert isinstance(rows, ArrowRows)
    assert isinstance(getattr(auto, "rows", None) or getattr(auto, "digits", None), ArrowRows)  # auto picks it
    _same(src, prep)


def test_manifest_records_shapes_and_source_checksums(root):
    m = json.loads((root / "prepared" / "taxibj" / "manifest.json").read_text())
    assert m["format"] == "vmrnn-prepared" and m["format_version"] == 1 and m["dataset"] == "taxibj"
    (f,) = m["source"]["files"]
    npz = root / "taxibj" / "dataset.npz"
    assert f["path"] == "dataset.npz" and f["size"] == npz.stat().st_size
    assert f["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert m["parts"]["train"]["row_shape"] == [8, 2, 32, 32] and m["parts"]["train"]["dtype"] == "float32"
    with np.load(npz) as z:
        assert m["parts"]["train"]["rows"] == len(z["X_train"]) and m["parts"]["test"]["rows"] == len(z["X_test"])
    k = json.loads((root / "prepared" / "kth" / "manifest.json").read_text())
    assert k["parts"]["train"]["row_shape"] == [128, 128] and k["parts"]["train"]["dtype"] == "uint8"
    assert k["source"]["kind"] == "tree" and len(k["source"]["content_sha256"]) == 64
    assert k["kth"]["resize"] == "pillow-bilinear"
    assert k["kth"]["parts"]["test"]["videos"][0][2] >= 17
    mm = json.loads((root / "prepared" / "mmnist" / "manifest.json").read_text())
    assert set(mm["parts"]) == {"digits", "test"} and mm["parts"]["test"]["row_shape"] == [20, 1, 64, 64]
    assert dataset_spec("custom", root / "prepared" / "custom").height == 32


def test_pickled_datasets_are_small_and_reopen_lazily(root):
    ds = build_dataset("kth", root, "train")
    ds[0]  # opens the map in this process
    assert ds.rows._lazy_views is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert clone.rows._lazy_views is None
    assert torch.equal(clone[len(ds) - 1][1], ds[len(ds) - 1][1])


def test_dataloader_workers_read_the_prepared_files(root):
    ds = build_dataset("taxibj", root, "train")
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    loaded = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, num_workers=2)])
    assert torch.equal(direct, loaded)


@pytest.fixture()
def copy(root, tmp_path):
    for d in ("taxibj", "kth", "prepared"):
        shutil.copytree(root / d, tmp_path / d, copy_function=shutil.copy2)
    return tmp_path


def test_changed_source_makes_prepared_stale(copy):
    npz = copy / "taxibj" / "dataset.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["X_test"][0, 0, 0, 0, 0] = -0.5
    np.savez_compressed(npz, **arrays)
    with pytest.warns(StalePreparedWarning, match="stale"):
        ds = build_dataset("taxibj", copy, "test")
    assert not isinstance(ds.rows, ArrowRows) and float(ds[0][0][0, 0, 0, 0]) == 0.25
    with pytest.raises(DataError, match="does not match the source"):
        build_dataset("taxibj", copy, "test", prepared="require")
    prepare_dataset("taxibj", copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("taxibj", copy, "test")
    assert isinstance(ds.rows, ArrowRows) and float(ds[0][0][0, 0, 0, 0]) == 0.25


def test_touched_but_unchanged_source_is_rehashed_and_accepted(copy):
    npz = copy / "taxibj" / "dataset.npz"
    st = npz.stat()
    os.utime(npz, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("taxibj", copy, "train")
    assert isinstance(ds.rows, ArrowRows)
    m = json.loads((copy / "prepared" / "taxibj" / "manifest.json").read_text())
    assert m["source"]["files"][0]["mtime_ns"] == st.st_mtime_ns + 10**9  # refreshed: next check is cheap


def test_changed_kth_frame_makes_prepared_stale(copy):
    f = next((copy / "kth" / "running").glob("person17_*/image_0003.png"))
    Image.new("RGB", (160, 120), (1, 2, 3)).save(f)
    with pytest.warns(StalePreparedWarning):
        ds = build_dataset("kth", copy, "test")
    assert not isinstance(ds.rows, ArrowRows)
    # a touched but identical tree is accepted after re-hashing
    prepare_dataset("kth", copy, workers=0)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(build_dataset("kth", copy, "test").rows, ArrowRows)
    f.unlink()
    with pytest.warns(StalePreparedWarning, match="frame files"):
        build_dataset("kth", copy, "test")


def test_prepared_copy_alone_is_enough(copy, root):
    shutil.rmtree(copy / "taxibj")
    ds = build_dataset("taxibj", copy, "test")
    assert isinstance(ds.rows, ArrowRows)
    _same(ds, build_dataset("taxibj", root, "test", prepared="never"))
    # data_dir pointing at the prepared folder itself, and an explicit prepared folder
    assert len(build_dataset("taxibj", copy / "prepared" / "taxibj", "test")) == len(ds)
    assert len(build_dataset("taxibj", copy / "elsewhere", "test", prepared=copy / "prepared" / "taxibj")) == len(ds)
    with pytest.raises(DatasetNotFoundError):
        build_dataset("taxibj", copy, "test", prepared="never")
    with pytest.raises(DataError, match="not 'kth'"):
        build_dataset("kth", copy / "prepared" / "taxibj", "test")


def test_require_without_prepared_copy(tmp_path):
    data = tmp_path / "my data"  # a space: the printed command quotes the folder
    write_synthetic("custom", data)
    with pytest.raises(DatasetNotFoundError, match="vmrnn data prepare") as err:
        build_dataset("custom", data, "train", prepared="require")
    # The command the error prints runs as printed, from a shell without the venv on PATH, and prepares the data.
    command = re.search(r"run `([^`]+)`", str(err.value)).group(1)
    venv_bin = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    ran = subprocess.run(["bash", "-c", command], env=dict(os.environ, PATH=path), capture_output=True, text=True)
    assert ran.returncode == 0, (command, ran.stderr[-2000:])
    assert len(build_dataset("custom", data, "train", prepared="require")) > 0
    with pytest.raises(DataError, match="prepared must be"):
        build_dataset("custom", tmp_path, "train", prepared=3)


def test_damaged_prepared_files(copy):
    pdir = copy / "prepared" / "taxibj"
    data = (pdir / "test.arrow").read_bytes()
    (pdir / "test.arrow").write_bytes(data[:-100])
    with pytest.raises(DataFormatError, match="test.arrow.*truncated"):
        build_dataset("taxibj", copy, "test", prepared="require")
    (pdir / "test.arrow").write_bytes(b"x" * len(data))
    ds = build_dataset("taxibj", copy, "test", prepared="require")  # sizes match: opened lazily
    with pytest.raises(DataFormatError, match="test.arrow: not a readable Arrow"):
        ds[0]
    m = json.loads((pdir / "manifest.json").read_text())
    m["format_version"] = 99
    (pdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataFormatError, match="format version 99"):
        build_dataset("taxibj", copy, "test", prepared="require")
    (pdir / "manifest.json").write_text("{")
    with pytest.raises(DataFormatError, match="unreadable manifest"):
        build_dataset("taxibj", copy, "test", prepared="require")


def test_float_custom_data_is_stored_as_float32_bit_exact(tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "meta.json").write_text('{"in_frames": 2, "out_frames": 1}')
    rng = np.random.default_rng(1)
    np.save(d / "train.npy", rng.random((6, 3, 2, 8, 8)))  # float64
    np.save(d / "test.npy", rng.random((2, 3, 2, 8, 8)).astype(np.float16))
    prepare_dataset("custom", tmp_path)
    for split in ("train", "val", "test"):
        _same(
            build_dataset("custom", tmp_path, split, prepared="never"),
            build_dataset("custom", tmp_path, split, prepared="require"),
        )


def test_prepare_rejects_bad_sources(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        prepare_dataset("taxibj", tmp_path)
    vdir = tmp_path / "kth" / "boxing" / "person01_boxing_d1_uncomp"
    vdir.mkdir(parents=True)
    for k in range(1, 31):
        Image.new("L", (64, 48) if k == 7 else (160, 120)).save(vdir / f"image_{k:04d}.png")
    with pytest.raises(DataFormatError, match="image_0007.png: image is 64x48"):
        prepare_dataset("kth", tmp_path, workers=0)
    assert not (tmp_path / "prepared" / "kth" / "manifest.json").exists()
    assert not list((tmp_path / "prepared" / "kth").glob("*.partial"))
    d = tmp_path / "custom"
    d.mkdir()
    (d / "meta.json").write_text('{"in_frames": 1, "out_frames": 1}')
    bad = np.zeros((3, 2, 1, 8, 8), np.float32)
    bad[2, 1, 0, 0, 0] = 2.0
    np.save(d / "train.npy", bad)
    np.save(d / "test.npy", bad[:1])
    with pytest.raises(DataFormatError, match="train.npy: sample 2"):
        prepare_dataset("custom", tmp_path)
