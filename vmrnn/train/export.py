"""The deployable model: `Forecaster` (inputs -> forecast), MLflow logging of it, and loading it back.

MLflow format (see docs/TRAINING.md, "Model format"): `mlflow.pytorch.log_model` with
`serialization_format="pt2"` (MLflow 3's default: a `torch.export` program, no pickle, loads without
vmrnn installed) of a CPU copy using the pure-PyTorch scan, with a dynamic batch dimension; the
vmrnn weights and config ride along as `extra_files`, so `load_forecaster` rebuilds the eager model
(any device, any horizon, the CUDA scan). `model_format="pickle"` logs the eager module with
cloudpickle instead (seconds instead of ~20-90 s of export on a CPU; needs vmrnn to load).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vmrnn.models import ModelConfig, build_model, set_scan_backend

log = logging.getLogger("vmrnn.train")

WEIGHTS_FILE = "vmrnn_weights.pt"
META_FILE = "vmrnn_meta.json"


class Forecaster(nn.Module):
    """forward(inputs (B, T_in, C, H, W)) -> (B, n_future, C, H, W): the model's autoregressive forecast."""

    def __init__(self, model: nn.Module, n_input: int, n_future: int) -> None:
        super().__init__()
        self.model = model
        self.n_input = int(n_input)
        self.n_future = int(n_future)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model.predict(inputs, self.n_future)


def build_forecaster(state: dict[str, Tensor], model_cfg: dict[str, Any], n_input: int, n_future: int,
                     device: str | torch.device = "cpu", scan_backend: str = "auto") -> Forecaster:
    model = build_model(ModelConfig(**model_cfg))
    model.load_state_dict(state)
    set_scan_backend(model, scan_backend)
    return Forecaster(model.to(device).eval(), n_input, n_future).eval()


def model_meta(model_cfg: dict[str, Any], dataset: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    return {"format": "vmrnn-forecaster/1", "model": model_cfg, "dataset": dataset,
            "n_input": dataset["in_frames"], "n_future": dataset["out_frames"], **(extra or {})}


def log_forecaster_to_mlflow(state: dict[str, Tensor], meta: dict[str, Any], example: np.ndarray, *,
                             fmt: str = "pt2", name: str = "model") -> tuple[Any, str]:
    """Log into the *active* MLflow run. Returns (ModelInfo, the format actually used)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], "cpu", scan_backend="torch")
    _, t_in, c, h, w = example.shape
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, t_in, c, h, w))]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["n_future"], c, h, w))]))
    example = np.ascontiguousarray(example, dtype=np.float32)
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
                info = mlflow.pytorch.log_model(fc, serialization_format="pt2", validate_serving_input=False,
                                                pip_requirements=[torch_req, "numpy"], **common)
                return info, "pt2"
            except Exception as exc:  # a model torch.export cannot trace: keep training's result anyway
                log.warning("torch.export of the forecaster failed (%s: %s); logging it with pickle instead",
                            type(exc).__name__, str(exc).splitlines()[0][:300])
        info = mlflow.pytorch.log_model(fc, serialization_format="pickle",
                                        pip_requirements=[torch_req, "numpy", "einops", "vmrnn-sweeps"], **common)
        return info, "pickle"


# ---------------------------------------------------------------------- loading

@dataclass
class LoadedForecaster:
    """A model ready to predict; `model` is the eager VMRNN when its weights are available."""

    module: nn.Module           # Forecaster, or the MLflow-loaded module (pt2 GraphModule / pickled)
    n_input: int
    n_future: int
    meta: dict[str, Any]
    source: str
    device: torch.device

    @property
    def model(self) -> nn.Module | None:
        return self.module.model if isinstance(self.module, Forecaster) else None

    @torch.no_grad()
    def predict(self, inputs: np.ndarray | Tensor, n_future: int | None = None) -> np.ndarray:
        """Forecast from (T, C, H, W) or (B, T, C, H, W) inputs in [0, 1]; returns the same rank."""
        x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs).float()
        single = x.dim() == 4
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 5:
            raise ValueError(f"inputs must be (T, C, H, W) or (B, T, C, H, W); got shape {tuple(x.shape)}")
        ds = self.meta.get("dataset", {})
        want = (ds.get("channels"), ds.get("height"), ds.get("width"))
        if None not in want and tuple(x.shape[2:]) != tuple(want):
            raise ValueError(f"inputs have frames {tuple(x.shape[2:])} but the model expects "
                             f"{tuple(want)} (channels, height, width)")
        n = int(n_future or self.n_future)
        x = x.to(self.device)
        if self.model is not None:
            y = self.model.predict(x, n)
        else:
            if n != self.n_future:
                raise ValueError(f"this model was exported for {self.n_future} future frames; "
                                 f"n_future={n} needs the vmrnn weights (not in {self.source})")
            y = self.module(x)
        y = y.float().cpu().numpy()
        return y[0] if single else y


def _from_dir(weights: Path, meta_path: Path, device: torch.device, source: str) -> LoadedForecaster:
    from vmrnn.train.checkpoint import load_tensors

    meta = json.loads(meta_path.read_text())
    state = load_tensors(weights)
    fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], device)
    return LoadedForecaster(fc, meta["n_input"], meta["n_future"], meta, source, device)


def load_forecaster(uri_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    which: str = "best", tracking_uri: str | None = None) -> LoadedForecaster:
    """Load a forecaster from an MLflow model URI (models:/..., runs:/..., or any artifact URI; resolved
    against `tracking_uri`, default MLflow's current one) or a local training checkpoint (an epoch dir,
    a checkpoint root, or a Ray run folder); `which` picks the checkpoint's best (by val_mse) or last
    weights."""
    device = torch.device(device)
    s = str(uri_or_path)
    is_uri = "://" in s or s.startswith(("models:/", "runs:/"))
    if not is_uri:
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"no model at {p}: give a checkpoint folder or an MLflow URI "
                                    "(models:/NAME@ALIAS, runs:/RUN_ID/model)")
        if (p / "MLmodel").exists():
            return _from_mlflow_dir(p, device, s)
        from vmrnn.train.checkpoint import find_checkpoint, load_best_model, load_state, read_meta

        d = find_checkpoint(p)
        m = read_meta(d)
        state = load_best_model(d) if which == "best" else load_state(d)["model"]
        meta = model_meta(m["model"], m["dataset"], {"train": m.get("train")})
        fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], device)
        return LoadedForecaster(fc, meta["n_input"], meta["n_future"], meta, str(d), device)
    import mlflow

    from vmrnn.train.config import default_tracking_uri
    from vmrnn.train.tracking import pinned_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Resolve the store here, not from mlflow's process-global URIs, which an earlier run may have set;
    # models:/ URIs are resolved through the registry URI, so both are pinned.
    tracking_uri = tracking_uri or default_tracking_uri()
    with pinned_tracking_uri(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s, tracking_uri=tracking_uri))
    return _from_mlflow_dir(local, device, s)


def _from_mlflow_dir(local: Path, device: torch.device, source: str) -> LoadedForecaster:
    w, m = local / "extra_files" / WEIGHTS_FILE, local / "extra_files" / META_FILE
    if w.exists() and m.exists():
        return _from_dir(w, m, device, source)
    import mlflow

    module = mlflow.pytorch.load_model(str(local))
    meta: dict[str, Any] = json.loads(m.read_text()) if m.exists() else {}
    n_future = int(meta.get("n_future", getattr(module, "n_future", 0)) or 0)
    n_input = int(meta.get("n_input", getattr(module, "n_input", 0)) or 0)
    return LoadedForecaster(module, n_input, n_future, meta, source, torch.device("cpu"))
