"""Model registry rules (vmrnn.tracking.registry) against a real local sqlite MLflow store with real models.

Champion / challenger: the first model becomes champion; a worse one is a challenger and the champion
stays; a model validated on synthetic (smoke) data never replaces a real-data champion; a better one
takes the champion alias; registering the same run again creates no new version. The champion then
loads and predicts through `models:/vmrnn-taxibj@champion`.
"""

import numpy as np
import pytest

from vmrnn.tracking import tags as T
from vmrnn.tracking.registry import decide, register_best
from vmrnn.tune import defaults as D

pytestmark = pytest.mark.slow


def test_decide_rules():
    assert decide(1.0, "real", None, None, has_champion=False) == (True, "no champion yet")
    assert decide(0.5, "real", 0.6, "real", True)[0] is True
    assert decide(0.6, "real", 0.6, "real", True)[0] is False  # a tie keeps the champion
    assert decide(0.7, "real", 0.6, "real", True)[0] is False
    assert decide(0.1, "synthetic", 0.6, "real", True)[0] is False
    assert decide(9.0, "real", 0.1, "synthetic", True)[0] is True
    assert decide(0.5, "synthetic", 0.6, "synthetic", True)[0] is True
    assert decide(0.5, "real", None, "real", True)[0] is True  # a champion without val_mse


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _logged_run(uri: str, seed: int, val_mse: float) -> str:
    """A real run holding a real (tiny TaxiBJ) forecaster at artifact path 'model'."""
    import mlflow
    import torch

    from vmrnn.models import build_model
    from vmrnn.tracking.models import log_forecaster
    from vmrnn.tracking.uris import pinned_tracking_uri
    from vmrnn.train.export import model_meta

    torch.manual_seed(seed)
    model = build_model("taxibj-tiny")
    meta = model_meta(
        model.config.to_dict(),
        {"name": "taxibj", "in_frames": 4, "out_frames": 4, "channels": 2, "height": 32, "width": 32},
        {"seed": seed},
    )
    with pinned_tracking_uri(uri):  # the fluent API, without leaving the URI set for later tests
        mlflow.set_experiment("registry-test")
        with mlflow.start_run() as run:
            mlflow.log_metric("val_mse", val_mse)
            log_forecaster(
                model.state_dict(),
                meta,
                np.zeros((1, 4, 2, 32, 32), np.float32),
                fmt="pickle",
                name=T.MODEL_ARTIFACT_PATH,
            )
    return run.info.run_id


def test_champion_and_challenger_on_a_real_store(store):
    from mlflow.tracking import MlflowClient

    from vmrnn.tracking.models import load_forecaster

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = D.registered_model_name("taxibj")
    a, b, c, d = (_logged_run(store, i, mse) for i, mse in enumerate([0.5, 0.7, 0.3, 0.4]))

    r = register_best(
        store,
        dataset="taxibj",
        run_id=a,
        val_mse=0.5,
        metrics={"val_ssim": 0.9},
        config={"lr": 1e-3},
        sweep="s1",
        trial_id="t-a",
    )
    assert (r.version, r.alias, r.previous_champion, r.reused) == ("1", T.CHAMPION, None, False)
    mv = client.get_model_version(name, "1")
    assert mv.run_id == a and mv.tags["val_mse"] == "0.5" and mv.tags["val_ssim"] == "0.9"
    assert mv.tags[T.TAG_SWEEP] == "s1" and '"lr": 0.001' in mv.tags["config"]

    r = register_best(store, dataset="taxibj", run_id=b, val_mse=0.7, sweep="s2", trial_id="t-b")
    assert (r.version, r.alias, r.previous_champion) == ("2", T.CHALLENGER, "1")
    assert "does not beat" in r.reason
    assert str(client.get_model_version_by_alias(name, T.CHAMPION).version) == "1"

    # the same run again (a resumed / re-run sweep): no new version, same decision
    r = register_best(store, dataset="taxibj", run_id=b, val_mse=0.7, sweep="s2", trial_id="t-b")
    assert (r.version, r.alias, r.reused) == ("2", T.CHALLENGER, True)

    # lower val_mse, but measured on synthetic data: never replaces a real-data champion
    r = register_best(
        store, dataset="taxibj", run_id=c, val_mse=0.3, sweep="smoke", trial_id="t-c", eval_data="synthetic"
    )
    assert (r.version, r.alias) == ("3", T.CHALLENGER) and "synthetic" in r.reason
    assert str(client.get_model_version_by_alias(name, T.CHAMPION).version) == "1"

    # a better real-data model takes the champion alias
    r = register_best(store, dataset="taxibj", run_id=d, val_mse=0.4, sweep="s3", trial_id="t-d")
    assert (r.version, r.alias, r.previous_champion) == ("4", T.CHAMPION, "1")
    assert r.previous_champion_mse == pytest.approx(0.5)
    assert str(client.get_model_version_by_alias(name, T.CHAMPION).version) == "4"
    assert str(client.get_model_version_by_alias(name, T.CHALLENGER).version) == "3"
    r = register_best(store, dataset="taxibj", run_id=d, val_mse=0.4, sweep="s3", trial_id="t-d")
    assert (r.version, r.alias, r.reused, r.reason) == ("4", T.CHAMPION, True, "already the champion")

    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3", "4"]
    assert len({v.run_id for v in versions}) == 4
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {T.CHAMPION: "4", T.CHALLENGER: "3"}

    fc = load_forecaster(f"models:/{name}@{T.CHAMPION}")
    assert fc.meta["seed"] == 3  # run d's model
    y = fc.predict(np.random.default_rng(0).random((2, 4, 2, 32, 32), dtype=np.float32))
    assert y.shape == (2, 4, 2, 32, 32) and np.isfinite(y).all()
