"""Graph files: an `AttributionGraph` as circuit-tracer's graph JSON, the file its frontend and
Neuronpedia load.

circuit-tracer (`circuit_tracer/utils/create_graph_files.py`, the pydantic models of
`circuit_tracer/frontend/graph_models.py`) prunes a graph, turns every kept node into a `Node`
and every kept edge into a link, and writes `{"metadata", "qParams", "nodes", "links"}`. This
module does the same for lenslab's graphs, with lenslab's `prune`:

| lenslab node | node_id | feature | layer | feature_type | jsNodeId |
|---|---|---|---|---|---|
| `L{l}F{f}@{p}` | `{l}_{f}_{p}` | Cantor pairing of (l, f) | `"{l}"` | `cross layer transcoder` | `{l}_{f}-0` |
| `MLP{l}.err@{p}` | `{l}_-1_{p}` | -1 | `"{l}"` | `mlp reconstruction error` | `{l}_-1-{p}` |
| `embed@{p}` (token t) | `E_{t}_{p}` | p | `"E"` | `embedding` | `E_{t}-{p}` |
| `logit{t}@{p}` | `{n_layers+1}_{t}_{p}` | t | `"{n_layers+1}"` | `logit` | `L_{t}-{p}` |
| `target{k}@{p}` | `{n_layers+1}_{d_vocab+k}_{p}` | d_vocab + k | `"{n_layers+1}"` | `logit` | `L_{d_vocab+k}-{p}` |

(`feature_type` is circuit-tracer's name for every transcoder feature, per-layer ones included;
a direction target gets circuit-tracer's virtual vocabulary index `d_vocab + k`.) A node's
`influence` is circuit-tracer's cumulative influence score: the share of the total node
influence (`AttributionGraph.node_influence`, on the unpruned graph) held by the nodes at least
as influential as it (None for logits); `activation` is a feature's activation; a logit's
`token_prob` is its target weight (the token's probability), `clerp` `Output "tok" (p=0.990)`,
and the first target has `is_target_logit`. A link's `weight` is the adjacency entry
`adjacency[target, source]` (a direct effect). The metadata holds circuit-tracer's fields
(`slug`, `scan`, `transcoder_list`, `prompt_tokens`, `prompt`, `node_threshold`, `schema_version`)
and Neuronpedia's optional ones (`info`, `generation_settings`, `pruning_settings`). `qParams`
is the saved view: `pinnedIds` (the pinned nodes' `node_id`s) and `supernodes` (Neuronpedia's
`[label, node_id, node_id, ...]` lists; `lenslab.probes.graph_supernodes` merges them for drawing),
both empty unless `pinned=` / `supernodes=` are given.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import lenslab
from lenslab import labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.attribution_graph import AttributionGraph, prune
from lenslab.probes.graph_supernodes import check_supernodes
from lenslab.toolbox import model_name

__all__ = ["FEATURE_TYPES", "SCHEMA_VERSION", "graph_file", "node_id", "write_graph_file"]

SCHEMA_VERSION = 1  # circuit-tracer's Metadata.schema_version
# lenslab node kind -> circuit-tracer feature_type
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
    "target": "logit",
}
# circuit-tracer's saved view state: nothing pinned, no supernodes, both link directions (graph_file
# fills pinnedIds and supernodes from its pinned= and supernodes=)
QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _fraction(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
        raise LenslabError(f"{name} must be in (0, 1], got {x!r}")
    return float(x)


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _process_token(token: str) -> str:
    """circuit-tracer's `process_token`: newlines, tabs and carriage returns made visible."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _decode(model, token: int) -> str:
    """One token as text, as `model.to_str_tokens` spells it."""
    tok = getattr(model, "tokenizer", None)
    return str(token) if tok is None else tok.decode([int(token)], clean_up_tokenization_spaces=False)


def node_id(label: str, tokens: list[int], n_layers: int, d_vocab: int) -> str:
    """circuit-tracer's `node_id` of the lenslab attribution-graph node `label` (`L1F37@5` ->
    `1_37_5`, `MLP1.err@5` -> `1_-1_5`, `embed@2` -> `E_{token}_2`, `logit117@9` -> `5_117_9` for
    4 layers); `tokens` are the prompt's token ids."""
    return _node(labels.parse(label), label, tokens, n_layers, d_vocab)["node_id"]


def _node(n: labels.Node, label: str, tokens: list[int], n_layers: int, d_vocab: int) -> dict:
    """The fields of circuit-tracer's `Node` that its factory methods set (no scores)."""
    if n.kind == "feature":
        return dict(
            node_id=f"{n.layer}_{n.index}_{n.pos}",
            feature=_cantor(n.layer, n.index),
            layer=str(n.layer),
            ctx_idx=n.pos,
            jsNodeId=f"{n.layer}_{n.index}-0",
        )
    if n.kind == "error":
        return dict(
            node_id=f"{n.layer}_-1_{n.pos}",
            feature=-1,
            layer=str(n.layer),
            ctx_idx=n.pos,
            jsNodeId=f"{n.layer}_-1-{n.pos}",
        )
    if n.kind == "token":
        t = int(tokens[n.pos])
        return dict(node_id=f"E_{t}_{n.pos}", feature=n.pos, layer="E", ctx_idx=n.pos, jsNodeId=f"E_{t}-{n.pos}")
    if n.kind in ("logit", "target"):
        v = n.index if n.kind == "logit" else d_vocab + n.index
        layer = str(n_layers + 1)
        return dict(node_id=f"{layer}_{v}_{n.pos}", feature=v, layer=layer, ctx_idx=n.pos, jsNodeId=f"L_{v}-{n.pos}")
    raise LenslabError(f"{label!r} is not an attribution-graph node (features, errors, tokens, logits, targets)")


def _cumulative(scores: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's cumulative influence: each node's share of the total held by the nodes
    ranked at or above it (`prune_graph`'s `cumulative_scores`)."""
    s = scores.float()
    total = float(s.sum())
    if not total > 0:
        return torch.zeros_like(s)
    sorted_scores, order = torch.sort(s, descending=True)
    out = torch.zeros_like(s)
    out[order] = torch.cumsum(sorted_scores, 0) / total
    return out


def _labels(items, what: str) -> list[str]:
    if isinstance(items, str):
        items = [items]
    out = [str(x) for x in items or ()]
    if len(set(out)) != len(out):
        raise LenslabError(f"{what} names a node twice: {out}")
    return out


def _written(written: dict[str, str], label: str, what: str) -> str:
    """The `node_id` of written node `label`, or a `LenslabError` saying why it is not in the file."""
    if label not in written:
        raise LenslabError(
            f"{what} {label!r} is not a node of the written graph{did_you_mean(label, written)} (the file holds "
            "the pruned graph's nodes that have an edge, plus the tokens and logits)"
        )
    return written[label]


def _prompt(model, graph: AttributionGraph) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return "".join(graph.str_tokens)
    ids = list(graph.tokens)
    if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    return tok.decode(ids)


def graph_file(
    graph: AttributionGraph,
    model,
    *,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    pinned: Sequence[str] = (),
    supernodes: Iterable = (),
) -> dict:
    """circuit-tracer's graph JSON of `graph` on `model` (the model it was computed on: its
    tokenizer names the tokens), as a dict: `metadata`, `qParams`, `nodes` (one per kept node),
    `links` (one per kept edge: `source`, `target` node ids and `weight`).

    An unpruned graph is pruned as `create_graph_files` does, with `prune(graph, node_threshold,
    edge_threshold)`, and its nodes' `influence` comes from the unpruned graph; an already pruned
    graph (`graph.pruned` set) is written as it is, with its own thresholds in the metadata.
    `slug`: the graph's name (letters, digits, `.`, `_`, `-`; circuit-tracer writes `{slug}.json`).
    `scan`: what Neuronpedia reads as the model id (default: the model's name).
    `pinned`: lenslab labels of written nodes, saved as `qParams.pinnedIds`; `supernodes`: labelled
    groups of written nodes (`Supernode`s, `"LABEL=NODE,NODE"`, `(label, [nodes])` or `[label, node,
    ...]`, see `lenslab.probes.graph_supernodes.check_supernodes`), saved as `qParams.supernodes`
    in Neuronpedia's form `[label, node_id, node_id, ...]`.
    """
    if not isinstance(graph, AttributionGraph):
        raise LenslabError(f"graph_file needs an AttributionGraph, got {type(graph).__name__}")
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise LenslabError(f"slug must be letters, digits, '.', '_' or '-' (it names the file), got {slug!r}")
    node_threshold = _fraction("node_threshold", node_threshold)
    edge_threshold = _fraction("edge_threshold", edge_threshold)
    name = model_name(model)
    made_on = graph.provenance.get("model")
    if made_on and made_on != name:
        raise LenslabError(f"this graph was computed on model {made_on!r}, not on {name!r}: pass that model")
    if scan is not None and (not isinstance(scan, str) or not scan.strip()):
        raise LenslabError(f"scan must be a non-empty string (Neuronpedia's model id), got {scan!r}")
    if graph.pruned is None:
        kept = prune(graph, node_threshold, edge_threshold)
    else:
        kept = graph
        node_threshold, edge_threshold = (float(x) for x in graph.pruned)
    if not kept.adjacency.any():
        raise LenslabError("the attribution graph has no edges: there is nothing to write")
    cumulative = _cumulative(graph.node_influence())
    index = {label: i for i, label in enumerate(graph.nodes)}
    d_vocab, n_layers = int(model.cfg.d_vocab), int(kept.n_layers)
    parsed = kept.parsed
    n_targets = len(kept.target_weights)
    first_target = len(kept.nodes) - n_targets
    nodes = []
    for i, (label, n) in enumerate(zip(kept.nodes, parsed)):
        ids = _node(n, label, kept.tokens, n_layers, d_vocab)
        node = {k: ids[k] for k in ("node_id", "feature", "layer", "ctx_idx")}  # circuit-tracer's field order
        node.update(feature_type=FEATURE_TYPES[n.kind], token_prob=0.0, is_target_logit=False, run_idx=0)
        node.update(reverse_ctx_idx=0, jsNodeId=ids["jsNodeId"], clerp="", influence=None, activation=None)
        if n.kind in ("logit", "target"):
            p = float(kept.target_weights[i - first_target])
            token = _process_token(_decode(model, n.index)) if n.kind == "logit" else f"target{n.index}"
            node.update(token_prob=p, is_target_logit=i == first_target, clerp=f'Output "{token}" (p={p:.3f})')
        else:
            node["influence"] = float(cumulative[index[label]])
        if n.kind == "feature":
            node["activation"] = float(kept.activations[i])
        nodes.append(node)
    all_nodes = list(nodes)
    tgt, src = kept.adjacency.nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(kept.adjacency[t, s])}
        for t, s in zip(tgt.tolist(), src.tolist())
    ]
    used = {x for link in links for x in (link["source"], link["target"])}
    nodes = [n for n in nodes if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    prov = graph.provenance
    metadata = {
        "slug": slug,
        "scan": scan or name,
        "transcoder_list": [],
        "prompt_tokens": [_process_token(t) for t in kept.str_tokens],
        "prompt": _prompt(model, kept),
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "info": {
            "description": (
                f"lenslab attribution graph (circuit-tracer's method) of {name} through its "
                f"{prov.get('transcoders', '?')} transcoders; "
                f"replacement score {kept.replacement_score:.4f}, completeness score {kept.completeness_score:.4f}"
            ),
            "source_urls": [],
            "generator": {"name": "lenslab", "version": lenslab.__version__},
            "create_time_ms": int(time.time() * 1000),
        },
        "generation_settings": {
            k: prov[k] for k in ("max_n_logits", "desired_logit_prob", "max_feature_nodes") if prov.get(k) is not None
        },
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    qparams = {k: list(v) if isinstance(v, list) else v for k, v in QPARAMS.items()}  # fresh lists
    kept_ids = {n["node_id"] for n in nodes}
    written = {label: n["node_id"] for label, n in zip(kept.nodes, all_nodes) if n["node_id"] in kept_ids}
    qparams["pinnedIds"] = [_written(written, label, "pinned node") for label in _labels(pinned, "pinned")]
    qparams["supernodes"] = [
        [s.label, *(_written(written, m, f"supernode {s.label!r}") for m in s.members)]
        for s in check_supernodes(kept, supernodes)
    ]
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def write_graph_file(
    graph: AttributionGraph,
    model,
    path: str | Path,
    *,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    pinned: Sequence[str] = (),
    supernodes: Iterable = (),
) -> Path:
    """Write `graph_file(graph, model, ...)` and return where. `path`: a `.json` file, or a folder
    (circuit-tracer's layout for its local server: `{folder}/{slug}.json`, and the graph's
    metadata added to `{folder}/graph-metadata.json`, replacing an entry of the same slug)."""
    d = graph_file(
        graph, model, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold, scan=scan,
        pinned=pinned, supernodes=supernodes,
    )  # fmt: skip
    try:
        text = json.dumps(d, indent=1, allow_nan=False)
    except ValueError as exc:
        raise LenslabError(f"the graph has a non-finite number (NaN or inf) that JSON cannot hold: {exc}") from exc
    path = Path(path)
    if path.suffix.lower() == ".json":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    if path.exists() and not path.is_dir():
        raise LenslabError(f"{str(path)!r} is neither a .json file nor a folder")
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"{slug}.json"
    out.write_text(text)
    index = path / "graph-metadata.json"
    try:
        graphs = json.loads(index.read_text())["graphs"] if index.exists() else []
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LenslabError(f"{index} is not circuit-tracer's graph-metadata.json ({{'graphs': [...]}})") from exc
    graphs = [g for g in graphs if g.get("slug") != slug] + [d["metadata"]]
    index.write_text(json.dumps({"graphs": graphs}, indent=2))
    return out
