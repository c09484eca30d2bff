"""KTH actions in the OpenSTL / PredRNN image layout.

``kth/{action}/personXX_{action}_dY_uncomp/image_NNNN.{png,jpg}``; persons 01-16 are the official
training persons, 17-25 the test persons. A frame is channel 0 of the image (a grayscale image is its
own channel 0), resized from 160x120 to 128x128 with Pillow's bilinear filter (images already 128x128
are taken as they are; any other size is an error) and divided by 255.

Windows follow the official rule (VMRNN_SPEC 3.2): walk backwards from the last frame of the frame
list; a window of ``seq_len`` frames ending at frame i is accepted when its first and last frames are in
the same video directory and their frame numbers differ by exactly ``seq_len - 1``; after an accepted
window the walk steps back ``seq_len`` frames (boxing, handclapping, handwaving, walking) or 3 frames
(jogging, running); otherwise it steps back 1.

kth and kth40 (10 -> 20 and 10 -> 40 frames) share this reader, the folder and the prepared copy. The
synthetic stand-in (`write_synthetic`) draws a silhouette whose motion depends on the action.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vmrnn.data.base import LazyMixin, WindowDataset, check_fraction, reject_unknown
from vmrnn.data.errors import DataError, DataFormatError, NoWindowsError
from vmrnn.data.layout import Location
from vmrnn.data.registry import OPENSTL_RELEASE, Checksum, DatasetSpec, Recipe, SourceFile, register_dataset

KTH_ACTIONS = ("boxing", "handclapping", "handwaving", "jogging", "running", "walking")
IN_FRAMES = 10
SEQ_LEN = {"kth": 30, "kth40": 50}
OUT_SIZE = (128, 128)  # (width, height) after resizing
SOURCE_SIZE = (160, 120)  # (width, height) of the published frames
OVERLAP_ACTIONS = ("jogging", "running")  # step back 3 after an accepted window
OVERLAP_STEP = 3
TRAIN_PERSONS = tuple(range(1, 17))
TEST_PERSONS = tuple(range(17, 26))
RESIZE = "pillow-bilinear"  # recorded in the prepared manifest
VIDEO_RE = re.compile(r"^person(\d\d)_([a-z]+)_d(\d+)_uncomp$")
FRAME_RE = re.compile(r"^image_(\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)
IMAGE_MODES = ("L", "RGB", "RGBA")


@dataclass(frozen=True)
class Video:
    relpath: str  # action/personXX_action_dY_uncomp, relative to the kth folder
    action: str
    person: int


@dataclass
class Catalog:
    """The frames of one part (train persons or test persons) in store order: videos sorted by
    (action, directory name), frames sorted by frame number."""

    videos: list[Video]
    video: np.ndarray  # (rows,) index into videos
    frame_no: np.ndarray  # (rows,) frame number from the file name

    def offsets(self) -> np.ndarray:
        counts = (
            np.bincount(self.video, minlength=len(self.videos))
            if len(self.video)
            else np.zeros(len(self.videos), np.int64)
        )
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def part_of(person: int) -> str:
    return "train" if person in TRAIN_PERSONS else "test"


def scan(kth_dir: Path) -> tuple[dict[str, Catalog], dict[str, list[str]]]:
    """List the tree. Returns per part its catalog and its frame files (relative paths, store order)."""
    videos: dict[str, list[Video]] = {"train": [], "test": []}
    files: dict[str, list[str]] = {"train": [], "test": []}
    vid_of_row: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    fno_of_row: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    found_action = False
    for action in KTH_ACTIONS:
        adir = kth_dir / action
        if not adir.is_dir():
            continue
        found_action = True
        for vname in sorted(os.listdir(adir)):
            if vname.startswith("."):
                continue
            vdir = adir / vname
            m = VIDEO_RE.match(vname)
            if not vdir.is_dir() or not m:
                raise DataFormatError(
                    f"{vdir}: unexpected entry; {adir} must hold only video folders named personXX_{action}_dY_uncomp",
                    vdir,
                )
            if m.group(2) != action:
                raise DataFormatError(f"{vdir}: video of action {m.group(2)!r} inside the {action!r} folder", vdir)
            person = int(m.group(1))
            if not 1 <= person <= 25:
                raise DataFormatError(f"{vdir}: person {person:02d} is outside KTH's persons 01-25", vdir)
            frames: dict[int, str] = {}
            for fname in os.listdir(vdir):
                if fname.startswith("."):
                    continue
                fm = FRAME_RE.match(fname)
                if not fm:
                    raise DataFormatError(
                        f"{vdir / fname}: unexpected file; frames must be named image_NNNN.png or image_NNNN.jpg",
                        vdir / fname,
                    )
                k = int(fm.group(1))
                if k in frames:
                    raise DataFormatError(
                        f"{vdir}: frame number {k} appears twice ({frames[k]} and {fname})", vdir / fname
                    )
                frames[k] = fname
            if not frames:
                raise DataFormatError(f"{vdir}: video folder holds no frames", vdir)
            part = part_of(person)
            numbers = sorted(frames)
            vid = len(videos[part])
            videos[part].append(Video(f"{action}/{vname}", action, person))
            files[part].extend(f"{action}/{vname}/{frames[k]}" for k in numbers)
            vid_of_row[part].append(np.full(len(numbers), vid, np.int64))
            fno_of_row[part].append(np.asarray(numbers, np.int64))
    if not found_action:
        raise DataError(f"{kth_dir}: none of the action folders {list(KTH_ACTIONS)}")  # caller re-raises
    cats = {
        p: Catalog(
            videos[p],
            np.concatenate(vid_of_row[p]) if vid_of_row[p] else np.zeros(0, np.int64),
            np.concatenate(fno_of_row[p]) if fno_of_row[p] else np.zeros(0, np.int64),
        )
        for p in ("train", "test")
    }
    return cats, files


def find_windows(catalog: Catalog, video_ids: list[int], seq_len: int) -> np.ndarray:
    """Start rows (in the part's store) of the windows that the official rule accepts, ascending.

    The walk runs over the frames of the selected videos concatenated in store order, exactly like the
    official loader walks its frame list; the returned values are row indices into the part.
    """
    offsets = catalog.offsets()
    if not video_ids:
        return np.zeros(0, np.int64)
    rows = np.concatenate([np.arange(offsets[v], offsets[v + 1]) for v in video_ids])
    vid = catalog.video[rows]
    fno = catalog.frame_no[rows]
    overlap = np.array([catalog.videos[v].action in OVERLAP_ACTIONS for v in range(len(catalog.videos))])
    step = np.where(overlap[vid], OVERLAP_STEP, seq_len)
    starts = []
    i = len(rows) - 1
    while i >= seq_len - 1:
        s = i - seq_len + 1
        if vid[s] == vid[i] and fno[i] - fno[s] == seq_len - 1:
            starts.append(s)
            i -= int(step[i])
        else:
            i -= 1
    return rows[np.asarray(starts[::-1], dtype=np.int64)]


def check_header(path: Path) -> None:
    """Cheap check of one image's header (size and mode) without decoding its pixels."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot read image ({type(exc).__name__}: {exc})", path) from None
    if size not in (SOURCE_SIZE, OUT_SIZE):
        raise DataFormatError(
            f"{path}: image is {size[0]}x{size[1]}; KTH frames must be 160x120 (resized to 128x128) or already 128x128",
            path,
        )
    if mode not in IMAGE_MODES:
        raise DataFormatError(f"{path}: image mode {mode!r}; expected grayscale (L) or RGB(A)", path)


def load_frame(path: Path, data: bytes | None = None) -> np.ndarray:
    """One frame as (128, 128) uint8: channel 0, resized with Pillow bilinear from 160x120."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            if im.size not in (SOURCE_SIZE, OUT_SIZE):
                raise DataFormatError(
                    f"{path}: image is {im.size[0]}x{im.size[1]}; KTH frames must be 160x120 "
                    "(resized to 128x128) or already 128x128",
                    path,
                )
            if im.mode not in IMAGE_MODES:
                raise DataFormatError(f"{path}: image mode {im.mode!r}; expected grayscale (L) or RGB(A)", path)
            im.load()
            ch = im if im.mode == "L" else im.getchannel(0)
            if ch.size != OUT_SIZE:
                ch = ch.resize(OUT_SIZE, Image.Resampling.BILINEAR)
            return np.array(ch, dtype=np.uint8)
    except DataFormatError:
        raise
    except FileNotFoundError:
        raise DataFormatError(f"{path}: frame file disappeared", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataFormatError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})", path) from None


class FrameFiles(LazyMixin):
    """Row store over image files: rows are decoded (and resized) when read."""

    def __init__(self, root: Path, relpaths: list[str]):
        self.root = Path(root)
        self.relpaths = relpaths

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, idx: int | slice) -> np.ndarray:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self.relpaths))
            return (
                np.stack([load_frame(self.root / self.relpaths[i]) for i in range(start, stop, step)])
                if stop > start
                else np.zeros((0, *OUT_SIZE[::-1]), np.uint8)
            )
        return load_frame(self.root / self.relpaths[int(idx)])


class KTHSource:
    family = "kth"
    parts = ("train", "test")

    def __init__(self, loc: Location):
        self.dir = loc.dataset_dir
        try:
            self.catalogs, self.files = scan(self.dir)
        except DataFormatError:
            raise
        except DataError:
            raise loc.not_found() from None
        # fail early on the common problems (wrong size or mode of a whole video): check the header of
        # each video's first frame; every frame is checked when it is decoded (and by prepare_dataset)
        for part in self.parts:
            offsets = self.catalogs[part].offsets()
            for a in offsets[:-1]:
                check_header(self.dir / self.files[part][a])

    def describe(self, part: str | None = None) -> str:
        return str(self.dir)

    def row_info(self, part: str) -> tuple[tuple[int, ...], str]:
        return OUT_SIZE[::-1], "uint8"

    def part(self, part: str) -> FrameFiles:
        return FrameFiles(self.dir, self.files[part])

    def catalog(self, part: str) -> Catalog:
        return self.catalogs[part]

    def all_files(self) -> list[str]:
        return self.files["train"] + self.files["test"]

    def stat_digest(self) -> str:
        """Cheap fingerprint of the tree: relative paths, sizes and modification times."""
        h = hashlib.sha256()
        for rel in self.all_files():
            st = os.stat(self.dir / rel)
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def shape_digest(self) -> str:
        """Relative paths and sizes only (survives a copy that changes modification times)."""
        h = hashlib.sha256()
        for rel in self.all_files():
            h.update(f"{rel}\t{os.path.getsize(self.dir / rel)}\n".encode())
        return h.hexdigest()

    def content_digest(self) -> str:
        """sha256 over (relative path, sha256 of the file) of every frame file: slow, exact."""
        h = hashlib.sha256()
        for rel in self.all_files():
            with open(self.dir / rel, "rb") as f:
                h.update(f"{rel}\t{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
        return h.hexdigest()


def val_persons_for(val_fraction: float | None, val_persons: Any) -> tuple[int, ...]:
    """Training persons held out for validation: `val_persons` if given, else the last
    round(val_fraction * 16) training persons (default 1/16: person 16)."""
    if val_persons is not None:
        try:
            persons = tuple(sorted({int(p) for p in val_persons}))
        except (TypeError, ValueError):
            raise DataError(f"val_persons must be a list of person numbers, got {val_persons!r}") from None
        bad = [p for p in persons if p not in TRAIN_PERSONS]
        if bad:
            raise DataError(f"val_persons {bad} are not training persons (01-16)")
        if val_fraction is not None:
            raise DataError("give either val_persons or val_fraction for KTH, not both")
        return persons
    f = check_fraction(val_fraction, 1 / 16)
    k = 0 if f == 0 else max(1, round(f * len(TRAIN_PERSONS)))
    if k >= len(TRAIN_PERSONS):
        raise DataError(f"val_fraction {f} would hold out every training person")
    return TRAIN_PERSONS[len(TRAIN_PERSONS) - k :]


def build(
    store: Any, name: str, split: str, *, seed: int, val_fraction: float | None, val_persons: Any = None, **kw: Any
) -> WindowDataset:
    reject_unknown(kw, (), name)
    seq_len = SEQ_LEN[name]
    held = val_persons_for(val_fraction, val_persons)
    if split == "test":
        part, persons = "test", set(TEST_PERSONS)
    elif split == "train":
        part, persons = "train", set(TRAIN_PERSONS) - set(held)
    else:
        part, persons = "train", set(held)
        if not persons:
            raise DataError(f"{name} val split is empty (val_fraction is 0)")
    cat = store.catalog(part)
    vids = [i for i, v in enumerate(cat.videos) if v.person in persons]
    label = ", ".join(f"{p:02d}" for p in sorted(persons))
    if not vids:
        raise NoWindowsError(
            f"{store.describe(part)}: no videos of persons {label} (the {name} {split} split)", store.describe(part)
        )
    starts = find_windows(cat, vids, seq_len)
    if len(starts) == 0:
        raise NoWindowsError(
            f"{store.describe(part)}: no usable window for the {name} {split} split "
            f"(persons {label}): no video has {seq_len} consecutive frames "
            f"(frame numbers k .. k+{seq_len - 1})",
            store.describe(part),
        )
    return WindowDataset(
        store.part(part),
        starts,
        seq_len,
        IN_FRAMES,
        seq_len - IN_FRAMES,
        name=name,
        split=split,
        origin=store.describe(part),
    )


# ------------------------------------------------------------------------------------------- synthetic

# (persons, frames per video, recordings dY)
SYNTH_SIZES = {"small": ((1, 2, 16, 17, 18), 50, (1,)), "medium": ((1, 2, 3, 4, 5, 16, 17, 18, 19), 80, (1, 2))}


def kth_frame(action: str, t: int, rng_params: dict) -> Image.Image:
    """One 160x120 RGB frame of the silhouette; deterministic in its arguments."""
    bg = rng_params["bg"]
    img = Image.new("L", SOURCE_SIZE, bg)
    draw = ImageDraw.Draw(img)
    # a soft horizontal floor line for texture
    draw.rectangle([0, 96, *SOURCE_SIZE], fill=max(0, bg - 25))
    shade, height = rng_params["shade"], rng_params["height"]
    speed = {"walking": 1.2, "jogging": 2.2, "running": 3.4}.get(action, 0.0)
    x0 = rng_params["x0"]
    if speed:
        span = SOURCE_SIZE[0] - 30
        pos = (x0 + speed * t) % (2 * span)
        cx = 15 + (pos if pos < span else 2 * span - pos)
        bob = 2 * math.sin(t * speed * 0.8)
    else:
        cx, bob = 40 + x0 % 80, 0.0
    top = 96 - height + bob
    head = height * 0.18
    draw.ellipse([cx - head / 2, top, cx + head / 2, top + head], fill=shade)
    draw.rectangle([cx - height * 0.12, top + head, cx + height * 0.12, top + height * 0.62], fill=shade)
    leg_phase = math.sin(t * max(speed, 0.3) * 0.9)
    for side in (-1, 1):
        fx = cx + side * (4 + 8 * leg_phase * (1 if speed else 0.1))
        draw.line([cx, top + height * 0.62, fx, 96], fill=shade, width=5)
    phase = 2 * math.pi * t / rng_params["period"]
    sy = top + head + 6
    if action == "boxing":
        reach = 10 + 14 * (0.5 + 0.5 * math.sin(phase))
        draw.line([cx, sy, cx + reach, sy + 2], fill=shade, width=4)
        draw.line([cx, sy + 4, cx + 24 - reach, sy + 6], fill=shade, width=4)
    elif action == "handclapping":
        gap = 3 + 10 * (0.5 + 0.5 * math.sin(phase))
        for side in (-1, 1):
            draw.line([cx + side * 5, sy, cx + side * gap, sy + 14], fill=shade, width=4)
    elif action == "handwaving":
        ang = 0.9 * math.sin(phase)
        for side in (-1, 1):
            ex = cx + side * 18 * math.cos(ang)
            ey = sy - 18 * math.sin(ang) * side
            draw.line([cx, sy, ex, ey], fill=shade, width=4)
    else:
        for side in (-1, 1):
            draw.line([cx, sy, cx - side * 6 * leg_phase, sy + 22], fill=shade, width=4)
    return Image.merge("RGB", (img, img, img))


def write_synthetic(folder: Path, seed: int, size: str) -> None:
    """The synthetic stand-in: every action for a few training persons (incl. 16) and test persons."""
    persons, n_frames, recordings = SYNTH_SIZES[size]
    for ai, action in enumerate(KTH_ACTIONS):
        for person in persons:
            for d in recordings:
                rng = np.random.default_rng([seed, 2, ai, person, d])
                params = {
                    "bg": int(rng.integers(150, 210)),
                    "shade": int(rng.integers(20, 70)),
                    "height": int(rng.integers(55, 75)),
                    "x0": int(rng.integers(0, 120)),
                    "period": float(rng.uniform(7, 11)),
                }
                vdir = folder / action / f"person{person:02d}_{action}_d{d}_uncomp"
                vdir.mkdir(parents=True)
                for t in range(n_frames):
                    kth_frame(action, t, params).save(vdir / f"image_{t + 1:04d}.png", compress_level=1)


# ------------------------------------------------------------------------------------------- registry


def looks_like(d: Path) -> bool:
    return any((d / a).is_dir() for a in KTH_ACTIONS)


_COMMON = dict(
    family="kth",
    folder="kth",
    source=KTHSource,
    build=build,
    looks_like=looks_like,
    origin=(
        "KTH comes from the OpenSTL release asset kth_action.zip (the PredRNN image version; see OpenSTL "
        "tools/prepare_data/download_kth.sh); unzip it so that {expected}/boxing/"
        "person01_boxing_d1_uncomp/image_0001.png and the other actions exist"
    ),
    synth=write_synthetic,
    preset="kth",
    smoke_preset="kth-tiny",
    in_frames=IN_FRAMES,
    channels=1,
    height=OUT_SIZE[1],
    width=OUT_SIZE[0],
    # No digest of OpenSTL's archive is published: it is checked by unpacking it and opening it with the reader.
    downloads=(SourceFile("kth_action.zip", (OPENSTL_RELEASE + "kth_action.zip",), Checksum(), unpack="zip-tree"),),
)
SPEC = register_dataset(
    DatasetSpec(
        name="kth",
        out_frames=SEQ_LEN["kth"] - IN_FRAMES,
        recipe=Recipe(epochs=100, batch_size=4, lr=1e-4),
        bench_batch=4,
        **_COMMON,
    )
)
SPEC_40 = register_dataset(
    DatasetSpec(
        name="kth40",
        out_frames=SEQ_LEN["kth40"] - IN_FRAMES,
        recipe=Recipe(epochs=100, batch_size=1, lr=1e-4, val_batch_size=1),
        **_COMMON,
    )
)
