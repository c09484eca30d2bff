"""MLflow experiments: found by name or created, with one rule for training runs and sweeps alike.

- A deleted experiment is never used nor silently restored (that would bring back the runs someone
  deleted): `ExperimentDeleted` says how to restore it or to pick another name, as MLflow itself does.
- A new experiment of a sqlite store keeps its artifacts beside the database, in mlruns/<experiment name>;
  MLflow's default is ./mlruns of whichever process creates the experiment, so that a sweep, its trials'
  workers and later runs started from other folders would disagree. Other stores choose for themselves.
- Our experiments are model-training experiments: the tag `mlflow.experimentKind` says so, and
  `mlflow.note.content` is their description; both are set when vmrnn creates or first uses an experiment
  that lacks them (a value someone chose is kept). MLflow 3.17's own UI picks its GenAI or model-training
  view from a URL parameter, else from the browser's last choice (GenAI at first), not from the tag: the
  links vmrnn prints (`ui_url`) carry `workflowType=machine_learning`, so they open on the runs table.
"""

from __future__ import annotations

import re
import shlex

from vmrnn import commands
from vmrnn.tracking.uris import (
    TRAIN_HINT,
    TrackingUnavailable,
    check_reachable,
    client,
    configure_client_env,
    is_remote,
    sqlite_path,
    strip_credentials,
)


class ExperimentDeleted(TrackingUnavailable):
    """The experiment asked for exists but is deleted (the message says how to restore it)."""


# MLflow's own experiment tags: the kind its UI opens an experiment as, and the experiment's description.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
KIND_MODEL_TRAINING = "custom_model_development"  # MLflow's other kind is "genai_development"
TAG_DESCRIPTION = "mlflow.note.content"
DESCRIPTION = (
    "VMRNN spatiotemporal forecasters trained by vmrnn. Each training run is one run (params, per-epoch "
    "metrics, forecast images under forecasts/, the best model under model/); a sweep is a parent run with "
    "one nested run per trial. The best model of a sweep is registered as `vmrnn-<dataset>` "
    "(alias `champion`); see docs/TRAINING.md and docs/SWEEPS.md."
)


# The URL parameter that opens MLflow's UI in its model-training view (runs table, model registry).
UI_MODEL_TRAINING = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_url(experiment_id: str, run_id: str | None = None, server: str = LOCAL_UI) -> str:
    """The link to an experiment's runs table (or to one run) in MLflow's UI, in its model-training view."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/{page}?{UI_MODEL_TRAINING}"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to look at an experiment (or one run) in MLflow's UI, as the user runs it from here: a tracking
    server's own page, else `mlflow ui` on the store (spelled by `vmrnn.commands`, a database's password left
    out) and the local page; every link opens the model-training view."""
    if is_remote(tracking_uri):
        return f"open {ui_url(experiment_id, run_id, server=strip_credentials(tracking_uri))}"
    store = shlex.quote(strip_credentials(tracking_uri))
    mlflow = commands.tool("mlflow", "mlflow")
    return f"{mlflow} ui --backend-store-uri {store}, then open {ui_url(experiment_id, run_id)}"


def default_experiment(dataset: str) -> str:
    return f"vmrnn-{dataset}"


def experiment_tags() -> dict[str, str]:
    """The tags every vmrnn experiment carries (its kind for MLflow's UI and its description)."""
    return {TAG_EXPERIMENT_KIND: KIND_MODEL_TRAINING, TAG_DESCRIPTION: DESCRIPTION}


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment named `name` keeps its artifacts in the store `uri` (None: the store decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"
    return str(db.expanduser().resolve().parent / "mlruns" / folder)


def ensure_experiment(uri: str, name: str, *, hint: str = TRAIN_HINT) -> str:
    """The id of experiment `name` in the store `uri`, created if needed. Raises `TrackingUnavailable`
    (naming the URI; `hint` ends the message of an unreachable server) or `ExperimentDeleted`."""
    configure_client_env(uri)
    check_reachable(uri, hint=hint)
    mlflow_client = client(uri)
    try:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            try:
                return mlflow_client.create_experiment(
                    name, artifact_location=artifact_location(uri, name), tags=experiment_tags()
                )
            except Exception:  # created concurrently by another trial or worker
                exp = mlflow_client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ExperimentDeleted(
                f"MLflow experiment {name!r} in {strip_credentials(uri)} is deleted: restore it "
                f"(MLFLOW_TRACKING_URI=... mlflow experiments restore --experiment-id {exp.experiment_id}) "
                "or choose another experiment name"
            )
        for key, value in experiment_tags().items():  # an experiment made by MLflow itself or an older vmrnn
            if key not in exp.tags:
                mlflow_client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    except TrackingUnavailable:
        raise
    except Exception as exc:
        raise TrackingUnavailable(
            f"MLflow tracking store {strip_credentials(uri)} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
