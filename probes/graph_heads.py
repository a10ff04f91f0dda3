"""Attribution-graph edges resolved by attention head: which heads carry each edge.

**What is split.** An edge of `lenslab.probes.attribution_graph` is a direct effect through the
frozen replacement model, whose direct paths are linear: the residual stream, the transcoders'
skip paths (if any) and each head's OV circuit under its frozen pattern (norm denominators
frozen too; features and errors are stop-gradients, so no transcoder nonlinearity is on a
path). Each path either crosses no head (the *residual* term: same position only) or has a
*last* head, the head that delivers it into the target's position stream. So

    edge = residual + sum over heads (l, h) of via_head[l, h]

exactly (to float error), where `via_head[l, h]` collects every path whose last head is (l, h),
multi-hop paths included: a path through L0H2 and then L1H0 counts for L1H0, the head that
writes it where the target reads. We attribute to the last head because it is the one the
target's position reads from (the name mover of IOI, the induction head of induction); a path's
earlier heads are shown by `one_hop`: the part of `via_head[l, h]` that crosses no earlier head
(head (l, h)'s own OV alone); `via_head - one_hop` went through earlier heads first. Head pairs
would need a term per pair (n_heads² per layer pair) and are left out.

**Checked by intervention.** `via_head[l, h]` equals the edge's drop when head (l, h)'s OV is
switched off in the frozen model whose attention layers after l are off; `one_hop[l, h]` is the
edge with only head (l, h) on minus the edge with no head on; `residual` is the edge with every
head off (tests/probes/test_graph_heads.py). Everything is computed in one batched backward per
few targets, with one batch element per head (`FrozenReplacement.head_rows`).

**Not here (yet).** The QK view (which earlier features set the patterns an edge used) is not
computed: the patterns are frozen constants of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.probes.attribution_graph import (
    FINAL_HOOK,
    AttributionGraph,
    FrozenReplacement,
    Target,
    feature_target,
    make_targets,
    resolve_transcoders,
)
from lenslab.results import Result, provenance

__all__ = ["RESIDUAL", "HeadEdges", "head_edges"]

RESIDUAL = "residual"  # the path label of the attention-free part of an edge


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadEdges(Result):
    """Edges of an attribution graph split by the attention head each path crosses last.

    Attributes:
        sources / targets: the edges' node labels (strongest first).
        weights: `[E]` each edge's weight in the graph.
        residual: `[E]` the part through no head (the residual stream and skip paths).
        heads: head labels (`L1H0`), layer-major. via_head: `[E, n_heads_total]` the part whose
            last head is that head; `weights = residual + via_head.sum(1)`.
        one_hop: `[E, n_heads_total]` the part of `via_head` that crosses no earlier head, or None.
        str_tokens: the prompt. provenance: model, options, versions.
    """

    sources: list[str]
    targets: list[str]
    weights: Tensor
    residual: Tensor
    heads: list[str]
    via_head: Tensor
    one_hop: Tensor | None = None
    str_tokens: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    KIND = "HeadEdges"

    def _index(self, source: str, target: str) -> int:
        for i, (s, t) in enumerate(zip(self.sources, self.targets)):
            if s == source and t == target:
                return i
        raise LenslabError(f"no edge {source} -> {target} in these head edges (max_edges may have left it out)")

    def edge(self, source: str, target: str) -> dict[str, float]:
        """One edge's split: `{"residual": .., "L0H0": .., ...}` (sums to the edge's weight)."""
        i = self._index(source, target)
        return {RESIDUAL: float(self.residual[i]), **dict(zip(self.heads, self.via_head[i].tolist()))}

    def head_totals(self, target: str | None = None, top_edges: int | None = None) -> dict[str, float]:
        """Per head, the sum of its parts over the edges into `target` (default: every edge), or
        over the `top_edges` strongest of them; strongest |total| first, `residual` included.
        Over all sources of a target in an unpruned graph this is each head's direct effect on it."""
        idx = [i for i, t in enumerate(self.targets) if target is None or t == target]
        if not idx:
            raise LenslabError(f"no edge into {target!r}; targets here: {sorted(set(self.targets))[:8]}")
        idx = sorted(idx, key=lambda i: -abs(float(self.weights[i])))[: top_edges or len(idx)]
        tot = {h: float(v) for h, v in zip(self.heads, self.via_head[idx].sum(0).tolist())}
        tot[RESIDUAL] = float(self.residual[idx].sum())
        return dict(sorted(tot.items(), key=lambda kv: -abs(kv[1])))

    def to_dict(self) -> dict:
        f = lambda t: t.detach().cpu().float().tolist()
        return {
            "kind": self.KIND,
            "sources": list(self.sources),
            "targets": list(self.targets),
            "weights": f(self.weights),
            "residual": f(self.residual),
            "heads": list(self.heads),
            "via_head": f(self.via_head),
            "one_hop": f(self.one_hop) if self.one_hop is not None else None,
            "str_tokens": list(self.str_tokens),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HeadEdges:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        t = lambda x: torch.tensor(x, dtype=torch.float32).reshape(len(d["sources"]), len(d["heads"]))
        return cls(
            sources=list(d["sources"]),
            targets=list(d["targets"]),
            weights=torch.tensor(d["weights"], dtype=torch.float32),
            residual=torch.tensor(d["residual"], dtype=torch.float32),
            heads=list(d["heads"]),
            via_head=t(d["via_head"]),
            one_hop=t(d["one_hop"]) if d.get("one_hop") is not None else None,
            str_tokens=list(d.get("str_tokens", [])),
            provenance=dict(d.get("provenance", {})),
        )

    def table(self, top: int = 3):
        """One row per edge and path: the residual part (where nonzero) and the `top` heads by
        |part|, with the part, its share of the edge and (where computed) its one-hop part."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        rows = []
        for i, (s, t) in enumerate(zip(self.sources, self.targets)):
            w = float(self.weights[i])
            share = lambda x, w=w: x / w if w else float("nan")
            base = {"source": s, "target": t, "weight": w}
            if float(self.residual[i]) != 0:
                r = float(self.residual[i])
                rows.append({**base, "path": RESIDUAL, "part": r, "share": share(r), "one_hop": r})
            order = self.via_head[i].abs().argsort(descending=True)[:top].tolist()
            for k in order:
                x = float(self.via_head[i, k])
                if x == 0:
                    continue
                one = float(self.one_hop[i, k]) if self.one_hop is not None else float("nan")
                rows.append({**base, "path": self.heads[k], "part": x, "share": share(x), "one_hop": one})
        cols = ["source", "target", "weight", "path", "part", "share", "one_hop"]
        return pd.DataFrame(rows, columns=cols)

    def figure(self, max_edges: int = 30):
        """Heatmap: the `max_edges` strongest edges (rows) by path (residual, then each head);
        colour: the part's share of its edge."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        k = min(max_edges, len(self.sources))
        parts = torch.cat([self.residual[:k, None], self.via_head[:k]], 1)
        w = self.weights[:k, None]
        share = torch.where(w != 0, parts / w.where(w != 0, torch.ones_like(w)), torch.zeros_like(parts))
        ylab = [f"{s} → {t} ({float(x):+.3g})" for s, t, x in zip(self.sources[:k], self.targets[:k], self.weights)]
        fig = go.Figure(
            go.Heatmap(
                z=share.tolist(),
                x=[RESIDUAL, *self.heads],
                y=ylab,
                customdata=parts.tolist(),
                hovertemplate="%{y}<br>%{x}: %{customdata:.4g} (share %{z:.2f})<extra></extra>",
                colorscale="RdBu",
                reversescale=True,
                zmid=0,
                colorbar=dict(title="share"),
            )
        )
        fig.update_layout(yaxis=dict(autorange="reversed"), height=max(320, 22 * k + 120))
        return figures.style(fig, f"graph edges by attention head · model {self.provenance.get('model', '?')}")


# --- building -------------------------------------------------------------------------------------
def _node_targets(model, frozen, tc, nodes: list[str], targets) -> dict[str, Target]:
    """The `Target` of each node label with an input (feature, logit, target)."""
    W_U = model.W_U.detach().float()
    out, need_dirs = {}, []
    for node in nodes:
        n = labels.parse(node)
        if n.kind == "feature":
            out[node] = feature_target(tc, n.layer, n.pos, n.index)
        elif n.kind == "logit":
            out[node] = Target(node, FINAL_HOOK, n.pos, W_U[:, n.index] - W_U.mean(-1))
        elif n.kind == "target":
            need_dirs.append(node)
        else:
            raise LenslabError(f"node {node!r} has no input: it cannot be an edge's target")
    if need_dirs:
        if targets is None:
            raise LenslabError(
                f"the graph has direction targets ({need_dirs[0]}): pass the targets it was built with "
                "(the Task or the directions) as targets="
            )
        made = {t.label: t for t in make_targets(model, frozen, targets)[0]}
        missing = [n for n in need_dirs if n not in made]
        if missing:
            raise LenslabError(f"targets= does not give the graph's target node(s) {missing}: pass the same targets")
        out.update({n: made[n] for n in need_dirs})
    return out


def _source_part(part: dict, i: int, node: str, error_layers: list[int]) -> Tensor:
    """Row `i`'s entries for source `node` (the head axis, if any, kept)."""
    n = labels.parse(node)
    if n.kind == "feature":
        return part["features"][n.layer][i, ..., n.pos, n.index]
    if n.kind == "error":
        return part["errors"][i, ..., error_layers.index(n.layer), n.pos]
    if n.kind == "token":
        return part["tokens"][i, ..., n.pos]
    raise LenslabError(f"node {node!r} is not a source (feature, error or token)")


def head_edges(
    model,
    graph: AttributionGraph,
    transcoders=None,
    *,
    targets=None,
    into: str | list[str] | None = None,
    max_edges: int | None = 500,
    one_hop: bool = True,
    batch_size: int = 4,
    atol: float = 1e-3,
) -> HeadEdges:
    """Split the edges of `graph` (built on `model` with `transcoders`; `None` for an attention-only
    model) by the attention head each path crosses last: `weight = residual + Σ_heads via_head`.

    `into`: only the edges into these target nodes (labels; default: every edge). `max_edges`: the
    strongest edges by |weight| (None: all nonzero edges; prune the graph first for big ones). `targets`: the graph's targets when they are directions or a Task (target nodes
    `target{k}@{pos}`), as given to `attribution_graph`. `one_hop`: also each head's one-hop part.
    `batch_size`: target nodes per backward pass (each is `1 + 2·n_layers·n_heads` batch elements).
    `atol`: the recomputed edges must match the graph's within this (else the graph was built on
    another model, prompt or transcoders: a `LenslabError`).

    >>> import lenslab
    >>> from lenslab.probes import attribution_graph as ag
    >>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
    >>> g = ag.attribution_graph(model, "t5 t9 t2 t7 t5", None, targets=["t9"])
    >>> h = head_edges(model, g)
    >>> h.sources[0], h.targets[0], next(iter(h.head_totals(h.targets[0], top_edges=1)))
    ('embed@2', 'logit13@5', 'L1H0')
    """
    tc = resolve_transcoders(model, transcoders)
    if getattr(model.cfg, "parallel_attn_mlp", False):
        raise LenslabError("head_edges needs sequential blocks: this model runs attention and MLP in parallel")
    if graph.n_layers != int(model.cfg.n_layers):
        raise LenslabError(f"the graph has {graph.n_layers} layers but the model has {model.cfg.n_layers}")
    if max_edges is not None and int(max_edges) < 1:
        raise LenslabError(f"max_edges must be >= 1 or None, got {max_edges}")
    frozen = FrozenReplacement(model, torch.tensor(graph.tokens), tc)
    adj = graph.adjacency
    if into is not None:
        into = [into] if isinstance(into, str) else list(into)
        unknown = [n for n in into if n not in graph.nodes]
        if unknown:
            raise LenslabError(f"into= names node(s) {unknown} not in the graph; its targets: {graph.nodes[-3:]}")
        keep = torch.zeros(len(graph.nodes), dtype=torch.bool)
        keep[[graph.nodes.index(n) for n in into]] = True
        adj = adj * keep[:, None]
    tgt, src = adj.nonzero(as_tuple=True)
    if not len(tgt):
        raise LenslabError("the attribution graph has no edges (into those nodes): nothing to split by head")
    w = adj[tgt, src]
    order = w.abs().argsort(descending=True, stable=True)[: None if max_edges is None else int(max_edges)]
    edges = [(int(tgt[i]), int(src[i])) for i in order.tolist()]
    row_nodes = sorted({t for t, _ in edges})
    tmap = _node_targets(model, frozen, tc, [graph.nodes[t] for t in row_nodes], targets)
    H = frozen.n_layers * frozen.n_heads
    residual, via, hop = torch.zeros(len(edges)), torch.zeros(len(edges), H), torch.zeros(len(edges), H)
    by_row: dict[int, list[int]] = {}
    for e, (t, _) in enumerate(edges):
        by_row.setdefault(t, []).append(e)
    for b in range(0, len(row_nodes), batch_size):
        chunk = row_nodes[b : b + batch_size]
        r = frozen.head_rows([tmap[graph.nodes[t]] for t in chunk], one_hop=one_hop)
        for i, t in enumerate(chunk):
            for e in by_row[t]:
                node = graph.nodes[edges[e][1]]
                residual[e] = _source_part(r["residual"], i, node, frozen.error_layers).float().cpu()
                via[e] = _source_part(r["heads"], i, node, frozen.error_layers).float().cpu()
                if one_hop:
                    hop[e] = _source_part(r["one_hop"], i, node, frozen.error_layers).float().cpu()
    weights = torch.stack([graph.adjacency[t, s] for t, s in edges]).float()
    err = (residual + via.sum(1) - weights).abs()
    if float(err.max()) > atol * max(1.0, float(weights.abs().max())):
        e = int(err.argmax())
        raise LenslabError(
            f"edge {graph.nodes[edges[e][1]]} -> {graph.nodes[edges[e][0]]}: the graph says {float(weights[e]):.6g}, "
            f"recomputed {float(residual[e] + via[e].sum()):.6g}: was the graph built on this model, prompt and "
            "transcoders?"
        )
    return HeadEdges(
        sources=[graph.nodes[s] for _, s in edges],
        targets=[graph.nodes[t] for t, _ in edges],
        weights=weights,
        residual=residual,
        heads=[labels.head(l, h) for l in range(frozen.n_layers) for h in range(frozen.n_heads)],
        via_head=via,
        one_hop=hop if one_hop else None,
        str_tokens=list(graph.str_tokens),
        provenance=provenance(
            model,
            method="head_edges",
            transcoders=tc.kind if tc is not None else None,
            n_edges=len(edges),
            max_edges=max_edges,
            into=into,
            one_hop=one_hop,
            attribution="last head",
            max_sum_error=float(err.max()),
        ),
    )
