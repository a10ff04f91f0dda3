"""`lenslab models` and `lenslab zoo list|train`: the models lenslab can load, and rebuilding a zoo
model with its training recipe (`train_zoo`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.cli.common import add_out, out_path
from lenslab.models import list_models


def add_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list zoo models and locally cached Hugging Face models")
    m.set_defaults(func=cmd_models)

    z = sub.add_parser("zoo", help="the model zoo: list or rebuild models")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser("train", help="rebuild a zoo model with its training script (deterministic)")
    zt.add_argument("name", help="e.g. induction-2l or zoo/ioi-4l")
    add_out(zt, "output folder (default: overwrite the zoo's own folder)", required=False, suffixes=None)
    zt.add_argument("--seed", type=int, default=0)
    zt.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default: the script's recipe; a few for a smoke run)"
    )
    zt.add_argument(
        "--checkpoints",
        default=None,
        metavar="DIR",
        help="also save log-spaced checkpoints to DIR/step{N}/ (lenslab.zoo.checkpoints; the model is unchanged)",
    )
    zt.add_argument("--n-checkpoints", type=int, default=16, help="how many checkpoints --checkpoints saves")
    zt.set_defaults(func=cmd_zoo_train)


def cmd_models(args: argparse.Namespace) -> int:
    rows = list_models()
    width = max((len(r.name) for r in rows), default=10)
    for r in rows:
        print(f"{r.name:<{width}}  {r.source:<8}  {r.summary}")
    if not any(r.source != "zoo" for r in rows):
        print("\n(no Hugging Face models in the local cache; online, any HF id such as 'gpt2' also loads)")
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    for e in zoo.zoo_entries():
        print(f"{e.name:<24} {e.summary}")
    return 0


def train_zoo(
    name: str,
    out_dir: str | Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    checkpoints: str | Path | None = None,
    n_checkpoints: int = 16,
) -> Path:
    """Rebuild zoo model `name` by running its training recipe (`lenslab/zoo/train_*.py`); returns
    the output folder. `steps` overrides the recipe's number of optimiser steps (None: its own; a
    few steps make a quick, still deterministic, smoke run). `checkpoints`: a folder the recipe
    also saves `n_checkpoints` log-spaced checkpoints to (`DIR/step{N}/`, lenslab.zoo.checkpoints)."""
    # the recipes import the areas they measure their cards with (docs/design.md, "Layers")
    from lenslab.zoo import (  # deferred: keeps CLI start-up fast
        train_english_4l,
        train_english_4l_noln,
        train_induction_2l,
        train_ioi_4l,
        train_ioi_4l_noln,
        train_moe_refusal,
        train_moe_refusal_noln,
        train_steer_sentiment,
        train_steer_sentiment_noln,
    )

    recipes = {
        "english-4l": train_english_4l,
        "english-4l-noln": train_english_4l_noln,
        "induction-2l": train_induction_2l,
        "ioi-4l": train_ioi_4l,
        "ioi-4l-noln": train_ioi_4l_noln,
        "moe-refusal": train_moe_refusal,
        "moe-refusal-noln": train_moe_refusal_noln,
        "steer-sentiment": train_steer_sentiment,
        "steer-sentiment-noln": train_steer_sentiment_noln,
    }
    assert sorted(zoo.PREFIX + r for r in recipes) == zoo.trainable_names(), "a recipe is missing from train_zoo"
    short = name.removeprefix(zoo.PREFIX)
    if short not in recipes:
        names = zoo.trainable_names()
        raise LenslabError(
            f"no training script for {name!r}{did_you_mean(zoo.PREFIX + short, names)}; trainable: {', '.join(names)}"
        )
    if steps is not None and steps < 1:
        raise LenslabError(f"--steps must be at least 1, got {steps}")
    module = recipes[short]
    out = Path(out_dir) if out_dir is not None else zoo.ZOO_DIR / short
    kwargs = {}
    if steps is not None:
        if "steps" in inspect.signature(module.train).parameters:
            kwargs["steps"] = steps
        else:  # induction-2l keeps its recipe in a frozen TrainConfig
            kwargs["config"] = dataclasses.replace(module.TrainConfig(), steps=steps)
    if checkpoints is not None:
        if "checkpoints" not in inspect.signature(module.train).parameters:
            with_ckpt = sorted(n for n, m in recipes.items() if "checkpoints" in inspect.signature(m.train).parameters)
            raise LenslabError(
                f"the {short} recipe saves no checkpoints; --checkpoints works with: {', '.join(with_ckpt)}"
            )
        kwargs.update(checkpoints=Path(checkpoints), n_checkpoints=n_checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    module.train(out, seed=seed, **kwargs)
    return out


def cmd_zoo_train(args: argparse.Namespace) -> int:
    out = train_zoo(
        args.name,
        out_dir=out_path(args),
        seed=args.seed,
        steps=args.steps,
        checkpoints=args.checkpoints,
        n_checkpoints=args.n_checkpoints,
    )
    print(f"lenslab: wrote {args.name} to {out}")
    return 0
