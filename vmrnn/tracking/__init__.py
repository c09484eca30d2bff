"""The one MLflow layer of vmrnn, used by training and by sweeps.

- `uris`: tracking URIs (default, absolute, credentials stripped), the client's environment, the
  reachability check (`TrackingUnavailable`), `pinned_tracking_uri` for MLflow's fluent API.
- `tags`: every tag, alias and artifact name vmrnn writes, and the secret-key rule (`redact`).
- `experiments`: `ensure_experiment`, the one rule for deleted experiments and artifact locations.
- `runs`: `RunTracker`, the rank-0 MLflow run of one training run, buffered and retried through outages.
- `sweeps`: `SweepTracker`, a sweep's parent run and its trial runs, results table and Optuna plots.
- `models`: logging a forecaster as an MLflow model and loading one back (`load_forecaster`).
- `registry`: registering a sweep's best model and moving the champion / challenger aliases.

Importing any of these does not import MLflow; the functions that talk to it do.
"""
