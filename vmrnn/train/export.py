"""The deployable model in plain PyTorch: `Forecaster` (inputs -> forecast), its meta data, and loading it
from a local training checkpoint. Logging it to MLflow and loading it from an MLflow URI is
`vmrnn.tracking.models`, which also has `load_forecaster` for either kind of source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vmrnn.models import ModelConfig, build_model, set_scan_backend

# The vmrnn weights and meta of a logged model, beside MLflow's own copy of it (see vmrnn.tracking.models).
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


def build_forecaster(
    state: dict[str, Tensor],
    model_cfg: dict[str, Any],
    n_input: int,
    n_future: int,
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
) -> Forecaster:
    model = build_model(ModelConfig(**model_cfg))
    model.load_state_dict(state)
    set_scan_backend(model, scan_backend)
    return Forecaster(model.to(device).eval(), n_input, n_future).eval()


def model_meta(model_cfg: dict[str, Any], dataset: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    return {
        "format": "vmrnn-forecaster/1",
        "model": model_cfg,
        "dataset": dataset,
        "n_input": dataset["in_frames"],
        "n_future": dataset["out_frames"],
        **(extra or {}),
    }


@dataclass
class LoadedForecaster:
    """A model ready to predict; `model` is the eager VMRNN when its weights are available."""

    module: nn.Module  # Forecaster, or the MLflow-loaded module (pt2 GraphModule / pickled)
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
            raise ValueError(
                f"inputs have frames {tuple(x.shape[2:])} but the model expects {tuple(want)} (channels, height, width)"
            )
        n = int(n_future or self.n_future)
        x = x.to(self.device)
        if self.model is not None:
            y = self.model.predict(x, n)
        else:
            if n != self.n_future:
                raise ValueError(
                    f"this model was exported for {self.n_future} future frames; "
                    f"n_future={n} needs the vmrnn weights (not in {self.source})"
                )
            y = self.module(x)
        y = y.float().cpu().numpy()
        return y[0] if single else y


def load_weights_dir(weights: Path, meta_path: Path, device: torch.device, source: str) -> LoadedForecaster:
    """The eager forecaster from vmrnn weights and their meta file (what an MLflow model carries as extra files)."""
    from vmrnn.train.checkpoint import load_tensors

    meta = json.loads(meta_path.read_text())
    state = load_tensors(weights)
    fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], device)
    return LoadedForecaster(fc, meta["n_input"], meta["n_future"], meta, source, device)


def load_checkpoint_forecaster(path: Path, device: torch.device, which: str = "best") -> LoadedForecaster:
    """The forecaster of a local training checkpoint (an epoch dir, a checkpoint root, or a Ray run folder);
    `which` picks its best (by val_mse) or last weights."""
    from vmrnn.train.checkpoint import find_checkpoint, load_best_model, load_state, read_meta

    d = find_checkpoint(path)
    m = read_meta(d)
    state = load_best_model(d) if which == "best" else load_state(d)["model"]
    meta = model_meta(m["model"], m["dataset"], {"train": m.get("train")})
    fc = build_forecaster(state, meta["model"], meta["n_input"], meta["n_future"], device)
    return LoadedForecaster(fc, meta["n_input"], meta["n_future"], meta, str(d), device)
