"""The prepared format: each dataset converted once into memory-mappable Arrow IPC files.

``prepare_dataset(name, data_dir, out_dir=None)`` writes, by default to ``<data_dir>/prepared/<key>/``
(key = the dataset's family: taxibj | kth | mmnist | custom; kth and kth40 share ``kth``)::

    manifest.json     format, format_version, dataset, source checksums, parts (file, rows, row_shape,
                      dtype, bytes) and dataset extras (KTH video list, custom meta.json)
    <part>.arrow      one Arrow IPC file per part (see vmrnn.data.arrowio)

Parts hold exactly the rows that the source readers produce (TaxiBJ: (8, 2, 32, 32) float32 samples
already mapped to [0, 1]; KTH: (128, 128) uint8 frames after the resize, one record batch per video, with
``video`` and ``frame_no`` columns; Moving MNIST: the (28, 28) uint8 digits and the (20, 1, 64, 64) uint8
test sequences; custom: (T, C, H, W) uint8 or float32 samples). The validation split is not stored: it
is cut at load time from the training part, by the same code as from the source, so one prepared copy
serves every seed and val_fraction, and prepared samples are bit-identical to source samples.

The manifest records each source file's path, size, mtime and sha256 (for KTH one digest over the whole
tree). ``build_dataset(prepared="auto")`` uses the prepared copy only while those still match: equal
size and mtime are trusted; a changed mtime triggers a re-hash of the content.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vmrnn import __version__
from vmrnn.commands import vmrnn_command
from vmrnn.data import kth as kth_mod
from vmrnn.data.arrowio import ArrowRows, ArrowRowWriter
from vmrnn.data.errors import DataError, DataFormatError, DatasetNotFoundError
from vmrnn.data.layout import locate

FORMAT = "vmrnn-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PART_NAMES = ("train", "val", "test", "digits")
CHUNK_BYTES = 32 << 20


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------- sources


def source_record(src: Any) -> dict[str, Any]:
    """Checksums of the source, as stored in the manifest."""
    if src.family == "kth":
        return {
            "kind": "tree",
            "n_files": len(src.all_files()),
            "stat_sha256": src.stat_digest(),
            "shape_sha256": src.shape_digest(),
            "content_sha256": None,
        }  # content filled while decoding
    files = []
    for p in src.source_files():
        st = os.stat(p)
        files.append({"path": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)})
    return {"kind": "files", "files": files}


def source_matches(record: dict[str, Any], src: Any) -> tuple[bool, str, bool]:
    """(matches, reason if not, whether the manifest's mtimes are out of date but the content matches)."""
    if src.family == "kth":
        if record.get("kind") != "tree":
            return False, "manifest records no KTH tree", False
        n = len(src.all_files())
        if n != record.get("n_files"):
            return False, f"the tree has {n} frame files, the prepared copy {record.get('n_files')}", False
        if src.stat_digest() == record.get("stat_sha256"):
            return True, "", False
        if src.shape_digest() != record.get("shape_sha256"):
            return False, "frame files were added, removed, renamed or resized", False
        if src.content_digest() != record.get("content_sha256"):
            return False, "frame file contents changed", False
        return True, "", True
    if record.get("kind") != "files":
        return False, "manifest records no source files", False
    by_name = {f["path"]: f for f in record.get("files", [])}
    paths = src.source_files()
    if sorted(by_name) != sorted(p.name for p in paths):
        return False, f"source files {sorted(p.name for p in paths)} != prepared from {sorted(by_name)}", False
    stale_mtime = False
    for p in paths:
        rec, st = by_name[p.name], os.stat(p)
        if st.st_size != rec["size"]:
            return False, f"{p} changed size", False
        if st.st_mtime_ns != rec["mtime_ns"]:
            if sha256_file(p) != rec["sha256"]:
                return False, f"{p} changed (sha256 differs)", False
            stale_mtime = True
    return True, "", stale_mtime


def refresh_mtimes(prepared_dir: Path, manifest: dict[str, Any], src: Any) -> None:
    """After a content-verified match with new mtimes, record them so the next check is cheap (best effort)."""
    rec = manifest["source"]
    if rec["kind"] == "tree":
        rec["stat_sha256"] = src.stat_digest()
    else:
        for f in rec["files"]:
            f["mtime_ns"] = os.stat(Path(src.source_files()[0]).parent / f["path"]).st_mtime_ns
    try:
        _write_json(prepared_dir / MANIFEST, manifest)
    except OSError:
        pass


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ prepared store


class PreparedStore:
    """Reads a prepared folder; offers the same interface as the source readers."""

    def __init__(self, d: Path, family: str):
        self.dir = Path(d)
        self.family = family
        path = self.dir / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no prepared copy at {self.dir} ({MANIFEST} missing)", path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFormatError(
                f"{path}: unreadable manifest ({exc}); run `{vmrnn_command('data prepare')}` again", path
            ) from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataFormatError(f"{path}: not a vmrnn prepared-data manifest", path)
        if m.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(
                f"{path}: prepared with format version {m.get('format_version')}, this vmrnn "
                f"reads version {FORMAT_VERSION}; run `{vmrnn_command('data prepare')}` again",
                path,
            )
        if m.get("dataset") != family:
            raise DataError(f"{self.dir} holds prepared {m.get('dataset')!r} data, not {family!r}")
        try:
            for info in m["parts"].values():
                f = self.dir / info["file"]
                if not f.is_file():
                    raise DataFormatError(
                        f"{f}: prepared file is missing; run `{vmrnn_command('data prepare')}` again", f
                    )
                if os.path.getsize(f) != info["bytes"]:
                    raise DataFormatError(
                        f"{f}: {os.path.getsize(f)} bytes, the manifest says {info['bytes']} "
                        f"(truncated or modified); run `{vmrnn_command('data prepare')}` again",
                        f,
                    )
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataFormatError(
                f"{path}: malformed manifest ({exc!r}); run `{vmrnn_command('data prepare')}` again", path
            ) from None
        self.parts = tuple(m["parts"])
        self.meta = m.get("meta")

    def describe(self, part: str | None = None) -> str:
        if part is None or part not in self.manifest["parts"]:
            return str(self.dir)
        return str(self.dir / self.manifest["parts"][part]["file"])

    def row_info(self, part: str) -> tuple[tuple[int, ...], str]:
        info = self.manifest["parts"][part]
        return tuple(info["row_shape"]), info["dtype"]

    def part(self, part: str) -> ArrowRows:
        if part not in self.manifest["parts"]:
            raise DataFormatError(f"{self.dir}: prepared copy has no part {part!r}", self.dir)
        info = self.manifest["parts"][part]
        return ArrowRows(self.dir / info["file"], tuple(info["row_shape"]), info["dtype"], info["rows"])

    def catalog(self, part: str) -> kth_mod.Catalog:
        rows = self.part(part)
        try:
            videos = [
                kth_mod.Video(rel, action, int(person))
                for rel, action, person in self.manifest["kth"]["parts"][part]["videos"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"{self.dir / MANIFEST}: malformed KTH video list ({exc!r})", self.dir) from None
        video, frame_no = rows.column("video"), rows.column("frame_no")
        if len(video) and (video.min() < 0 or video.max() >= len(videos) or np.any(np.diff(video) < 0)):
            raise DataFormatError(f"{rows.path}: video column inconsistent with the manifest", rows.path)
        return kth_mod.Catalog(videos, video, frame_no)

    def matches(self, src: Any) -> tuple[bool, str]:
        ok, reason, refresh = source_matches(self.manifest.get("source", {}), src)
        if ok and refresh:
            refresh_mtimes(self.dir, self.manifest, src)
        return ok, reason


# ----------------------------------------------------------------------------------------------- writing


def _decode_video(args: tuple[Path, list[str]]) -> tuple[np.ndarray, list[str]]:
    root, rels = args
    frames, digests = [], []
    for rel in rels:
        path = root / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataFormatError(f"{path}: cannot read ({exc})", path) from None
        digests.append(f"{rel}\t{hashlib.sha256(data).hexdigest()}\n")
        frames.append(kth_mod.load_frame(path, data))
    return np.stack(frames), digests


def _check_float_rows(block: np.ndarray, start: int, what: str) -> None:
    if block.dtype == np.uint8:
        return
    flat = block.reshape(len(block), -1)
    bad = ~(np.isfinite(flat).all(1) & (flat >= 0).all(1) & (flat <= 1).all(1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFormatError(f"{what}: sample {start + i} has values outside [0, 1] or not finite", what)


def prepare_dataset(
    name: str,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a dataset (read from its published layout under data_dir) into the prepared format.

    Returns the prepared folder (default ``<data_dir>/prepared/<key>``). Raises DataError on bad input.
    KTH frames are decoded in `workers` processes (default: the CPU count; 0 or 1 = in this process).
    """
    loc = locate(name, data_dir)
    family = loc.family
    src = loc.open_source()
    out = Path(out_dir) if out_dir is not None else loc.prepared_dir
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: None)
    (out / MANIFEST).unlink(missing_ok=True)  # no valid manifest while the parts are rewritten
    t0 = time.time()
    source = source_record(src)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": family,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vmrnn_version": __version__,
        "source_dir": str(loc.dataset_dir.resolve()),
        "source": source,
        "parts": {},
    }
    if family == "kth":
        manifest["kth"] = {"resize": kth_mod.RESIZE, "size": list(kth_mod.OUT_SIZE), "parts": {}}
    if getattr(src, "meta", None) is not None:  # datasets described by a meta.json (custom) keep it
        manifest["meta"] = src.meta
    content = hashlib.sha256()
    for part in src.parts:
        row_shape, dtype = src.row_info(part)
        final = out / f"{part}.arrow"
        tmp = out / f"{part}.arrow.{os.getpid()}.partial"
        extra = ("video", "frame_no") if family == "kth" else ()
        with ArrowRowWriter(tmp, row_shape, dtype, extra) as w:
            if family == "kth":
                _write_kth_part(src, part, w, content, workers, log)
                manifest["kth"]["parts"][part] = {
                    "videos": [[v.relpath, v.action, v.person] for v in src.catalog(part).videos]
                }
            else:
                rows = src.part(part)
                chunk = max(1, CHUNK_BYTES // w.row_nbytes)
                for a in range(0, len(rows), chunk):
                    block = np.asarray(rows[a : a + chunk])
                    _check_float_rows(block, a, src.describe(part))
                    w.write(block)
        n = w.rows
        os.replace(tmp, final)
        manifest["parts"][part] = {
            "file": final.name,
            "rows": n,
            "row_shape": list(row_shape),
            "dtype": dtype,
            "bytes": os.path.getsize(final),
        }
        log(f"wrote {final} ({n} rows of {tuple(row_shape)} {dtype}, {os.path.getsize(final) / 2**20:.1f} MiB)")
    if family == "kth":
        source["content_sha256"] = content.hexdigest()
    for stale in PART_NAMES:
        if stale not in manifest["parts"]:
            (out / f"{stale}.arrow").unlink(missing_ok=True)
    _write_json(out / MANIFEST, manifest)
    log(f"wrote {out / MANIFEST} ({time.time() - t0:.1f} s)")
    return out


def _write_kth_part(
    src: Any, part: str, w: ArrowRowWriter, content: Any, workers: int | None, log: Callable[[str], None]
) -> None:
    cat = src.catalog(part)
    files = src.files[part]
    offsets = cat.offsets()
    jobs = [(src.dir, files[offsets[v] : offsets[v + 1]]) for v in range(len(cat.videos))]
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    n_workers = min(n_workers, len(jobs))
    if n_workers > 1 and len(jobs) >= 4:
        with ProcessPoolExecutor(n_workers) as ex:
            results = ex.map(_decode_video, jobs, chunksize=1)
            _consume(results, cat, offsets, w, content, log, part)
    else:
        _consume(map(_decode_video, jobs), cat, offsets, w, content, log, part)


def _consume(
    results: Any,
    cat: kth_mod.Catalog,
    offsets: np.ndarray,
    w: ArrowRowWriter,
    content: Any,
    log: Callable[[str], None],
    part: str,
) -> None:
    for v, (frames, digests) in enumerate(results):
        a, b = offsets[v], offsets[v + 1]
        w.write(frames, video=cat.video[a:b], frame_no=cat.frame_no[a:b])
        content.update("".join(digests).encode())
        if (v + 1) % 100 == 0:
            log(f"  {part}: {v + 1}/{len(cat.videos)} videos")
