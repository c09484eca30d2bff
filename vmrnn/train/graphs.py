"""CUDA-graph capture of a training step and of a forecast: capture once per input shape, then replay.

`vmrnn.train.step.make_train_step` / `make_forecast` wrap their functions in these when the execution
config asks for CUDA graphs on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

_MAX_GRAPHS = 4  # input shapes captured per step function; others run eagerly (e.g. a ragged last batch)


def _graph_key(frames: Tensor, model: nn.Module) -> tuple:
    return (tuple(frames.shape), frames.dtype, frames.device, model.training)


class GraphedForecast:
    """Captures the no-grad rollout once per input shape and replays it."""

    def __init__(self, fn: Callable[[Tensor], Tensor], model: nn.Module, warmup: int = 2) -> None:
        self.fn, self.model, self.warmup = fn, model, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def __call__(self, frames: Tensor) -> Tensor:
        key = _graph_key(frames, self.model)
        if key not in self.graphs:
            if len(self.graphs) >= _MAX_GRAPHS:
                return self.fn(frames)
            static_in = frames.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(frames)
        graph.replay()
        return static_out.clone()


class GraphedTrainStep:
    """The whole training step in one CUDA graph per input shape.

    Capture needs a few warm-up steps (lazy optimizer state, cuDNN / Triton / inductor set-up). They run
    on the first batch and are then undone: parameters and optimizer state are restored in place, so
    the first call makes exactly one real update, as the eager step does. The optimizer runs with
    ``capturable=True`` and a tensor learning rate, so LR schedulers keep working (they write the tensor
    in place; a float written over it is noticed and copied in before the next replay).
    """

    def __init__(
        self, step: Callable[[Tensor], Tensor], model: nn.Module, optimizer: torch.optim.Optimizer, warmup: int = 3
    ) -> None:
        self.step, self.model, self.optimizer, self.warmup = step, model, optimizer, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._lr_tensors: list[Tensor | None] = []
        self._pool = None

    def _prepare_optimizer(self, device: torch.device) -> None:
        if self._lr_tensors:
            return
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
            lr = group.get("lr")
            if "capturable" in group and not isinstance(lr, Tensor):
                group["lr"] = torch.tensor(float(lr), device=device)
            self._lr_tensors.append(group["lr"] if isinstance(group.get("lr"), Tensor) else None)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != device:
                state["step"] = step.to(device=device, dtype=torch.float32)

    def _sync_lr(self) -> None:
        for group, lr_t in zip(self.optimizer.param_groups, self._lr_tensors):
            if lr_t is not None and group["lr"] is not lr_t:
                lr_t.fill_(float(group["lr"]))  # a scheduler wrote a float: keep the captured tensor
                group["lr"] = lr_t

    def _snapshot(self) -> tuple[list[Tensor], dict]:
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {
            p: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        return params, state

    @torch.no_grad()
    def _restore(self, snap: tuple[list[Tensor], dict]) -> None:
        params, state = snap
        for p, saved in zip(self.model.parameters(), params):
            p.copy_(saved)
        for p, s in self.optimizer.state.items():
            old = state.get(p)
            for k, v in s.items():
                if isinstance(v, Tensor):
                    if old is not None and k in old:
                        v.copy_(old[k])
                    else:
                        v.zero_()  # lazily created by the warm-up: back to a fresh optimizer's zeros

    def _capture(self, frames: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        self._prepare_optimizer(frames.device)
        static_in = frames.clone()
        snap = self._snapshot()
        rng = torch.cuda.get_rng_state(frames.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static_in)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-up's blocks, so the graph's pool does not double the peak
        self._restore(snap)
        torch.cuda.set_rng_state(rng, frames.device)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self._pool):
            static_loss = self.step(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, static_in, static_loss

    def __call__(self, frames: Tensor) -> Tensor:
        key = _graph_key(frames, self.model)
        if key not in self.graphs:
            if len(self.graphs) >= _MAX_GRAPHS or not self.model.training:
                return self.step(frames)
            self.graphs[key] = self._capture(frames)
        graph, static_in, static_loss = self.graphs[key]
        self._sync_lr()
        static_in.copy_(frames)
        graph.replay()
        return static_loss.clone()
