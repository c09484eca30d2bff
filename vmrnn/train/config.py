"""`TrainConfig`: everything one training run needs, as a flat dataclass with validation.

A config is built from a dict (`TrainConfig.from_dict`, CLI `--set key=value`, a Ray/Tune trial config),
validated field by field (a `TrainConfigError` names the field), then *resolved*: fields left at None
take the dataset's recipe (the official single-GPU script settings) and the dataset's model preset, both
from the dataset registry (vmrnn.data.registry).
`to_dict()` of a resolved config is what goes into checkpoints and MLflow params.

This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from vmrnn.data import DATASETS, dataset_names, dataset_spec
from vmrnn.data.remote import is_remote
from vmrnn.models import ConfigError
from vmrnn.tracking.tags import TAG_EXECUTION, TAG_WORLD_SIZE
from vmrnn.tracking.uris import absolute_tracking_uri, default_tracking_uri
from vmrnn.train.execution import (
    DEFAULT_MODE,
    MODES,
    OVERRIDES,
    ExecutionConfig,
    ExecutionError,
    resolve_execution,
)

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw"),
    "schedule": ("cosine", "cosine_step", "constant"),
    "precision": ("fp32", "bf16"),  # None too: the mode's
    "loss_target": ("all", "future"),
    "loss_kind": ("mse", "mse+l1"),
    "metrics_mode": ("standard", "paper"),
    "scan_backend": ("auto", "torch", "cuda", "triton"),  # None too: the mode's
    "execution": tuple(MODES),
    "model_format": ("pt2", "pickle"),
}


class TrainConfigError(ConfigError):
    """A training option that is missing, of the wrong type or out of range; the message names it."""


@dataclass
class TrainConfig:
    # --- data ---
    dataset: str = ""
    data_dir: str = ""
    data_options: dict[str, Any] = field(default_factory=dict)  # extra kwargs for vmrnn.data.build_dataset
    # --- model ---
    preset: str | None = None  # default: the dataset's preset (vmrnn.data.DATASETS)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {"depth": 4}
    scan_backend: str | None = None  # reference SS2D: auto|torch|cuda; fused: auto|torch|triton
    # --- optimisation (None: the dataset's recipe, DatasetSpec.recipe) ---
    epochs: int | None = None
    batch_size: int | None = None  # per worker
    val_batch_size: int | None = None  # default: batch_size
    lr: float | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine (per epoch, the paper's), cosine_step, constant
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    grad_clip: float | None = None
    # `execution` names a mode of vmrnn.train.execution.MODES; precision, checkpoint_steps, fused, cuda_graphs,
    # compile and scan_backend override single fields of it (None: the mode's value)
    precision: str | None = None  # fp32 | bf16 (bf16 autocast on GPU only)
    checkpoint_steps: bool | None = None  # activation checkpointing per rollout step
    execution: str = DEFAULT_MODE  # reference, fast, bf16-graphs, ... (GPU-only parts off on CPU)
    fused: bool | None = None  # fused SS2D layout (vmrnn.ops.ss2d_scan)
    cuda_graphs: bool | None = None  # the whole step in a CUDA graph (GPU; with the gradient all-reduce)
    compile: bool | None = None  # torch.compile every SS2D
    loss_target: str = "all"
    loss_kind: str = "mse"
    seed: int = 42
    # --- execution ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_loader_workers: int = 0
    max_train_batches: int | None = None  # per worker and epoch, for smoke runs
    max_val_batches: int | None = None  # per worker
    max_test_batches: int | None = None  # per worker
    metrics_mode: str = "standard"
    test_at_end: bool = True  # score the best (by val_mse) weights on the test split
    checkpoint_dir: str | None = None  # plain (no-Ray) runs: where epoch checkpoints go
    keep_checkpoints: int = 2
    # --- tracking (MLflow, rank 0) ---
    tracking: bool = True
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # default: vmrnn-<dataset>
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_key: str | None = None  # continue the run tagged vmrnn.run_key == this
    log_images: bool = True
    n_vis_samples: int = 4
    log_model: bool = True
    model_format: str = "pt2"  # how mlflow.pytorch.log_model serialises the model

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | TrainConfig) -> TrainConfig:
        """Build from a (possibly partial) dict; values are coerced to the field types (so "4" works)."""
        if isinstance(d, TrainConfig):
            return dataclasses.replace(d)
        if not isinstance(d, dict):
            raise TrainConfigError(f"a training config must be a dict; got {type(d).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        hints = get_type_hints(cls)
        kwargs = {k: _coerce(k, v, hints[k]) for k, v in d.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain JSON types, deep-copied

    def replace(self, **changes: Any) -> TrainConfig:
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> TrainConfigError:
            return TrainConfigError(f"training option '{name}' {why}; got {getattr(self, name)!r}")

        if not self.dataset:
            raise TrainConfigError(f"training option 'dataset' is required (one of {', '.join(dataset_names())})")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"must be one of {list(dataset_names())}")
        if not self.data_dir:
            raise TrainConfigError("training option 'data_dir' is required (the folder that holds the data)")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices and not (name in OVERRIDES and getattr(self, name) is None):
                raise bad(name, f"must be one of {list(choices)}")
        for name in (
            "epochs",
            "batch_size",
            "val_batch_size",
            "max_train_batches",
            "max_val_batches",
            "max_test_batches",
        ):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, "must be >= 1")
        for name in ("warmup_epochs", "num_loader_workers", "seed", "n_vis_samples"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be >= 1")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if v is None:
                continue
            if not math.isfinite(v) or v < 0:
                raise bad(name, "must be a finite number >= 0")
        if self.lr is not None and self.lr == 0:
            raise bad("lr", "must be > 0")
        if self.grad_clip is not None and self.grad_clip == 0:
            raise bad("grad_clip", "must be > 0 (leave it unset for no clipping)")
        self.execution_config("cuda")  # the mode with its overrides must exist, on any device
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        for name in ("model", "tags", "data_options"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be a mapping")

    # ------------------------------------------------------------------ resolution
    @property
    def is_resolved(self) -> bool:
        return None not in (self.preset, self.epochs, self.batch_size, self.val_batch_size, self.lr)

    def resolved(self) -> TrainConfig:
        """Fill the None fields from the dataset spec and recipe; check the model against the data shape.

        Paths become absolute (Ray workers and checkpoints may run elsewhere), and the MLflow URI is
        pinned (the default sqlite store is relative to the *current* folder).
        """
        from vmrnn.models import PRESETS, model_config

        c = dataclasses.replace(
            self, model=dict(self.model), tags=dict(self.tags), data_options=dict(self.data_options)
        )
        c.validate()
        if not is_remote(c.data_dir):  # an object-store URI stays as it is (cached per node by vmrnn.data)
            c.data_dir = str(Path(c.data_dir).expanduser().resolve())
        spec = dataset_spec(c.dataset, c.data_dir)
        recipe = spec.recipe
        if c.preset is None:
            c.preset = spec.preset
        if spec.fit_model:
            if c.preset not in PRESETS:  # e.g. "custom": VMRNN-B in the KTH configuration, sized to the frames
                c.preset = "kth"
                c.model.setdefault("patch_size", _custom_patch(spec.height, spec.width))
            c.model.setdefault("img_size", spec.height)
            c.model.setdefault("in_chans", spec.channels)
        elif c.preset not in PRESETS:
            raise TrainConfigError(f"training option 'preset' must be one of {sorted(PRESETS)}; got {c.preset!r}")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(c, name) is None:
                setattr(c, name, getattr(recipe, name))
        if c.val_batch_size is None:
            c.val_batch_size = recipe.val_batch_size or c.batch_size
        if c.checkpoint_dir:
            c.checkpoint_dir = str(Path(c.checkpoint_dir).expanduser().resolve())
        if c.experiment is None:
            c.experiment = f"vmrnn-{c.dataset}"
        if c.tracking and c.tracking_uri is None:
            c.tracking_uri = default_tracking_uri()
        if c.tracking_uri:
            c.tracking_uri = absolute_tracking_uri(c.tracking_uri)
        try:
            mc = model_config(c.preset, **c.model)
        except ConfigError as exc:
            raise TrainConfigError(f"training option 'model'/'preset': {exc}") from None
        shape = (spec.channels, spec.height, spec.width)
        if (mc.in_chans, mc.img_size, mc.img_size) != tuple(shape):
            raise TrainConfigError(
                f"training option 'preset' {c.preset!r} (with 'model' overrides {c.model}) builds a model for "
                f"{mc.in_chans}x{mc.img_size}x{mc.img_size} frames, but {c.dataset} frames are "
                f"{spec.channels}x{spec.height}x{spec.width}; choose a matching preset or override "
                "model.in_chans / model.img_size"
            )
        return c

    def with_run_key(self) -> TrainConfig:
        """A copy with a run_key (generated if unset), so that restarts find the same MLflow run."""
        if self.run_key:
            return self
        return dataclasses.replace(self, run_key=uuid.uuid4().hex)

    def execution_overrides(self) -> dict[str, Any]:
        """The execution fields this config sets (not None) on top of its mode."""
        return {k: getattr(self, k) for k in OVERRIDES if getattr(self, k) is not None}

    def execution_config(self, device_type: str, world_size: int = 1) -> ExecutionConfig:
        """The ExecutionConfig that runs on this device: the mode, the overrides, GPU-only parts dropped off
        CUDA (`vmrnn.train.execution.resolve_execution`)."""
        try:
            return resolve_execution(
                self.execution, self.execution_overrides(), device_type=device_type, world_size=world_size
            )
        except ExecutionError as exc:
            raise TrainConfigError(f"training option '{exc.option}' {exc.detail}") from None

    def with_effective_execution(self, device_type: str, world_size: int = 1) -> TrainConfig:
        """A copy whose execution fields are what runs here (the mode name kept, every override field set
        to the effective value) and tagged ``vmrnn.execution`` = its description and ``vmrnn.world_size``:
        what MLflow and the checkpoints record."""
        ex = self.execution_config(device_type, world_size)
        c = dataclasses.replace(self, tags={**self.tags, TAG_EXECUTION: ex.describe(), TAG_WORLD_SIZE: str(world_size)})
        for name in OVERRIDES:
            setattr(c, name, getattr(ex, name))
        return c


def _custom_patch(height: int, width: int) -> int:
    if height != width:
        raise TrainConfigError(f"VMRNN needs square frames; the custom data has {height}x{width}")
    for p in (4, 2, 8):
        if height % p == 0 and (height // p) % 2 == 0:
            return p
    raise TrainConfigError(f"no patch size in (2, 4, 8) gives an even token grid for {height}x{width} frames")


# ---------------------------------------------------------------------- type coercion and --set parsing


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        if hint is str:
            return ""
        raise TrainConfigError(f"training option '{name}' cannot be empty")
    if type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            return None
        return _coerce(name, value, inner)
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise TrainConfigError(f"training option '{name}' must be a mapping (JSON); got {value!r}") from None
        if not isinstance(value, dict):
            raise TrainConfigError(f"training option '{name}' must be a mapping; got {value!r}")
        if args and args[1] is str:
            return {str(k): str(v) for k, v in value.items()}
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise TrainConfigError(f"training option '{name}' must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise TrainConfigError(f"training option '{name}' must be an integer; got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"training option '{name}' must be an integer; got {value!r}") from None
        if not f.is_integer():
            raise TrainConfigError(f"training option '{name}' must be an integer; got {value!r}")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise TrainConfigError(f"training option '{name}' must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"training option '{name}' must be a number; got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TrainConfigError(f"training option '{name}' must be a string; got {value!r}")
        return str(value)
    return value


def parse_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, true/false/null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """Apply `key=value` strings; dotted keys go into the mapping fields: model.depth=4, tags.team=x."""
    out = json.loads(json.dumps(d))
    for item in items or []:
        if "=" not in item:
            raise TrainConfigError(f"--set expects key=value; got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = parse_value(text)
        if "." in key:
            head, sub = key.split(".", 1)
            if head not in ("model", "tags", "data_options"):
                raise TrainConfigError(f"--set {key}: only model.*, tags.* and data_options.* take dotted keys")
            out.setdefault(head, {})
            out[head] = dict(out[head] or {})
            out[head][sub] = str(value) if head == "tags" else value
        else:
            if key not in TrainConfig.field_names():
                raise TrainConfigError(
                    f"--set {key}: unknown training option; known: {sorted(TrainConfig.field_names())}"
                )
            out[key] = value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.depth': '4', ...} with string values (for MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = "{}"
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = "None" if v is None else str(v)
    return out
