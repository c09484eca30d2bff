"""`vmrnn data synth | prepare | info` through the top-level command."""

from __future__ import annotations

import argparse

import pytest

from vmrnn.cli import data as data_cli
from vmrnn.cli import main


def test_register_adds_the_data_command():
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", "--dataset", "kth", "--out", "x", "--seed", "4", "--size", "medium"])
    assert args.func is data_cli.run_synth and (args.dataset, args.seed, args.size) == ("kth", 4, "medium")
    args = parser.parse_args(["data", "prepare", "--dataset", "kth40", "--data-dir", "d", "--out", "o"])
    assert args.func is data_cli.run_prepare and args.out == "o"
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--dataset", "kth40", "--out", "x"])  # synth writes kth


def test_synth_prepare_info(tmp_path, capsys):
    assert main(["data", "synth", "--dataset", "taxibj", "--out", str(tmp_path), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert f"wrote synthetic taxibj (small, seed 2) to {tmp_path / 'taxibj'}" in out and "dataset.npz" in out
    assert main(["data", "prepare", "--dataset", "taxibj", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "prepared" / "taxibj" / "train.arrow") in out and "manifest.json" in out
    assert main(["data", "info", "--dataset", "taxibj", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prepared data" in out and "train" in out and "test" in out


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert main(["data", "prepare", "--dataset", "kth", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vmrnn data: error:") and "\n" not in err and "kth_action.zip" in err
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "x").write_text("")
    assert main(["data", "synth", "--dataset", "custom", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
