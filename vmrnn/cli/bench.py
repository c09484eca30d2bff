"""`vmrnn bench`: time the training step and the inference rollout of every execution mode on a GPU."""

from __future__ import annotations

import argparse
import shlex


def register(sub: argparse._SubParsersAction) -> None:
    from vmrnn.bench import BASELINES, DEFAULT_MODES, SHAPES  # noqa: PLC0415
    from vmrnn.train.execution import MODES  # noqa: PLC0415

    p = sub.add_parser(
        "bench",
        help="time training steps and rollouts per execution mode against two baselines (GPU)",
        description="For each preset (official batch size, random inputs) time a training step (forward, "
        "backward, Adam) and an inference rollout in each execution mode, in one process, and "
        f"print each mode's ratios against the baselines {', '.join(BASELINES)} (measured in every "
        "run unless --modes leaves them out); write JSON.",
    )
    p.add_argument(
        "--presets", default="taxibj,kth,mmnist,mmnist-openstl", help=f"comma-separated, from {sorted(SHAPES)}"
    )
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from {list(MODES)}; the baselines {', '.join(BASELINES)} always run "
        "unless named with a leading '-' (e.g. --modes=fast,-bf16-graphs)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first one")
    p.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument(
        "--check", action="store_true", help="also compare each mode's loss and gradients with the reference's"
    )
    p.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="STEPS",
        help="also train the reference and --curve-modes STEPS steps on synthetic data and compare windowed loss means",
    )
    p.add_argument("--curve-presets", default="taxibj")
    p.add_argument(
        "--curve-modes",
        default="fast",
        help=f"comma-separated, from {list(MODES)}; naming --curve-ref too runs it a second time, whose gap to "
        "the first is the noise floor of two fp32 runs",
    )
    p.add_argument(
        "--curve-ref",
        default="reference",
        choices=list(MODES),
        help="the fp32 curve to compare with (default the reference; fp32-fused-graphs, checked equal "
        "to it, is ~8x faster on TaxiBJ)",
    )
    p.add_argument("--no-infer", action="store_true", help="skip the inference rollout timings")
    p.add_argument("--json", default="bench.json", help="where to write the full report")
    p.add_argument("--device", default="cuda")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The run as one `vmrnn bench` command with every option spelled out (kept in the JSON report)."""
    words = ["vmrnn", "bench"]
    for key in (
        "presets",
        "modes",
        "warmup",
        "iters",
        "curve",
        "curve_presets",
        "curve_modes",
        "curve_ref",
        "json",
        "device",
    ):
        words.append(f"--{key.replace('_', '-')}={getattr(args, key)}")
    words += [flag for flag, on in (("--check", args.check), ("--no-infer", args.no_infer)) if on]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from vmrnn.bench import format_table, run_bench, validate_request, write_json  # noqa: PLC0415
    from vmrnn.cli import UserError  # noqa: PLC0415

    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    try:  # a bad mode name is an error before the GPU is looked for
        validate_request(
            split(args.modes), check=args.check, curve_modes=split(args.curve_modes), curve_ref=args.curve_ref
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not torch.cuda.is_available():
        raise UserError("vmrnn bench needs a CUDA GPU; this machine has none")
    try:
        report = run_bench(
            split(args.presets),
            split(args.modes),
            warmup=args.warmup,
            iters=args.iters,
            check=args.check,
            curve_steps=args.curve,
            curve_presets=split(args.curve_presets),
            curve_modes=split(args.curve_modes),
            curve_ref=args.curve_ref,
            infer=not args.no_infer,
            device=args.device,
            command=command_line(args),
        )
    except (KeyError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    write_json(report, args.json)
    print(format_table(report))
    print(f"wrote {args.json}")
    return 0
