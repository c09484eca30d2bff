"""Sweep VMRNN-B on KTH actions (10 -> 20 frames of 1x128x128): Optuna + ASHA over Ray Train trials.

    python sweeps/kth.py --smoke                          # minutes on a CPU: tiny model, synthetic data
    python sweeps/kth.py --data-dir ./data                # the real sweep (GPUs when the cluster has them)
    ray job submit --working-dir . -- python sweeps/kth.py --data-dir /shared/data

`python sweeps/kth.py --help` lists the flags; docs/SWEEPS.md explains the rest.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "vmrnn" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from ray import tune  # noqa: E402

from vmrnn.tune import SweepSpec, main  # noqa: E402

SPEC = SweepSpec(
    dataset="kth",
    description="VMRNN-B, OpenSTL's KTH configuration as the baseline",
    # The official point (the first trial) comes from the registry: the kth recipe (the single-GPU `kth`
    # script: Adam, lr 1e-4, batch 4, cosine with 5 warm-up epochs) and the kth preset (OpenSTL configs/kth/
    # VMRNN-B: patch 2, 6 blocks of width 128, d_state 16, drop-path 0.1).
    space={
        "lr": tune.loguniform(2e-5, 1e-3),
        "warmup_epochs": tune.randint(0, 6),
        "weight_decay": tune.choice([0.0, 1e-5, 1e-4, 1e-3, 1e-2]),
        "optimizer": tune.choice(["adam", "adamw"]),
        "batch_size": tune.choice([2, 4, 8]),  # per worker; 128x128 frames x 30 steps are memory-heavy
        "embed_dim": tune.choice([64, 96, 128]),
        "depth": tune.choice([2, 4, 6, 8]),
        "d_state": tune.choice([8, 16, 32]),
        "patch_size": tune.choice([2, 4]),
        "drop_path": tune.uniform(0.0, 0.3),
    },
    # --smoke: the kth-tiny preset (patch 8, width 16, 1 block, d_state 4).
    smoke_official={
        "lr": 1e-3,
        "warmup_epochs": 1,
        "weight_decay": 0.0,
        "batch_size": 2,
        "embed_dim": 16,
        "depth": 1,
        "d_state": 4,
        "patch_size": 8,
        "drop_path": 0.1,
    },
    smoke_space={
        "lr": tune.loguniform(1e-4, 1e-2),
        "warmup_epochs": tune.randint(0, 2),
        "weight_decay": tune.choice([0.0, 1e-4]),
        "batch_size": tune.choice([2, 4]),
        "embed_dim": tune.choice([16, 32]),
        "depth": tune.choice([1, 2]),
        "d_state": tune.choice([4, 8]),
        "patch_size": tune.choice([8]),
        "drop_path": tune.uniform(0.0, 0.2),
    },
    epochs=30,
    num_samples=24,
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
