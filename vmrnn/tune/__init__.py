"""Ray Tune + Optuna sweeps over Ray Train trials, tracked in MLflow, with the MLflow Model Registry.

Entry scripts (`sweeps/<dataset>.py`) declare a `SweepSpec` and call `main(spec)`; see docs/SWEEPS.md.
"""

from vmrnn.tune.spaces import SweepSpec


def main(spec: SweepSpec, argv: list[str] | None = None) -> int:
    # Deferred: the driver loads Optuna, torch and the training layer; importing a name from
    # vmrnn.tune (defaults, spaces) should not.
    from vmrnn.tune.sweep import main as _main

    return _main(spec, argv)


__all__ = ["SweepSpec", "main"]
