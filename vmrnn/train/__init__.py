"""Training: the per-worker loop in plain PyTorch, checkpoints, MLflow logging, and the Ray Train layer."""
