"""MLflow tracking for one training run (rank 0 only): `RunTracker`.

One MLflow run per training run. It is found again after a restart, first by the run id stored in the
checkpoint, then by the tag `vmrnn.run_key`, else created. Params are the full resolved config
(flattened, secrets redacted). Metrics are logged per epoch at step = the epoch counted from 1, as the
console and Ray's training_iteration count (the loop's 0-based index is converted here with
`epoch_number`; so are `best_epoch`, the best-epoch tag and the picture titles). Every (metric, epoch) pair
is logged once: on (re)start the run's metric history is read, and epochs that the checkpoint's history has
but MLflow lacks are backfilled, while epochs MLflow already has are never logged again.

Outages: a tracking store that cannot be reached at start is an error within seconds
(`TrackingUnavailable`, naming the URI; see vmrnn.tracking.uris). Later failures do not stop training:
metrics and artifacts are buffered and retried with exponential back-off (1 s .. 60 s) at each epoch;
`finish()` keeps trying for VMRNN_MLFLOW_FLUSH_TIMEOUT_S (default 60 s), then writes what is still unsent
to a JSON file and warns.

Pictures and JSON files are made in memory and held there while they wait to be sent; a temporary folder
exists only for the moment of each upload. A run that is killed (Ray kills an ASHA-pruned trial's workers)
or stopped leaves nothing behind in /tmp.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmrnn.models import model_config
from vmrnn.tracking import tags as T
from vmrnn.tracking import uris
from vmrnn.tracking.experiments import default_experiment, ensure_experiment
from vmrnn.tracking.models import log_forecaster_in_run
from vmrnn.tracking.uris import TrackingUnavailable, strip_credentials
from vmrnn.train import visualize
from vmrnn.train.config import TrainConfig, flatten
from vmrnn.train.epochs import epoch_number
from vmrnn.train.export import model_meta

log = logging.getLogger("vmrnn.train")
# MLflow is imported inside the methods that call it: importing this module does not import MLflow.

# MLflow error codes that a retry cannot fix: the operation is dropped, not buffered.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def _retryable(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return code not in _PERMANENT_CODES


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """The run's params: the resolved config and the model config it builds, flattened, secrets redacted."""
    params = {k: T.redact(k, v) for k, v in flatten(cfg.to_dict()).items()}
    try:
        mc = model_config(cfg.preset, **cfg.model).to_dict()
        params.update({f"model_config.{k}": T.redact(k, v) for k, v in flatten(mc).items()})
    except Exception:
        pass
    return params


# ---------------------------------------------------------------------- the tracker


@dataclass
class _Op:
    desc: str
    fn: Callable[[], Any]
    key: str | None = None  # a later op with the same key replaces a pending one


class RunTracker:
    """Rank-0 MLflow logger of one training run, resilient to tracking outages."""

    def __init__(self, cfg: TrainConfig, client: Any, uri: str, experiment_id: str, run_id: str) -> None:
        self.cfg, self.client, self.uri = cfg, client, uri
        self.experiment_id, self.run_id = experiment_id, run_id
        self.logged: dict[str, set[int]] = {}
        self._metrics: list[Any] = []
        self._ops: list[_Op] = []
        self._failures = 0
        self._next_try = 0.0
        self._outage_since: float | None = None
        self.closed = False

    # ---- opening
    @classmethod
    def open(cls, cfg: TrainConfig, run_id: str | None = None, history: Iterable[dict[str, Any]] = ()) -> RunTracker:
        """Find or create the run (checkpoint run id > run_key tag > new), log params, backfill history."""
        uri = cfg.tracking_uri or ""
        exp_id = ensure_experiment(uri, cfg.experiment or default_experiment(cfg.dataset))
        client = uris.client(uri)
        try:
            run = None
            if run_id:
                try:
                    run = client.get_run(run_id)
                    if run.info.lifecycle_stage == "deleted":
                        run = None
                except Exception as exc:
                    if _retryable(exc) and getattr(exc, "error_code", None) not in (None, "RESOURCE_DOES_NOT_EXIST"):
                        raise
                    run = None
            if run is None and cfg.run_key:
                found = client.search_runs(
                    [exp_id], filter_string=f"tags.`{T.TAG_RUN_KEY}` = '{cfg.run_key}'", max_results=1
                )
                run = found[0] if found else None
            if run is None:
                tags = {T.TAG_RUN_KEY: cfg.run_key or "", T.TAG_DATASET: cfg.dataset, T.TAG_PRESET: str(cfg.preset)}
                tags.update({k: T.redact(k, str(v)) for k, v in cfg.tags.items()})
                if cfg.parent_run_id:
                    tags[T.TAG_PARENT_RUN] = cfg.parent_run_id
                name = cfg.run_name or f"{cfg.dataset}-{cfg.preset}-{(cfg.run_key or '')[:8]}".rstrip("-")
                run = client.create_run(exp_id, run_name=name, tags=tags)
                log.info(
                    "MLflow run %s (%s) in experiment %s at %s",
                    run.info.run_id,
                    name,
                    cfg.experiment,
                    strip_credentials(uri),
                )
            else:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                # A restart (worker failure, resumed sweep or --resume) is visible on the run: how many,
                # from which epoch, and the failure that caused it (no longer the run's failure reason).
                tags = run.data.tags
                client.set_tag(run.info.run_id, T.TAG_RESTARTS, str(int(tags.get(T.TAG_RESTARTS, "0") or 0) + 1))
                epochs = [epoch_number(h["epoch"]) for h in history if "epoch" in h]
                client.set_tag(run.info.run_id, T.TAG_RESUMED_FROM_EPOCH, str(max(epochs)) if epochs else "none")
                if tags.get(T.TAG_FAILURE):
                    client.set_tag(run.info.run_id, T.TAG_PREVIOUS_FAILURE, tags[T.TAG_FAILURE][:5000])
                    client.delete_tag(run.info.run_id, T.TAG_FAILURE)
                log.info("continuing MLflow run %s", run.info.run_id)
            self = cls(cfg, client, uri, exp_id, run.info.run_id)
            self._log_params(run)
            self._load_logged(history)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {strip_credentials(uri)} failed while opening the "
                f"run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        self.backfill(history)
        return self

    def _log_params(self, run: Any) -> None:
        from mlflow.entities import Param

        existing = dict(run.data.params)
        params = config_params(self.cfg)
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        for k, v in changed.items():  # MLflow params are immutable: record the new value as a tag
            self.client.set_tag(self.run_id, T.TAG_PARAM_CHANGED + k, v[:5000])

    def _load_logged(self, history: Iterable[dict[str, Any]]) -> None:
        keys = set()
        for h in history:
            keys.update(k for k, v in h.items() if _is_number(v) and k != "epoch")
        run = self.client.get_run(self.run_id)
        keys.update(run.data.metrics)
        for k in keys:
            self.logged[k] = {m.step for m in self.client.get_metric_history(self.run_id, k)}

    def backfill(self, history: Iterable[dict[str, Any]]) -> int:
        """Log the (metric, epoch) pairs of a checkpoint's history that MLflow lacks; returns how many."""
        n = 0
        for h in history:
            n += self.log_epoch(h, int(h["epoch"]), pump=False)
        self.pump()
        if n:
            log.info("backfilled %d metric values into MLflow run %s", n, self.run_id)
        return n

    # ---- buffered sending
    def _submit(self, op: _Op) -> None:
        if op.key is not None:
            self._ops = [o for o in self._ops if o.key != op.key]
        self._ops.append(op)

    def pump(self, force: bool = False) -> bool:
        """Send what is buffered, unless backing off; returns True when nothing is left."""
        if self.closed:
            return True
        if not force and time.monotonic() < self._next_try:
            return not (self._metrics or self._ops)
        try:
            while self._metrics:
                chunk = self._metrics[:1000]
                self._call(lambda: self.client.log_batch(self.run_id, metrics=chunk), "metrics")
                del self._metrics[: len(chunk)]
            while self._ops:
                op = self._ops[0]
                self._call(op.fn, op.desc)
                self._ops.pop(0)
        except _Deferred:
            return False
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s reachable again after %.0f s; buffered data sent",
                strip_credentials(self.uri),
                time.monotonic() - self._outage_since,
            )
        self._failures, self._next_try, self._outage_since = 0, 0.0, None
        return True

    def _call(self, fn: Callable[[], Any], desc: str) -> Any:
        try:
            return fn()
        except Exception as exc:
            if not _retryable(exc):
                log.warning("MLflow rejected %s (dropped): %s", desc, str(exc).splitlines()[0][:300])
                return None
            self._failures += 1
            delay = min(60.0, 2.0 ** (self._failures - 1))
            self._next_try = time.monotonic() + delay
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning(
                    "MLflow at %s failed (%s: %s); training continues, buffering and retrying with back-off",
                    strip_credentials(self.uri),
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200],
                )
            raise _Deferred() from exc

    def flush(self, timeout: float | None = None) -> bool:
        """Keep trying (with back-off) until sent or `timeout` s passed; True when all was sent."""
        timeout = float(os.environ.get("VMRNN_MLFLOW_FLUSH_TIMEOUT_S", "60")) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.pump(force=True):
                return True
            wait = min(self._next_try, deadline) - time.monotonic()
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.05, wait))

    # ---- logging
    def log_epoch(self, metrics: dict[str, Any], epoch: int, pump: bool = True) -> int:
        """Buffer the metrics of the loop's epoch `epoch` (0-based) at MLflow step `epoch_number(epoch)`."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = epoch_number(epoch)
        n = 0
        for k, v in metrics.items():
            if k == "epoch" or not _is_number(v):
                continue
            if k == "best_epoch":
                v = epoch_number(v)
            seen = self.logged.setdefault(k, set())
            if step in seen:
                continue
            seen.add(step)
            self._metrics.append(Metric(k, float(v), ts, int(step)))
            n += 1
        if pump:
            self.pump()
        return n

    def log_best_epoch(self, epoch: int, vis: tuple[Any, Any, Any] | None, val: dict[str, Any], n_input: int) -> None:
        """New best validation epoch (the loop's index): refresh the forecast pictures and the lead-time curves."""
        epoch = epoch_number(epoch)
        title = f"epoch {epoch}  val_mse {val.get('mse', float('nan')):.4g}"
        if vis is not None and self.cfg.log_images:
            try:
                files = {
                    visualize.STRIP_FILE: visualize.strip_png(*vis, title=title),
                    visualize.GIF_FILE: visualize.forecast_gif(*vis),
                }
                self._submit(self._upload_op("forecast images", files, "forecasts", key="images"))
            except Exception as exc:  # a picture must never stop training
                log.warning("could not draw forecast images: %s", exc)
        per_lead = {k: v for k, v in val.items() if isinstance(v, list)}
        if per_lead:
            try:
                files = {
                    visualize.LEAD_FILE: visualize.lead_time_png(_lead_panels(per_lead), title=f"validation, {title}"),
                    "val_lead_time_metrics.json": json.dumps({"epoch": epoch, **per_lead}, indent=1).encode(),
                }
                self._submit(self._upload_op("lead-time metrics", files, "metrics", key="lead"))
            except Exception as exc:
                log.warning("could not draw the lead-time plot: %s", exc)
        self._submit(
            _Op(
                "best-epoch tags",
                lambda: self.client.set_tag(self.run_id, T.TAG_BEST_EPOCH, str(epoch)),
                key="best_tag",
            )
        )
        self.pump()

    def log_test(self, test: dict[str, Any], epoch: int) -> None:
        """The test scores of the best weights, after the loop's epoch `epoch`."""
        epoch = epoch_number(epoch)
        per_lead = {k: v for k, v in test.items() if isinstance(v, list)}
        files = {"test_metrics.json": json.dumps({"scored_after_epoch": epoch, **test}, indent=1, default=str).encode()}
        if per_lead:
            try:
                files["test_lead_time_metrics.png"] = visualize.lead_time_png(
                    _lead_panels(per_lead), title="test (best weights)"
                )
            except Exception as exc:
                log.warning("could not draw the test lead-time plot: %s", exc)
        self._submit(self._upload_op("test metrics", files, "metrics", key="test"))
        self.pump()

    def _upload_op(self, desc: str, files: dict[str, bytes], artifact_path: str, key: str) -> _Op:
        """Send `files` ({name: content}) under `artifact_path`, through a folder that lives only for the upload."""

        def upload() -> None:
            with tempfile.TemporaryDirectory(prefix="vmrnn-mlflow-") as d:
                for name, data in files.items():
                    (Path(d) / name).write_bytes(data)
                self.client.log_artifacts(self.run_id, d, artifact_path)

        return _Op(desc, upload, key=key)

    def log_model(self, best_state: dict[str, Any], model_cfg: dict[str, Any], spec: Any, val_ds: Any) -> str | None:
        """Log the best weights as an MLflow model (once per run); returns its URI."""
        if not self.flush():
            log.warning("MLflow unreachable: the model is not logged (it stays in the checkpoint)")
            return None
        try:
            run = self.client.get_run(self.run_id)
            if T.TAG_MODEL_URI in run.data.tags:
                return run.data.tags[T.TAG_MODEL_URI]
        except Exception:
            pass
        example = np.asarray(val_ds[0][0], dtype=np.float32)  # one sample: see vmrnn.tracking.models
        meta = model_meta(
            model_cfg,
            {
                "name": self.cfg.dataset,
                "in_frames": spec.in_frames,
                "out_frames": spec.out_frames,
                "channels": spec.channels,
                "height": spec.height,
                "width": spec.width,
            },
            {"run_id": self.run_id, "train": {k2: v for k2, v in config_params(self.cfg).items()}},
        )

        def do() -> str:
            model_uri, fmt = log_forecaster_in_run(
                self.uri, self.run_id, best_state, meta, example, fmt=self.cfg.model_format, name=T.MODEL_ARTIFACT_PATH
            )
            self.client.set_tag(self.run_id, T.TAG_MODEL_URI, model_uri)
            self.client.set_tag(self.run_id, T.TAG_MODEL_FORMAT, fmt)
            return model_uri

        t0 = time.perf_counter()
        deadline = time.monotonic() + float(os.environ.get("VMRNN_MLFLOW_FLUSH_TIMEOUT_S", "60"))
        while True:
            try:
                uri = do()
                log.info("logged model %s in %.1f s", uri, time.perf_counter() - t0)
                return uri
            except Exception as exc:
                if not _retryable(exc) or time.monotonic() > deadline:
                    log.warning(
                        "could not log the model to MLflow (%s: %s); it stays in the checkpoint",
                        type(exc).__name__,
                        str(exc).splitlines()[0][:300],
                    )
                    return None
                time.sleep(2.0)

    # ---- closing
    def finish(self) -> None:
        self._close("FINISHED")

    def fail(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._submit(_Op("failure reason", lambda: self.client.set_tag(self.run_id, T.TAG_FAILURE, reason[:5000])))
        self._close("FAILED", timeout=10.0)

    def _close(self, status: str, timeout: float | None = None) -> None:
        if self.closed:
            return
        self._submit(_Op(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status)))
        if not self.flush(timeout):
            unsent = Path(tempfile.mkdtemp(prefix="vmrnn-mlflow-unsent-")) / "unsent_metrics.json"
            unsent.write_text(
                json.dumps(
                    [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self._metrics],
                    indent=1,
                )
            )
            log.warning(
                "MLflow at %s still unreachable: run %s left unfinished; %d metric values and %d "
                "operations (%s) not sent; the metrics are saved in %s (the checkpoint's history has "
                "them too and a resumed run backfills them; delete the folder when done)",
                strip_credentials(self.uri),
                self.run_id,
                len(self._metrics),
                len(self._ops),
                ", ".join(o.desc for o in self._ops),
                unsent,
            )
        self.closed = True


class _Deferred(Exception):
    """Sending failed; the buffer is kept and retried later."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _lead_panels(per_lead: dict[str, list]) -> dict[str, list]:
    """Keep the per-lead-time curves of the four headline metrics (whatever the accumulator names them)."""
    out = {}
    for k, v in per_lead.items():
        if v and all(isinstance(x, (int, float)) for x in v):
            out[k] = v
    return out
