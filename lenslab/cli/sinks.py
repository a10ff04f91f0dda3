"""`lenslab sinks attention|massive|ablate|experts` (lenslab.probes.sinks, lenslab.probes.super_experts):
attention sinks, massive activations, and MoE super experts, on --prompts or the model's default prompt."""

from __future__ import annotations

import argparse

import lenslab
from lenslab.cli.common import (
    MOE_MODEL_HELP,
    add_device,
    add_model,
    add_out,
    add_prompts,
    out_path,
    prompts_or_default,
)
from lenslab.figures import export


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sinks", help="attention sinks and massive activations")
    ssub = s.add_subparsers(dest="sinks_command", required=True, metavar="SINKS_COMMAND")
    for cmd, hlp in (
        ("attention", "per-head attention to the first token and the sink rate (Gu et al.)"),
        ("massive", "the largest residual entries per layer and the massive ones (Sun et al.)"),
        ("ablate", "set the massive activations to zero or their mean: loss and sink rate"),
    ):
        sp = ssub.add_parser(cmd, help=hlp)
        add_model(sp, "zoo/ioi-4l")
        add_prompts(sp)
        _add_massive_rule(sp)
        sp.add_argument("--mode", default="mean", choices=["mean", "zero"], help="ablate: the value set")
        add_device(sp)
        add_out(sp)
        sp.set_defaults(func=cmd_sinks)

    sx = ssub.add_parser(
        "experts",
        help="MoE super experts (Su et al.): max |down_proj output| per expert, "
        "the outliers, and (--prune) pruning them vs random experts",
    )
    add_model(sx, "zoo/moe-refusal", MOE_MODEL_HELP)
    add_prompts(sx, "calibration prompts (default: the model's default prompt)")
    sx.add_argument(
        "--rule",
        default="su",
        choices=["su", "p99.5", "mean+3std", "50xmean"],
        help="su: > P99.5 and > floor(max / 10) (Su et al.)",
    )
    sx.add_argument(
        "--include-layers", type=float, default=0.75, help="rules consider layers l < round(this x n_layers)"
    )
    sx.add_argument("--prune", action="store_true", help="prune the super experts; loss, sinks, massive activations")
    sx.add_argument(
        "--experts",
        nargs="+",
        default=None,
        metavar="L:E",
        help="with --prune: prune these instead of the super experts (L:-1 is a shared expert)",
    )
    sx.add_argument("--random-draws", type=int, default=5, help="with --prune: random control sets")
    sx.add_argument("--seed", type=int, default=0)
    _add_massive_rule(sx)
    add_device(sx)
    add_out(sx)
    sx.set_defaults(func=cmd_sinks_experts)


def _add_massive_rule(p: argparse.ArgumentParser) -> None:
    """The sink threshold and the two bars of the massive-activation rule."""
    p.add_argument("--threshold", type=float, default=0.3, help="sink threshold epsilon in (0, 1)")
    p.add_argument("--absolute", type=float, default=100.0, help="massive if |a| > this (0: no absolute bar)")
    p.add_argument("--ratio", type=float, default=1000.0, help="... and |a| >= this x the median (0: no ratio bar)")


def cmd_sinks(args: argparse.Namespace) -> int:
    from lenslab.probes import sinks  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    prompts = prompts_or_default(args)
    rule = sinks.MassiveRule(absolute=args.absolute or None, ratio=args.ratio or None)
    if args.sinks_command == "attention":
        result = sinks.attention_sinks(model, prompts, threshold=args.threshold)
        print(
            f"sink rate {100 * result.sink_rate:.1f}% (threshold {result.threshold:g}); sink heads {result.sink_heads()}"
        )
    elif args.sinks_command == "massive":
        result = sinks.massive_activations(model, prompts, rule=rule)
        print(f"massive dims {result.massive_dims} on positions {result.massive_positions}")
    else:
        result = sinks.ablate_massive(model, prompts, mode=args.mode, rule=rule, threshold=args.threshold)
        print(
            f"loss {result.loss_clean:.4g} -> {result.loss_ablated:.4g}; sink rate "
            f"{100 * result.sinks_clean.sink_rate:.1f}% -> {100 * result.sinks_ablated.sink_rate:.1f}%"
        )
    print(f"lenslab: wrote {export(result, out)}")
    return 0


def cmd_sinks_experts(args: argparse.Namespace) -> int:
    from lenslab.probes import routers, sinks  # deferred: keeps CLI start-up fast
    from lenslab.probes import super_experts as se  # deferred: keeps CLI start-up fast

    out = out_path(args)
    experts = [p for text in args.experts for p in routers.parse_experts(text)] if args.experts else None
    model = lenslab.load_model(args.model, device=args.device)
    prompts = prompts_or_default(args)
    if args.prune:
        rule = sinks.MassiveRule(absolute=args.absolute or None, ratio=args.ratio or None)
        result = se.ablate_super_experts(
            model,
            prompts,
            experts=experts,
            rule=args.rule,
            include_layers=args.include_layers,
            random_draws=args.random_draws,
            seed=args.seed,
            threshold=args.threshold,
            massive_rule=rule,
        )
        print(
            f"pruned {result.experts}: loss {result.loss_clean:.4g} -> {result.loss_pruned:.4g}; sink rate "
            f"{100 * result.sinks_clean.sink_rate:.1f}% -> {100 * result.sinks_pruned.sink_rate:.1f}%; massive entries "
            f"{len(result.massive_clean.massive)} -> {len(result.massive_pruned.massive)}"
        )
        if result.random:
            print(
                f"random experts ({len(result.random)} draws): loss {result.random_loss:.4g}, "
                f"sink rate {100 * result.random_sink_rate:.1f}%"
            )
    else:
        result = se.super_experts(model, prompts, rule=args.rule, include_layers=args.include_layers)
        print(
            f"super experts ({args.rule}): {', '.join(result.labels) or 'none'}; largest down_proj |output| "
            f"{max(result.profile.population().tolist(), default=0.0):.4g}"
        )
    print(f"lenslab: wrote {export(result, out)}")
    return 0
