"""The `vmrnn` command. Each sub-command group lives in its own module exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add sub-commands, each with `register(subparsers)`.
COMMAND_MODULES = ("vmrnn.cli.data", "vmrnn.cli.train", "vmrnn.cli.bench", "vmrnn.cli.info")


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2, no traceback."""


DESCRIPTION = (
    "Train, evaluate and use VMRNN spatiotemporal forecasters, and manage their data. Sweeps (Ray Tune + "
    "Optuna) run from sweeps/<dataset>.py; `vmrnn COMMAND --help` explains each command."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmrnn", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'bad input', not 'bug': shown without a traceback."""
    # Deferred until a command fails (main's `except` evaluates this only then): both import torch.
    from vmrnn.data.errors import DataError
    from vmrnn.models import CheckpointMismatch, ConfigError

    # OSErrors of paths the user named (a file where a folder should be, no permission, ...) too.
    return (
        UserError,
        ConfigError,
        CheckpointMismatch,
        DataError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
        PermissionError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except user_error_types() as exc:
        print(f"vmrnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vmrnn {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
