"""Faults that tests inject into Ray Train runs from the outside: the package has no test hooks.

    run_config = RunConfig(..., callbacks=[KillWorkerAfterReport(rank=1, reports=2, marker=tmp_path / "killed")])

Relies on Ray 2.60's Train V2 `TrainContextCallback` (a DeveloperAPI): a callback passed in
`RunConfig.callbacks` is copied to every worker, and its `on_report` wraps each `ray.train.report` call
there.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import ray.cloudpickle
import ray.train
from ray.train.v2._internal.execution.callback import TrainContextCallback

# Ray's controller and workers cannot import this module (tests/ is not on their path): send it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWorkerAfterReport(TrainContextCallback):
    """SIGKILL the worker of world rank `rank` right after its `reports`-th `ray.train.report` returned
    (the metrics and checkpoint of that report are handed over), once: the first kill writes `marker`,
    and the restarted worker group sees it and trains on."""

    def __init__(self, rank: int, reports: int, marker: Path) -> None:
        self.rank = rank
        self.reports = reports
        self.marker = Path(marker)
        self._seen = 0  # per worker process: each worker gets its own copy of the callback

    @contextmanager
    def on_report(self):
        yield
        self._seen += 1
        if self._seen != self.reports or ray.train.get_context().get_world_rank() != self.rank:
            return
        if self.marker.exists():
            return
        self.marker.write_text(f"worker rank {self.rank} (pid {os.getpid()}) killed after report {self._seen}\n")
        os.kill(os.getpid(), signal.SIGKILL)
