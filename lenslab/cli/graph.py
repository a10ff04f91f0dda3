"""`lenslab graph attribute|prune|export|validate|heads|intervene` (lenslab.probes.attribution_graph,
lenslab.probes.graph_files, lenslab.probes.graph_validation, lenslab.steering.graph_interventions):
circuit-tracer's attribution graph of a prompt through a model's transcoders, pruned, written as
circuit-tracer's / Neuronpedia's graph file or a figure, checked by ablating its features against
random ones in the live model, its edges split by attention head (lenslab.probes.graph_heads), and
intervened on from its feature nodes (ablate, clamp, steer; the logits before and after, and a
side-by-side generation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lenslab
from lenslab import labels
from lenslab._errors import LenslabError
from lenslab.cli.common import (
    add_device,
    add_model,
    add_out,
    add_prompt,
    add_prompts,
    add_ray,
    out_path,
    prompt_or_default,
    ray_cluster,
)
from lenslab.figures import FORMATS, export

JSON_OUT = dict(suffixes=(".json",), why="the graph is written as lenslab's AttributionGraph JSON (.json)")
EXPORT_OUT_HELP = (
    "output file: .json writes circuit-tracer's graph file (its frontend and Neuronpedia load it); "
    ".svg .png .pdf .html the graph's figure"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "graph", help="attribution graphs through transcoders (circuit-tracer's): compute, prune, export"
    )
    ssub = s.add_subparsers(dest="graph_command", required=True, metavar="GRAPH_COMMAND")

    sa = ssub.add_parser(
        "attribute",
        help="the attribution graph of a prompt at its last position: direct effects among transcoder features, "
        "errors, token embeddings and logits",
    )
    add_model(sa, "zoo/ioi-4l")
    add_prompt(sa)
    sa.add_argument(
        "--transcoders",
        default=None,
        help="a zoo transcoder name (zoo/ioi-4l/per-layer) or a folder in circuit-tracer's layout "
        "(default: the zoo model's shipped per-layer transcoders)",
    )
    sa.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="TOKEN",
        help="one-token strings to attribute from (quote a leading space: ' Mary'); default: the salient logits",
    )
    sa.add_argument("--max-feature-nodes", type=int, default=None, help="keep this many features, by influence")
    sa.add_argument("--max-n-logits", type=int, default=10, help="at most this many salient logits")
    sa.add_argument(
        "--desired-logit-prob", type=float, default=0.95, help="salient logits up to this cumulative probability"
    )
    sa.add_argument("--batch-size", type=int, default=32, help="targets per backward pass")
    sa.add_argument(
        "--memory-budget", default=None, help="bound the graph's extra memory, e.g. 2GiB (lowers the batch size)"
    )
    add_prompts(
        sa,
        help="several prompts instead of --prompt: one graph each, written as OUT_0.json, OUT_1.json, ... "
        "(with --ray, one shard per prompt on the cluster)",
    )
    add_ray(sa)
    add_device(sa, default="cpu")
    add_out(sa, "the graph, lenslab's AttributionGraph JSON (.json)", **JSON_OUT)
    sa.set_defaults(func=cmd_attribute)

    sp = ssub.add_parser(
        "prune", help="circuit-tracer's pruning: keep the most influential nodes, then the most influential edges"
    )
    sp.add_argument("--graph", required=True, help="a graph written by `lenslab graph attribute`")
    sp.add_argument("--node-threshold", type=float, default=0.8, help="share of the features' influence kept")
    sp.add_argument("--edge-threshold", type=float, default=0.98, help="share of the edges' influence kept")
    add_out(sp, "the pruned graph, lenslab's AttributionGraph JSON (.json)", **JSON_OUT)
    sp.set_defaults(func=cmd_prune)

    se = ssub.add_parser(
        "export",
        help="write a graph as circuit-tracer's graph file (.json, for its frontend and Neuronpedia) or a figure",
    )
    se.add_argument("--graph", required=True, help="a graph written by `lenslab graph attribute` or `prune`")
    se.add_argument(
        "--model",
        default=None,
        help="the model the graph was computed on, for .json (it names the tokens); default: the one the graph records",
    )
    se.add_argument("--slug", default=None, help="the graph's name in the file (default: --out's file name)")
    se.add_argument("--scan", default=None, help="Neuronpedia's model id (default: the model's name)")
    se.add_argument(
        "--node-threshold", type=float, default=0.8, help="pruning of an unpruned graph: features' influence kept"
    )
    se.add_argument(
        "--edge-threshold", type=float, default=0.98, help="pruning of an unpruned graph: edges' influence kept"
    )
    se.add_argument(
        "--supernode",
        action="append",
        default=[],
        metavar="LABEL=NODE,NODE",
        help="group nodes into a labelled supernode (repeatable; nodes as lenslab labels, e.g. "
        "'say Mary=L3F12@14,L2F7@14'): .json keeps it in qParams.supernodes, a figure draws it as one node "
        "whose edges are the sums of its members' edges",
    )
    se.add_argument(
        "--pin", nargs="+", default=[], metavar="NODE", help="nodes to save as pinned (.json: qParams.pinnedIds)"
    )
    add_device(se, default="cpu")
    add_out(se, EXPORT_OUT_HELP, suffixes=FORMATS, why=f"the extension picks the format, one of {', '.join(FORMATS)}")
    se.set_defaults(func=cmd_export)

    sv = ssub.add_parser(
        "validate",
        help="ablate the graph's feature nodes in the live model and compare the targets' drop with ablating "
        "random active features of the same number",
    )
    add_graph_source(sv)
    sv.add_argument("--n-random", type=int, default=20, help="random feature sets to ablate")
    sv.add_argument("--seed", type=int, default=0, help="seed of the random sets")
    add_device(sv, default="cpu")
    add_out(sv, "the ablation result (.json) or its figure (.svg .png .pdf .html)", required=False)
    sv.set_defaults(func=cmd_validate)

    sh = ssub.add_parser(
        "heads",
        help="split the graph's strongest edges by the attention head each path crosses last (plus the "
        "attention-free residual part); the parts sum to the edge",
    )
    add_graph_source(sh, "; none for an attention-only model")
    sh.add_argument("--into", nargs="+", default=None, metavar="NODE", help="only the edges into these nodes")
    sh.add_argument("--max-edges", type=int, default=200, help="split the strongest this many edges")
    sh.add_argument("--top", type=int, default=3, help="heads printed per edge")
    add_device(sh, default="cpu")
    add_out(sh, "the split (.json) or its figure (.svg .png .pdf .html)", required=False)
    sh.set_defaults(func=cmd_heads)

    si = ssub.add_parser(
        "intervene",
        help="ablate, clamp or steer the transcoder features of graph nodes (one, or several as a supernode) in "
        "the live model: next-token logits before and after, and optionally a side-by-side generation",
    )
    si.add_argument(
        "--graph",
        default=None,
        help="a graph written by `lenslab graph attribute` or `prune`: its prompt and model, the nodes checked "
        "against it, its activations for --factor and its edges for the first-order prediction "
        "(without it: --model and --prompt)",
    )
    si.add_argument("--model", default=None, help="the model (default: the one the graph records, else zoo/ioi-4l)")
    add_prompt(si)
    si.add_argument(
        "--transcoders",
        default=None,
        help="the transcoders the graph was computed with (default: the zoo model's shipped per-layer set)",
    )
    si.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="LABEL",
        help="a feature node, e.g. L0F195@3 (layer 0, feature 195, position 3); repeat it for a supernode",
    )
    si.add_argument("--name", default=None, help="the supernode's label (default: the mode and the nodes)")
    si.add_argument("--mode", choices=("ablate", "clamp", "steer"), default="ablate", help="default ablate")
    si.add_argument("--value", type=float, default=None, help="clamp: the activation to hold; steer: the amount added")
    si.add_argument(
        "--factor", type=float, default=None, help="clamp: hold this multiple of the node's activation (needs --graph)"
    )
    si.add_argument(
        "--positions",
        default="node",
        help="node (each node's own position, default), or all, last, prompt, generated (all: every generated "
        "token too)",
    )
    si.add_argument("--strength", type=float, default=1.0, help="the edits' strength (0: unchanged; default 1)")
    si.add_argument(
        "--target",
        default=None,
        help="the token to track (default: the graph's heaviest logit target, else the top token)",
    )
    si.add_argument("--top-k", type=int, default=10, help="top tokens shown before and after (default 10)")
    si.add_argument(
        "--generate", type=int, default=0, metavar="N", help="also stream N tokens unsteered and steered, side by side"
    )
    si.add_argument("--temperature", type=float, default=0.0, help="generation: 0 is greedy (default)")
    si.add_argument("--seed", type=int, default=0, help="generation: the sampling seed")
    add_device(si, default="cpu")
    add_out(si, "the before/after result (.json) or its figure (.svg .png .pdf .html)", required=False)
    si.set_defaults(func=cmd_intervene)


def add_graph_source(p: argparse.ArgumentParser, transcoders_note: str = "") -> None:
    """--graph (required), --model and --transcoders of the commands that read a saved graph."""
    p.add_argument("--graph", required=True, help="a graph written by `lenslab graph attribute` or `prune`")
    p.add_argument("--model", default=None, help="the model the graph was computed on (default: the one it records)")
    p.add_argument(
        "--transcoders",
        default=None,
        help="the transcoders the graph was computed with (default: the zoo model's shipped per-layer set"
        f"{transcoders_note})",
    )


def graph_model(args: argparse.Namespace, graph) -> str:
    """--model, else the model the graph records, else a clear error."""
    name = args.model or graph.provenance.get("model")
    if not name:
        raise LenslabError(f"--graph {args.graph!r} does not record its model: pass --model")
    return name


def model_transcoders(args: argparse.Namespace) -> str | None:
    """--transcoders, else none for an attention-only zoo model (its graph has no features), else the
    zoo model's shipped per-layer set; decided before the model loads, so bad input fails fast."""
    from lenslab import zoo  # deferred: keeps CLI start-up fast

    if args.transcoders:
        return args.transcoders
    name = str(args.model)
    if name in zoo.zoo_names():
        if json.loads((zoo.zoo_path(name) / "config.json").read_text()).get("cfg", {}).get("attn_only"):
            return None
    return default_transcoders(name)


def default_transcoders(model: str) -> str:
    """The zoo model's shipped per-layer transcoders (`zoo/<model>/per-layer`), else a clear error."""
    from lenslab.probes.transcoders import list_transcoders  # deferred: keeps CLI start-up fast

    shipped = list_transcoders()
    name = f"{model.rstrip('/')}/per-layer"
    if name in shipped:
        return name
    have = sorted({s.rsplit("/", 1)[0] for s in shipped})
    raise LenslabError(
        f"model {model!r} has no shipped transcoders (models that have them: {', '.join(have) or 'none'}); "
        "pass --transcoders with a zoo transcoder name or a folder of transcoders trained on this model"
    )


def read_graph(path: str):
    """The `AttributionGraph` in the JSON file `path`, or a one-line `LenslabError`."""
    from lenslab.probes.attribution_graph import AttributionGraph  # deferred: keeps CLI start-up fast

    file = Path(path)
    if not file.is_file():
        raise LenslabError(f"--graph {path!r} does not exist; pass a graph written by `lenslab graph attribute`")
    try:
        return AttributionGraph.from_json(file)
    except json.JSONDecodeError as exc:
        raise LenslabError(f"--graph {path!r} is not JSON ({exc})") from exc
    except LenslabError as exc:
        raise LenslabError(f"--graph {path!r}: {exc}") from exc
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise LenslabError(f"--graph {path!r} is not a complete AttributionGraph JSON ({exc!r})") from exc


def _counts(graph) -> str:
    kinds = [n.kind for n in graph.parsed]
    c = {k: kinds.count(k) for k in ("feature", "error", "token")}
    n_edges = int((graph.adjacency != 0).sum())
    return (
        f"{len(graph.nodes)} nodes ({c['feature']} features, {c['error']} errors, {c['token']} tokens, "
        f"{len(graph.target_weights)} targets), {n_edges} edges"
    )


def _scores(graph) -> str:
    return f"replacement score {graph.replacement_score:.4f}, completeness score {graph.completeness_score:.4f}"


def cmd_attribute(args: argparse.Namespace) -> int:
    from lenslab.probes import attribution_graph as AG  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.prompts is not None and args.prompt is not None:
        raise LenslabError("give --prompt (one graph) or --prompts (one graph each), not both")
    if args.prompts is None and (args.ray or args.resume):
        raise LenslabError("--ray and --resume split several prompts: give them with --prompts")
    cluster = ray_cluster(args)
    transcoders = model_transcoders(args)
    model = lenslab.load_model(args.model, device=args.device)
    options = dict(
        targets=args.targets,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        memory_budget=args.memory_budget,
    )
    if args.prompts is None:
        graphs = {out: AG.attribution_graph(model, prompt_or_default(args), transcoders, **options)}
    else:
        from lenslab.probes.graph_batch import attribution_graphs  # deferred: keeps CLI start-up fast

        many = attribution_graphs(model, args.prompts, transcoders, cluster=cluster, resume=args.resume, **options)
        graphs = {out.with_name(f"{out.stem}_{i}{out.suffix}"): g for i, g in enumerate(many)}
    for path, graph in graphs.items():
        print(f"{_counts(graph)}; {_scores(graph)}")
        nk = len(graph.target_weights)
        for label, w in zip(graph.nodes[len(graph.nodes) - nk :], graph.target_weights.tolist()):
            n = labels.parse(label)
            token = f" {model.to_single_str_token(n.index)!r}" if n.kind == "logit" else ""
            print(f"  target {label}{token}: weight {w:.4f}")
        path.parent.mkdir(parents=True, exist_ok=True)
        graph.to_json(path)
        print(f"lenslab: wrote {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from lenslab.probes import attribution_graph as AG  # deferred: keeps CLI start-up fast

    out = out_path(args)
    graph = read_graph(args.graph)
    if graph.pruned is not None:
        print(f"note: {args.graph} is already pruned at {tuple(graph.pruned)}; pruning it again")
    pruned = AG.prune(graph, args.node_threshold, args.edge_threshold)
    print(f"kept {_counts(pruned)} of {_counts(graph)}; {_scores(pruned)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    pruned.to_json(out)
    print(f"lenslab: wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lenslab.probes import graph_files, graph_supernodes  # deferred: keeps CLI start-up fast

    out = out_path(args)
    graph = read_graph(args.graph)
    supernodes = [graph_supernodes.parse_supernode(s) for s in args.supernode]
    if out.suffix.lower() != ".json":
        if args.pin:
            raise LenslabError("--pin is saved in the graph file only: write a .json, or leave --pin out")
        merged = graph_supernodes.merge_supernodes(graph, supernodes)
        for sn in merged.supernodes:
            print(f"supernode {sn.label!r}: {len(sn.members)} nodes merged into one")
        print(f"lenslab: wrote {export(merged, out)}")
        return 0
    name = graph_model(args, graph)
    model = lenslab.load_model(name, device=args.device)
    path = graph_files.write_graph_file(
        graph,
        model,
        out,
        slug=args.slug or out.stem,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        scan=args.scan,
        pinned=args.pin,
        supernodes=supernodes,
    )
    d = json.loads(path.read_text())
    q = d["qParams"]
    print(
        f"circuit-tracer graph file {d['metadata']['slug']!r} (scan {d['metadata']['scan']!r}): "
        f"{len(d['nodes'])} nodes, {len(d['links'])} links, node threshold {d['metadata']['node_threshold']}, "
        f"{len(q['pinnedIds'])} pinned, {len(q['supernodes'])} supernodes"
    )
    print(f"lenslab: wrote {path}")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from lenslab.probes import graph_heads  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.max_edges < 1:
        raise LenslabError(f"--max-edges must be at least 1, got {args.max_edges}")
    graph = read_graph(args.graph)
    args.model = graph_model(args, graph)
    transcoders = model_transcoders(args)
    model = lenslab.load_model(args.model, device=args.device)
    split = graph_heads.head_edges(model, graph, transcoders, into=args.into, max_edges=args.max_edges)
    print(split.table(top=args.top).to_string(index=False))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"lenslab: wrote {export(split, out)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lenslab.probes import graph_validation  # deferred: keeps CLI start-up fast

    out = out_path(args)
    graph = read_graph(args.graph)
    name = graph_model(args, graph)
    transcoders = args.transcoders or default_transcoders(name)
    model = lenslab.load_model(name, device=args.device)
    res = graph_validation.ablate_graph(model, graph, transcoders, n_random=args.n_random, seed=args.seed)
    mean, std = res.random_effect()
    print(
        f"ablating the graph's {res.n_features} features: weighted target drop {res.graph_effect():.4f}; "
        f"{args.n_random} random sets of {res.n_features} active features: {mean:.4f} ± {std:.4f}"
    )
    for label, c, g in zip(res.targets, res.clean.tolist(), res.graph.tolist()):
        print(f"  {label}: {c:.4f} -> {g:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"lenslab: wrote {export(res, out)}")
    return 0


POSITION_CHOICES = ("node", "all", "last", "prompt", "generated")


def cmd_intervene(args: argparse.Namespace) -> int:
    from lenslab.cli.steering import print_side_by_side  # deferred: keeps CLI start-up fast
    from lenslab.steering import graph_interventions as GI  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.positions not in POSITION_CHOICES:
        raise LenslabError(f"--positions {args.positions!r} is not one of {', '.join(POSITION_CHOICES)}")
    if args.generate < 0:
        raise LenslabError(f"--generate must be >= 0 tokens, got {args.generate}")
    graph = read_graph(args.graph) if args.graph else None
    if graph is not None and args.prompt:
        raise LenslabError("--graph fixes the prompt (the one it was computed on): drop --prompt, or drop --graph")
    if graph is None and args.factor is not None:
        raise LenslabError(
            "--factor multiplies the node's activation recorded in the graph: pass --graph (or clamp with --value)"
        )
    name = args.model or (graph.provenance.get("model") if graph is not None else None) or "zoo/ioi-4l"
    args.model = name
    transcoders = args.transcoders or default_transcoders(name)
    iv = GI.node_intervention(
        transcoders,
        args.node,
        args.mode,
        args.value,
        factor=args.factor,
        graph=graph,
        positions=args.positions,
        strength=args.strength,
        name=args.name,
    )
    model = lenslab.load_model(name, device=args.device)
    prompt = GI.graph_prompt(model, graph) if graph is not None else prompt_or_default(args)
    res = GI.intervention_effect(model, graph if graph is not None else prompt, iv, target=args.target, k=args.top_k)
    print(f"{iv.name}: {len(iv.edits)} edit(s) at {', '.join(iv.hook_names)}")
    pred = "" if res.predicted is None else f"; the graph's first-order change {res.predicted:+.4f}"
    print(
        f"target {res.target_token!r} (logit - mean logit at position {res.pos}): {res.target_before:.4f} -> "
        f"{res.target_after:.4f} (change {res.target_change():+.4f}{pred})"
    )
    k = min(args.top_k, len(res.tokens))
    before = sorted(range(len(res.tokens)), key=lambda i: -float(res.probs_before[i]))[:k]
    after = sorted(range(len(res.tokens)), key=lambda i: -float(res.probs_after[i]))[:k]
    print(f"  {'before':<30}after")
    for rank, (b, a) in enumerate(zip(before, after), 1):
        left = f"{res.tokens[b]!r} {float(res.probs_before[b]):.4g}"
        print(f"  {rank:>2}. {left:<26}{res.tokens[a]!r} {float(res.probs_after[a]):.4g}")
    if args.generate:
        print()
        kw = dict(max_new_tokens=args.generate, seed=args.seed, temperature=args.temperature)
        print_side_by_side(model, prompt, iv, **kw)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"lenslab: wrote {export(res, out)}")
    return 0
