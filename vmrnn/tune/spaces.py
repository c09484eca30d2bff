"""Search-space definitions: what a dataset's sweep script declares, and how a sampled point becomes a
training configuration.

A space is a flat dict of Ray Tune domains (`tune.loguniform`, `tune.choice`, ...). Keys are either
training options (`lr`, `warmup_epochs`, `weight_decay`, `optimizer`, `batch_size`) or model options (`embed_dim`,
`depth`, `d_state`, `patch_size`, `drop_path`, and for VMRNN-D `depths`, a string "down/up" such as
"2,2/2,2" because Optuna's categorical choices must be scalars).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search.sample import Categorical, Domain, Float, Integer, LogUniform, Quantized

from vmrnn.data import get_dataset
from vmrnn.models import get_preset
from vmrnn.train.config import TrainConfig

# Sampled keys that are model options (ModelConfig fields, after decoding `depths`).
MODEL_KEYS = ("embed_dim", "depth", "d_state", "patch_size", "drop_path", "depths")
# Sampled keys that are training options (TrainConfig fields).
TRAIN_KEYS = ("lr", "warmup_epochs", "weight_decay", "optimizer", "batch_size")


@dataclass(frozen=True)
class SweepSpec:
    """Everything a dataset's entry script declares: search spaces, the official point, defaults.

    The dataset must be registered (vmrnn.data); its registry entry gives the defaults: the model preset, the
    smoke preset and the official point (its recipe's lr and batch size, the preset's model options).
    """

    dataset: str
    space: dict[str, Domain]
    smoke_space: dict[str, Domain]
    smoke_official: dict[str, Any]
    official: dict[str, Any] | None = None  # enqueued as the first trial; default: `official_point`
    preset: str | None = None  # model preset; default: the dataset's (DatasetSpec.preset)
    smoke_preset: str | None = None  # default: the dataset's smoke preset (DatasetSpec.smoke_preset)
    epochs: int = 50
    num_samples: int = 32
    grace_period: int | None = None  # ASHA: epochs every trial gets; default max(1, epochs // 8)
    reduction_factor: int = 3
    workers_per_trial: int = 1
    description: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_dataset(self.dataset)  # an unknown dataset fails here, naming the registered ones

    def resolved_preset(self, smoke: bool) -> str:
        spec = get_dataset(self.dataset)
        if smoke:
            return self.smoke_preset or spec.smoke_preset
        return self.preset or spec.preset

    def space_for(self, smoke: bool) -> dict[str, Domain]:
        return self.smoke_space if smoke else self.space

    def official_for(self, smoke: bool) -> dict[str, Any]:
        if smoke:
            return self.smoke_official
        if self.official is not None:
            return self.official
        return official_point(self.dataset, self.space, self.resolved_preset(False))


def official_point(dataset: str, keys: Iterable[str], preset: str | None = None) -> dict[str, Any]:
    """The published configuration of `dataset` for the sampled `keys`: lr and batch_size from the dataset's
    recipe, the other training keys at their TrainConfig defaults (the OpenSTL recipe: Adam, 5 warm-up epochs,
    no weight decay), the model keys from `preset` (default: the dataset's)."""
    spec = get_dataset(dataset)
    model = get_preset(preset or spec.preset).config
    defaults = TrainConfig()
    out: dict[str, Any] = {}
    for key in keys:
        if key in ("lr", "batch_size"):
            out[key] = getattr(spec.recipe, key)
        elif key in TRAIN_KEYS:
            out[key] = getattr(defaults, key)
        elif key == "depths":
            out[key] = f"{','.join(map(str, model.depths_down))}/{','.join(map(str, model.depths_up))}"
        elif key in MODEL_KEYS:
            out[key] = getattr(model, key)
        else:
            raise KeyError(
                f"search-space key {key!r} is neither a training option {TRAIN_KEYS} nor a model option {MODEL_KEYS}"
            )
    return out


def decode_depths(value: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'2,6/6,2' -> ((2, 6), (6, 2)): VMRNN-D depths_down / depths_up."""
    try:
        down, up = str(value).split("/")
        return tuple(int(x) for x in down.split(",")), tuple(int(x) for x in up.split(","))
    except ValueError:
        raise ValueError(f"depths must look like '2,2/2,2' (down/up); got {value!r}") from None


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sampled point -> (training options, model overrides)."""
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for key, value in params.items():
        if hasattr(value, "item"):  # numpy scalars from the searcher
            value = value.item()
        if key == "depths":
            model["depths_down"], model["depths_up"] = decode_depths(value)
        elif key in MODEL_KEYS:
            model[key] = value
        elif key in TRAIN_KEYS:
            train[key] = value
        else:
            raise KeyError(
                f"search-space key {key!r} is neither a training option {TRAIN_KEYS} nor a model option {MODEL_KEYS}"
            )
    return train, model


def describe(domain: Any) -> str:
    """A short, stable text for a domain (logged as the parent run's params)."""
    if isinstance(domain, Categorical):
        return f"choice({list(domain.categories)})"
    if isinstance(domain, (Float, Integer)):
        sampler = domain.get_sampler()
        q = ""
        if isinstance(sampler, Quantized):
            q, sampler = f", q={sampler.q}", sampler.sampler
        kind = "log" if isinstance(sampler, LogUniform) else ""
        if isinstance(domain, Float):
            return f"{kind}uniform({domain.lower:g}, {domain.upper:g}{q})"
        return f"{kind}randint({domain.lower}, {domain.upper}{q})"  # upper exclusive, as tune.randint
    return json.dumps(domain, default=str)


def contains(domain: Any, value: Any) -> bool:
    if isinstance(domain, Categorical):
        return value in domain.categories
    if isinstance(domain, Float):
        return domain.lower <= float(value) <= domain.upper
    if isinstance(domain, Integer):
        return domain.lower <= int(value) < domain.upper and int(value) == value
    return domain == value


def validate(space: dict[str, Domain], official: dict[str, Any], preset: str) -> None:
    """Fail early (in the driver, not in a worker) on a space that cannot be trained.

    The official point must name every key and lie inside the space; every combination of the model's
    categorical choices must build a valid ModelConfig for `preset` (e.g. embed_dim % 16 for patch >= 4).
    """
    from vmrnn.models.config import model_config

    if set(space) != set(official):
        raise ValueError(f"the official point's keys {sorted(official)} differ from the space's {sorted(space)}")
    for key, domain in space.items():
        split_params({key: official[key]})  # known key
        if not contains(domain, official[key]):
            raise ValueError(f"the official value {key}={official[key]!r} is outside {describe(domain)}")
    choices = {k: list(d.categories) for k, d in space.items() if k in MODEL_KEYS and isinstance(d, Categorical)}
    fixed = {k: official[k] for k in space if k in MODEL_KEYS and k not in choices}
    names = list(choices)
    for combo in itertools.islice(itertools.product(*(choices[n] for n in names)), 5000):
        point = dict(fixed, **dict(zip(names, combo)))
        _, overrides = split_params(point)
        model_config(preset, **overrides)  # raises ConfigError naming the field


def space_params(space: dict[str, Domain], official: dict[str, Any]) -> dict[str, str]:
    """MLflow params describing a space: space.<key> = domain, official.<key> = value."""
    out = {f"space.{k}": describe(d) for k, d in sorted(space.items())}
    out.update({f"official.{k}": str(v) for k, v in sorted(official.items())})
    return out
