"""Sweep VMRNN-B on TaxiBJ (4 -> 4 frames of 2x32x32 traffic flow): Optuna + ASHA over Ray Train trials.

    python sweeps/taxibj.py --smoke                       # minutes on a CPU: tiny model, synthetic data
    python sweeps/taxibj.py --data-dir ./data             # the real sweep (GPUs when the cluster has them)
    ray job submit --working-dir . -- python sweeps/taxibj.py --data-dir /shared/data

`python sweeps/taxibj.py --help` lists the flags; docs/SWEEPS.md explains the rest.
"""

import sys
from pathlib import Path

# Run from a checkout or a `ray job submit --working-dir .` upload without installing: the vmrnn package
# beside this folder comes first.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "vmrnn" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from ray import tune  # noqa: E402

from vmrnn.tune import SweepSpec, main  # noqa: E402

SPEC = SweepSpec(
    dataset="taxibj",
    description="VMRNN-B, OpenSTL's TaxiBJ configuration as the baseline",
    # The official point (the first trial) comes from the registry: the taxibj recipe (OpenSTL's single-GPU
    # script: Adam, lr 4e-4, batch 16, cosine with 5 warm-up epochs) and the taxibj preset (configs/taxibj/
    # VMRNN-B: patch 4, 12 blocks of width 128, d_state 16, drop-path 0.1).
    space={
        "lr": tune.loguniform(5e-5, 2e-3),
        "warmup_epochs": tune.randint(0, 6),  # 0..5
        "weight_decay": tune.choice([0.0, 1e-5, 1e-4, 1e-3, 1e-2]),
        "optimizer": tune.choice(["adam", "adamw"]),
        "batch_size": tune.choice([8, 16, 32]),  # per worker
        "embed_dim": tune.choice([64, 96, 128, 160]),  # multiples of 16 (GroupNorm(16) for patch >= 4)
        "depth": tune.choice([4, 6, 8, 12]),
        "d_state": tune.choice([8, 16, 32]),
        "patch_size": tune.choice([2, 4]),
        "drop_path": tune.uniform(0.0, 0.3),
    },
    # --smoke: the taxibj-tiny preset (patch 4, width 16, 2 blocks, d_state 4) and a space around it.
    smoke_official={
        "lr": 4e-4,
        "warmup_epochs": 1,
        "weight_decay": 0.0,
        "batch_size": 4,
        "embed_dim": 16,
        "depth": 2,
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
        "depth": tune.choice([1, 2]),
        "d_state": tune.choice([4, 8]),
        "patch_size": tune.choice([4, 8]),
        "drop_path": tune.uniform(0.0, 0.2),
    },
    epochs=50,
    num_samples=32,
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
