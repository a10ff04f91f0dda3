"""Circuit graphs: data first (nodes, signed edges, provenance as JSON), rendering second.

Node order is `lenslab.circuits.edges.node_names`: "input", then per layer its heads "L{l}H{h}"
and "MLP{l}", then "logits". A graph is built from edge scores (EAP / EAP-IG) by keeping the
`top_k` edges by |score| or those with |score| >= `threshold`, then pruning to edges that lie on
a path from "input" to "logits". With pruning, `top_k` takes the shortest run of strongest edges
whose pruned graph has at least `top_k` edges, so the circuit is never empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.circuits.edges import EdgeScores, node_key
from lenslab.results import JsonResult, PatchResult


@dataclass(frozen=True, eq=False)
class CircuitGraph(JsonResult):
    """Nodes (graph order), signed edges (source, target, weight) and, for graphs built from
    node scores, each node's signed score (`node_scores`)."""

    nodes: list[str]
    edges: list[tuple[str, str, float]]
    metric: str = ""
    method: str = ""
    provenance: dict = field(default_factory=dict)
    node_scores: dict[str, float] = field(default_factory=dict)
    KIND = "CircuitGraph"

    @classmethod
    def from_node_scores(
        cls,
        heads: PatchResult,
        mlps: PatchResult | None = None,
        *,
        top_k: int | None = 10,
        threshold: float | None = None,
    ) -> CircuitGraph:
        """Keep the `top_k` (or |score| >= `threshold`) heads and MLPs by node score.

        `heads`: a `[layer, head]` result (site "z" from `patch` or `attribute`); `mlps`: a
        `[layer, pos]` or `[layer]` result for "mlp_out" (an MLP's score is its largest-magnitude position). Exact-patching
        scores are taken relative to their baseline. Node scores carry no edges: the graph lists
        the kept nodes between "input" and "logits", sized by score, with no edges drawn.
        """
        if top_k is None and threshold is None:
            raise LenslabError("give top_k=N or threshold=X to choose the circuit's nodes")
        if tuple(heads.axes) != ("layer", "head"):
            raise LenslabError(f"heads must be a [layer, head] result (site 'z'), got axes {heads.axes}")
        scores: dict[str, float] = {}
        delta = heads.scores - (heads.baseline if heads.method == "exact" and heads.baseline is not None else 0.0)
        for l in range(delta.shape[0]):
            for h in range(delta.shape[1]):
                scores[labels.head(l, h)] = float(delta[l, h])
        if mlps is not None:
            if mlps.axes[0] != "layer":
                raise LenslabError(f"mlps must have a layer axis first (site 'mlp_out'), got axes {mlps.axes}")
            m = mlps.scores - (mlps.baseline if mlps.method == "exact" and mlps.baseline is not None else 0.0)
            m = m.reshape(m.shape[0], -1)
            m = m.gather(1, m.abs().argmax(-1, keepdim=True))[:, 0]  # each layer's largest-|score| position
            for l in range(m.shape[0]):
                scores[labels.mlp(l)] = float(m[l])
        ranked = sorted(scores.items(), key=lambda kv: -abs(kv[1]))
        if threshold is not None:
            ranked = [kv for kv in ranked if abs(kv[1]) >= threshold]
        if top_k is not None:
            ranked = ranked[:top_k]
        kept = dict(ranked)
        order = sorted(kept, key=lambda n: (node_key(n)[1], 0 if node_key(n)[0] == "head" else 1, node_key(n)[2]))
        return cls(
            nodes=["input", *order, "logits"],
            edges=[],
            metric=heads.metric,
            method=f"{heads.method} nodes",
            provenance={**heads.provenance, "top_k": top_k, "threshold": threshold},
            node_scores=kept,
        )

    @classmethod
    def from_edge_scores(
        cls, scores: EdgeScores, *, top_k: int | None = 20, threshold: float | None = None, prune: bool = True
    ) -> CircuitGraph:
        """Keep the `top_k` strongest edges (or those with |score| >= `threshold`)."""
        if top_k is None and threshold is None:
            raise LenslabError("give top_k=N or threshold=X to choose the circuit's edges")
        if top_k is not None and top_k < 1:
            raise LenslabError(f"top_k must be >= 1, got {top_k}")
        ranked = sorted(scores.edges(), key=lambda e: -abs(e[2]))
        if threshold is not None:
            ranked = [e for e in ranked if abs(e[2]) >= threshold]
        if top_k is not None and not prune:
            ranked = ranked[:top_k]
        elif top_k is not None:
            # the shortest prefix (by |score|) whose pruned graph has >= top_k edges (monotone: bisect)
            lo, hi = min(top_k, len(ranked)), len(ranked)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(_prune(ranked[:mid])) >= top_k:
                    hi = mid
                else:
                    lo = mid + 1
            ranked = _prune(ranked[:lo])
        elif prune:
            ranked = _prune(ranked)
        used = {u for u, _, _ in ranked} | {v for _, v, _ in ranked}
        nodes = [n for n in scores.nodes if n in used]
        return cls(
            nodes=nodes,
            edges=ranked,
            metric=scores.metric,
            method=scores.method,
            provenance={**scores.provenance, "top_k": top_k, "threshold": threshold, "pruned": prune},
        )

    def table(self):
        """One row per edge (source, target, weight); a graph built from node scores has no edges,
        and then one row per node (node, score)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        if self.edges:
            return pd.DataFrame(self.edges, columns=["source", "target", "weight"])
        return pd.DataFrame(
            [(n, self.node_scores.get(n)) for n in self.nodes if n in self.node_scores], columns=["node", "score"]
        )

    def to_dict(self) -> dict:
        return {
            "kind": "CircuitGraph",
            "nodes": self.nodes,
            "edges": [list(e) for e in self.edges],
            "metric": self.metric,
            "method": self.method,
            "provenance": self.provenance,
            "node_scores": self.node_scores,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CircuitGraph:
        return cls(
            nodes=d["nodes"],
            edges=[(u, v, float(w)) for u, v, w in d["edges"]],
            metric=d.get("metric", ""),
            method=d.get("method", ""),
            provenance=d.get("provenance") or {},
            node_scores=d.get("node_scores") or {},
        )

    def figure(self):
        """An interactive plotly drawing: layers left to right, red/blue edges by sign, width by |weight|."""
        return circuit_figure(self)


def _reachable(start: str, edges: list[tuple[str, str, float]], reverse: bool = False) -> set[str]:
    """Nodes reachable from `start` along `edges` (against their direction when `reverse`)."""
    seen = {start}
    changed = True
    while changed:
        changed = False
        for u, v, _ in edges:
            a, b = (v, u) if reverse else (u, v)
            if a in seen and b not in seen:
                seen.add(b)
                changed = True
    return seen


def _prune(edges: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """Keep edges on some input -> ... -> logits path within the kept set."""
    forward = _reachable("input", edges)
    backward = _reachable("logits", edges, reverse=True)
    return [e for e in edges if e[0] in forward and e[1] in backward]


def node_position(node: str, n_heads: int) -> tuple[float, float]:
    """(x, y) for drawing: x grows with depth (MLP after its layer's heads), y spreads heads."""
    kind, layer, head = node_key(node)
    if kind == "input":
        return 0.0, (n_heads - 1) / 2
    if kind == "logits":
        return -1.0, (n_heads - 1) / 2  # x is set by the caller to the far right
    if kind == "head":
        return 1.0 + 2 * layer, float(head)
    return 2.0 + 2 * layer, (n_heads - 1) / 2


def _node_sizes(graph) -> list[float]:
    """16 px per node, or 10-40 px by |node score| for graphs built from node scores."""
    if not graph.node_scores:
        return [16.0] * len(graph.nodes)
    top = max(abs(v) for v in graph.node_scores.values()) or 1.0
    return [10 + 30 * abs(graph.node_scores[n]) / top if n in graph.node_scores else 16.0 for n in graph.nodes]


def circuit_figure(graph):
    """Draw a `CircuitGraph` with plotly: nodes by layer, edges coloured by sign, width by |weight|."""
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

    heads = [int(n.split("H")[1]) for n in graph.nodes if n.startswith("L") and "H" in n]
    n_heads = max(heads) + 1 if heads else 1
    pos = {n: node_position(n, n_heads) for n in graph.nodes}
    right = max([x for x, _ in pos.values()] + [0.0]) + 1.5
    pos = {n: ((right if x < 0 else x), y) for n, (x, y) in pos.items()}
    wmax = max([abs(w) for _, _, w in graph.edges] + [1e-12])
    fig = go.Figure()
    for u, v, w in graph.edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        bend = (
            0.12 * (x1 - x0) * (1 if (graph.nodes.index(u) + graph.nodes.index(v)) % 2 else -1)
        )  # arcs keep long edges from hiding short ones
        ts = [i / 12 for i in range(13)]
        xs = [x0 + (x1 - x0) * t for t in ts]
        ys = [y0 + (y1 - y0) * t + bend * 4 * t * (1 - t) for t in ts]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line=dict(width=1 + 7 * abs(w) / wmax, color="#1f5fb4" if w > 0 else "#c0392b"),
                opacity=0.35 + 0.6 * abs(w) / wmax,
                hoverinfo="text",
                text=[f"{u} → {v}: {w:.4g}"] * len(xs),
                showlegend=False,
            )
        )
    kinds = {"input": "#555555", "logits": "#555555"}
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in graph.nodes],
            y=[pos[n][1] for n in graph.nodes],
            mode="markers+text",
            text=graph.nodes,
            textposition="top center",
            hoverinfo="text",
            showlegend=False,
            marker=dict(
                size=_node_sizes(graph),
                line=dict(width=1, color="#222"),
                color=[kinds.get(n, "#f5b041" if node_key(n)[0] == "mlp" else "#7fb3d5") for n in graph.nodes],
            ),
            hovertext=[f"{n}: {graph.node_scores[n]:+.4g}" if n in graph.node_scores else n for n in graph.nodes],
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[None], y=[None], mode="lines", line=dict(color="#1f5fb4", width=4), name="positive (helps the answer)"
        )
    )
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="#c0392b", width=4), name="negative"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, range=[n_heads - 0.5 + 0.15 * right, -0.9 - 0.15 * right])
    fig.update_layout(
        height=max(380, 70 * n_heads + 160), width=max(600, int(110 * right)), legend=dict(orientation="h", y=-0.05)
    )
    p = graph.provenance
    size = f"{len(graph.edges)} edges" if graph.edges or not graph.node_scores else f"{len(graph.node_scores)} nodes"
    return figures.style(
        fig,
        f"Circuit ({graph.method}, {size}) · model {p.get('model', '?')} · task {p.get('task', '?')} · metric {graph.metric}",
    )
