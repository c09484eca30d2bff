"""Tracking URIs: the default store, absolute local stores, credentials kept out of messages, the MLflow
client's environment, a fail-fast reachability check, and MLflow's fluent API pinned to one URI.

A tracking *server* that cannot be reached is an error within seconds (`TrackingUnavailable`, naming the
URI): the client's own per-request retries are bounded (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless already set), so a dead server costs seconds, not minutes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

TRAIN_HINT = " (or disable tracking: --set tracking=false)"  # a sweep cannot run without tracking, training can

# MLflow is imported inside the functions that call it: importing this module does not import MLflow.
_DB_SCHEMES = ("sqlite", "mysql", "postgresql", "mssql")  # SQLAlchemy stores, with an optional +driver
_OTHER_SCHEMES = ("file", "databricks", "databricks-uc", "uc")


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or used as asked (the message names the URI)."""


def default_tracking_uri() -> str:
    """MLflow's own default store: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (artifacts ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def absolute_tracking_uri(uri: str) -> str:
    """Make a local store URI absolute (sqlite:///rel.db, file:rel, or a bare path)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if rel and not rel.startswith(":memory:"):
            return f"sqlite:///{Path(rel).expanduser().resolve()}"
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        while path.startswith("//"):
            path = path[1:]
        return Path(path).expanduser().resolve().as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store (None for other stores and for an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    if not path or path.startswith(":memory:"):
        return None
    return Path(path)


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


def configure_client_env(uri: str) -> None:
    """Bound the MLflow client's own retries (user settings win)."""
    os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if is_remote(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_reachable(uri: str, timeout: float = 5.0, hint: str = TRAIN_HINT) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer /health, a sqlite store's folder
    is missing, or the scheme is unknown; `hint` ends the message."""
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
                f"--tracking-uri / MLFLOW_TRACKING_URI at a running server{hint}"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.parent.is_dir():
            raise TrackingUnavailable(f"MLflow tracking store {uri}: folder {db.parent} does not exist")
    elif "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in _OTHER_SCHEMES and scheme.split("+")[0] not in _DB_SCHEMES:
            raise TrackingUnavailable(
                f"MLflow tracking URI {strip_credentials(uri)} has an unknown scheme {scheme!r}: use "
                "http(s)://HOST:PORT (a tracking server), sqlite:///PATH/mlflow.db, file:///PATH or a folder"
            )


def client(uri: str) -> Any:
    """An MlflowClient bound to `uri` for tracking and the model registry alike."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def pinned_tracking_uri(uri: str) -> Iterator[None]:
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
