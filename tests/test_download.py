"""`vmrnn data download` against a real HTTP server on 127.0.0.1 (with Range support) that serves synthetic
data in the published formats, zipped as the real archives are. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import struct
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from vmrnn.cli import main
from vmrnn.data import DATASETS, build_dataset, download_names, get_dataset, write_synthetic
from vmrnn.data.download import MIRROR_ENV, RECORD, Checksum, DownloadError, download_dataset
from vmrnn.data.errors import DataError, DatasetNotFoundError
from vmrnn.data.locks import file_lock
from vmrnn.data.synth import MARKER

MNIST_FILES = ("train-images-idx3-ubyte.gz", "mnist_test_seq.npy")


# ------------------------------------------------------------------------------------------- the server


class FileServer(ThreadingHTTPServer):
    """Serves `files` by name. Range requests (bytes=N-) get 206, guarded by If-Range on the ETag.
    `cut` makes the next GET of a file stop after that many body bytes ("close": a clean FIN, "reset":
    an RST); `claim` announces another Content-Length. Every GET is logged as (name, Range, If-Range)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, tuple[int, str]] = {}
        self.claim: dict[str, int] = {}
        self.log: list[tuple[str, str | None, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        name = self.path.lstrip("/")
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        srv.log.append((name, rng, if_range))
        if name not in srv.files:
            self.send_error(404)
            return
        data = srv.files[name]
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        start, status = 0, 200
        if rng and if_range in (None, etag):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(srv.claim.get(name, len(body))))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if name in srv.claim:
            self.close_connection = True
            return
        if name in srv.cut:
            n, how = srv.cut.pop(name)
            self.wfile.write(body[:n])
            self.wfile.flush()
            if how == "reset":  # after the client has read what was sent (an RST discards unread data)
                time.sleep(0.5)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


# ------------------------------------------------------------------------------------------- fixtures


def _zip_tree(src: Path, dest: Path, prefix: str = "", junk: bool = False) -> bytes:
    """Zip `src`'s content (not the synthetic marker) under `prefix`, as the published archives are."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        if prefix:
            zf.writestr(prefix, "")
        for p in sorted(src.rglob("*")):
            if p.name == MARKER:
                continue
            rel = prefix + p.relative_to(src).as_posix()
            if p.is_dir():
                zf.writestr(rel + "/", "")
            else:
                zf.write(p, rel)
        if junk:  # what a zip made on macOS carries
            zf.writestr("__MACOSX/._boxing", b"\0\5\26\7")
    return dest.read_bytes()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published files, made from synthetic data: name -> bytes, plus the synthetic roots."""
    d = tmp_path_factory.mktemp("published")
    src = d / "src"
    for name in ("taxibj", "kth", "mmnist"):
        write_synthetic(name, src, seed=3)
    files = {
        "taxibj_dataset.zip": _zip_tree(src / "taxibj", d / "taxibj_dataset.zip"),
        "kth_action.zip": _zip_tree(src / "kth", d / "kth_action.zip"),
        "kth_action_nested.zip": _zip_tree(src / "kth", d / "kth_action_nested.zip", "kth_action/", junk=True),
    }
    for name in MNIST_FILES:
        files[name] = (src / "moving_mnist" / name).read_bytes()
    return files, src


def _digests(files: dict[str, bytes]) -> dict[str, Checksum]:
    return {n: Checksum(sha256=hashlib.sha256(b).hexdigest(), size=len(b)) for n, b in files.items()}


def _same_samples(name: str, a: Path, b: Path, split: str, n: int = 3) -> None:
    da, db = build_dataset(name, a, split, prepared="never"), build_dataset(name, b, split, prepared="never")
    assert len(da) == len(db) > 0
    for i in range(min(n, len(da))):
        for x, y in zip(da[i], db[i], strict=True):
            assert np.array_equal(x.numpy(), y.numpy())


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------- tests


def test_table_names_the_published_sources():
    assert download_names() == ("taxibj", "kth", "mmnist")
    urls = {sf.name: sf.urls for name in download_names() for sf in get_dataset(name).downloads}
    assert urls["taxibj_dataset.zip"] == (
        "https://github.com/chengtan9907/OpenSTL/releases/download/v0.1.0/taxibj_dataset.zip",
    )
    assert urls["kth_action.zip"][0].endswith("/v0.1.0/kth_action.zip")
    assert urls["mnist_test_seq.npy"] == ("http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy",)
    train = get_dataset("mmnist").downloads[0].checksum
    assert train.size == 9912422 and train.md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873" and len(train.sha256) == 64


def test_cli_downloads_taxibj_that_the_loaders_read(tmp_path, server, published, capsys):
    files, src = published
    server.files.update(files)
    root = tmp_path / "data"
    argv = ["data", "download", "--dataset", "taxibj", "--data-dir", str(root), "--mirror", server.url, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"taxibj is in {root / 'taxibj'}" in out and "source data at" in out
    assert re.search(r"train +\d+ samples", out) and re.search(r"test +\d+ samples", out)
    assert (root / "taxibj" / "dataset.npz").is_file() and not (root / "taxibj" / MARKER).exists()
    assert not list((root / ".downloads").glob("taxibj_dataset.zip*"))  # archive and partial files gone
    record = (root / "taxibj" / RECORD).read_text()
    assert hashlib.sha256(files["taxibj_dataset.zip"]).hexdigest() in record and "format check" in record
    for split in ("train", "val", "test"):
        _same_samples("taxibj", root, src, split)
    # a second run finds it in place and downloads nothing
    n = len(server.log)
    assert main(argv) == 0
    assert "already there" in capsys.readouterr().out and len(server.log) == n


@pytest.mark.parametrize("archive", ["kth_action.zip", "kth_action_nested.zip"])
def test_kth_archive_unpacks_into_the_layout(tmp_path, server, published, archive, capsys):
    files, src = published
    server.files["kth_action.zip"] = files[archive]
    root = tmp_path / "data"
    folder = download_dataset("kth", root, mirror=server.url, progress=True)  # the bar goes to stderr
    assert folder == root / "kth" and (folder / "boxing").is_dir() and not (folder / "__MACOSX").exists()
    assert "kth_action.zip" in capsys.readouterr().err  # tqdm's bar names the file
    _same_samples("kth", root, src, "test", n=2)


def test_mmnist_from_the_mirror_env_with_given_digests(tmp_path, server, published, monkeypatch):
    files, src = published
    for name in MNIST_FILES:
        server.files[name] = files[name]
    monkeypatch.setenv(MIRROR_ENV, server.url)
    root = tmp_path / "data"
    lines: list[str] = []
    folder = download_dataset("mmnist", root, checksums=_digests(files), progress=False, log=lines.append)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MNIST_FILES, RECORD])
    assert any("verified by sha256 and size" in line for line in lines)
    _same_samples("mmnist", root, src, "test")
    _same_samples("mmnist", root, src, "train")


@pytest.mark.parametrize("how", ["close", "reset"])
def test_cut_connection_is_resumed(tmp_path, server, published, how):
    files, _ = published
    server.files.update(files)
    size = len(files["taxibj_dataset.zip"])
    server.cut["taxibj_dataset.zip"] = (size // 3, how)
    root = tmp_path / "data"
    download_dataset("taxibj", root, mirror=server.url, progress=False)
    gets = [entry for entry in server.log if entry[0] == "taxibj_dataset.zip"]
    assert gets[0][1] is None and len(gets) == 2
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", gets[1][1]).group(1))
    assert 0 < resumed_at <= size // 3 and gets[1][2]  # resumed with If-Range
    assert np.load(root / "taxibj" / "dataset.npz")["X_train"].shape[1:] == (4, 2, 32, 32)


def test_broken_download_resumes_on_the_next_run(tmp_path, server, published):
    files, src = published
    server.files.update(files)
    size = len(files["taxibj_dataset.zip"])
    server.cut["taxibj_dataset.zip"] = (size // 2, "close")
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as exc:
        download_dataset("taxibj", root, mirror=server.url, progress=False, retries=0)
    msg = _one_line(exc)
    partial = root / ".downloads" / "taxibj_dataset.zip.partial"
    assert f"{server.url}taxibj_dataset.zip" in msg and str(partial) in msg and "resume" in msg
    assert partial.stat().st_size == size // 2
    with pytest.raises(DatasetNotFoundError):  # nothing half-written is read as data
        build_dataset("taxibj", root, "train")
    download_dataset("taxibj", root, mirror=server.url, progress=False, retries=0)
    assert server.log[-1][1] == f"bytes={size // 2}-"
    _same_samples("taxibj", root, src, "test")


def test_a_changed_file_starts_over(tmp_path, server, published):
    files, src = published
    server.files.update(files)
    size = len(files["taxibj_dataset.zip"])
    server.files["taxibj_dataset.zip"] = b"an older file" * 1000
    server.cut["taxibj_dataset.zip"] = (5000, "close")
    root = tmp_path / "data"
    with pytest.raises(DownloadError):
        download_dataset("taxibj", root, mirror=server.url, progress=False, retries=0)
    server.files["taxibj_dataset.zip"] = files["taxibj_dataset.zip"]  # republished: another ETag
    download_dataset("taxibj", root, mirror=server.url, progress=False, retries=0)
    assert server.log[-1][1] == "bytes=5000-"  # asked to resume, got the whole new file (If-Range)
    assert (root / "taxibj" / RECORD).read_text().count(str(size)) >= 1
    _same_samples("taxibj", root, src, "train")


def test_checksum_mismatch_is_refused_and_kept_aside(tmp_path, server, published):
    files, _ = published
    server.files.update(files)
    root = tmp_path / "data"
    wrong = {"mnist_test_seq.npy": Checksum(sha256="0" * 64)}
    with pytest.raises(DownloadError) as exc:
        download_dataset("mmnist", root, mirror=server.url, checksums={**_digests(files), **wrong}, progress=False)
    msg = _one_line(exc)
    rejected = root / ".downloads" / "mnist_test_seq.npy.rejected"
    assert msg.startswith(f"checksum mismatch for {server.url}mnist_test_seq.npy") and str(rejected) in msg
    assert rejected.read_bytes() == files["mnist_test_seq.npy"]
    assert not (root / "moving_mnist" / "mnist_test_seq.npy").exists()
    with pytest.raises(DatasetNotFoundError):
        build_dataset("mmnist", root, "test")
    # with the published table, the synthetic stand-in is refused by its size before it is downloaded
    with pytest.raises(DownloadError) as exc:
        download_dataset("mmnist", tmp_path / "other", mirror=server.url, progress=False)
    msg = _one_line(exc)
    assert "train-images-idx3-ubyte.gz" in msg and "9912422" in msg
    assert not (tmp_path / "other" / "moving_mnist").exists()


def test_404_is_one_line_naming_the_url(tmp_path, server, capsys):
    root = tmp_path / "data"
    assert (
        main(["data", "download", "--dataset", "kth", "--data-dir", str(root), "--mirror", server.url, "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vmrnn data: error: cannot download kth_action.zip")
    assert f"{server.url}kth_action.zip: HTTP 404" in err and "--mirror" in err
    assert not (root / "kth").exists()


def test_no_network_names_the_manual_route_which_then_works(tmp_path, published):
    files, src = published
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/"
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as exc:
        download_dataset("taxibj", root, mirror=mirror, progress=False)
    msg = _one_line(exc)
    dest = root / ".downloads" / "taxibj_dataset.zip"
    assert f"{mirror}taxibj_dataset.zip: cannot reach the server" in msg and f"save it as {dest}" in msg
    dest.write_bytes(files["taxibj_dataset.zip"])  # the manual route, still without a network
    download_dataset("taxibj", root, mirror=mirror, progress=False)
    _same_samples("taxibj", root, src, "test")


def test_archive_with_the_wrong_contents_is_refused(tmp_path, server):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("taxibj/README.txt", "no data here")
    server.files["taxibj_dataset.zip"] = bad.read_bytes()
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as exc:
        download_dataset("taxibj", root, mirror=server.url, progress=False)
    msg = _one_line(exc)
    assert "holds no dataset.npz (top-level entries: taxibj)" in msg and "taxibj_dataset.zip.rejected" in msg
    assert not (root / "taxibj").exists()
    with zipfile.ZipFile(bad, "w") as zf:  # the right name, but not an npz of the right arrays
        zf.writestr("dataset.npz", b"not an npz")
    server.files["taxibj_dataset.zip"] = bad.read_bytes()
    with pytest.raises(DownloadError) as exc:
        download_dataset("taxibj", root, mirror=server.url, progress=False)
    assert "not a usable taxibj dataset" in _one_line(exc)
    assert not (root / "taxibj").exists() and not list((root / ".downloads").glob("*.unpack-*"))
    server.files["taxibj_dataset.zip"] = b"PK\3\4 truncated"
    with pytest.raises(DownloadError) as exc:
        download_dataset("taxibj", root, mirror=server.url, progress=False)
    assert "not a readable zip archive" in _one_line(exc)


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, server, published):
    files, _ = published
    server.files.update(files)
    server.claim["kth_action.zip"] = 1 << 60
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as exc:
        download_dataset("kth", root, mirror=server.url, progress=False)
    msg = _one_line(exc)
    assert msg.startswith(f"not enough disk space for {server.url}kth_action.zip") and "--data-dir" in msg
    assert (
        not (root / ".downloads" / "kth_action.zip.partial").exists()
        or (root / ".downloads" / "kth_action.zip.partial").stat().st_size == 0
    )


def test_refusals(tmp_path, server, published):
    files, _ = published
    server.files.update(files)
    write_synthetic("taxibj", tmp_path / "synth")
    with pytest.raises(DataError, match="holds synthetic data"):
        download_dataset("taxibj", tmp_path / "synth", mirror=server.url, progress=False)
    with pytest.raises(DataError, match="http:// or https://"):
        download_dataset("taxibj", tmp_path, mirror="ftp://mirror/", progress=False)
    with pytest.raises(DataError, match="local folder"):
        download_dataset("taxibj", "s3://bucket/data", mirror=server.url, progress=False)
    with pytest.raises(DataError, match="vmrnn downloads"):
        download_dataset("custom", tmp_path, progress=False)
    root = tmp_path / "busy"
    with file_lock(root / ".downloads" / "taxibj.lock"):
        with pytest.raises(DataError, match="another `vmrnn data download --dataset taxibj` is writing"):
            download_dataset("taxibj", root, mirror=server.url, progress=False)
    (root / "kth").mkdir()
    (root / "kth" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no KTH action folders"):
        download_dataset("kth", root, mirror=server.url, progress=False)
    assert (root / "kth" / "notes.txt").read_text() == "mine"
    mm = root / "moving_mnist"
    mm.mkdir()
    shutil.copy(Path(__file__), mm / "mnist_test_seq.npy")
    with pytest.raises(DownloadError, match="already there but its"):
        download_dataset("mmnist", root, mirror=server.url, checksums=_digests(files), progress=False)


def test_published_urls_are_tried_in_order(tmp_path, server, published, monkeypatch):
    files, src = published
    server.files.update(files)
    spec = get_dataset("mmnist")
    (train, test) = spec.downloads
    moved = (f"{server.url}gone/{train.name}", f"{server.url}{train.name}")  # the first one answers 404
    monkeypatch.setitem(
        DATASETS,
        "mmnist",
        replace(spec, downloads=(replace(train, urls=moved), replace(test, urls=(server.url + test.name,)))),
    )
    lines: list[str] = []
    download_dataset("mmnist", tmp_path, checksums=_digests(files), progress=False, log=lines.append)
    assert any(line.startswith(f"{moved[0]}: HTTP 404") and "trying the next source" in line for line in lines)
    assert f'"url": "{moved[1]}"' in (tmp_path / "moving_mnist" / RECORD).read_text()
    _same_samples("mmnist", tmp_path, src, "test")
