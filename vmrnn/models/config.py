"""Model configuration and named presets (the official configurations plus tiny ones for smoke runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["b", "d"]
    img_size: int
    in_chans: int
    patch_size: int
    embed_dim: int = 128
    depth: int = 6  # VMRNN-B: blocks in the one cell
    depths_down: tuple[int, ...] = (2, 2)  # VMRNN-D: blocks per level, finest first
    depths_up: tuple[int, ...] = (2, 2)  # VMRNN-D: listed from the output end, as the official code
    d_state: int = 16
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths_down", tuple(int(d) for d in self.depths_down))
        object.__setattr__(self, "depths_up", tuple(int(d) for d in self.depths_up))
        self.validate()

    def validate(self) -> None:
        if self.arch not in ("b", "d"):
            raise ConfigError(f"arch must be 'b' (VMRNN-B) or 'd' (VMRNN-D); got {self.arch!r}")
        for name in ("img_size", "in_chans", "patch_size", "embed_dim", "d_state"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.patch_size not in (2, 4, 8):
            raise ConfigError(
                f"patch_size must be 2, 4 or 8 (the patch-inflation head upsamples by "
                f"powers of two); got {self.patch_size}"
            )
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        grid = self.img_size // self.patch_size
        if grid % 2:
            raise ConfigError(f"the token grid {grid}x{grid} (img_size / patch_size) must be even")
        if self.patch_size >= 4 and self.embed_dim % 16:
            raise ConfigError(
                f"embed_dim {self.embed_dim} must be a multiple of 16 for patch_size >= 4 (GroupNorm(16) in the head)"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1); got {self.drop_path}")
        if self.arch == "b":
            if self.depth < 1:
                raise ConfigError(f"depth must be >= 1; got {self.depth}")
        else:
            n = len(self.depths_down)
            if n < 1 or len(self.depths_up) != n:
                raise ConfigError(
                    f"depths_down {self.depths_down} and depths_up {self.depths_up} must be "
                    "non-empty and of the same length"
                )
            if min(self.depths_down + self.depths_up) < 1:
                raise ConfigError("every VMRNN-D level needs depth >= 1")
            if grid % 2**n:
                raise ConfigError(f"a {grid}x{grid} token grid cannot be halved {n} times (depths_down has {n} levels)")

    @property
    def name(self) -> str:
        return "VMRNN-B" if self.arch == "b" else "VMRNN-D"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depths_down"], d["depths_up"] = list(self.depths_down), list(self.depths_up)
        return d

    def replace(self, **overrides: Any) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    description: str
    official_params: int | None = None  # the official model's count, unused tensors included
    notes: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "taxibj": Preset(ModelConfig("b", 32, 2, 4, 128, depth=12), "TaxiBJ VMRNN-B (OpenSTL config)", 2_579_970),
    "kth": Preset(ModelConfig("b", 128, 1, 2, 128, depth=6), "KTH VMRNN-B (OpenSTL config)", 1_214_721),
    "mmnist": Preset(
        ModelConfig("d", 64, 1, 2, 128, depths_down=(2, 6), depths_up=(6, 2)),
        "Moving MNIST VMRNN-D [2,6]/[6,2] (standalone default, the released model)",
        15_267_201,
    ),
    "mmnist-openstl": Preset(
        ModelConfig("d", 64, 1, 2, 128, depths_down=(2, 2), depths_up=(2, 2)),
        "Moving MNIST VMRNN-D [2,2]/[2,2] (OpenSTL config)",
        9_674_113,
    ),
    "mmnist-b": Preset(
        ModelConfig("b", 64, 1, 2, 128, depth=6), "Moving MNIST VMRNN-B (standalone default depths [6])"
    ),
    # Tiny models with the same data shapes, for smoke sweeps and tests on CPU.
    "taxibj-tiny": Preset(ModelConfig("b", 32, 2, 4, 16, depth=2, d_state=4), "tiny TaxiBJ VMRNN-B"),
    "kth-tiny": Preset(ModelConfig("b", 128, 1, 8, 16, depth=1, d_state=4), "tiny KTH VMRNN-B"),
    "mmnist-tiny": Preset(
        ModelConfig("d", 64, 1, 4, 16, depths_down=(1, 1), depths_up=(1, 1), d_state=4), "tiny Moving MNIST VMRNN-D"
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def model_config(preset: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A preset's config (or a given config) with overrides applied and validated."""
    base = preset if isinstance(preset, ModelConfig) else get_preset(preset).config
    return base.replace(**overrides) if overrides else base
