"""`lenslab moe inspect|rank` (lenslab.probes.routers): the experts a MoE model's routers choose,
and MoTE's fTRI ranking of experts by the behaviour they serve. `moe generate`, which switches
experts, is in `lenslab.cli.steering`."""

from __future__ import annotations

import argparse

import torch

import lenslab
from lenslab.cli.common import (
    MOE_MODEL_HELP,
    add_device,
    add_model,
    add_out,
    add_prompt_set,
    add_prompts,
    add_ray,
    group,
    out_path,
    prompt_list,
    prompts_or_default,
    ray_cluster,
)
from lenslab.figures import export


def add_commands(sub: argparse._SubParsersAction) -> None:
    esub = group(sub, "moe")
    ei = esub.add_parser("inspect", help="chosen experts per token and layer, and the expert load")
    add_prompts(ei)
    ei.set_defaults(func=cmd_inspect)
    er = esub.add_parser("rank", help="fTRI (MoTE): rank (layer, expert) by target-class minus other-class usage")
    for which in ("target", "other"):
        add_prompt_set(er, which)
    er.add_argument("--weights", action="store_true", help="sum gate weights instead of counting selections")
    er.add_argument("--top-k", type=int, default=10)
    add_ray(er)
    er.add_argument(
        "--shard-size",
        type=int,
        default=256,
        help="with --ray or --resume: prompts per shard (whole batches of 16 prompts of one length; default 256)",
    )
    er.set_defaults(func=cmd_rank)
    for sp in (ei, er):
        add_model(sp, "zoo/moe-refusal", MOE_MODEL_HELP)
        add_device(sp)
        add_out(sp)


def top_k(values: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The `k` largest entries of a 1-d tensor as (index, value), largest first."""
    top = torch.topk(values, k)
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices)]


def cmd_inspect(args: argparse.Namespace) -> int:
    from lenslab.probes import routers  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    result = routers.route(model, prompts_or_default(args))
    load = result.load(fraction=True)
    for li, layer in enumerate(result.layers):
        top = top_k(load[li], min(3, result.n_experts))
        print(f"L{layer}: busiest experts " + ", ".join(f"e{e} {100 * v:.0f}%" for e, v in top))
    print(f"lenslab: wrote {export(result, out)}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from lenslab.probes import routers  # deferred: keeps CLI start-up fast

    out = out_path(args)
    cluster = ray_cluster(args)
    model = lenslab.load_model(args.model, device=args.device)
    target, other = prompt_list(args, "target"), prompt_list(args, "other")
    ranking = routers.ftri_rank(
        model,
        target,
        other,
        weights=args.weights,
        cluster=cluster,
        resume=args.resume,
        shard_size=args.shard_size,
        progress=cluster is not None,
    )
    for layer, expert, score in ranking.top(args.top_k):
        print(f"L{layer} e{expert}  {score:+.3f}")
    print(f"lenslab: wrote {export(ranking, out)}")
    return 0
