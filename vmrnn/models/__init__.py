"""VMRNN models: SS2D, VSS blocks, the VMRNN cell, VMRNN-B / VMRNN-D, presets and official checkpoints."""

from __future__ import annotations

from torch import nn

from vmrnn.models.blocks import DropPath, VMRNNCell, VSSBlock
from vmrnn.models.config import PRESETS, ConfigError, ModelConfig, Preset, get_preset, model_config
from vmrnn.models.official import (
    CheckpointMismatch,
    convert_official_state_dict,
    load_official_state_dict,
    official_key_map,
    official_parameter_count,
    to_official_state_dict,
)
from vmrnn.models.ss2d import SS2D, cross_merge, cross_scan
from vmrnn.models.vmrnn import VMRNNB, VMRNND, VMRNNBase, build_model, rollout_loss


def set_scan_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the selective-scan backend ('auto', 'torch' or 'cuda') for every SS2D in the model."""
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose 'auto', 'torch' or 'cuda'")
    for m in model.modules():
        if isinstance(m, SS2D):
            m.scan_backend = backend
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "PRESETS",
    "SS2D",
    "VMRNNB",
    "VMRNND",
    "CheckpointMismatch",
    "ConfigError",
    "DropPath",
    "ModelConfig",
    "Preset",
    "VMRNNBase",
    "VMRNNCell",
    "VSSBlock",
    "build_model",
    "convert_official_state_dict",
    "count_parameters",
    "cross_merge",
    "cross_scan",
    "get_preset",
    "load_official_state_dict",
    "model_config",
    "official_key_map",
    "official_parameter_count",
    "rollout_loss",
    "set_scan_backend",
    "to_official_state_dict",
]
