"""MLflow tracking for one training run (rank 0 only).

One MLflow run per training run. It is found again after a restart, first by the run id stored in the
checkpoint, then by the tag `vmrnn.run_key`, else created. Params are the full resolved config
(flattened, secrets redacted); metrics are logged per epoch with step=epoch, and every (metric, epoch)
pair is logged once: on (re)start the run's metric history is read, and epochs that the checkpoint's
history has but MLflow lacks are backfilled, while epochs MLflow already has are never logged again.

Outages: a tracking *server* that cannot be reached at start is an error within seconds
(`TrackingUnavailable`, naming the URI). Later failures do not stop training: metrics and artifacts are
buffered and retried with exponential back-off (1 s .. 60 s) at each epoch; `finish()` keeps trying for
VMRNN_MLFLOW_FLUSH_TIMEOUT_S (default 60 s), then writes what is still unsent to a JSON file and warns.
Per-request retries of the MLflow client are bounded (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless already set) so that a dead server costs seconds, not minutes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from vmrnn.train.config import TrainConfig, flatten

log = logging.getLogger("vmrnn.train")

RUN_KEY_TAG = "vmrnn.run_key"
MODEL_TAG = "vmrnn.model_uri"                 # models:/m-... of the logged best model
MODEL_ARTIFACT_PATH = "model"                 # its name in the run: runs:/<run_id>/model
FAILURE_TAG = "vmrnn.failure_reason"
RESTARTS_TAG = "vmrnn.restarts"  # times the run was continued after a stop (worker failure, resume)
PARENT_TAG = "mlflow.parentRunId"
SECRET_RE = re.compile(r"(secret|token|passw|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth)", re.I)
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
MAX_PARAM_LEN = 6000


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or opened (the message names the URI)."""


# ---------------------------------------------------------------------- helpers

def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def strip_credentials(uri: str) -> str:
    """Drop user:password@ from a URI (for messages and params)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def redact(key: str, value: str) -> str:
    if SECRET_RE.search(key):
        return "***"
    if "://" in value:
        value = strip_credentials(value)
    return value[:MAX_PARAM_LEN]


def configure_client_env(uri: str) -> None:
    """Bound the MLflow client's own retries (user settings win)."""
    os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if is_remote(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_reachable(uri: str, timeout: float = 5.0,
                    hint: str = " (or disable tracking: --set tracking=false)") -> None:
    """Fail fast, naming the URI, when a tracking server does not answer /health; `hint` ends the
    message (a sweep cannot run without tracking, training can)."""
    if is_remote(uri):
        # urllib does not take user:password@ in the host: send them as basic auth, as MLflow's client does
        parts = urlsplit(uri)
        request = urllib.request.Request(strip_credentials(uri).rstrip("/") + "/health")
        if parts.username or parts.password:
            token = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode())
            request.add_header("Authorization", "Basic " + token.decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                if resp.status >= 500:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"MLflow tracking server {strip_credentials(uri)} is unreachable ({reason}); start it, or point "
                f"--tracking-uri / MLFLOW_TRACKING_URI at a running server{hint}") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingUnavailable(f"MLflow tracking store {uri}: folder {db.parent} does not exist")
    elif "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in _OTHER_SCHEMES and scheme.split("+")[0] not in _DB_SCHEMES:
            raise TrackingUnavailable(
                f"MLflow tracking URI {strip_credentials(uri)} has an unknown scheme {scheme!r}: use "
                "http(s)://HOST:PORT (a tracking server), sqlite:///PATH/mlflow.db, file:///PATH or a folder")


_DB_SCHEMES = ("sqlite", "mysql", "postgresql", "mssql")  # SQLAlchemy stores, with an optional +driver
_OTHER_SCHEMES = ("file", "databricks", "databricks-uc", "uc")


@contextlib.contextmanager
def pinned_tracking_uri(uri: str):
    """MLflow's fluent API (log_model, register_model, models:/ downloads) pointed at `uri` for tracking
    and the registry for a while; the process's own settings (the globals and $MLFLOW_TRACKING_URI) are
    restored exactly afterwards, not replaced by what they resolved to."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = old_tracking, old_registry
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _retryable(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return code not in _PERMANENT_CODES


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed. For a sqlite store its artifacts go to `mlruns/`
    beside the database (MLflow's own default puts them in ./mlruns of whatever the current folder is)."""
    configure_client_env(uri)
    check_reachable(uri)
    client = _client(uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            db_dir = Path(uri[len("sqlite:///"):]).parent
            if db_dir.resolve() != Path.cwd().resolve():
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
                location = str(db_dir / "mlruns" / slug)
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception as exc:  # created concurrently by another trial
            if getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS":
                return client.get_experiment_by_name(name).experiment_id
            raise
    except TrackingUnavailable:
        raise
    except Exception as exc:
        raise TrackingUnavailable(f"MLflow tracking store {strip_credentials(uri)} failed: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def config_params(cfg: TrainConfig) -> dict[str, str]:
    from vmrnn.models import model_config

    params = {k: redact(k, v) for k, v in flatten(cfg.to_dict()).items()}
    try:
        mc = model_config(cfg.preset, **cfg.model).to_dict()
        params.update({f"model_config.{k}": redact(k, v) for k, v in flatten(mc).items()})
    except Exception:
        pass
    return params


# ---------------------------------------------------------------------- the tracker

@dataclass
class _Op:
    desc: str
    fn: Callable[[], Any]
    key: str | None = None  # a later op with the same key replaces a pending one


class Tracker:
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
        self._staging = Path(tempfile.mkdtemp(prefix="vmrnn-mlflow-"))
        self.closed = False

    # ---- opening
    @classmethod
    def open(cls, cfg: TrainConfig, run_id: str | None = None, history: Iterable[dict[str, Any]] = ()) -> Tracker:
        """Find or create the run (checkpoint run id > run_key tag > new), log params, backfill history."""
        uri = cfg.tracking_uri or ""
        exp_id = ensure_experiment(uri, cfg.experiment or f"vmrnn-{cfg.dataset}")
        client = _client(uri)
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
                found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{cfg.run_key}'",
                                           max_results=1)
                run = found[0] if found else None
            if run is None:
                tags = {RUN_KEY_TAG: cfg.run_key or "", "vmrnn.dataset": cfg.dataset,
                        "vmrnn.preset": str(cfg.preset)}
                tags.update({k: redact(k, str(v)) for k, v in cfg.tags.items()})
                if cfg.parent_run_id:
                    tags[PARENT_TAG] = cfg.parent_run_id
                name = cfg.run_name or f"{cfg.dataset}-{cfg.preset}-{(cfg.run_key or '')[:8]}".rstrip("-")
                run = client.create_run(exp_id, run_name=name, tags=tags)
                log.info("MLflow run %s (%s) in experiment %s at %s", run.info.run_id, name, cfg.experiment,
                         strip_credentials(uri))
            else:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                # A restart (worker failure, resumed sweep or --resume) is visible on the run: how many,
                # from which epoch, and the failure that caused it (no longer the run's failure reason).
                tags = run.data.tags
                client.set_tag(run.info.run_id, RESTARTS_TAG, str(int(tags.get(RESTARTS_TAG, "0") or 0) + 1))
                epochs = [int(h["epoch"]) for h in history if "epoch" in h]
                client.set_tag(run.info.run_id, "vmrnn.resumed_from_epoch", str(max(epochs)) if epochs else "none")
                if tags.get(FAILURE_TAG):
                    client.set_tag(run.info.run_id, "vmrnn.previous_failure", tags[FAILURE_TAG][:5000])
                    client.delete_tag(run.info.run_id, FAILURE_TAG)
                log.info("continuing MLflow run %s", run.info.run_id)
            self = cls(cfg, client, uri, exp_id, run.info.run_id)
            self._log_params(run)
            self._load_logged(history)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow tracking store {strip_credentials(uri)} failed while opening the "
                                      f"run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
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
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        for k, v in changed.items():  # MLflow params are immutable: record the new value as a tag
            self.client.set_tag(self.run_id, f"vmrnn.param_changed.{k}", v[:5000])

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
                del self._metrics[:len(chunk)]
            while self._ops:
                op = self._ops[0]
                self._call(op.fn, op.desc)
                self._ops.pop(0)
        except _Deferred:
            return False
        if self._outage_since is not None:
            log.warning("MLflow at %s reachable again after %.0f s; buffered data sent",
                        strip_credentials(self.uri), time.monotonic() - self._outage_since)
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
                log.warning("MLflow at %s failed (%s: %s); training continues, buffering and retrying with "
                            "back-off", strip_credentials(self.uri), type(exc).__name__,
                            str(exc).splitlines()[0][:200])
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
    def log_epoch(self, metrics: dict[str, Any], step: int, pump: bool = True) -> int:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        n = 0
        for k, v in metrics.items():
            if k == "epoch" or not _is_number(v):
                continue
            seen = self.logged.setdefault(k, set())
            if step in seen:
                continue
            seen.add(step)
            self._metrics.append(Metric(k, float(v), ts, int(step)))
            n += 1
        if pump:
            self.pump()
        return n

    def log_best_epoch(self, epoch: int, vis: tuple[Any, Any, Any] | None, val: dict[str, Any],
                       n_input: int) -> None:
        """New best validation epoch: refresh the forecast pictures and the lead-time curves."""
        from vmrnn.train import visualize

        d = self._staging / f"best_{epoch:04d}"
        d.mkdir(parents=True, exist_ok=True)
        title = f"epoch {epoch}  val_mse {val.get('mse', float('nan')):.4g}"
        if vis is not None and self.cfg.log_images:
            try:
                visualize.save_strip(*vis, d / visualize.STRIP_FILE, title=title)
                visualize.save_gif(*vis, d / visualize.GIF_FILE)
                self._submit(_Op("forecast images", lambda d=d: self._log_dir_files(
                    d, [visualize.STRIP_FILE, visualize.GIF_FILE], "forecasts"), key="images"))
            except Exception as exc:  # a picture must never stop training
                log.warning("could not draw forecast images: %s", exc)
        per_lead = {k: v for k, v in val.items() if isinstance(v, list)}
        if per_lead:
            try:
                visualize.save_lead_time_plot(_lead_panels(per_lead), d / visualize.LEAD_FILE,
                                              title=f"validation, {title}")
                (d / "val_lead_time_metrics.json").write_text(json.dumps({"epoch": epoch, **per_lead}, indent=1))
                self._submit(_Op("lead-time metrics", lambda d=d: self._log_dir_files(
                    d, [visualize.LEAD_FILE, "val_lead_time_metrics.json"], "metrics"), key="lead"))
            except Exception as exc:
                log.warning("could not draw the lead-time plot: %s", exc)
        self._submit(_Op("best-epoch tags", lambda: self.client.set_tag(self.run_id, "vmrnn.best_epoch", str(epoch)),
                         key="best_tag"))
        self.pump()

    def log_test(self, test: dict[str, Any], epoch: int) -> None:
        from vmrnn.train import visualize

        per_lead = {k: v for k, v in test.items() if isinstance(v, list)}
        d = self._staging / "test"
        d.mkdir(parents=True, exist_ok=True)
        (d / "test_metrics.json").write_text(json.dumps({"scored_after_epoch": epoch, **test}, indent=1,
                                                        default=str))
        files = ["test_metrics.json"]
        if per_lead:
            try:
                visualize.save_lead_time_plot(_lead_panels(per_lead), d / "test_lead_time_metrics.png",
                                              title="test (best weights)")
                files.append("test_lead_time_metrics.png")
            except Exception as exc:
                log.warning("could not draw the test lead-time plot: %s", exc)
        self._submit(_Op("test metrics", lambda: self._log_dir_files(d, files, "metrics"), key="test"))
        self.pump()

    def _log_dir_files(self, d: Path, names: list[str], artifact_path: str) -> None:
        for name in names:
            if (d / name).exists():
                self.client.log_artifact(self.run_id, str(d / name), artifact_path)

    def log_model(self, best_state: dict[str, Any], model_cfg: dict[str, Any], spec: Any, val_ds: Any) -> str | None:
        """Log the best weights as an MLflow model (once per run); returns its URI."""
        import numpy as np

        from vmrnn.train.export import log_forecaster_to_mlflow, model_meta

        if not self.flush():
            log.warning("MLflow unreachable: the model is not logged (it stays in the checkpoint)")
            return None
        try:
            run = self.client.get_run(self.run_id)
            if MODEL_TAG in run.data.tags:
                return run.data.tags[MODEL_TAG]
        except Exception:
            pass
        k = min(2, len(val_ds))
        example = np.stack([np.asarray(val_ds[i % len(val_ds)][0]) for i in range(max(2, k))]).astype(np.float32)
        meta = model_meta(model_cfg, {"name": self.cfg.dataset, "in_frames": spec.in_frames,
                                      "out_frames": spec.out_frames, "channels": spec.channels,
                                      "height": spec.height, "width": spec.width},
                          {"run_id": self.run_id, "train": {k2: v for k2, v in config_params(self.cfg).items()}})

        def do() -> str:
            import mlflow

            with pinned_tracking_uri(self.uri):
                with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                    info, fmt = log_forecaster_to_mlflow(best_state, meta, example, fmt=self.cfg.model_format,
                                                         name=MODEL_ARTIFACT_PATH)
            self.client.set_tag(self.run_id, MODEL_TAG, info.model_uri)
            self.client.set_tag(self.run_id, "vmrnn.model_format", fmt)
            return info.model_uri

        t0 = time.perf_counter()
        deadline = time.monotonic() + float(os.environ.get("VMRNN_MLFLOW_FLUSH_TIMEOUT_S", "60"))
        while True:
            try:
                uri = do()
                log.info("logged model %s in %.1f s", uri, time.perf_counter() - t0)
                return uri
            except Exception as exc:
                if not _retryable(exc) or time.monotonic() > deadline:
                    log.warning("could not log the model to MLflow (%s: %s); it stays in the checkpoint",
                                type(exc).__name__, str(exc).splitlines()[0][:300])
                    return None
                time.sleep(2.0)

    # ---- closing
    def finish(self) -> None:
        self._close("FINISHED")

    def fail(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._submit(_Op("failure reason", lambda: self.client.set_tag(self.run_id, FAILURE_TAG, reason[:5000])))
        self._close("FAILED", timeout=10.0)

    def _close(self, status: str, timeout: float | None = None) -> None:
        if self.closed:
            return
        self._submit(_Op(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status)))
        if self.flush(timeout):
            shutil.rmtree(self._staging, ignore_errors=True)
        else:
            unsent = self._staging / "unsent_metrics.json"
            unsent.write_text(json.dumps([{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                                          for m in self._metrics], indent=1))
            log.warning("MLflow at %s still unreachable: run %s left unfinished; %d metric values and %d "
                        "operations (%s) not sent; the metrics are saved in %s (the checkpoint's history has "
                        "them too and a resumed run backfills them)", strip_credentials(self.uri), self.run_id,
                        len(self._metrics), len(self._ops), ", ".join(o.desc for o in self._ops), unsent)
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
