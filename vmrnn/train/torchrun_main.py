"""Plain-PyTorch training entry, for one process or `torchrun` (no Ray needed):

    python -m vmrnn.train.torchrun_main --dataset taxibj --data-dir data --epochs 100
    torchrun --nproc_per_node 4 -m vmrnn.train.torchrun_main --dataset taxibj --data-dir data --set batch_size=8

Under torchrun every rank trains on its shard (DistributedSampler) with the step's own gradient all-reduce
(NCCL on GPUs, gloo on CPU);
metrics are summed over ranks; rank 0 writes checkpoints (--checkpoint-dir, resumed automatically when it
holds one) and logs to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from vmrnn.data import dataset_names
from vmrnn.train.epochs import epoch_number


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vmrnn.train.torchrun_main", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--data-dir", required=True)
    p.add_argument("--epochs", type=int)
    p.add_argument("--checkpoint-dir", help="epoch checkpoints (default ./vmrnn_runs/<dataset>-<run key>)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --checkpoint-dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri")
    p.add_argument("--no-tracking", action="store_true")
    p.add_argument("--experiment")
    p.add_argument("--result-json", help="rank 0 writes the final metrics here")
    return p.parse_args(argv)


def _user_errors() -> tuple[type[BaseException], ...]:
    from vmrnn.data.errors import DataError
    from vmrnn.models import ConfigError
    from vmrnn.tracking.uris import TrackingUnavailable

    return (ConfigError, DataError, FileNotFoundError, TrackingUnavailable)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s")
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch.distributed as dist

    from vmrnn.train.config import TrainConfig, apply_overrides
    from vmrnn.train.distributed import init_from_env
    from vmrnn.train.loop import TrainingDiverged, train

    d = {"dataset": args.dataset, "data_dir": args.data_dir}
    if args.epochs is not None:
        d["epochs"] = args.epochs
    if args.checkpoint_dir:
        d["checkpoint_dir"] = args.checkpoint_dir
    if args.tracking_uri:
        d["tracking_uri"] = args.tracking_uri
    if args.experiment:
        d["experiment"] = args.experiment
    if args.no_tracking:
        d["tracking"] = False
    started = init_from_env()
    try:
        try:
            cfg = TrainConfig.from_dict(apply_overrides(d, args.overrides))
            if not cfg.checkpoint_dir:
                cfg = cfg.replace(checkpoint_dir=os.path.join("vmrnn_runs", f"{cfg.dataset}-torchrun"))
            res = train(cfg, resume_from=args.resume, resume=not args.no_resume)
        except _user_errors() as exc:
            print(f"vmrnn.train.torchrun_main: error: {exc}", file=sys.stderr)
            return 2
        except TrainingDiverged as exc:
            print(f"vmrnn.train.torchrun_main: {exc}", file=sys.stderr)
            return 1
        if rank == 0:
            summary = {
                "metrics": res.metrics,
                "best_epoch": None if res.best_epoch is None else epoch_number(res.best_epoch),
                "best_val_mse": res.best_val_mse,
                "test": {k: v for k, v in res.test_metrics.items()},
                "run_id": res.run_id,
                "checkpoint": res.checkpoint,
            }
            if args.result_json:
                with open(args.result_json, "w") as f:
                    json.dump(summary, f, indent=1, default=str)
            print(
                json.dumps({k: summary[k] for k in ("best_epoch", "best_val_mse", "run_id", "checkpoint")}, default=str)
            )
        return 0
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
