"""`lenslab dla` (lenslab.probes.dla): direct logit attribution of every head, MLP (or neuron),
embedding and bias toward a task's answers or a prompt's answer token (minus a wrong one)."""

from __future__ import annotations

import argparse

import lenslab
from lenslab import tasks, zoo
from lenslab._errors import LenslabError
from lenslab.cli.common import add_device, add_model, add_out, out_path
from lenslab.figures import export, save_figure


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "dla",
        help="direct logit attribution: each head, MLP (or neuron), embedding and bias toward the answer",
        description="Direct logit attribution toward a task's answer pairs (--task) or a prompt's answer "
        "(--prompt P --answer A [--wrong B]); without either, the model's default prompt and answers.",
    )
    add_model(d, "zoo/ioi-4l")
    d.add_argument("--task", default=None, help="ioi, ioi-heldout, induction, refusal, or a JSON file (as circuits)")
    d.add_argument("--n", type=int, default=16, help="with --task: prompts")
    d.add_argument("--seed", type=int, default=0, help="with --task: seed")
    d.add_argument("--prompt", default=None, help="a prompt (default: the model's default prompt)")
    d.add_argument("--answer", default=None, help="the answer token (default: the model's default answer)")
    d.add_argument("--wrong", default=None, help="a token to subtract: the logit difference answer - wrong")
    d.add_argument(
        "--by",
        default="head",
        choices=["head", "position", "neuron"],
        help="head: layer x head at --pos; position: every component at every position; neuron: MLP neurons",
    )
    d.add_argument(
        "--pos", type=int, default=-1, help="the position read (default -1, the last; not with --by position)"
    )
    d.add_argument(
        "--norm", default="frozen", choices=["frozen", "none"], help="the final norm's scale frozen, or none"
    )
    d.add_argument("--top", type=int, default=8, help="components printed")
    add_device(d)
    add_out(d)
    d.set_defaults(func=cmd_dla)


def cmd_dla(args: argparse.Namespace) -> int:
    from lenslab.probes import dla  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.task and (args.prompt or args.answer or args.wrong):
        raise LenslabError("pass either --task T or --prompt P --answer A [--wrong B], not both")
    model = lenslab.load_model(args.model, device=args.device)
    pos = "all" if args.by == "position" else args.pos
    common = dict(pos=pos, norm=args.norm, neurons=args.by == "neuron")
    if args.task:
        task = tasks.from_spec(model, args.task, n=args.n, seed=args.seed)
        result = dla.direct_logit_attribution(model, task=task, **common)
    else:
        prompt, answer, wrong = args.prompt, args.answer, args.wrong
        if answer is None:
            if prompt is not None:
                raise LenslabError("--prompt needs --answer A (and optionally --wrong B), or use --task T")
            default = zoo.default_prompts(args.model)
            prompt, answer, wrong = default.clean, default.answer, wrong or default.wrong
        elif prompt is None:
            prompt = zoo.default_prompts(args.model).clean
        result = dla.direct_logit_attribution(model, prompt, answer, wrong, **common)

    kinds = ("neuron",) if args.by == "neuron" else ("head", "mlp")
    at = -1 if args.by == "position" else args.pos
    print(f"{result.direction}: {float(result.total[:, result.position_index(at)].mean()):+.4g} (mean, position {at})")
    top = result.top(args.top, pos=at, kinds=kinds)
    what = "neurons" if args.by == "neuron" else "heads and MLPs"
    print(f"top {what}: " + ", ".join(f"{label} {score:+.3g}" for label, score in top))
    # .json: the result's data (figures.export); a figure format: the view --by names
    path = export(result, out) if out.suffix.lower() == ".json" else save_figure(result.figure(args.by, at), out)
    print(f"lenslab: wrote {path}")
    return 0
