"""What the `lenslab` command modules share: the one `--out` option (argument and check), the
model, device and prompt options, the prompts a command falls back to, the `--ray` / `--resume`
options of commands that run as distributed jobs (`lenslab.jobs`), and the subcommand groups that
more than one module adds to (`moe`, `sae`)."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from lenslab import jobs, zoo
from lenslab._errors import LenslabError
from lenslab.figures import FORMATS

MODEL_HELP = "zoo name, HF id or local dir"
MOE_MODEL_HELP = "a MoE model: zoo name, HF id or local dir"
FIGURE_OUT_HELP = "output file; the extension picks the format: .json .svg .png .pdf .html"
FIGURE_OUT_WHY = f"the extension picks the format, one of {', '.join(FORMATS)}"

# subcommand groups that several command modules add subcommands to: name -> (help, dest, metavar)
GROUPS = {
    "moe": (
        "Mixture-of-Experts: router inspection, fTRI expert ranking, expert switching",
        "moe_command",
        "MOE_COMMAND",
    ),
    "sae": (
        "sparse autoencoders: train, index a corpus, look up features, dashboards, search",
        "sae_command",
        "SAE_COMMAND",
    ),
}


def group(sub: argparse._SubParsersAction, name: str) -> argparse._SubParsersAction:
    """The subcommands of group `name` (a key of GROUPS), created on first use."""
    if name not in sub.choices:
        help_, dest, metavar = GROUPS[name]
        return sub.add_parser(name, help=help_).add_subparsers(dest=dest, required=True, metavar=metavar)
    return next(a for a in sub.choices[name]._actions if isinstance(a, argparse._SubParsersAction))


def add_out(
    p: argparse.ArgumentParser,
    help: str = FIGURE_OUT_HELP,
    *,
    required: bool = True,
    suffixes: Sequence[str] | None = FORMATS,
    why: str = FIGURE_OUT_WHY,
) -> None:
    """Add `--out` to `p`. `suffixes` are the extensions `out_path` accepts (None: any path, e.g. a
    folder); `why` ends its error message."""
    p.add_argument("--out", required=required, default=None, help=help)
    p.set_defaults(out_suffixes=None if suffixes is None else tuple(suffixes), out_why=why)


def out_path(args: argparse.Namespace) -> Path | None:
    """`--out` as a Path (None when it was not given), checked against the extensions `add_out` took."""
    if not getattr(args, "out", None):
        return None
    out = Path(args.out)
    suffixes = getattr(args, "out_suffixes", None)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise LenslabError(f"--out {out.name!r}: {args.out_why}")
    return out


def add_model(p: argparse.ArgumentParser, default: str | None = None, help: str | None = None) -> None:
    """`--model`: required without a default; the help names the default unless `help` is given."""
    if help is None:
        help = MODEL_HELP if default is None else f"{MODEL_HELP} (default {default})"
    p.add_argument("--model", required=default is None, default=default, help=help)


def add_device(p: argparse.ArgumentParser, default: str = "auto", help: str | None = None) -> None:
    p.add_argument("--device", default=default, help=help)


def add_prompts(p: argparse.ArgumentParser, help: str = "prompts (default: the model's default prompt)") -> None:
    """`--prompts P ...`; `prompts_or_default` fills in the model's default prompt."""
    p.add_argument("--prompts", nargs="+", default=None, help=help)


def add_prompt(p: argparse.ArgumentParser) -> None:
    """`--prompt P`; `prompt_or_default` fills in the model's default prompt."""
    p.add_argument("--prompt", default=None, help="prompt (default: the model's default prompt)")


def prompt_or_default(args: argparse.Namespace) -> str:
    """--prompt, else the model's default prompt (`zoo.default_prompts`)."""
    return args.prompt or zoo.default_prompts(args.model).prompt


def prompts_or_default(args: argparse.Namespace) -> list[str]:
    """--prompts, else the model's default prompt (`zoo.default_prompts`) alone."""
    return list(args.prompts) if args.prompts else [zoo.default_prompts(args.model).prompt]


def add_prompt_set(p: argparse.ArgumentParser, which: str) -> None:
    """`--{which} P ...` and `--{which}-file FILE`, read by `prompt_list`."""
    p.add_argument(
        f"--{which}", nargs="+", default=None, help=f"{which} prompts (default: the zoo model's '{which}' prompt set)"
    )
    p.add_argument(f"--{which}-file", default=None, help=f"{which} prompts, one per line")


def prompt_list(args: argparse.Namespace, which: str) -> list[str]:
    """Prompts from --{which} or --{which}-file (one per line), else the zoo's prompt set of that name."""
    given, path = getattr(args, which), getattr(args, f"{which}_file")
    if path:
        file = Path(path)
        if not file.is_file():
            raise LenslabError(f"--{which}-file {path!r} does not exist; pass a text file with one prompt per line")
        given = [line for line in file.read_text().splitlines() if line.strip()]
    if given:
        return list(given)
    sets = zoo.prompt_sets(args.model)
    if sets.get(which):
        return sets[which]
    raise LenslabError(f"no {which} prompts: pass --{which} P ... or --{which}-file FILE")


RAY_HELP = (
    "run as shards on a Ray cluster: 'local' (start Ray here), 'auto' (the running cluster, after "
    "`ray start --head`) or its address HOST:PORT / ray://HOST:PORT (default: this process, no Ray; "
    "docs/scaling.md)"
)


def add_ray(p: argparse.ArgumentParser, resume: bool = True) -> None:
    """`--ray auto|local|ADDRESS`, `--ray-fallback` and (unless `resume` is False) `--resume DIR`,
    read by `ray_cluster` and passed on as `cluster=` / `resume=`."""
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS", help=RAY_HELP)
    p.add_argument(
        "--ray-fallback",
        action="store_true",
        help="when the --ray cluster cannot be reached, run on a local Ray instead of stopping",
    )
    if resume:
        p.add_argument(
            "--resume",
            default=None,
            metavar="DIR",
            help="save each finished shard in DIR; run again with the same DIR to skip the finished ones",
        )


def ray_cluster(args: argparse.Namespace) -> str | None:
    """The `cluster=` that --ray asks for (None without it), checked before any work: an address
    that does not answer is an error, or with --ray-fallback a warning and "local"."""
    given = getattr(args, "ray", None)
    try:
        cluster = jobs.parse_cluster(given)
    except LenslabError:
        raise LenslabError(
            f"--ray {given!r} must be auto, local or an address HOST:PORT / ray://HOST:PORT of a Ray cluster"
        ) from None
    if cluster is None or cluster == "local" or not getattr(args, "ray_fallback", False):
        return cluster
    try:
        jobs.connect(cluster)
    except LenslabError as err:
        warnings.warn(f"{err}; --ray-fallback: running on a local Ray", stacklevel=2)
        return "local"
    return cluster
