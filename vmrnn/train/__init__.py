"""Training: the per-worker loop in plain PyTorch, checkpoints, MLflow logging, and the Ray Train layer.

- `vmrnn.train.config.TrainConfig`: every option of a run (validated, resolved against the dataset recipe).
- `vmrnn.train.loop.train(cfg)`: all epochs in this process (data-parallel under torchrun); `run_training` is the
  per-worker loop; `evaluate`, `TrainingDiverged`.
- `vmrnn.train.ray_train`: `build_trainer`, `train_loop_per_worker`, `fit` (Ray Train V2 TorchTrainer).
- `vmrnn.train.export`: the deployable `Forecaster` and loading it from a checkpoint (MLflow: `vmrnn.tracking`).
- `python -m vmrnn.train.torchrun_main`: the torchrun entry.

Nothing here imports Ray or MLflow at package import; see docs/TRAINING.md.
"""
