"""Sweep VMRNN-D on Moving MNIST (10 -> 10 frames of 1x64x64): Optuna + ASHA over Ray Train trials.

    python sweeps/mmnist.py --smoke                       # minutes on a CPU: tiny model, synthetic data
    python sweeps/mmnist.py --data-dir ./data             # the real sweep (GPUs when the cluster has them)
    ray job submit --working-dir . -- python sweeps/mmnist.py --data-dir /shared/data

`python sweeps/mmnist.py --help` lists the flags; docs/SWEEPS.md explains the rest.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "vmrnn" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from ray import tune  # noqa: E402

from vmrnn.tune import SweepSpec, main  # noqa: E402

SPEC = SweepSpec(
    dataset="mmnist",
    description="VMRNN-D, the released Moving MNIST model's configuration as the baseline",
    # The official point (the first trial) comes from the registry: the `mmnist` preset (VMRNN-D, depths
    # down [2,6] / up [6,2], patch 2, width 128, d_state 16, drop-path 0.1) with the mmnist recipe (OpenSTL's:
    # Adam, lr 1e-4, batch 16, cosine with 5 warm-up epochs). `depths` is "down/up" (Optuna's categorical
    # choices must be scalars).
    space={
        "lr": tune.loguniform(2e-5, 1e-3),
        "warmup_epochs": tune.randint(0, 6),
        "weight_decay": tune.choice([0.0, 1e-5, 1e-4, 1e-3, 1e-2]),
        "optimizer": tune.choice(["adam", "adamw"]),
        "batch_size": tune.choice([8, 16, 32]),
        "embed_dim": tune.choice([64, 96, 128]),
        "depths": tune.choice(["2,2/2,2", "2,4/4,2", "2,6/6,2"]),
        "d_state": tune.choice([8, 16, 32]),
        "patch_size": tune.choice([2, 4]),
        "drop_path": tune.uniform(0.0, 0.3),
    },
    # --smoke: the mmnist-tiny preset (VMRNN-D [1]/[1], patch 4, width 16, d_state 4).
    smoke_official={
        "lr": 1e-3,
        "warmup_epochs": 1,
        "weight_decay": 0.0,
        "batch_size": 4,
        "embed_dim": 16,
        "depths": "1,1/1,1",
        "d_state": 4,
        "patch_size": 4,
        "drop_path": 0.1,
    },
    smoke_space={
        "lr": tune.loguniform(1e-4, 1e-2),
        "warmup_epochs": tune.randint(0, 2),
        "weight_decay": tune.choice([0.0, 1e-4]),
        "batch_size": tune.choice([4, 8]),
        "embed_dim": tune.choice([16, 32]),
        "depths": tune.choice(["1,1/1,1", "1,2/2,1"]),
        "d_state": tune.choice([4, 8]),
        "patch_size": tune.choice([4, 8]),
        "drop_path": tune.uniform(0.0, 0.2),
    },
    epochs=100,
    num_samples=32,
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
