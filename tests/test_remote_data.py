"""Prepared data read from an object store: a real S3-protocol server (moto's ThreadedMotoServer) on
127.0.0.1, reached through pyarrow's S3 filesystem exactly as a cluster reaches S3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vmrnn.cli import main
from vmrnn.data import build_dataset, dataset_spec, prepare_dataset, write_synthetic
from vmrnn.data.errors import DataError, DataFormatError, DatasetNotFoundError
from vmrnn.data.remote import CACHE_ENV, RECORD, cache_prepared, is_remote, local_data_dir

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extras")
pafs = pytest.importorskip("pyarrow.fs")

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """(endpoint, filesystem able to create buckets) of a moto S3 server on 127.0.0.1."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
    yield endpoint, fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A local data root with synthetic taxibj and mmnist and their prepared copies."""
    root = tmp_path_factory.mktemp("local")
    for name in ("taxibj", "mmnist"):
        write_synthetic(name, root, seed=5)
        prepare_dataset(name, root)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


_bucket_no = iter(range(10_000))


def upload(s3, local_dir: Path, dest: str | None = None) -> tuple[str, str]:
    """Upload local_dir's prepared/ to a new bucket; returns (URI of the data root, its bucket path)."""
    endpoint, fs = s3
    bucket = f"bkt{next(_bucket_no)}"
    fs.create_dir(bucket)
    base = f"{bucket}/{dest or 'data'}"
    pafs.copy_files(str(local_dir / "prepared"), f"{base}/prepared", destination_filesystem=fs)
    return f"s3://{base}?endpoint_override={endpoint}&scheme=http&region=us-east-1", base


def _same(name: str, a, b, split: str) -> None:
    da, db = build_dataset(name, a, split), build_dataset(name, b, split)
    assert len(da) == len(db) > 0
    for i in (0, len(da) - 1):
        for x, y in zip(da[i], db[i], strict=True):
            assert np.array_equal(x.numpy(), y.numpy())


def test_is_remote():
    assert is_remote("s3://b/p") and is_remote("gs://b/p") and is_remote("hdfs://h/p")
    assert not is_remote("data") and not is_remote("/abs/data") and not is_remote("file:///abs/data")
    assert not is_remote(Path("s3://b/p"))
    assert local_data_dir("file:///abs/data") == Path("/abs/data")
    assert local_data_dir("~/d") == Path.home() / "d"


def test_build_dataset_reads_an_s3_uri_through_a_node_local_cache(s3, local, cache, capsys):
    uri, _ = upload(s3, local)
    for split in ("train", "val", "test"):
        _same("taxibj", uri, local, split)
    assert dataset_spec("taxibj", uri).frame_shape == (2, 32, 32)
    assert "vmrnn: cached s3://bkt" in capsys.readouterr().err  # copied once, then reused
    entries = [p for p in cache.glob("*/*") if p.is_dir()]
    assert len(entries) == 1
    entry = entries[0]
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == [
        RECORD,
        "prepared/taxibj/manifest.json",
        "prepared/taxibj/test.arrow",
        "prepared/taxibj/train.arrow",
    ]
    record = json.loads((entry / RECORD).read_text())
    assert record["uri"].startswith("s3://bkt") and "endpoint_override" not in record["uri"]
    assert len(record["files"]["prepared/taxibj/train.arrow"]["sha256"]) == 64
    assert cache_prepared(uri, "taxibj") == (entry, False)
    # the CLI's info reads the same URI
    assert main(["data", "info", "--dataset", "taxibj", "--data-dir", uri]) == 0
    assert f"prepared data at {entry / 'prepared' / 'taxibj'}" in capsys.readouterr().out


def test_a_uri_of_a_prepared_folder_and_of_all_prepared_data(s3, local):
    uri, base = upload(s3, local)
    folder_uri = uri.replace("/data?", "/data/prepared/mmnist?")
    _same("mmnist", folder_uri, local, "test")
    path, copied = cache_prepared(uri)  # no key: every prepared dataset under the root
    assert copied and sorted(p.name for p in (path / "prepared").iterdir()) == ["mmnist", "taxibj"]


def test_workers_on_one_node_download_once(s3, local, cache, tmp_path):
    uri, _ = upload(s3, local)
    go = tmp_path / "go"
    code = (
        f"import json, os, sys, time\nfrom vmrnn.data.remote import cache_prepared\n"
        f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"path, copied = cache_prepared(sys.argv[1], 'mmnist')\nprint(json.dumps([str(path), copied]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), CACHE_ENV: str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({path for path, _ in results}) == 1
    assert sum(copied for _, copied in results) == 1
    _same("mmnist", results[0][0], local, "test")


def test_new_upload_gives_a_new_entry_and_a_damaged_cache_is_fetched_again(s3, local, tmp_path):
    uri, base = upload(s3, local)
    first, copied = cache_prepared(uri, "taxibj")
    assert copied
    other = tmp_path / "other"
    write_synthetic("taxibj", other, seed=9)
    prepare_dataset("taxibj", other)
    _, fs = s3
    pafs.copy_files(str(other / "prepared"), f"{base}/prepared", destination_filesystem=fs)  # re-upload
    second, copied = cache_prepared(uri, "taxibj")
    assert copied and second != first and first.is_dir()  # a running trial keeps its files
    _same("taxibj", second, other, "test")
    part = second / "prepared" / "taxibj" / "train.arrow"
    part.write_bytes(part.read_bytes()[:100])
    assert cache_prepared(uri, "taxibj") == (second, True)
    _same("taxibj", second, other, "train")


def test_bad_remote_data_is_one_clear_error(s3, local, cache):
    endpoint, fs = s3
    uri, base = upload(s3, local)
    with pytest.raises(DatasetNotFoundError) as exc:
        build_dataset("taxibj", uri.replace("/data?", "/nothing?"), "train")
    msg = str(exc.value)
    assert "no prepared data at s3://" in msg and "/nothing/prepared/taxibj/manifest.json" in msg
    assert "vmrnn data prepare" in msg and "\n" not in msg
    train = local / "prepared" / "taxibj" / "train.arrow"
    with fs.open_output_stream(f"{base}/prepared/taxibj/train.arrow") as f:  # a broken upload
        f.write(train.read_bytes()[:1000])
    with pytest.raises(DataFormatError, match=r"train.arrow has 1000 bytes, its manifest says \d+; upload"):
        build_dataset("taxibj", uri, "train")
    assert not [p for p in cache.glob("*/*") if p.is_dir()]  # nothing cached as complete
    secret = (
        f"s3://AKIDEXAMPLE:hunter2secret@{base}?endpoint_override=http://127.0.0.1:1&scheme=http"
        "&region=us-east-1"
    )  # credentials in the URI, and nothing listening at the endpoint
    with pytest.raises(DataError) as exc:
        time_0 = time.time()
        build_dataset("taxibj", secret, "train")
    assert "hunter2secret" not in str(exc.value) and "cannot read s3://" in str(exc.value)
    assert time.time() - time_0 < 120
    with pytest.raises(DataError, match="cannot open"):
        local_data_dir("nosuchscheme://bucket/data")


def test_sweeps_and_training_configs_keep_an_object_store_uri(monkeypatch):
    import runpy

    from vmrnn.train.config import TrainConfig
    from vmrnn.tune.sweep import build_parser, resolve_settings

    uri = "s3://bucket/vmrnn/data"
    spec = runpy.run_path(str(REPO / "sweeps" / "taxibj.py"))["SPEC"]
    assert resolve_settings(spec, build_parser(spec).parse_args(["--data-dir", uri]), {})["data_dir"] == uri
    monkeypatch.setenv("VMRNN_DATA_DIR", uri)
    assert resolve_settings(spec, build_parser(spec).parse_args([]), {})["data_dir"] == uri
    monkeypatch.setenv("VMRNN_DATA_DIR", "~/d")
    assert resolve_settings(spec, build_parser(spec).parse_args([]), {})["data_dir"] == str(Path.home() / "d")
    assert TrainConfig.from_dict({"dataset": "taxibj", "data_dir": uri, "tracking": False}).resolved().data_dir == uri
