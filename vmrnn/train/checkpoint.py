"""Training checkpoints: one directory per saved epoch.

    state.pt         model + optimizer + scheduler state, epoch, RNG state, metrics history, best
                     (epoch, val_mse), MLflow run id, world size, the resolved TrainConfig (dict)
    best_model.pt    state_dict of the best epoch so far (by val_mse): what test scoring and export use
    config.json      {"train": TrainConfig dict, "model": ModelConfig dict, "dataset": {...}} (readable;
                     enough to rebuild the model without unpickling state.pt)
    metrics.json     the per-epoch metrics history (readable; `epoch` and `best_epoch` counted from 1, as
                     everywhere users see epochs; state.pt keeps the loop's 0-based index)

Plain runs keep `<checkpoint_dir>/epoch_NNNN/` (the newest `keep_checkpoints`); Ray runs hand the same
directory to `ray.train.report`. Tensors are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vmrnn.train.epochs import epoch_number

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


class CheckpointError(FileNotFoundError):
    """A checkpoint path that does not hold a vmrnn training checkpoint (shown as a user error)."""


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with a one-line `CheckpointError` when the file is not a
    torch file or holds anything but tensors and plain data (a pickled object could run code on load:
    it is refused, never unpickled)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as exc:
        text = str(exc)
        unsafe = re.search(r"(unsupported GLOBAL [^\n]*?)(?: whose module| because|\.\s|\n|$)", text)
        if unsafe:
            why = (
                f"it holds pickled Python objects ({unsafe.group(1).strip()}), not only tensors; "
                "refused: loading it would run code"
            )
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = f"not a readable torch file ({type(exc).__name__}: {lines[0][:200] if lines else ''})"
        raise CheckpointError(f"cannot read checkpoint file {path}: {why}") from None


def write_checkpoint(
    directory: str | os.PathLike, state: dict[str, Any], best_model: dict[str, Any] | None, meta: dict[str, Any]
) -> Path:
    """Write the checkpoint files into `directory` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, **state}, d / STATE_FILE)
    if best_model is not None:
        torch.save(best_model, d / BEST_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
    (d / METRICS_FILE).write_text(json.dumps(_readable(state.get("history", [])), indent=2, default=_json_default))
    return d


def _readable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with its epochs counted from 1, as users see them."""
    return [{**h, **{k: epoch_number(h[k]) for k in ("epoch", "best_epoch") if k in h}} for h in history]


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def save_epoch_checkpoint(
    root: str | os.PathLike,
    epoch: int,
    state: dict[str, Any],
    best_model: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Atomically write `<root>/epoch_NNNN` (temp dir + rename), then prune all but the newest `keep`.

    `epoch` is the loop's 0-based index; the folder is named as users count it (`epoch_0001` after the first).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch_number(epoch):04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".epoch_{epoch_number(epoch):04d}.", dir=root))
    write_checkpoint(tmp, state, best_model, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_epoch_dirs(root))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def _epoch_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _EPOCH_DIR.match(p.name)
            if m and (p / STATE_FILE).exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir itself, or the newest `epoch_NNNN` under a checkpoint root or Ray run folder."""
    p = Path(path).expanduser()
    if (p / STATE_FILE).exists():
        return p
    dirs = _epoch_dirs(p)
    if dirs:
        return dirs[-1][1]
    # A Ray Train run folder: checkpoint_<date>/ subfolders
    ray_dirs = (
        sorted((c for c in p.glob("checkpoint_*") if (c / STATE_FILE).exists()), key=lambda c: c.stat().st_mtime)
        if p.is_dir()
        else []
    )
    if ray_dirs:
        return ray_dirs[-1]
    raise CheckpointError(
        f"no vmrnn checkpoint at {p} (expected {STATE_FILE}, epoch_NNNN/ or checkpoint_*/ folders from a training run)"
    )


def latest_checkpoint(root: str | os.PathLike | None) -> Path | None:
    if not root:
        return None
    try:
        return find_checkpoint(root)
    except CheckpointError:
        return None


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    d = find_checkpoint(path)
    state = load_tensors(d / STATE_FILE, map_location)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {d} has format version {version}, this vmrnn reads {FORMAT_VERSION}")
    state["path"] = str(d)
    return state


def load_best_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    d = find_checkpoint(path)
    f = d / BEST_FILE if (d / BEST_FILE).exists() else None
    if f is None:
        return load_state(d, map_location)["model"]
    return load_tensors(f, map_location)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    d = find_checkpoint(path)
    try:
        return json.loads((d / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} has no {CONFIG_FILE}") from None
