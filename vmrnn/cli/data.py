"""`vmrnn data`: write synthetic datasets, convert datasets to the prepared format, inspect them.

vmrnn data synth   --dataset NAME --out DIR [--seed N] [--size small|medium] [--overwrite]
vmrnn data prepare --dataset NAME --data-dir DIR [--out DIR] [--workers N]
vmrnn data info    --dataset NAME --data-dir DIR [--prepared auto|never|require]
vmrnn data download --dataset taxibj|kth|mmnist [--data-dir DIR] [--mirror URL] [--no-progress]
"""

from __future__ import annotations

import argparse

from vmrnn.data import dataset_names, download_names, synth_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="synthetic data, prepared (Arrow) format, dataset info",
        description="Dataset utilities; see docs/DATA.md.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    s = dsub.add_parser("synth", help="write a seeded synthetic dataset in the published layout")
    s.add_argument("--dataset", required=True, choices=synth_names())
    s.add_argument("--out", required=True, help="data root to write into (creates OUT/<dataset folder>)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="small", choices=("small", "medium"))
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing synthetic dataset folder (never a folder without SYNTHETIC.txt)",
    )
    s.set_defaults(func=run_synth)

    r = dsub.add_parser("prepare", help="convert a dataset once into memory-mappable Arrow files")
    r.add_argument("--dataset", required=True, choices=dataset_names())
    r.add_argument("--data-dir", required=True, help="data root (or the dataset folder itself)")
    r.add_argument("--out", default=None, help="output folder (default DATA_DIR/prepared/<dataset>)")
    r.add_argument("--workers", type=int, default=None, help="KTH decoding processes (default: CPU count)")
    r.set_defaults(func=run_prepare)

    i = dsub.add_parser("info", help="show where a dataset is read from and its split sizes")
    i.add_argument("--dataset", required=True, choices=dataset_names())
    i.add_argument("--data-dir", required=True)
    i.add_argument("--prepared", default="auto", help="auto | never | require | a prepared folder")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--val-fraction", type=float, default=None)
    i.set_defaults(func=run_info)

    d = dsub.add_parser("download", help="fetch a dataset from its published source (verified, resumable)")
    d.add_argument("--dataset", required=True, choices=download_names())
    d.add_argument("--data-dir", default=None, help="data root to download into (default $VMRNN_DATA_DIR, else ./data)")
    d.add_argument(
        "--mirror",
        default=None,
        metavar="URL",
        help="base URL of a mirror serving the same file names (default $VMRNN_DATA_MIRROR)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run_download)


def run_synth(args: argparse.Namespace) -> int:
    from vmrnn.data.synth import write_synthetic

    folder = write_synthetic(args.dataset, args.out, seed=args.seed, size=args.size, overwrite=args.overwrite)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(
        f"wrote synthetic {args.dataset} ({args.size}, seed {args.seed}) to {folder}: "
        f"{len(files)} files, {total / 2**20:.1f} MiB"
    )
    for p in files[:6]:
        print(f"  {p}")
    if len(files) > 6:
        print(f"  ... ({len(files) - 6} more)")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from vmrnn.data.prepare import prepare_dataset

    out = prepare_dataset(args.dataset, args.data_dir, args.out, workers=args.workers, log=print)
    print(f"prepared {args.dataset} in {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vmrnn.data import build_dataset, dataset_spec, open_store
    from vmrnn.data.errors import DataError

    store = open_store(args.dataset, args.data_dir, args.prepared)
    kind = "prepared" if type(store).__name__ == "PreparedStore" else "source"
    spec = dataset_spec(args.dataset, args.data_dir, prepared=args.prepared)
    print(f"{args.dataset}: {kind} data at {store.describe()}")
    print(
        f"  frames {spec.in_frames} -> {spec.out_frames}, {spec.channels}x{spec.height}x{spec.width}, "
        f"model preset {spec.preset!r}"
    )
    failed = []
    for split in ("train", "val", "test"):
        try:
            ds = build_dataset(
                args.dataset,
                args.data_dir,
                split,
                seed=args.seed,
                val_fraction=args.val_fraction,
                prepared=args.prepared,
            )
            print(f"  {split:5s} {len(ds):8d} samples")
        except DataError as exc:
            print(f"  {split:5s}        - ({exc})")
            failed.append((split, exc))
    if failed:  # data that cannot be trained on is an error, not just a line in the table
        splits = ", ".join(s for s, _ in failed)
        raise DataError(f"{args.dataset} split(s) {splits} cannot be read: {failed[0][1]}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from vmrnn.data.download import download_dataset

    folder = download_dataset(args.dataset, args.data_dir, mirror=args.mirror, progress=not args.no_progress, log=print)
    print(f"{args.dataset} is in {folder}")
    return run_info(
        argparse.Namespace(
            dataset=args.dataset, data_dir=str(folder.parent), prepared="auto", seed=0, val_fraction=None
        )
    )
