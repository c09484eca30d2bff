"""How epochs are numbered where users see them: from 1, as Ray's `training_iteration` (the console, MLflow
steps, `best_epoch` and tags, picture titles, checkpoint folder names, the checkpoint's metrics.json,
error messages, the torchrun entry's JSON summary). The training loop's own index, the `epoch` key of the
reported metrics (ASHA's clock) and a checkpoint's state count from 0; they are converted with `epoch_number`
where they are shown.
"""

from __future__ import annotations


def epoch_number(index: int) -> int:
    """The epoch as users see it (counted from 1) of the loop's 0-based epoch index."""
    return int(index) + 1
