"""The forecaster as an MLflow model: logging it into a run, and loading a forecaster from anything a user
names (an MLflow model URI, a downloaded MLflow model folder, or a local training checkpoint).

MLflow format (see docs/TRAINING.md, "Model format"): `mlflow.pytorch.log_model` with
`serialization_format="pt2"` (MLflow 3's default: a `torch.export` program, no pickle, loads without
vmrnn installed) of a CPU copy using the pure-PyTorch scan, with a dynamic batch dimension; the
vmrnn weights and config ride along as `extra_files`, so `load_forecaster` rebuilds the eager model
(any device, any horizon, the CUDA scan). `model_format="pickle"` logs the eager module with
cloudpickle instead (seconds instead of ~20-90 s of export on a CPU; needs vmrnn to load).

The input example stored with the model is one sample, its values rounded to 1/32 steps: it documents the
input's shape and range, and at 8-bit float precision its two JSON copies (input_example.json,
serving_input_example.json) would be most of a small model's size.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from vmrnn.tracking.uris import (
    TrackingUnavailable,
    check_reachable,
    default_tracking_uri,
    is_remote,
    pinned_tracking_uri,
    sqlite_path,
    strip_credentials,
)
from vmrnn.train.export import (
    META_FILE,
    WEIGHTS_FILE,
    LoadedForecaster,
    build_forecaster,
    load_checkpoint_forecaster,
    load_weights_dir,
)

log = logging.getLogger("vmrnn.train")
# MLflow is imported inside the functions that call it: importing this module does not import MLflow.

EXAMPLE_LEVELS = 32  # the input example's values are multiples of 1/32: short in JSON, still a picture


def small_example(frames: np.ndarray) -> np.ndarray:
    """The input example logged with a model: the first sample of (B, T, C, H, W) frames (or the one sample of
    (T, C, H, W)) as a batch of one, float32, rounded to multiples of 1/EXAMPLE_LEVELS."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[0] < 1:
        raise ValueError(f"an input example must be (T, C, H, W) or (B, T, C, H, W) frames; got shape {x.shape}")
    return np.ascontiguousarray(np.round(x[:1] * EXAMPLE_LEVELS) / EXAMPLE_LEVELS, dtype=np.float32)


def log_forecaster(
    state: dict[str, Tensor], meta: dict[str, Any], example: np.ndarray, *, fmt: str = "pt2", name: str = "model"
) -> tuple[Any, str]:
    """Log into the *active* MLflow run; `example` holds input frames (`small_example` keeps one sample).
    Returns (ModelInfo, the format actually used)."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], "cpu", scan_backend="torch")
    example = small_example(example)
    _, t_in, c, h, w = example.shape
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, t_in, c, h, w))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["n_future"], c, h, w))]),
    )
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        wpath, mpath = Path(tmp) / WEIGHTS_FILE, Path(tmp) / META_FILE
        torch.save(state, wpath)
        mpath.write_text(json.dumps(meta, indent=2, default=str))
        common = dict(name=name, signature=sig, input_example=example, extra_files=[str(wpath), str(mpath)])
        # MLflow validates the serving example by loading the model back; its warning on failure is noise.
        logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)
        if fmt == "pt2":
            try:
                # validate_serving_input=False: MLflow would load the exported program back and run it once
                # more (seconds); the pt2 branch of save_model takes no other extra kwargs.
                info = Model.log(
                    artifact_path=None,  # MLflow 3 names the model by `name`
                    flavor=_PyTorchOneSampleExample(),
                    pytorch_model=fc,
                    serialization_format="pt2",
                    validate_serving_input=False,
                    pip_requirements=[torch_req, "numpy"],
                    **common,
                )
                return info, "pt2"
            except Exception as exc:  # a model torch.export cannot trace: keep training's result anyway
                log.warning(
                    "torch.export of the forecaster failed (%s: %s); logging it with pickle instead",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:300],
                )
        info = mlflow.pytorch.log_model(
            fc, serialization_format="pickle", pip_requirements=[torch_req, "numpy", "einops", "vmrnn-sweeps"], **common
        )
        return info, "pickle"


class _PyTorchOneSampleExample:
    """mlflow.pytorch as the flavor of `Model.log`, for pt2: torch.export traces the example twice over (it keeps
    the batch dimension dynamic only for a batch > 1), and the stored input example stays the one sample."""

    __name__ = "mlflow.pytorch"  # the flavor name MLflow records on the logged model

    def save_model(self, path: str, mlflow_model: Any, input_example: np.ndarray, **kwargs: Any) -> None:
        import mlflow
        from mlflow.models import convert_input_example_to_serving_input

        mlflow.pytorch.save_model(
            path=path, mlflow_model=mlflow_model, input_example=np.concatenate([input_example] * 2), **kwargs
        )
        saved = mlflow_model.saved_input_example_info or {}
        if saved.get("type") == "ndarray":  # MLflow's files of the traced pair, rewritten with the one sample
            Path(path, saved["artifact_path"]).write_text(json.dumps(input_example.tolist()))
            if saved.get("serving_input_path"):
                serving = json.loads(convert_input_example_to_serving_input(input_example))  # without its indent
                Path(path, saved["serving_input_path"]).write_text(json.dumps(serving))


def log_forecaster_in_run(
    uri: str,
    run_id: str,
    state: dict[str, Tensor],
    meta: dict[str, Any],
    example: np.ndarray,
    *,
    fmt: str = "pt2",
    name: str = "model",
) -> tuple[str, str]:
    """Log into run `run_id` of the store `uri` (whatever run or URI the process has active stays as it
    was). Returns (the model's URI, the format actually used)."""
    import mlflow

    with pinned_tracking_uri(uri):
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info, used = log_forecaster(state, meta, example, fmt=fmt, name=name)
    return info.model_uri, used


class ModelNotFound(FileNotFoundError):
    """An MLflow model URI that the tracking store does not hold (the message names the store)."""


def load_forecaster(
    uri_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    which: str = "best",
    tracking_uri: str | None = None,
) -> LoadedForecaster:
    """Load a forecaster from an MLflow model URI (models:/..., runs:/..., or any artifact URI; resolved
    against `tracking_uri`, default $MLFLOW_TRACKING_URI else ./mlflow.db), an MLflow model folder, or a
    local training checkpoint (an epoch dir, a checkpoint root, or a Ray run folder); `which` picks the
    checkpoint's best (by val_mse) or last weights.

    Reading never writes: a store that does not exist is `TrackingUnavailable` (nothing is created), a model
    the store lacks is `ModelNotFound`; both name the tracking URI and how to point elsewhere."""
    device = torch.device(device)
    s = str(uri_or_path)
    is_uri = "://" in s or s.startswith(("models:/", "runs:/"))
    if not is_uri:
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"no model at {p}: give a checkpoint folder or an MLflow URI (models:/NAME@ALIAS, runs:/RUN_ID/model)"
            )
        if (p / "MLmodel").exists():
            return _from_mlflow_dir(p, device, s)
        return load_checkpoint_forecaster(p, device, which)
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Resolve the store here, not from mlflow's process-global URIs, which an earlier run may have set;
    # models:/ URIs are resolved through the registry URI, so both are pinned.
    where = (
        "from --tracking-uri / MLFLOW_TRACKING_URI"
        if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        else "the default store: mlflow.db in the current folder"
    )
    tracking_uri = tracking_uri or default_tracking_uri()
    if s.startswith(("models:/", "runs:/")):
        _check_store_exists(tracking_uri, where)
    try:
        with pinned_tracking_uri(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s, tracking_uri=tracking_uri))
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
            raise ModelNotFound(
                f"{s} is not in the MLflow tracking store {strip_credentials(tracking_uri)} ({where}): "
                f"{str(exc).splitlines()[0][:200]}; point --tracking-uri / MLFLOW_TRACKING_URI at the store "
                "that holds it"
            ) from None
        raise
    return _from_mlflow_dir(local, device, s)


def _check_store_exists(uri: str, where: str) -> None:
    """A local store that is not there is an error, never created by a read (MLflow would create an empty one)."""
    hint = (
        "; run from the folder that holds mlflow.db, or point --tracking-uri / MLFLOW_TRACKING_URI at your "
        "store (sqlite:////abs/path/mlflow.db or http://HOST:5000)"
    )
    if is_remote(uri):
        check_reachable(uri, hint="")
        return
    db = sqlite_path(uri)
    folder = Path(urlsplit(uri).path) if uri.startswith("file:") else None
    if (db is not None and not db.is_file()) or (folder is not None and not folder.is_dir()):
        raise TrackingUnavailable(f"no MLflow tracking store at {uri} ({where}); nothing was created{hint}")


def _from_mlflow_dir(local: Path, device: torch.device, source: str) -> LoadedForecaster:
    w, m = local / "extra_files" / WEIGHTS_FILE, local / "extra_files" / META_FILE
    if w.exists() and m.exists():
        return load_weights_dir(w, m, device, source)
    import mlflow

    module = mlflow.pytorch.load_model(str(local))
    meta: dict[str, Any] = json.loads(m.read_text()) if m.exists() else {}
    n_future = int(meta.get("n_future", getattr(module, "n_future", 0)) or 0)
    n_input = int(meta.get("n_input", getattr(module, "n_input", 0)) or 0)
    return LoadedForecaster(module, n_input, n_future, meta, source, torch.device("cpu"))
