"""Process-group plumbing for the training core: who am I, seeding, sharding samplers, reductions.

Works the same under `torchrun` (we initialise the process group), under Ray Train (Ray initialised it)
and on one process (no process group). Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from vmrnn.train.data_parallel import GradientAllReduce, broadcast_parameters


def _identity(x: Any, **_: Any) -> Any:
    return x


@dataclass
class DistEnv:
    """The worker's place in the run and how to wrap the model and loaders for it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Wrappers: plain runs move the model to `device` and use our samplers; the Ray layer passes its own.
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    wrap_loader: Callable[..., DataLoader] = _identity  # (loader, train=bool) -> loader
    backend: str = "plain"  # plain | torchrun | ray (for the record)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on this worker's device with rank 0's weights; never wrapped (no DDP).

        Gradients are averaged by `gradient_sync` inside the training step instead, so that the whole step,
        all-reduce included, can run as one CUDA graph (see vmrnn.train.data_parallel).
        """
        model = self.wrap_model(model) if self.wrap_model is not None else model.to(self.device)
        if self.distributed:
            broadcast_parameters(model)
        return model

    def gradient_sync(self, model: nn.Module) -> GradientAllReduce | None:
        """The gradient all-reduce of a data-parallel run (None on a single process)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return GradientAllReduce(model.parameters(), self.world_size)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


def current_env(device: str = "auto") -> DistEnv:
    """The env of this process: from an initialised torch.distributed group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev, backend="torchrun")
    return DistEnv(0, 1, 0, resolve_device(device, 0))


def init_from_env(timeout_s: float = 1800) -> bool:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    NCCL when CUDA is available, else gloo. Returns False (and does nothing) outside torchrun."""
    if not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "RANK" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


# ---------------------------------------------------------------------- seeding


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed mixed from the base seed and e.g. (epoch, rank): distinct streams, reproducible."""
    rng = np.random.SeedSequence([int(seed), *[int(p) for p in parts]])
    return int(rng.generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """RNG states in types that `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # a different number of devices: the per-epoch re-seeding covers it
            pass


# ---------------------------------------------------------------------- samplers


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r takes indices r, r+W, r+2W, ...

    Every sample is scored exactly once across ranks (torch's DistributedSampler pads by repeating
    samples, which would bias the metrics); shards may differ in length by one, which is fine because
    evaluation runs no collective inside the loop.
    """

    def __init__(self, length: int, world_size: int = 1, rank: int = 0, limit: int | None = None) -> None:
        self.length, self.world_size, self.rank, self.limit = length, world_size, rank, limit

    def _indices(self) -> range:
        return range(self.rank, self.length, self.world_size)

    def __iter__(self) -> Iterator[int]:
        idx = self._indices()
        return iter(idx if self.limit is None else idx[: self.limit])

    def __len__(self) -> int:
        n = len(self._indices())
        return n if self.limit is None else min(n, self.limit)


# ---------------------------------------------------------------------- reductions


def all_reduce_sum(values: list[float] | torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a vector over ranks (float64 on CPU, for gloo and exactness); a no-op on one process."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if env.distributed:
        dev = env.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.cpu()
    return t


def all_reduce_tensor_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place SUM of a tensor (moved to the backend's device and back when needed)."""
    if not env.distributed:
        return t
    dev = env.device if dist.get_backend() == "nccl" else torch.device("cpu")
    work = t.to(dev)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not t:
        t.copy_(work.to(t.device))
    return t


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device if dist.get_backend() == "nccl" else None)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
