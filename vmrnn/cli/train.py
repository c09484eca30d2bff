"""`vmrnn train`, `vmrnn evaluate`, `vmrnn predict`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vmrnn.data import dataset_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model (Ray Train TorchTrainer, or --no-ray in this process)",
        description="Train VMRNN on one dataset: the official recipe unless --set changes it. "
        "Starts a local loopback Ray unless RAY_ADDRESS / --ray-address names a cluster.",
    )
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--data-dir", required=True, help="data root (e.g. holding taxibj/dataset.npz)")
    p.add_argument("--epochs", type=int, help="default: the dataset's recipe")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU training)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: what the machine has, shared)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training option, e.g. --set lr=1e-3 --set model.depth=4 --set tags.team=x "
        "(see docs/TRAINING.md); repeatable",
    )
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="train in this process (torchrun also works: python -m vmrnn.train.torchrun_main)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<cwd>/mlflow.db with artifacts in ./mlruns)",
    )
    p.add_argument("--no-tracking", action="store_true", help="no MLflow logging")
    p.add_argument("--experiment", help="MLflow experiment (default vmrnn-<dataset>)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument(
        "--storage-path",
        help="where Ray Train keeps run folders and checkpoints (default ~/ray_results; --no-ray: ./vmrnn_runs)",
    )
    p.add_argument("--name", help="run folder name (default vmrnn-<dataset>-<run key>)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (Ray)")
    p.add_argument("--ray-address", help="Ray cluster to use (default $RAY_ADDRESS, else a local one)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="--no-ray: continue from this checkpoint")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("evaluate", help="score a checkpoint or an MLflow model on a data split")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint folder (or a run's checkpoint root)")
    src.add_argument("--model", help="MLflow model URI (models:/NAME@ALIAS, runs:/RUN_ID/model) or folder")
    e.add_argument("--data-dir", required=True)
    e.add_argument("--dataset", choices=dataset_names(), help="default: the one the model was trained on")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument(
        "--metrics",
        choices=("standard", "paper"),
        default="standard",
        help="paper: the official SSIM data_range 2 and uint8 PSNR (to compare with published numbers)",
    )
    e.add_argument("--max-batches", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=run_evaluate)

    q = sub.add_parser(
        "predict",
        help="forecast future frames from a .npy sequence",
        description="Forecast the frames that follow the input frames with a trained model.",
        epilog=input_shapes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--model", required=True, help="MLflow model URI or training checkpoint folder")
    q.add_argument(
        "--input",
        required=True,
        help=".npy of (T, C, H, W) or (B, T, C, H, W) frames in [0, 1] (uint8 is divided by 255)",
    )
    q.add_argument("--out", required=True, help="where to write the forecast .npy (same rank as the input)")
    q.add_argument("--n-future", type=int, help="frames to forecast (default: the dataset's)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs")
    q.set_defaults(func=run_predict)


def input_shapes_help() -> str:
    """What each dataset's model takes as --input, from the dataset registry."""
    from vmrnn.data import DATASETS

    lines = ["input frames each dataset's model takes (T, C, H, W), and the frames it forecasts by default:"]
    for name, spec in DATASETS.items():
        if spec.in_frames is None or spec.channels is None:
            lines.append(f"  {name:<8} the shape of the data the model was trained on")
        else:
            shape = f"({spec.in_frames}, {spec.channels}, {spec.height}, {spec.width})"
            lines.append(f"  {name:<8} {shape:<18} -> {spec.out_frames} frames")
    lines.append("a batch of sequences is (B, T, C, H, W); the forecast .npy has the input's rank.")
    return "\n".join(lines)


def _user_error(msg: str) -> Exception:
    from vmrnn.cli import UserError

    return UserError(msg)


def _setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("alembic", "mlflow.store.db.utils", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------- train


def build_config(args: argparse.Namespace) -> Any:
    from vmrnn.train.config import TrainConfig, apply_overrides

    d: dict[str, Any] = {"dataset": args.dataset, "data_dir": args.data_dir}
    if args.epochs is not None:
        d["epochs"] = args.epochs
    d = apply_overrides(d, args.overrides)
    if args.no_tracking:
        d["tracking"] = False
    if args.tracking_uri:
        d["tracking_uri"] = args.tracking_uri
    if args.experiment:
        d["experiment"] = args.experiment
    if args.run_name:
        d["run_name"] = args.run_name
    return TrainConfig.from_dict(d)


def run_train(args: argparse.Namespace) -> int:
    _setup_logging(args.quiet)
    from vmrnn.tracking.uris import TrackingUnavailable
    from vmrnn.train.loop import TrainingDiverged

    cfg = build_config(args)
    if args.workers < 1:
        raise _user_error(f"--workers must be >= 1; got {args.workers}")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise _user_error(f"--cpus-per-worker must be > 0; got {args.cpus_per_worker:g}")
    if not args.gpus_per_worker >= 0:
        raise _user_error(f"--gpus-per-worker must be >= 0; got {args.gpus_per_worker:g}")
    if args.max_failures < -1:
        raise _user_error(f"--max-failures must be >= 0 (or -1: retry forever); got {args.max_failures}")
    try:
        if args.no_ray:
            summary = _train_plain(cfg, args)
        else:
            summary = _train_ray(cfg, args)
    except TrackingUnavailable as exc:
        raise _user_error(str(exc)) from None
    except TrainingDiverged as exc:
        print(f"vmrnn train: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary)
    return 0


def _train_plain(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from vmrnn.train.loop import train

    if args.workers != 1:
        raise _user_error(
            "--no-ray trains in this one process; for several processes use torchrun "
            "(python -m vmrnn.train.torchrun_main) or drop --no-ray"
        )
    cfg = cfg.resolved().with_run_key()
    if not cfg.checkpoint_dir:
        root = Path(args.storage_path or "vmrnn_runs")
        cfg = cfg.replace(
            checkpoint_dir=str((root / (args.name or f"vmrnn-{cfg.dataset}-{cfg.run_key[:8]}")).resolve())
        )
    res = train(cfg, resume_from=args.resume)
    return {
        "metrics": res.metrics,
        "best_epoch": res.best_epoch,
        "best_val_mse": res.best_val_mse,
        "test": res.test_metrics,
        "run_id": res.run_id,
        "checkpoint": res.checkpoint,
        "config": cfg,
        "tracking_uri": (res.config or cfg).tracking_uri,
    }


def _train_ray(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from vmrnn.train import ray_train

    if args.resume:
        raise _user_error("--resume is for --no-ray runs; a Ray run resumes by itself after a worker failure")
    cfg = ray_train.prepare_config(cfg)  # data and MLflow problems fail here, before Ray starts
    from vmrnn.train.loop import build_split

    build_split(cfg, "train")[0]  # unreadable or wrong-shape data: one error here, not in every worker
    local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    if local and args.gpus_per_worker > 0:  # a local Ray has this machine's GPUs and no more: never wait
        import torch

        need, have = args.gpus_per_worker * args.workers, torch.cuda.device_count()
        if need > have:
            raise _user_error(
                f"{args.workers} worker(s) x {args.gpus_per_worker:g} GPU need {need:g} GPU(s) "
                f"but this machine has {have}; pass --gpus-per-worker 0 to train on CPUs"
            )
    ray_train.init_local_ray(address=args.ray_address, log_to_driver=True)
    if local and args.cpus_per_worker:
        import ray

        have = float(ray.cluster_resources().get("CPU", 0))
        if args.cpus_per_worker * args.workers > have:
            raise _user_error(
                f"{args.workers} worker(s) x {args.cpus_per_worker:g} CPU need "
                f"{args.cpus_per_worker * args.workers:g} CPUs but this machine has {have:g}; "
                "lower --cpus-per-worker or --workers"
            )
    res_per_worker = None
    if args.cpus_per_worker or args.gpus_per_worker:
        res_per_worker = {}
        if args.cpus_per_worker:
            res_per_worker["CPU"] = args.cpus_per_worker
        if args.gpus_per_worker:
            res_per_worker["GPU"] = args.gpus_per_worker
    try:
        result = ray_train.fit(
            cfg,
            num_workers=args.workers,
            use_gpu=args.gpus_per_worker > 0,
            resources_per_worker=res_per_worker,
            storage_path=args.storage_path,
            name=args.name,
            max_failures=args.max_failures,
            progress=not args.quiet,
        )
    except Exception as exc:
        from ray.train import TrainingFailedError

        if isinstance(exc, TrainingFailedError):
            from vmrnn.tracking.uris import TrackingUnavailable
            from vmrnn.train.loop import TrainingDiverged

            inner = _unwrap_worker_error(exc)
            if isinstance(inner, (TrainingDiverged, TrackingUnavailable)):
                raise inner from None
            if _is_user_error(inner):
                raise inner from None
        raise
    rv = result.return_value or {}
    return {
        "metrics": result.metrics,
        "best_epoch": rv.get("best_epoch"),
        "best_val_mse": rv.get("best_val_mse"),
        "test": rv.get("test_metrics") or {},
        "run_id": rv.get("run_id"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "path": result.path,
        "tracking_uri": cfg.tracking_uri,
    }


def _unwrap_worker_error(exc: BaseException) -> BaseException:
    errs = getattr(exc, "worker_failures", None) or {}
    for e in errs.values():
        cause = getattr(e, "cause", None) or e
        return cause
    return exc


def _is_user_error(exc: BaseException) -> bool:
    from vmrnn.cli import user_error_types

    return isinstance(exc, user_error_types())


def _print_summary(s: dict[str, Any]) -> None:
    from vmrnn.train.epochs import epoch_number

    m = s.get("metrics") or {}
    print("")
    print(
        f"best epoch      {epoch_number(s['best_epoch'])}  (val_mse {s.get('best_val_mse'):.6g})"
        if s.get("best_val_mse") is not None and s.get("best_epoch") is not None
        else "best epoch      -"
    )
    for k in ("train_loss", "val_mse", "val_mae", "val_ssim", "val_psnr"):
        if k in m:
            print(f"last {k:<11} {m[k]:.6g}")
    test = s.get("test") or {}
    if test:
        print("test (best)     " + "  ".join(f"{k} {test[k]:.6g}" for k in ("mse", "mae", "ssim", "psnr") if k in test))
    if s.get("run_id"):
        print(f"MLflow run      {s['run_id']}")
        ui = _ui_line(s.get("tracking_uri"), s["run_id"])
        if ui:
            print(f"MLflow UI       {ui}")
    if s.get("checkpoint"):
        print(f"checkpoint      {s['checkpoint']}")


def _ui_line(uri: str | None, run_id: str) -> str | None:
    """How to look at the run in MLflow's UI (its model-training view), as a command that works as printed."""
    from vmrnn.tracking.experiments import ui_hint
    from vmrnn.tracking.uris import client

    if not uri:
        return None
    try:
        experiment_id = client(uri).get_run(run_id).info.experiment_id
    except Exception:  # only a hint: the run is logged either way
        return None
    return ui_hint(uri, experiment_id, run_id)


# ---------------------------------------------------------------------- evaluate / predict


def _set_tracking(uri: str | None) -> None:
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def _load(source: str, device: str) -> Any:
    from vmrnn.tracking.models import load_forecaster
    from vmrnn.tracking.uris import TrackingUnavailable

    try:
        return load_forecaster(source, device=_device(device))
    except (FileNotFoundError, ValueError):
        raise
    except TrackingUnavailable as exc:
        raise _user_error(str(exc)) from None
    except Exception as exc:
        if "mlflow" in type(exc).__module__ or "RESOURCE_DOES_NOT_EXIST" in str(exc):
            raise _user_error(f"cannot load model {source}: {str(exc).splitlines()[0][:300]}") from None
        raise


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise _user_error(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise _user_error(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise _user_error(f"--device {spec!r}: vmrnn runs on cpu or cuda")
    return spec


def run_evaluate(args: argparse.Namespace) -> int:
    _setup_logging(True)
    import torch
    from torch.utils.data import DataLoader

    from vmrnn.data import build_dataset
    from vmrnn.train.distributed import DistEnv
    from vmrnn.train.loop import evaluate
    from vmrnn.train.step import ExecutionConfig

    if args.batch_size < 1:
        raise _user_error(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise _user_error(f"--max-batches must be >= 1; got {args.max_batches}")
    _set_tracking(args.tracking_uri)
    fc = _load(args.checkpoint or args.model, args.device)
    if fc.model is None:
        raise _user_error(
            f"{args.checkpoint or args.model} holds no vmrnn weights (only an exported graph); "
            "evaluate needs a checkpoint or a model logged by vmrnn train"
        )
    ds_meta = fc.meta.get("dataset", {})
    name = args.dataset or ds_meta.get("name")
    if not name:
        raise _user_error("the model does not say which dataset it was trained on: pass --dataset")
    ds = build_dataset(name, args.data_dir, args.split)
    x, y = ds[0]
    want = tuple(ds_meta.get(k) for k in ("channels", "height", "width"))
    if None not in want and tuple(x.shape[1:]) != want:
        raise _user_error(
            f"the model was trained on {ds_meta.get('name')} frames of "
            f"{'x'.join(map(str, want))} (channels x height x width) but {name} has "
            f"{'x'.join(map(str, x.shape[1:]))}: evaluate it on data of its own kind"
        )
    device = torch.device(_device(args.device))
    env = DistEnv(device=device)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    if args.max_batches:
        from itertools import islice

        loader = list(islice(loader, args.max_batches))
    out = evaluate(
        fc.model,
        loader,
        n_input=x.shape[0],
        env=env,
        execution=ExecutionConfig(),
        metrics_mode=args.metrics,
        n_future=y.shape[0],
    )
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{name} {args.split}: {out['count']} samples, metrics mode {args.metrics}")
    for k in ("mse", "mae", "ssim", "psnr"):
        print(f"  {k:<5} {out[k]:.6g}")
    if "mse_by_lead" in out:
        print("  per lead time (mse): " + " ".join(f"{v:.4g}" for v in out["mse_by_lead"]))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    _setup_logging(True)
    import numpy as np

    _set_tracking(args.tracking_uri)
    path = Path(args.input)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise _user_error(f"cannot read {path} as a .npy array: {exc}") from None
    if x.ndim not in (4, 5):
        raise _user_error(f"--input must be (T, C, H, W) or (B, T, C, H, W); {path} has shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise _user_error(f"--input values must be in [0, 1]; {path} has range [{x.min():.4g}, {x.max():.4g}]")
    if args.n_future is not None and args.n_future < 1:
        raise _user_error(f"--n-future must be >= 1; got {args.n_future}")
    fc = _load(args.model, args.device)
    try:
        y = fc.predict(x, n_future=args.n_future)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, y.astype(np.float32))
    print(f"wrote {out}: {y.shape} float32 forecast ({y.shape[-4]} frames) from {x.shape[-4]} input frames")
    return 0
