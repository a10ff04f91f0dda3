"""`lenslab circuits patch|attribute|faithfulness|graph` (lenslab.circuits) on a task of
`lenslab.tasks`; every result goes to --out in the format its extension picks."""

from __future__ import annotations

import argparse

import lenslab
from lenslab import tasks
from lenslab.cli.common import add_device, add_model, add_out, add_ray, out_path, ray_cluster
from lenslab.figures import export

METHODS = ["atp", "atp*", "relp", "ig"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("circuits", help="activation patching, attribution, faithfulness, circuit graphs")
    csub = c.add_subparsers(dest="circuits_command", required=True, metavar="CIRCUITS_COMMAND")

    cp = csub.add_parser("patch", help="exact activation patching of one site")
    _task_options(
        cp,
        "resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, z_by_pos, q, k, v, q_by_pos, ..., pattern, mlp_neuron",
        False,
    )
    cp.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    add_ray(cp)
    cp.set_defaults(func=cmd_patch)

    ca = csub.add_parser("attribute", help="AtP / AtP* / RelP / IG attribution of one or more sites")
    _task_options(ca, "one or more sites (one output file per site when several)", True)
    ca.add_argument("--method", required=True, choices=METHODS)
    ca.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    ca.add_argument("--steps", type=int, default=10, help="interpolation steps for ig")
    add_ray(ca)
    ca.set_defaults(func=cmd_attribute)

    cf = csub.add_parser("faithfulness", help="correlation of attribution methods with exact patching")
    _task_options(cf, "sites to compare", True)
    cf.add_argument("--method", nargs="+", default=["atp", "relp"], choices=METHODS)
    cf.add_argument("--steps", type=int, default=10)
    cf.set_defaults(func=cmd_faithfulness)

    cg = csub.add_parser("graph", help="circuit graph from EAP / EAP-IG edge scores, or from exact node patching")
    _task_options(cg, "", False)
    cg.add_argument(
        "--method",
        default="eap-ig",
        choices=["eap", "eap-ig", "nodes"],
        help="eap / eap-ig: edges; nodes: top heads and MLPs by exact patching (no edges)",
    )
    cg.add_argument("--steps", type=int, default=5, help="interpolation steps for eap-ig")
    cg.add_argument("--top-k", type=int, default=20)
    cg.add_argument("--threshold", type=float, default=None)
    cg.set_defaults(func=cmd_graph)


def _task_options(sp: argparse.ArgumentParser, site_help: str, many_sites: bool) -> None:
    """The model, task, metric and --out of every circuits command; --site and --layer when `site_help`."""
    add_model(sp, "zoo/ioi-4l")
    sp.add_argument(
        "--task", default="ioi", help="ioi, ioi-heldout, induction, or a JSON file {clean, corrupt, answers}"
    )
    sp.add_argument("--n", type=int, default=16, help="prompts for a built-in task (default 16)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--metric", default="logit_diff", help="logit_diff, logit_diff_normalized, answer_prob, kl_to_clean"
    )
    add_device(sp)
    add_out(sp)
    if site_help:
        sp.add_argument("--site", nargs="+" if many_sites else None, required=True, help=site_help)
        sp.add_argument("--layer", type=int, default=None, help="MLP layer for --site mlp_neuron")


def _inputs(args: argparse.Namespace):
    """--out and --ray (checked first, before any work), the model, the task, the cluster."""
    out = out_path(args)
    cluster = ray_cluster(args)
    model = lenslab.load_model(args.model, device=args.device)
    task = tasks.from_spec(model, args.task, n=args.n, seed=args.seed)
    return out, model, task, cluster


def _wrote(*paths) -> int:
    for w in paths:
        print(f"lenslab: wrote {w}")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from lenslab import circuits  # deferred: keeps CLI start-up fast

    out, model, task, cluster = _inputs(args)
    result = circuits.patch(
        model,
        task,
        args.site,
        direction=args.direction,
        metric=args.metric,
        layer=args.layer,
        cluster=cluster,
        resume=args.resume,
    )
    return _wrote(export(result, out))


def cmd_attribute(args: argparse.Namespace) -> int:
    from lenslab import circuits  # deferred: keeps CLI start-up fast

    out, model, task, cluster = _inputs(args)
    results = circuits.attribute(
        model,
        task,
        args.method,
        args.site,
        metric=args.metric,
        direction=args.direction,
        layer=args.layer,
        steps=args.steps,
        cluster=cluster,
        resume=args.resume,
    )
    return _wrote(
        *(
            export(r, out if len(results) == 1 else out.with_name(f"{out.stem}_{site}{out.suffix}"))
            for site, r in results.items()
        )
    )


def cmd_faithfulness(args: argparse.Namespace) -> int:
    from lenslab import circuits  # deferred: keeps CLI start-up fast

    out, model, task, _ = _inputs(args)
    result = circuits.faithfulness(
        model, task, args.method, args.site, metric=args.metric, layer=args.layer, steps=args.steps
    )
    print(result.to_markdown())
    return _wrote(export(result, out))


def cmd_graph(args: argparse.Namespace) -> int:
    from lenslab import circuits  # deferred: keeps CLI start-up fast

    out, model, task, _ = _inputs(args)
    if args.method == "nodes":
        heads = circuits.patch(model, task, "z", metric=args.metric)
        mlps = None if model.cfg.attn_only else circuits.patch(model, task, "mlp_out", metric=args.metric)
        graph = circuits.CircuitGraph.from_node_scores(heads, mlps, top_k=args.top_k, threshold=args.threshold)
    else:
        scores = circuits.attribute_edges(model, task, args.method, metric=args.metric, steps=args.steps)
        graph = circuits.CircuitGraph.from_edge_scores(scores, top_k=args.top_k, threshold=args.threshold)
    return _wrote(export(graph, out))
