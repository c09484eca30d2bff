"""`vmrnn data download`: fetch a dataset from its published source, verified, resumable and atomic.

Every file passes through ``<root>/.downloads/``: ``NAME.partial`` while it arrives (a later run resumes
it with an HTTP Range request, guarded by If-Range so that a changed file starts over), ``NAME`` once it
is complete, and ``NAME.rejected`` when verification fails (kept aside, never read). Archives are
unpacked into ``.downloads/NAME.unpack-PID/``, checked by the dataset's own reader and only then renamed
into ``<root>/<dataset folder>/``, so a dataset folder never holds half-written data. ``DOWNLOADED.json``
in the dataset folder records each file's URL, size, sha256 and how it was verified.

The facts about each dataset's files (names, URLs, published digests and sizes, how to unpack them) live
in the ``downloads`` of each dataset's registry entry (vmrnn.data.registry).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from vmrnn.data.errors import DataError
from vmrnn.data.kth import KTH_ACTIONS
from vmrnn.data.layout import locate
from vmrnn.data.locks import file_lock
from vmrnn.data.registry import Checksum, DatasetSpec, SourceFile, download_names, get_dataset
from vmrnn.data.remote import is_remote
from vmrnn.data.synth import MARKER

MIRROR_ENV = "VMRNN_DATA_MIRROR"
DATA_DIR_ENV = "VMRNN_DATA_DIR"
DOWNLOADS = ".downloads"
RECORD = "DOWNLOADED.json"
CHUNK = 1 << 20
RETRY_WAIT = 1.0  # seconds before the first retry of an attempt that made no progress; doubles each time


class DownloadError(DataError):
    """A download that failed; the message names the URL and what to do."""


class _Transient(Exception):
    """The transfer broke off (cut connection, timeout, 5xx); retrying may resume it."""

    def __init__(self, reason: str, progressed: bool):
        super().__init__(reason)
        self.progressed = progressed


class _Unavailable(Exception):
    """This URL cannot give the file (unreachable, HTTP 4xx, wrong size); another URL might."""


@dataclass
class _Transfer:
    progress: bool
    retries: int
    timeout: float
    log: Callable[[str], None]


# ------------------------------------------------------------------------------------------------ entry


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def download_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    mirror: str | None = None,
    checksums: Mapping[str, Checksum] | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download dataset `name` (taxibj, kth or mmnist) into the data root and return its dataset folder.

    data_dir: the data root (default $VMRNN_DATA_DIR, else ./data). mirror: a base URL serving the same
    file names (default $VMRNN_DATA_MIRROR); it replaces every published URL. checksums: expected
    checksums by file name, replacing those of the dataset's registry entry (for a mirror that serves other content,
    e.g. test fixtures). retries: how often a broken transfer is resumed before giving up. Files already
    in place are verified and kept. Raises DownloadError (a DataError) with one line naming the URL and
    what to do.
    """
    log = log or (lambda msg: None)
    spec = get_dataset(name)
    if not spec.downloads:
        raise DataError(f"vmrnn downloads {', '.join(download_names())}, not {name!r}")
    family = spec.family
    if data_dir is not None and is_remote(os.fspath(data_dir)):
        raise DataError(
            f"download into a local folder, not {data_dir}; prepare it there and upload the prepared "
            "files (see docs/CLUSTER.md)"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    mirror = _check_mirror(mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise DataError(f"retries must be a non-negative integer, got {retries!r}")
    folder = root / spec.folder
    if (folder / MARKER).is_file():
        raise DataError(
            f"{folder} holds synthetic data ({MARKER}); remove that folder or choose another data "
            "folder for the real data"
        )
    downloads = root / DOWNLOADS
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {downloads} ({exc.strerror}); choose another --data-dir") from None
    t = _Transfer(progress, retries, timeout, log)
    busy = (
        f"another `vmrnn data download --dataset {family}` is writing to {root} (lock "
        f"{downloads / (family + '.lock')} is held); wait for it to finish"
    )
    with file_lock(downloads / f"{family}.lock", wait=False, busy=busy):
        for sf in spec.downloads:
            expected = (checksums or {}).get(sf.name, sf.checksum)
            urls = (mirror + sf.name,) if mirror else sf.urls
            if _in_place(spec, sf, folder, expected, log):
                continue
            archive = downloads / sf.name
            record = _obtain(sf.name, urls, archive, expected, t, via_mirror=bool(mirror))
            _install(spec, sf, archive, folder, record, urls, t)
    return folder


def _check_mirror(mirror: str | None) -> str | None:
    if mirror is None:
        return None
    scheme = urllib.parse.urlsplit(mirror).scheme
    if scheme not in ("http", "https"):
        raise DataError(f"mirror must be an http:// or https:// URL, got {mirror!r}")
    return mirror.rstrip("/") + "/"


# ---------------------------------------------------------------------------------------- already there


def _in_place(spec: DatasetSpec, sf: SourceFile, folder: Path, expected: Checksum, log: Callable[[str], None]) -> bool:
    """Whether what `sf` provides is already in the dataset folder (a file is verified first)."""
    if sf.unpack == "file":
        path = folder / sf.name
        if not path.is_file():
            return False
        digests = _digests(path, expected)
        bad = _mismatch(digests, expected)
        if bad:
            raise DownloadError(f"{path} is already there but its {bad}; move it away and run the command again")
        if not (expected.sha256 or expected.md5 or expected.size) and sf.check is not None:
            sf.check(path)
        log(f"{path}: already there ({expected.method()} verified)")
        return True
    if sf.unpack == "zip-member":
        present = (folder / sf.member).is_file()
    else:
        present = folder.is_dir() and spec.looks_like(folder)
        if not present and folder.is_dir() and any(p for p in folder.iterdir() if p.name != RECORD):
            raise DataError(
                f"{folder} exists but holds no KTH action folders; move it away so that {sf.name} can be unpacked there"
            )
    if present:
        log(f"{folder}: already there, {sf.name} not downloaded")
    return present


# --------------------------------------------------------------------------------------------- fetching


def _obtain(
    name: str, urls: tuple[str, ...], dest: Path, expected: Checksum, t: _Transfer, *, via_mirror: bool
) -> dict[str, Any]:
    """A complete, verified copy of the file at `dest` (downloaded unless a complete one is there)."""
    url, found = urls[0], dest.is_file()
    if found:
        t.log(f"{dest}: found complete, verifying it (not downloaded again)")
    else:
        url = _fetch_any(name, urls, dest, expected, t)
    digests = _digests(dest, expected)
    bad = _mismatch(digests, expected)
    if bad:
        rejected = _reject(dest)
        where = "the mirror" if via_mirror else "the source"
        what = f"{dest} (found there, not downloaded)" if found else url
        raise DownloadError(
            f"checksum mismatch for {what}: its {bad}; the file is kept aside at {rejected} and not "
            f"used. Run the command again to download it afresh; if it fails again, {where} serves "
            "different content"
        )
    t.log(f"{dest.name}: {_size(digests['bytes'])}, verified by {expected.method()}; sha256 {digests['sha256']}")
    return {"url": url, **digests, "verified_by": expected.method()}


def _fetch_any(name: str, urls: tuple[str, ...], dest: Path, expected: Checksum, t: _Transfer) -> str:
    failures = []
    for url in urls:
        try:
            _fetch_with_retries(url, dest, expected, t)
            return url
        except _Unavailable as exc:
            failures.append(f"{url}: {exc}")
            if url != urls[-1]:
                t.log(f"{url}: {exc}; trying the next source")
    manual = (
        f"fetch {urls[0]} by other means, save it as {dest} and run this command again (it then verifies "
        "and unpacks it without the network)"
    )
    raise DownloadError(
        f"cannot download {name}: {'; '.join(failures)}. Use --mirror URL (or {MIRROR_ENV}) "
        f"for a mirror with the same file names, or {manual}"
    )


def _fetch_with_retries(url: str, dest: Path, expected: Checksum, t: _Transfer) -> None:
    partial = dest.with_name(dest.name + ".partial")
    state = dest.with_name(dest.name + ".partial.json")
    for attempt in range(t.retries + 1):
        try:
            _fetch_once(url, partial, state, expected, t)
        except _Transient as exc:
            have = partial.stat().st_size if partial.exists() else 0
            total = _read_state(state).get("total")
            of = f" of {_size(total)}" if total else ""
            if attempt == t.retries:
                raise DownloadError(
                    f"{url}: the download broke off ({exc}) after {_size(have)}{of}; the partial "
                    f"file {partial} is kept: run the same command again to resume it"
                ) from None
            t.log(f"{url}: {exc} after {_size(have)}{of}; resuming")
            if not exc.progressed:
                time.sleep(RETRY_WAIT * 2**attempt)
            continue
        os.replace(partial, dest)
        state.unlink(missing_ok=True)
        return


def _read_state(state: Path) -> dict[str, Any]:
    try:
        return json.loads(state.read_text())
    except (OSError, ValueError):
        return {}


def _request(url: str, offset: int, validator: str | None, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "vmrnn-data-download", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}", progressed=False) from None
        raise _Unavailable(_http_problem(exc.code, exc.reason)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            raise _Unavailable(f"cannot resolve the host ({reason.strerror}): no network or no DNS") from None
        raise _Unavailable(
            f"cannot reach the server ({getattr(reason, 'strerror', None) or reason}): no network, "
            "a firewall or a proxy in the way (set HTTPS_PROXY if one is needed)"
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}", progressed=False) from None


def _http_problem(code: int, reason: str) -> str:
    if code == 404:
        return "HTTP 404 Not Found: the file is not at this address (moved upstream, or missing on the mirror)"
    if code in (401, 403):
        return (
            f"HTTP {code} {reason}: the server refuses the download (an access rule, a rate limit or an "
            "expired link); try again later or use a mirror"
        )
    return f"HTTP {code} {reason}"


CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _fetch_once(url: str, partial: Path, state: Path, expected: Checksum, t: _Transfer) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    saved = _read_state(state) if offset else {}
    validator = saved.get("validator")
    try:
        resp = _request(url, offset, validator, t.timeout)
    except urllib.error.HTTPError:  # 416: the partial file is not a prefix of the file (it changed): start over
        partial.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
        raise _Transient("the server cannot resume the partial file; starting over", progressed=True) from None
    with resp:
        total: int | None
        if resp.status == 206 and offset:
            m = CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != offset:
                partial.unlink(missing_ok=True)
                raise _Transient(
                    f"unexpected Content-Range {resp.headers.get('Content-Range')!r}; starting over", progressed=True
                )
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            if offset:
                t.log(
                    f"{url}: the server sent the whole file (the partial file changed or cannot be resumed); "
                    "starting over"
                )
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected.size is not None and total is not None and total != expected.size:
            raise _Unavailable(f"serves {total} bytes, the published file has {expected.size}: a different file")
        _check_space(partial.parent, (total - offset) if total is not None else 0, url)
        etag = resp.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        state.write_text(json.dumps({"url": url, "validator": validator, "total": total}))
        got = 0
        try:
            with (
                open(partial, mode) as f,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=partial.name[: -len(".partial")],
                    disable=not t.progress,
                ) as bar,
            ):
                while True:
                    chunk = resp.read1(CHUNK)  # what has arrived: a cut loses nothing received
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(
                    f"disk full while writing {partial} from {url}: free space on {partial.parent} "
                    "(or choose another --data-dir) and run the command again; the partial file "
                    "resumes"
                ) from None
            if isinstance(exc, (TimeoutError, ConnectionError)):
                raise _Transient(f"{type(exc).__name__}: {exc}", progressed=got > 0) from None
            raise
        except http.client.HTTPException as exc:
            raise _Transient(f"{type(exc).__name__}", progressed=got > 0) from None
    if total is not None and offset + got < total:
        raise _Transient("the connection closed early", progressed=got > 0)
    if total is not None and offset + got > total:
        partial.unlink(missing_ok=True)
        raise _Transient(
            f"received {offset + got} bytes, more than the announced {total}; starting over", progressed=True
        )


def _check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(
            f"not enough disk space for {what}: it needs {_size(need)}, {folder} has {_size(free)} "
            "free; free some space or choose another --data-dir"
        )


# ------------------------------------------------------------------------------------------ verifying


def _digests(path: Path, expected: Checksum) -> dict[str, Any]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False) if expected.md5 else None
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            if md5 is not None:
                md5.update(block)
    out: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}
    if md5 is not None:
        out["md5"] = md5.hexdigest()
    return out


def _mismatch(digests: dict[str, Any], expected: Checksum) -> str:
    """'' when the file matches, else what differs."""
    if expected.size is not None and digests["bytes"] != expected.size:
        return f"size is {digests['bytes']} bytes, expected {expected.size}"
    if expected.sha256 and digests["sha256"] != expected.sha256.lower():
        return f"sha256 is {digests['sha256']}, expected {expected.sha256}"
    if expected.md5 and digests["md5"] != expected.md5.lower():
        return f"md5 is {digests['md5']}, expected {expected.md5}"
    return ""


def _reject(path: Path) -> Path:
    rejected = path.with_name(path.name + ".rejected")
    os.replace(path, rejected)
    return rejected


# ------------------------------------------------------------------------------------------ installing


def _install(
    spec: DatasetSpec,
    sf: SourceFile,
    archive: Path,
    folder: Path,
    record: dict[str, Any],
    urls: tuple[str, ...],
    t: _Transfer,
) -> None:
    """Put the verified file (or the archive's content) into the dataset folder, checked, atomically."""
    url = record["url"]
    if sf.unpack == "file":
        if sf.check is not None:
            try:
                sf.check(archive)
            except DataError as exc:
                rejected = _reject(archive)
                raise DownloadError(
                    f"{url} is not a valid {sf.name} ({exc}); it is kept aside at {rejected} and "
                    "not used; check the source or the mirror"
                ) from None
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(archive, folder / sf.name)
    else:
        staging = archive.with_name(f"{archive.name}.unpack-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _unpack(spec, sf, archive, staging, url)
            if sf.unpack == "zip-member":
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(staging / spec.folder / sf.member, folder / sf.member)
            else:
                if folder.is_dir():
                    _remove_empty(folder)  # _in_place made sure it holds nothing (or only our record)
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / spec.folder, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        archive.unlink()
    _write_record(folder, sf.name, record)
    t.log(f"{sf.name}: installed into {folder}")


def _remove_empty(folder: Path) -> None:
    (folder / RECORD).unlink(missing_ok=True)
    folder.rmdir()


def _unpack(spec: DatasetSpec, sf: SourceFile, archive: Path, staging: Path, url: str) -> None:
    """Unpack into staging/<dataset folder> and open it with the dataset's reader; a bad archive is rejected."""

    def wrong(what: str) -> DownloadError:
        rejected = _reject(archive)
        return DownloadError(
            f"{url}: {what}; the archive is kept aside at {rejected} and not used; check the source or the mirror"
        )

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise wrong(f"not a readable zip archive ({exc})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        for i in infos:
            p = PurePosixPath(i.filename)
            if p.is_absolute() or ".." in p.parts or "\\" in i.filename:
                raise wrong(f"archive entry {i.filename!r} points outside the archive")
        top = sorted({PurePosixPath(i.filename).parts[0] for i in infos if i.filename.strip("/")})[:8]
        if sf.unpack == "zip-member":
            found = sorted(
                (i for i in infos if PurePosixPath(i.filename).name == sf.member and not i.is_dir()),
                key=lambda i: i.filename.count("/"),
            )
            if not found:
                raise wrong(f"the archive holds no {sf.member} (top-level entries: {', '.join(top) or 'none'})")
            chosen, prefix = [found[0]], found[0].filename[: -len(sf.member)]
        else:
            prefix = _kth_prefix(infos)
            if prefix is None:
                raise wrong(
                    f"the archive holds none of the KTH action folders {', '.join(KTH_ACTIONS)} "
                    f"(top-level entries: {', '.join(top) or 'none'})"
                )
            chosen = [i for i in infos if i.filename.startswith(prefix) and i.filename != prefix]
        _check_space(staging.parent, sum(i.file_size for i in chosen), f"unpacking {archive.name}")
        dest = staging / spec.folder
        try:
            for i in chosen:
                target = dest / i.filename[len(prefix) :]
                if i.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(i) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise wrong(f"corrupt archive ({exc})") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(
                    f"disk full while unpacking {archive}: free space on {staging.parent} (or "
                    "choose another --data-dir) and run the command again"
                ) from None
            raise
    try:
        check_dataset(spec.name, staging)
    except DataError as exc:
        raise wrong(f"the unpacked data is not a usable {spec.family} dataset ({exc})") from None


def _kth_prefix(infos: list[zipfile.ZipInfo]) -> str | None:
    """The shallowest folder in the archive that holds KTH action folders ('' for the archive root)."""
    best: str | None = None
    for i in infos:
        parts = PurePosixPath(i.filename).parts
        for k, part in enumerate(parts[:-1] if not i.is_dir() else parts):
            if part in KTH_ACTIONS:
                prefix = "".join(p + "/" for p in parts[:k])
                if best is None or prefix.count("/") < best.count("/"):
                    best = prefix
                break
    return best


def check_dataset(name: str, data_root: Path) -> None:
    """Open the dataset under data_root with its own reader and touch every part; raises DataError."""
    src = locate(name, data_root).open_source()
    for part in src.parts:
        len(src.part(part))


def _write_record(folder: Path, name: str, record: dict[str, Any]) -> None:
    path = folder / RECORD
    try:
        data = json.loads(path.read_text())
        files = data["files"] if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}
    except (OSError, ValueError):
        files = {}
    files[name] = {**record, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f"{RECORD}.{os.getpid()}.partial")
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, path)


def _size(n: int | None) -> str:
    if n is None:
        return "? bytes"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


__all__ = [
    "Checksum",
    "DownloadError",
    "MIRROR_ENV",
    "SourceFile",
    "check_dataset",
    "default_data_dir",
    "download_dataset",
]
