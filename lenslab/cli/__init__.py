"""The `lenslab` command line: thin shell over the library, one module per area.

lenslab app [--port 8501] [--host 127.0.0.1] [--model zoo/induction-2l]
lenslab models
lenslab zoo list | train NAME [--out DIR] [--seed 0] [--steps N]
lenslab circuits patch|attribute|faithfulness|graph --model M --task T ... --out FILE
lenslab sinks attention|massive|ablate --model M [--prompts P ...] --out FILE
lenslab sinks experts --model M [--prompts P ...] [--rule su] [--prune] --out FILE
lenslab norms atlas --model M [--prompts P ...] [--kinds K ...] --out FILE
lenslab norms fit --csv FILE --out FILE
lenslab dla --model M (--task T | --prompt P --answer A [--wrong B]) [--by head|position|neuron] --out FILE
lenslab moe inspect|rank|generate --model zoo/moe-refusal ...
lenslab steer fit|generate|eval --model zoo/steer-sentiment ...
lenslab probe train|eval|steer --model zoo/steer-sentiment [--data sentiment|refusal|ioi|FILE] ...
lenslab sae train --model M --hook H --out DIR [--corpus FILE] [--d-sae N --k K ...]
lenslab sae index|lookup|export|search --model M --sae S ...
lenslab lens logit|tuned --model M [--prompt P] [--k 5] [--lens DIR] [--out FILE]
lenslab lens kl --model M [--lens DIR] [--corpus FILE] [--out FILE]
lenslab lens train --model M --out DIR [--corpus FILE] [--steps 250] [--seed 0]
lenslab graph attribute|prune|export --model M [--prompt P] ... --out FILE

Modules: `common` (the `--out` option and the other shared options), `app`, `zoo` (models, zoo,
`train_zoo`), `circuits`, `sinks`, `norms` (atlas, fit), `dla`, `experts` (moe inspect, rank), `steering` (steer, moe
generate), `probes` (probe), `features` (sae), `lenses` (lens) and `graph` (attribution graphs). Each adds its subcommands with
`add_commands(subparsers)`; the areas' modules are imported when a command runs, so
`lenslab --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from lenslab._errors import LenslabError
from lenslab.cli import app, circuits, dla, experts, features, graph, lenses, norms, probes, sinks, steering, zoo
from lenslab.cli.zoo import train_zoo

__all__ = ["build_parser", "main", "train_zoo"]

# in the order `lenslab --help` lists their commands
_MODULES = (app, zoo, circuits, sinks, norms, dla, experts, steering, probes, features, lenses, graph)


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
