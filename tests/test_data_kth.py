"""KTH reader: the official window rule on a crafted tree, image handling, splits and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vmrnn.data import (
    DATASETS,
    DataError,
    DataFormatError,
    DatasetNotFoundError,
    NoWindowsError,
    build_dataset,
    write_synthetic,
)
from vmrnn.data.kth import load_frame

# Each frame of the crafted tree is a constant gray image whose value identifies (video, frame number).
OFFSET = {"boxing": 0, "jogging": 100, "walking": 200, "handwaving": 150, "running": 60}


def make_video(root, action, person, d, numbers, *, size=(128, 128), mode="L", value=None, ext="png"):
    vdir = root / "kth" / action / f"person{person:02d}_{action}_d{d}_uncomp"
    vdir.mkdir(parents=True)
    for k in numbers:
        v = value if value is not None else OFFSET[action] + k
        if mode == "L":
            img = Image.new("L", size, v)
        else:
            img = Image.new("RGB", size, (v, 255 - v, 7))
        img.save(vdir / f"image_{k:04d}.{ext}")
    return vdir


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Train persons 01-03, validation person 16, test person 17; gaps and a cross-video trap."""
    r = tmp_path_factory.mktemp("kth-crafted")
    make_video(r, "boxing", 1, 1, range(1, 66))  # 65 frames
    make_video(r, "jogging", 2, 1, [k for k in range(1, 46) if k != 10])  # 44 frames, frame 10 missing
    make_video(r, "walking", 3, 1, range(1, 11))  # 10 frames
    make_video(r, "walking", 3, 2, range(11, 36))  # 25 frames continuing 11..35
    make_video(r, "handwaving", 16, 1, range(1, 32))  # 31 frames
    make_video(r, "running", 17, 1, range(1, 34))  # 33 frames
    return r


def first_values(ds):
    """(first frame value, whether the window's 30/50 frames are consecutive numbers of one video)."""
    out = []
    for i in range(len(ds)):
        x, y = ds[i]
        frames = torch.cat([x, y])[:, 0, 0, 0].mul(255).round().long().tolist()
        assert frames == list(range(frames[0], frames[0] + len(frames))), frames
        out.append(frames[0])
    return out


def test_window_rule_by_hand(crafted):
    # boxing 1..65, step 30: windows ending at 65 (start 36) and 35 (start 6); nothing fits before.
    # jogging 1..9, 11..45, step 3: end 45 -> start 16 (ok), end 42 -> start 13 (ok), end 39 -> start 9
    #   (numbers 9..39 span 30, rejected); every later window spans the gap; 11..40 is skipped by the step.
    # walking d1 1..10 + d2 11..35: the 30 rows ending at d2's frame 35 are frames 6..35 with a number
    #   difference of 29, but they cross two videos: rejected. No window.
    train = build_dataset("kth", crafted, "train", prepared="never")
    assert first_values(train) == [6, 36, 100 + 13, 100 + 16]
    # handwaving person 16 (validation): 1..31 -> one window starting at 2
    assert first_values(build_dataset("kth", crafted, "val", prepared="never")) == [150 + 2]
    # running person 17 (test), step 3: end 33 -> start 4, end 30 -> start 1
    assert first_values(build_dataset("kth", crafted, "test", prepared="never")) == [60 + 1, 60 + 4]
    # kth40 (seq 50): only boxing end 65 -> start 16
    k40 = build_dataset("kth40", crafted, "train", prepared="never")
    assert first_values(k40) == [16]
    x, y = k40[0]
    assert x.shape == (10, 1, 128, 128) and y.shape == (40, 1, 128, 128)
    with pytest.raises(NoWindowsError, match="no usable window"):
        build_dataset("kth40", crafted, "test", prepared="never")


def test_val_persons_option(crafted):
    # holding out persons 1 and 16 leaves jogging (person 2) in train
    train = build_dataset("kth", crafted, "train", val_persons=[1, 16], prepared="never")
    assert first_values(train) == [113, 116]
    val = build_dataset("kth", crafted, "val", val_persons=[1, 16], prepared="never")
    assert first_values(val) == [6, 36, 152]
    # val_fraction 0: all 16 training persons are trained on, no validation split
    assert len(build_dataset("kth", crafted, "train", val_fraction=0, prepared="never")) == 5
    with pytest.raises(DataError, match="empty"):
        build_dataset("kth", crafted, "val", val_fraction=0, prepared="never")
    # val_fraction 0.125 -> persons 15 and 16
    assert len(build_dataset("kth", crafted, "val", val_fraction=0.125, prepared="never")) == 1
    with pytest.raises(DataError, match="not training persons"):
        build_dataset("kth", crafted, "val", val_persons=[17], prepared="never")


def test_frames_are_channel_zero_resized_with_pillow_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    expect = np.asarray(Image.fromarray(rgb[:, :, 0]).resize((128, 128), Image.Resampling.BILINEAR))
    got = load_frame(tmp_path / "a.png")
    assert got.shape == (128, 128) and got.dtype == np.uint8 and np.array_equal(got, expect)
    # grayscale input: channel 0 is the image itself
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    assert np.array_equal(load_frame(tmp_path / "g.png"), expect)
    # 128x128 images are taken as they are (no resize), RGB -> channel 0
    sq = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(sq).save(tmp_path / "s.png")
    assert np.array_equal(load_frame(tmp_path / "s.png"), sq[:, :, 0])


def test_synthetic_tree_in_published_format(tmp_path):
    write_synthetic("kth", tmp_path, seed=1)
    with Image.open(next((tmp_path / "kth" / "boxing").glob("person01_*/image_0001.png"))) as im:
        assert im.size == (160, 120) and im.mode == "RGB"
    spec = DATASETS["kth"]
    for split in ("train", "val", "test"):
        ds = build_dataset("kth", tmp_path, split, prepared="never")
        x, y = ds[len(ds) - 1]
        assert x.shape == (spec.in_frames, 1, 128, 128) and y.shape == (spec.out_frames, 1, 128, 128)
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert DATASETS["kth40"].out_frames == 40 and DATASETS["kth40"].preset == "kth"
    # synthetic jogging/running videos overlap (step 3), boxing ones do not
    ds = build_dataset("kth", tmp_path, "test", prepared="never")
    assert len(ds) > 0


def test_missing_tree_names_path_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("kth", tmp_path, "train")
    assert str(tmp_path / "kth") in str(e.value) and "kth_action.zip" in str(e.value)


def test_bad_images_raise_naming_the_file(tmp_path):
    vdir = make_video(tmp_path, "boxing", 1, 1, range(1, 31), size=(100, 100), value=9)
    with pytest.raises(DataFormatError, match=r"100x100.*160x120") as e:
        build_dataset("kth", tmp_path, "train", prepared="never")  # first frames are checked up front
    assert "image_0001.png" in str(e.value)
    for k in range(1, 31):
        Image.new("L", (160, 120) if k != 12 else (161, 120)).save(vdir / f"image_{k:04d}.png")
    ds = build_dataset("kth", tmp_path, "train", prepared="never")
    with pytest.raises(DataFormatError, match=r"image_0012.png: image is 161x120"):
        ds[0]  # the others when decoded
    with pytest.raises(DataFormatError, match=r"image_0012.png: image is 161x120"):
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))  # also from a DataLoader worker
    Image.new("P", (160, 120)).save(vdir / "image_0001.png")
    with pytest.raises(DataFormatError, match=r"image_0001.png: image mode 'P'"):
        build_dataset("kth", tmp_path, "train", prepared="never")


def test_truncated_png_raises_naming_the_file(tmp_path):
    vdir = make_video(tmp_path, "walking", 2, 1, range(1, 31), size=(160, 120), mode="RGB")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(vdir / "image_0005.png")
    data = (vdir / "image_0005.png").read_bytes()
    (vdir / "image_0005.png").write_bytes(data[: len(data) // 2])
    ds = build_dataset("kth", tmp_path, "train", prepared="never")
    with pytest.raises(DataFormatError, match="image_0005.png"):
        ds[0]
    (vdir / "image_0005.png").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="image_0005.png"):
        ds[0]


def test_tree_without_usable_window(tmp_path):
    make_video(tmp_path, "boxing", 1, 1, range(1, 20))  # too short
    make_video(tmp_path, "running", 2, 1, [k for k in range(1, 40) if k % 15])  # gaps every 15 frames
    with pytest.raises(NoWindowsError, match="no usable window") as e:
        build_dataset("kth", tmp_path, "train", prepared="never")
    assert str(tmp_path / "kth") in str(e.value)
    with pytest.raises(NoWindowsError, match="no videos of persons 17"):
        build_dataset("kth", tmp_path, "test", prepared="never")


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("boxing/person01_boxing_d1_uncomp/frame_0001.png", "unexpected file"),
        ("boxing/person1_boxing_d1/image_0001.png", "unexpected entry"),
        ("boxing/person01_walking_d1_uncomp/image_0001.png", "inside the 'boxing' folder"),
        ("boxing/person30_boxing_d1_uncomp/image_0001.png", "outside KTH's persons"),
    ],
)
def test_malformed_tree(tmp_path, bad, pattern):
    make_video(tmp_path, "boxing", 2, 1, range(1, 31))
    p = tmp_path / "kth" / bad
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (128, 128)).save(p)
    with pytest.raises(DataFormatError, match=pattern):
        build_dataset("kth", tmp_path, "train", prepared="never")


def test_duplicate_frame_numbers(tmp_path):
    vdir = make_video(tmp_path, "boxing", 2, 1, range(1, 31))
    Image.new("L", (128, 128)).save(vdir / "image_0003.jpg")
    with pytest.raises(DataFormatError, match="appears twice"):
        build_dataset("kth", tmp_path, "train", prepared="never")
