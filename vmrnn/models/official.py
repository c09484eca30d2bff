"""Official VMRNN checkpoints: key map, validation and loading into our modules.

Three official layouts are accepted:
- OpenSTL VMRNN-B (``ST.patch_embed``, ``ST.patch_inflated``, ``ST.layer``) and VMRNN-D
  (``Downsample.*`` / ``Upsample.*``), optionally with DDP's ``module.`` prefix;
- the standalone Moving MNIST VMRNN-D (same keys as OpenSTL's for p = 2);
- the standalone VMRNN-B (``ST.layers.0.`` instead of ``ST.layer.``; one cell only).

The official models carry tensors that never receive gradients (``VSBs.{i>=1}.linear`` and, in VMRNN-D,
``Upsample.patch_embed``). Our model omits them: they are checked for shape and then dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vmrnn.models.config import ModelConfig
from vmrnn.models.vmrnn import build_model


class CheckpointMismatch(ValueError):
    """An official state_dict that does not fit the model; the message lists what does not fit."""


_SS2D = {
    "in_proj.weight": "in_proj.weight",
    "conv2d.weight": "dwconv.weight",
    "conv2d.bias": "dwconv.bias",
    "x_proj_weight": "x_proj",
    "dt_projs_weight": "dt_proj",
    "dt_projs_bias": "dt_bias",
    "A_logs": "A_log",
    "Ds": "skip",
    "out_norm.weight": "out_norm.weight",
    "out_norm.bias": "out_norm.bias",
    "out_proj.weight": "out_proj.weight",
}


def _cell_map(official: str, ours: str, depth: int) -> dict[str, str | None]:
    m: dict[str, str | None] = {}
    for i in range(depth):
        o, u = f"{official}VSBs.{i}.", f"{ours}blocks.{i}."
        m[o + "ln_1.weight"], m[o + "ln_1.bias"] = u + "norm.weight", u + "norm.bias"
        for k, v in _SS2D.items():
            m[o + "self_attention." + k] = u + "mixer." + v
        for k in ("weight", "bias"):
            m[o + "linear." + k] = u + "fuse." + k if i == 0 else None  # unused in the official model
    return m


def _embed_map(official: str, ours: str | None) -> dict[str, str | None]:
    return {
        f"{official}{k}": (f"{ours}{k}" if ours else None)
        for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    }


def _inflate_map(official: str, ours: str, patch_size: int) -> dict[str, str | None]:
    m: dict[str, str | None] = {
        f"{official}Conv.weight": f"{ours}out.weight",
        f"{official}Conv.bias": f"{ours}out.bias",
    }
    for j in range(patch_size // 4):
        for idx in (3 * j, 3 * j + 1):
            for k in ("weight", "bias"):
                m[f"{official}Conv_.{idx}.{k}"] = f"{ours}up.{idx}.{k}"
    return m


def official_key_map(config: ModelConfig) -> dict[str, str | None]:
    """Official key (OpenSTL naming) -> our key, or None for a tensor our model omits."""
    m: dict[str, str | None] = {}
    p = config.patch_size
    if config.arch == "b":
        m |= _embed_map("ST.patch_embed.", "embed.")
        m |= _inflate_map("ST.patch_inflated.", "head.", p)
        m |= _cell_map("ST.layer.", "cell.", config.depth)
        return m
    n = len(config.depths_down)
    m |= _embed_map("Downsample.patch_embed.", "embed.")
    for i in range(n):
        m |= _cell_map(f"Downsample.layers.{i}.", f"down_cells.{i}.", config.depths_down[i])
        m[f"Downsample.downsample.{i}.reduction.weight"] = f"merges.{i}.proj.weight"
        for k in ("weight", "bias"):
            m[f"Downsample.downsample.{i}.norm.{k}"] = f"merges.{i}.norm.{k}"
    m |= _embed_map("Upsample.patch_embed.", None)  # registered but never called officially
    m |= _inflate_map("Upsample.Unembed.", "head.", p)
    for i in range(n):
        m |= _cell_map(f"Upsample.layers.{i}.", f"up_cells.{i}.", config.depths_up[n - 1 - i])
        m[f"Upsample.upsample.{i}.expand.weight"] = f"expands.{i}.proj.weight"
        for k in ("weight", "bias"):
            m[f"Upsample.upsample.{i}.norm.{k}"] = f"expands.{i}.norm.{k}"
    return m


def official_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every official key's shape, computed from the config (our model supplies the kept ones)."""
    ours = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, target in official_key_map(config).items():
        if target is not None:
            shapes[key] = ours[target]
        elif ".linear." in key:  # unused fuse layer of a later block: Linear(2C -> C)
            c = _block_dim(config, key)
            shapes[key] = (c, 2 * c) if key.endswith("weight") else (c,)
        else:  # Upsample.patch_embed
            e, ci, pp = config.embed_dim, config.in_chans, config.patch_size
            shapes[key] = {"proj.weight": (e, ci, pp, pp)}.get(key.split("patch_embed.")[1], (e,))
    return shapes


def _block_dim(config: ModelConfig, key: str) -> int:
    if config.arch == "b":
        return config.embed_dim
    n = len(config.depths_down)
    level = int(re.search(r"layers\.(\d+)\.", key).group(1))
    return config.embed_dim * 2 ** (level if key.startswith("Downsample") else n - level)


def official_parameter_count(config: ModelConfig) -> int:
    """Parameters of the official model for this config (its unused tensors included)."""
    return sum(math.prod(s) for s in official_shapes(config).values())


def _normalise_keys(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if config.arch == "b" and key.startswith("ST.layers."):
            cell = key.split(".")[2]
            if cell != "0":
                raise CheckpointMismatch(
                    f"'{key}': this standalone VMRNN-B checkpoint stacks several cells (depths list of "
                    "length > 1); only single-cell VMRNN-B models are supported"
                )
            key = "ST.layer." + key[len("ST.layers.0.") :]
        out[key] = value
    return out


def convert_official_state_dict(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Validate an official state_dict against ``config`` and return it in our key names.

    Raises CheckpointMismatch listing missing keys, unexpected keys and shape mismatches.
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # OpenSTL's latest.pth wraps the weights
    state = _normalise_keys(state, config)
    key_map, shapes = official_key_map(config), official_shapes(config)
    missing = sorted(set(key_map) - set(state))
    unexpected = sorted(set(state) - set(key_map))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs expected {shapes[k]}"
        for k in sorted(set(key_map) & set(state))
        if tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or wrong:
        parts = [f"the checkpoint does not fit {config.name} {config.to_dict()}:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointMismatch(" ".join(parts))
    return {key_map[k]: v for k, v in state.items() if key_map[k] is not None}


def load_official_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Load an official VMRNN state_dict (any of the three layouts) into our model, strictly."""
    converted = convert_official_state_dict(state, model.config)
    model.load_state_dict(converted, strict=True)
    return model


def to_official_state_dict(model: nn.Module, fill_unused: float | None = 0.0) -> dict[str, Tensor]:
    """Our model's weights in the OpenSTL layout; tensors our model omits are filled with a constant."""
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    shapes = official_shapes(model.config)
    for key, target in official_key_map(model.config).items():
        if target is not None:
            out[key] = ours[target].clone()
        elif fill_unused is not None:
            out[key] = torch.full(shapes[key], fill_unused)
    return out
