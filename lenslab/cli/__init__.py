"""The `lenslab` command line: thin shell over the library, one module per area.

lenslab app [--port 8501] [--host 127.0.0.1] [--model zoo/induction-2l]
lenslab models
lenslab zoo list | train NAME [--out DIR] [--seed 0] [--steps N]
lenslab circuits patch|attribute|faithfulness|graph --model M --task T ... --out FILE
lenslab sinks attention|massive|ablate --model M [--prompts P ...] --out FILE
lenslab sinks experts --model M [--prompts P ...] [--rule su] [--prune] --out FILE
lenslab moe inspect|rank|generate --model zoo/moe-refusal ...
lenslab steer fit|generate|eval --model zoo/steer-sentiment ...
lenslab sae train --model M --hook H --out DIR [--corpus FILE] [--d-sae N --k K ...]
lenslab sae index|lookup|export|search --model M --sae S ...

Modules: `common` (the `--out` option and the other shared options), `app`, `zoo` (models, zoo,
`train_zoo`), `circuits`, `sinks`, `experts` (moe inspect, rank), `steering` (steer, moe
generate) and `features` (sae). Each adds its subcommands with `add_commands(subparsers)`; the
areas' modules are imported when a command runs, so `lenslab --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from lenslab._errors import LenslabError
from lenslab.cli import app, circuits, experts, features, sinks, steering, zoo
from lenslab.cli.zoo import train_zoo

__all__ = ["build_parser", "main", "train_zoo"]

# in the order `lenslab --help` lists their commands
_MODULES = (app, zoo, circuits, sinks, experts, steering, features)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lenslab", description="lenslab: mechanistic-interpretability and steering workbench"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _MODULES:
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LenslabError as exc:
        print(f"lenslab: error: {exc}", file=sys.stderr)
        return 2
