"""The dataset registry: one DatasetSpec per dataset, every list of datasets derived from it, and a dataset
added from outside the package (a reader defined in this file) that trains with the plain PyTorch loop."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vmrnn.cli import build_parser
from vmrnn.cli import main as cli_main
from vmrnn.data import (
    DATASETS,
    DataError,
    DatasetNotFoundError,
    DatasetSpec,
    Recipe,
    build_dataset,
    dataset_names,
    dataset_spec,
    get_dataset,
    prepare_dataset,
    register_dataset,
    synth_names,
)
from vmrnn.data.base import NpyRows, SequenceDataset, npy_header, reject_unknown
from vmrnn.train.config import TrainConfig, TrainConfigError
from vmrnn.train.loop import run_training
from vmrnn.train.torchrun_main import parse_args as torchrun_args

DATA_PKG = Path(__file__).resolve().parents[1] / "vmrnn" / "data"

# ------------------------------------------------------------------------ a dataset defined only here

SIDE, IN, OUT = 16, 3, 3


class DotsSource:
    """``dots/{train,test}.npy``: (N, 6, 1, 16, 16) uint8 sequences of a dot moving one pixel per frame."""

    family = "dots"
    parts = ("train", "test")

    def __init__(self, loc):
        self.dir = loc.dataset_dir
        self.headers = {}
        for part in self.parts:
            path = self.dir / f"{part}.npy"
            if not path.is_file():
                raise loc.not_found(path)
            self.headers[part] = npy_header(path)

    def describe(self, part=None):
        return str(self.dir / f"{part}.npy") if part else str(self.dir)

    def source_files(self):
        return [self.dir / f"{p}.npy" for p in self.parts]

    def row_info(self, part):
        return self.headers[part][0][1:], "uint8"

    def part(self, part):
        shape, dtype = self.headers[part]
        return NpyRows(self.dir / f"{part}.npy", shape, dtype)


def build_dots(store, name, split, *, seed, val_fraction, **kw):
    reject_unknown(kw, (), name)
    rows = store.part("test" if split == "test" else "train")
    n = len(rows)
    idx = np.arange(n) if split == "test" else (np.arange(n - n // 4) if split == "train" else np.arange(n - n // 4, n))
    return SequenceDataset(rows, idx, IN, OUT, name=name, split=split, origin=store.describe(split))


def write_dots(folder, seed, size):
    rng = np.random.default_rng(seed)
    for part, n in (("train", 24), ("test", 8)):
        seq = np.zeros((n, IN + OUT, 1, SIDE, SIDE), np.uint8)
        for i in range(n):
            y, x, v = rng.integers(2, SIDE - 2), rng.integers(0, SIDE), rng.choice([-1, 1])
            for t in range(IN + OUT):
                seq[i, t, 0, y - 1 : y + 2, (x + v * t) % SIDE] = 255
        np.save(folder / f"{part}.npy", seq)


DOTS = DatasetSpec(
    name="dots",
    family="dots",
    folder="dots",
    source=DotsSource,
    build=build_dots,
    looks_like=lambda d: (d / "train.npy").exists(),
    origin="dots are made up by tests/test_data_registry.py; expected at {expected}",
    synth=write_dots,
    recipe=Recipe(epochs=1, batch_size=4, lr=2e-3),
    preset="kth",
    smoke_preset="kth-tiny",
    fit_model=True,
    in_frames=IN,
    out_frames=OUT,
    channels=1,
    height=SIDE,
    width=SIDE,
)


@pytest.fixture
def dots():
    spec = register_dataset(DOTS)
    yield spec
    DATASETS.pop("dots")


# ------------------------------------------------------------------------ the registry itself


def test_built_in_datasets_and_lookups():
    assert dataset_names()[:5] == ("taxibj", "kth", "kth40", "mmnist", "custom")
    assert synth_names()[:4] == ("taxibj", "kth", "mmnist", "custom")  # one per family: kth40 writes kth
    kth, kth40 = get_dataset("kth"), get_dataset("kth40")
    assert (kth.family, kth.folder, kth40.family, kth40.folder) == ("kth", "kth", "kth", "kth")
    assert kth.source is kth40.source and (kth.out_frames, kth40.out_frames) == (20, 40)
    assert get_dataset("mmnist").folder == "moving_mnist" and get_dataset("taxibj").recipe.lr == 4e-4
    assert get_dataset("custom").in_frames is None and get_dataset("custom").from_data is not None
    with pytest.raises(DataError, match=r"^unknown dataset 'nope'; choose one of \['taxibj', 'kth'") as e:
        get_dataset("nope")
    assert "\n" not in str(e.value)


def test_register_refuses_conflicts_and_bad_specs():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(dataclasses.replace(get_dataset("taxibj"), recipe=Recipe(1, 1, 1e-3)))
    assert register_dataset(get_dataset("taxibj")) is get_dataset("taxibj")  # the same spec again: a no-op
    with pytest.raises(ValueError, match="folder 'taxibj' already holds 'taxibj'"):
        register_dataset(dataclasses.replace(DOTS, name="dots2", family="dots2", folder="taxibj"))
    with pytest.raises(ValueError, match="family 'kth' lives in folder 'kth'"):
        register_dataset(dataclasses.replace(get_dataset("kth"), name="kth99", folder="kth99"))
    with pytest.raises(ValueError, match="give in_frames"):
        dataclasses.replace(DOTS, in_frames=None)
    with pytest.raises(ValueError, match="lower-case"):
        dataclasses.replace(DOTS, name="Dots")
    assert "dots2" not in DATASETS and "kth99" not in DATASETS


def test_no_import_cycle_inside_vmrnn_data():
    """No module of vmrnn.data imports (at module level or in a function) a module that imports it back."""
    modules = {p.stem: p for p in DATA_PKG.glob("*.py")}
    pkg = "__init__"
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "vmrnn.data":  # `from vmrnn.data import x`: submodule x, or the package
                    targets = [f"vmrnn.data.{a.name}" if a.name in modules else "vmrnn.data" for a in node.names]
                else:
                    targets = [node.module]
            for t in targets:
                if t == "vmrnn.data":
                    edges[mod].add(pkg)
                elif t.startswith("vmrnn.data."):
                    edges[mod].add(t.split(".")[2])
    assert edges["build"] and "prepare" in edges["build"]  # the graph was read

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for n in edges.get(m, ()):
                if n == goal:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return False

    cycles = sorted(f"{a} -> {b}" for a in edges for b in edges[a] if reaches(b, a))
    assert cycles == []


# ------------------------------------------------------------------------ lists derived from the registry


def test_a_registered_dataset_is_in_every_choice_list(dots):
    parser = build_parser()
    assert parser.parse_args(["train", "--dataset", "dots", "--data-dir", "d"]).dataset == "dots"
    assert parser.parse_args(["evaluate", "--checkpoint", "c", "--data-dir", "d", "--dataset", "dots"]).dataset
    for sub in ("prepare", "info"):
        assert parser.parse_args(["data", sub, "--dataset", "dots", "--data-dir", "d"]).dataset == "dots"
    assert parser.parse_args(["data", "synth", "--dataset", "dots", "--out", "o"]).dataset == "dots"
    assert torchrun_args(["--dataset", "dots", "--data-dir", "d"]).dataset == "dots"
    assert TrainConfig.from_dict({"dataset": "dots", "data_dir": "d"}).dataset == "dots"

    from vmrnn.tune.spaces import SweepSpec

    sweep = SweepSpec(dataset="dots", space={}, smoke_space={}, smoke_official={})
    assert (sweep.resolved_preset(False), sweep.resolved_preset(True)) == ("kth", "kth-tiny")


def test_an_unregistered_dataset_is_refused_everywhere(capsys):
    assert "dots" not in DATASETS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--dataset", "dots", "--data-dir", "d"])
    assert "invalid choice: 'dots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        torchrun_args(["--dataset", "dots", "--data-dir", "d"])
    with pytest.raises(TrainConfigError, match=r"'dataset' must be one of \['taxibj', 'kth', 'kth40'"):
        TrainConfig.from_dict({"dataset": "dots", "data_dir": "d"})
    from vmrnn.tune.spaces import SweepSpec

    with pytest.raises(DataError, match="unknown dataset 'dots'"):
        SweepSpec(dataset="dots", space={}, smoke_space={}, smoke_official={})


def test_bench_shapes_come_from_the_registry():
    from vmrnn.bench import SHAPES

    for spec in DATASETS.values():
        if spec.bench_batch is None:
            continue
        shape = SHAPES[spec.preset]
        assert (shape.batch, shape.n_input, shape.n_output) == (spec.bench_batch, spec.in_frames, spec.out_frames)
    assert SHAPES["taxibj"].batch == 16 and SHAPES["kth"].batch == 4 and SHAPES["mmnist-openstl"].n_output == 10


# ------------------------------------------------------------------------ the added dataset end to end


def test_added_dataset_reads_prepares_and_trains_one_epoch(dots, tmp_path, capsys):
    with pytest.raises(
        DatasetNotFoundError,
        match=r"dots data not found.*made up by tests.*vmrnn data synth "
        r"--dataset dots",
    ):
        build_dataset("dots", tmp_path, "train")
    assert cli_main(["data", "synth", "--dataset", "dots", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "dots" / "SYNTHETIC.txt").is_file()
    src = build_dataset("dots", tmp_path, "train", prepared="never")
    assert len(src) == 18 and [tuple(t.shape) for t in src[0]] == [(3, 1, 16, 16), (3, 1, 16, 16)]
    prepare_dataset("dots", tmp_path)
    assert json.loads((tmp_path / "prepared" / "dots" / "manifest.json").read_text())["dataset"] == "dots"
    prep = build_dataset("dots", tmp_path, "train", prepared="require")
    assert all(torch.equal(a, b) for a, b in zip(src[5], prep[5]))
    assert cli_main(["data", "info", "--dataset", "dots", "--data-dir", str(tmp_path)]) == 0
    assert "frames 3 -> 3, 1x16x16, model preset 'kth'" in capsys.readouterr().out
    assert dataset_spec("dots", tmp_path) is dots

    cfg = TrainConfig.from_dict(
        {
            "dataset": "dots",
            "data_dir": str(tmp_path),
            "preset": "kth-tiny",
            "device": "cpu",
            "tracking": False,
            "warmup_epochs": 0,
            "seed": 3,
        }
    ).resolved()
    assert (cfg.epochs, cfg.batch_size, cfg.val_batch_size, cfg.lr) == (1, 4, 4, 2e-3)  # the spec's recipe
    assert (cfg.model["img_size"], cfg.model["in_chans"]) == (16, 1)  # fit_model: sized to the frames
    torch.manual_seed(0)
    res = run_training(cfg)
    assert [m["epoch"] for m in res.history] == [0]
    m = res.history[0]
    assert np.isfinite(m["train_loss"]) and np.isfinite(m["val_mse"]) and m["val_samples"] == 6
    assert res.test_metrics["count"] == 8 and np.isfinite(res.test_metrics["mse"])
