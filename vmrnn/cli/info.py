"""`vmrnn presets`: list the model presets with their parameter counts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list model presets and their parameter counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmrnn.models import PRESETS, build_model, count_parameters, official_parameter_count

    print(f"{'preset':<16} {'model':<8} {'params':>12} {'official':>12}  description")
    for name, preset in PRESETS.items():
        model = build_model(name)
        print(
            f"{name:<16} {preset.config.name:<8} {count_parameters(model):>12,} "
            f"{official_parameter_count(preset.config):>12,}  {preset.description}"
        )
    return 0
