"""Prepared data on an object store or a shared filesystem, for every worker of a cluster.

``local_data_dir(uri, key)`` turns a data location into a local folder that the readers memory-map:

* a local path or ``file://`` URI (for example a shared filesystem mounted on every node) is returned
  as it is and read in place;
* any other URI that ``pyarrow.fs`` opens (``s3://bucket/path``, ``gs://bucket/path``, ``hdfs://...``)
  must hold *prepared* data: ``<uri>/prepared/<key>/{manifest.json,*.arrow}`` (what ``vmrnn data
  prepare`` writes under a data root), or ``<uri>`` is itself a prepared folder. It is copied once per
  node into a cache (``$VMRNN_DATA_CACHE``, default ``~/.cache/vmrnn/data``) under a lock file, so the
  trials on a node download it once and share the copy. Each file's size is checked against the
  manifest and the store (and its sha256 against the manifest where the manifest records one); the
  sha256 of every copied file is written to the cache record. A cache entry is named after the URI and
  a fingerprint of the remote manifest, sizes and modification times: uploading new prepared files
  gives a new entry, and a running trial never sees its files replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrnn.data.errors import DataError, DataFormatError, DatasetNotFoundError
from vmrnn.data.locks import file_lock
from vmrnn.data.prepare import FORMAT, MANIFEST

CACHE_ENV = "VMRNN_DATA_CACHE"
RECORD = ".vmrnn-cache.json"
CHUNK = 8 << 20
_MEMO: dict[tuple[str, str | None, str], Path] = {}


def is_remote(data_dir: Any) -> bool:
    """Whether data_dir is a URI other than file:// (a Path never is)."""
    if not isinstance(data_dir, str) or "://" not in data_dir:
        return False
    return urllib.parse.urlsplit(data_dir).scheme not in ("", "file")


def _local(data_dir: str | os.PathLike) -> Path:
    s = os.fspath(data_dir)
    if isinstance(s, str) and s.startswith("file://"):
        s = urllib.parse.unquote(urllib.parse.urlsplit(s).path)
    return Path(s).expanduser()


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vmrnn" / "data").expanduser()


def shown(uri: str) -> str:
    """The URI without credentials or query (pyarrow accepts keys in both) for messages."""
    u = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path, "", ""))


def local_data_dir(uri: str | os.PathLike, key: str | None = None) -> Path:
    """A local folder holding the data at `uri`: local paths as they are, object-store URIs as a node-local
    cached copy of their prepared data (only ``prepared/<key>/`` when key is given). Raises DataError."""
    if not is_remote(uri):
        return _local(uri)
    memo = (str(uri), key, str(cache_root()))
    if memo in _MEMO and _MEMO[memo].is_dir():
        return _MEMO[memo]
    path, _ = cache_prepared(str(uri), key)
    _MEMO[memo] = path
    return path


@dataclass(frozen=True)
class _Remote:
    rel: str  # path relative to the URI (and to the cache entry)
    path: str  # path inside the filesystem
    size: int
    mtime_ns: int | None
    sha256: str | None  # from the manifest, where it records one


def cache_prepared(uri: str, key: str | None = None, cache_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Copy the prepared data at `uri` into the node-local cache unless it is there; returns the local data
    folder and whether this call copied it. Concurrent callers on one node copy once (a lock file)."""
    fs, base = _filesystem(uri)
    manifests, files = _listing(fs, base, key, uri)
    h = hashlib.sha256()
    for rel, raw in sorted(manifests.items()):
        h.update(f"{rel}\n".encode() + raw)
    for f in files:
        h.update(f"{f.rel}\t{f.size}\t{f.mtime_ns}\n".encode())
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    u = urllib.parse.urlsplit(shown(uri))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{u.scheme}-{u.netloc}{u.path}").strip("-")[:60]
    entry = root / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}" / h.hexdigest()[:16]
    if _intact(entry):
        return entry, False
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the data cache {entry.parent} ({exc.strerror}); set {CACHE_ENV} to a "
            "writable node-local folder"
        ) from None
    with file_lock(entry.parent / f"{entry.name}.lock"):
        if _intact(entry):  # another process on this node copied it while we waited
            return entry, False
        _copy(fs, uri, manifests, files, entry)
    return entry, True


def _filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs  # deferred: only object-store URIs need it

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / others by scheme
        raise DataError(f"cannot open {shown(uri)}: {_first_line(exc)}") from None
    return fs, path.rstrip("/")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _listing(fs: Any, base: str, key: str | None, uri: str) -> tuple[dict[str, bytes], list[_Remote]]:
    """The remote prepared folders: their manifests (raw bytes, by relative folder) and part files."""
    import pyarrow.fs as pafs

    where = shown(uri)
    try:
        if fs.get_file_info(f"{base}/{MANIFEST}").type == pafs.FileType.File:
            folders = [""]
        elif key is not None:
            folders = [f"prepared/{key}/"]
        else:
            sel = pafs.FileSelector(f"{base}/prepared", allow_not_found=True)
            folders = sorted(
                f"prepared/{i.base_name}/" for i in fs.get_file_info(sel) if i.type == pafs.FileType.Directory
            )
        manifests: dict[str, bytes] = {}
        files: list[_Remote] = []
        for rel in folders or [f"prepared/{key or '<dataset>'}/"]:
            mpath = f"{base}/{rel}{MANIFEST}"
            if not folders or fs.get_file_info(mpath).type != pafs.FileType.File:
                raise DatasetNotFoundError(
                    f"no prepared data at {where}/{rel}{MANIFEST}: run `vmrnn data prepare` where the data is and "
                    f"upload <data root>/prepared/ to {where}/prepared/ (see docs/CLUSTER.md)",
                    f"{where}/{rel}",
                )
            raw = _read(fs, mpath)
            manifests[rel] = raw
            for name, size, sha in _parts(raw, f"{where}/{rel}{MANIFEST}"):
                files.append(_Remote(rel + name, f"{base}/{rel}{name}", size, None, sha))
        infos = fs.get_file_info([f.path for f in files])
    except DataError:
        raise
    except Exception as exc:  # network, credentials, permissions: pyarrow raises OSError or ArrowException
        raise DataError(f"cannot read {where}: {_first_line(exc)}") from None
    out = []
    for f, info in zip(files, infos, strict=True):
        if info.type != pafs.FileType.File:
            raise DataFormatError(f"{where}/{f.rel} is missing; upload the whole prepared folder again", f.rel)
        if info.size != f.size:
            raise DataFormatError(
                f"{where}/{f.rel} has {info.size} bytes, its manifest says {f.size}; upload the "
                "prepared folder again (or run `vmrnn data prepare` again)",
                f.rel,
            )
        out.append(_Remote(f.rel, f.path, f.size, info.mtime_ns, f.sha256))
    return manifests, out


def _parts(raw: bytes, where: str) -> list[tuple[str, int, str | None]]:
    try:
        m = json.loads(raw)
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataFormatError(f"{where} is not a vmrnn prepared-data manifest", where)
        out = []
        for info in m["parts"].values():
            name, size = info["file"], int(info["bytes"])
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise DataFormatError(f"{where}: bad part file name {name!r}", where)
            out.append((name, size, info.get("sha256")))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataFormatError(f"{where}: malformed manifest ({exc!r}); run `vmrnn data prepare` again", where) from None


def _intact(entry: Path) -> bool:
    """A finished cache entry whose files still have the recorded sizes (a cheap check on every open)."""
    try:
        record = json.loads((entry / RECORD).read_text())
        return all(os.path.getsize(entry / rel) == f["bytes"] for rel, f in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _copy(fs: Any, uri: str, manifests: dict[str, bytes], files: list[_Remote], entry: Path) -> None:
    where = shown(uri)
    tmp = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    need = sum(f.size for f in files)
    free = shutil.disk_usage(entry.parent).free
    if need > free:
        raise DataError(
            f"not enough space to cache {where} at {entry}: it needs {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free; set {CACHE_ENV} to a larger node-local folder"
        )
    t0 = time.time()
    record: dict[str, Any] = {"uri": where, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": {}}
    try:
        for f in files:
            target = tmp / f.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            sha, n = hashlib.sha256(), 0
            try:
                with fs.open_input_stream(f.path) as src, open(target, "wb") as out:
                    while block := src.read(CHUNK):
                        out.write(block)
                        sha.update(block)
                        n += len(block)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DataError(
                        f"disk full while caching {where}/{f.rel} at {target}; set {CACHE_ENV} to a "
                        "larger node-local folder"
                    ) from None
                raise DataError(f"cannot read {where}/{f.rel}: {_first_line(exc)}") from None
            if n != f.size:
                raise DataFormatError(
                    f"{where}/{f.rel}: received {n} bytes, the manifest says {f.size}; try again", f.rel
                )
            if f.sha256 and sha.hexdigest() != f.sha256:
                raise DataFormatError(
                    f"{where}/{f.rel}: sha256 {sha.hexdigest()} differs from the manifest's "
                    f"{f.sha256}; upload the prepared folder again",
                    f.rel,
                )
            record["files"][f.rel] = {"bytes": n, "sha256": sha.hexdigest()}
        for rel, raw in manifests.items():  # the manifests last, as `vmrnn data prepare` does
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            (tmp / rel / MANIFEST).write_bytes(raw)
            record["files"][rel + MANIFEST] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if entry.exists():  # a damaged earlier copy (a file changed size): replace it
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"vmrnn: cached {where} on this node at {entry} ({need / 2**20:.1f} MiB in {time.time() - t0:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


__all__ = ["CACHE_ENV", "cache_prepared", "cache_root", "is_remote", "local_data_dir"]
