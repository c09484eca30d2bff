"""The MLflow Model Registry end of a sweep: register the best trial's model as `vmrnn-<dataset>` and
decide who holds the `champion` alias.

Rules:
- the new version becomes `champion` when there is none, or when it beats the champion on val_mse
  (lower is better) measured on the same kind of data;
- a model validated on real data always beats a champion validated on synthetic data (a --smoke
  sweep), and a synthetic-data model never replaces a real-data champion;
- otherwise it becomes `challenger` (the alias moves to it) and the champion stays;
- registering the same run twice (a resumed or re-run sweep) reuses its version: no duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vmrnn.tracking import tags as T
from vmrnn.tracking import uris
from vmrnn.tune import defaults as D
from vmrnn.tune.values import finite_float

# MLflow is imported inside the functions that call it: importing this module does not import MLflow.


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # "champion" | "challenger"
    model_uri: str  # models:/<name>/<version>
    previous_champion: str | None  # version that held champion before (None: there was none)
    previous_champion_mse: float | None
    reason: str
    reused: bool  # the run was already registered (resume / re-run)

    def describe(self) -> str:
        return (
            f"{self.name} version {self.version} -> @{self.alias} ({self.reason}); "
            f"load it as models:/{self.name}@{self.alias}"
        )


def _eval_rank(kind: str | None) -> int:
    return 0 if kind == "synthetic" else 1


def _version_mse(client, mv) -> float | None:
    mse = finite_float(mv.tags.get("val_mse"))
    if mse is None and mv.run_id:
        try:
            metrics = client.get_run(mv.run_id).data.metrics
        except Exception:
            return None
        mse = finite_float(metrics.get("best_val_mse", metrics.get("val_mse")))
    return mse


def _get_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(
    new_mse: float, new_kind: str, champ_mse: float | None, champ_kind: str | None, has_champion: bool
) -> tuple[bool, str]:
    """(promote?, why). Pure: the whole champion/challenger rule in one place."""
    if not has_champion:
        return True, "no champion yet"
    new_rank, champ_rank = _eval_rank(new_kind), _eval_rank(champ_kind)
    if new_rank > champ_rank:
        return True, "validated on real data; the champion was validated on synthetic (smoke) data"
    if new_rank < champ_rank:
        return False, ("validated on synthetic (smoke) data; it never replaces a champion validated on real data")
    if champ_mse is None:
        return True, "the champion has no val_mse recorded"
    if new_mse < champ_mse:
        return True, f"val_mse {new_mse:.6g} beats the champion's {champ_mse:.6g}"
    return False, f"val_mse {new_mse:.6g} does not beat the champion's {champ_mse:.6g}"


def _logged_model_uri(client, run_id: str, artifact_path: str) -> str:
    """models:/<model_id> of the model the run logged under `artifact_path`: the run's tag vmrnn.model_uri
    (set by the training layer), else the logged model of that name whose source is the run."""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    uri = run.data.tags.get(T.TAG_MODEL_URI, "")
    if uri.startswith("models:/m-"):
        return uri
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_path}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    if not models:
        raise MlflowException(f"run {run_id} logged no model named {artifact_path!r}")
    return f"models:/{models[0].model_id}"


def register_best(
    tracking_uri: str,
    *,
    dataset: str,
    run_id: str,
    val_mse: float,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    sweep: str = "",
    trial_id: str = "",
    eval_data: str = "real",
    artifact_path: str | None = None,
    name: str | None = None,
) -> Registration:
    """Register runs:/<run_id>/<artifact_path> as `name` (default vmrnn-<dataset>) and move the
    aliases by the rules above."""
    from mlflow.exceptions import MlflowException

    name = name or D.registered_model_name(dataset)
    artifact_path = artifact_path or T.MODEL_ARTIFACT_PATH
    client = uris.client(tracking_uri)
    try:
        client.create_registered_model(
            name, tags={T.TAG_DATASET: dataset}, description=f"VMRNN forecaster for {dataset}, from vmrnn sweeps"
        )
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise

    tags: dict[str, str] = {
        k: f"{finite_float(v):.8g}"
        for k, v in (metrics or {}).items()
        if k in T.VERSION_METRIC_TAGS and finite_float(v) is not None
    }
    tags.update(
        {
            "val_mse": f"{val_mse:.8g}",
            T.TAG_SWEEP: sweep,
            T.TAG_TRIAL_ID: trial_id,
            T.TAG_DATASET: dataset,
            T.TAG_EVAL_DATA: eval_data,
        }
    )
    if config:
        tags[T.TAG_VERSION_CONFIG] = json.dumps(config, sort_keys=True, default=str)[:5000]

    existing = list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    reused = bool(existing)
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
    else:
        # From the logged model's own URI (models:/m-...), linked to the run: mlflow.register_model would
        # look for files under runs:/<id>/model first (a logged model has none there) and print its notes.
        source = _logged_model_uri(client, run_id, artifact_path)
        mv = client.create_model_version(
            name, source=source, run_id=run_id, tags=tags, model_id=source[len("models:/") :]
        )
    for key, value in tags.items():
        if mv.tags.get(key) != value:
            client.set_model_version_tag(name, mv.version, key, value)

    champion = _get_alias(client, name, T.CHAMPION)
    prev_version = str(champion.version) if champion else None
    prev_mse = _version_mse(client, champion) if champion else None
    if champion is not None and str(champion.version) == str(mv.version):
        promote, reason = True, "already the champion"
    else:
        promote, reason = decide(
            val_mse, eval_data, prev_mse, champion.tags.get(T.TAG_EVAL_DATA) if champion else None, champion is not None
        )
    if promote:
        client.set_registered_model_alias(name, T.CHAMPION, mv.version)
        challenger = _get_alias(client, name, T.CHALLENGER)
        if challenger is not None and str(challenger.version) == str(mv.version):
            client.delete_registered_model_alias(name, T.CHALLENGER)
        alias = T.CHAMPION
    else:
        client.set_registered_model_alias(name, T.CHALLENGER, mv.version)
        alias = T.CHALLENGER
    client.set_model_version_tag(name, mv.version, T.TAG_ALIAS_DECISION, reason[:4900])
    return Registration(
        name=name,
        version=str(mv.version),
        alias=alias,
        model_uri=f"models:/{name}/{mv.version}",
        previous_champion=prev_version,
        previous_champion_mse=prev_mse,
        reason=reason,
        reused=reused,
    )
