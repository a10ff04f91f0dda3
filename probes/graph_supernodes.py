"""Supernodes: groups of attribution-graph nodes that a reader names and draws as one node.

A researcher reading an attribution graph groups nodes that do one job ("say Mary", "John
in context") into a *supernode* with a label, as in Neuronpedia's graph view and the Circuit
Tracing paper's figures. `merge_supernodes(graph, supernodes)` returns the `MergedGraph`: every
supernode becomes one node whose edges are the sums of its members' edges (edge from a supernode
to node t = the sum over its members m of `adjacency[t, m]`; into it, the sum over members of
their incoming edges; between two supernodes, the sum over both member sets). The edges among the
members of one supernode are internal: they are left out of the merged adjacency
(`MergedGraph.internal` keeps their sum). Every other node stays as it is. On disk, the
supernodes go into circuit-tracer's / Neuronpedia's graph file as `qParams.supernodes`
(`lenslab.probes.graph_files.graph_file(..., supernodes=)`).

- `Supernode`: a label and its member node labels (lenslab's, `L1F37@5`, `MLP1.err@5`, ...).
- `parse_supernode("LABEL=NODE,NODE")`: the CLI's spelling.
- `check_supernodes(graph, supernodes)`: normalised, checked against the graph's nodes.
- `add_supernode(graph, supernodes, label, members)`: the list with one more (the app's button).
- `merge_supernodes(graph, supernodes)` -> `MergedGraph`: merged nodes, adjacency, `table()`,
  `figure()` (the graph's figure with each supernode drawn as one node) and `to_json()` (the
  graph's JSON with the supernodes in its provenance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.attribution_graph import AttributionGraph, add_edge_traces, node_positions

__all__ = [
    "MergedGraph",
    "Supernode",
    "add_supernode",
    "check_supernodes",
    "merge_supernodes",
    "parse_supernode",
]


@dataclass(frozen=True)
class Supernode:
    """A labelled group of attribution-graph nodes (`members`: lenslab node labels, in order)."""

    label: str
    members: tuple[str, ...]

    def as_list(self) -> list[str]:
        """Neuronpedia's form, `[label, member, member, ...]` (here with lenslab labels)."""
        return [self.label, *self.members]


def parse_supernode(text: str) -> Supernode:
    """`"LABEL=NODE,NODE,..."` -> `Supernode` (the CLI's `--supernode`; spaces around names are dropped).

    >>> parse_supernode("say Mary=L3F12@14, L2F7@14")
    Supernode(label='say Mary', members=('L3F12@14', 'L2F7@14'))
    """
    label, sep, rest = str(text).partition("=")
    if not sep:
        raise LenslabError(
            f"a supernode is written LABEL=NODE,NODE (for example 'say Mary=L3F12@14,L2F7@14'), got {text!r}"
        )
    return Supernode(label.strip(), tuple(m.strip() for m in rest.split(",") if m.strip()))


def _one(item) -> Supernode:
    if isinstance(item, Supernode):
        return item
    if isinstance(item, str):
        return parse_supernode(item)
    if isinstance(item, (list, tuple)) and len(item) == 2 and not isinstance(item[1], str):
        return Supernode(str(item[0]), tuple(str(m) for m in item[1]))  # (label, members)
    if isinstance(item, (list, tuple)) and item and all(isinstance(x, str) for x in item):
        return Supernode(item[0], tuple(item[1:]))  # Neuronpedia's [label, member, ...]
    raise LenslabError(
        f"a supernode is a Supernode, 'LABEL=NODE,NODE', (label, [nodes]) or [label, node, node], got {item!r}"
    )


def check_supernodes(graph: AttributionGraph, supernodes: Iterable) -> list[Supernode]:
    """`supernodes` as `Supernode`s, checked against `graph`: each has a non-empty label of its own
    (not another supernode's, not a node's), at least two distinct members, all nodes of `graph`,
    and no node is in two supernodes. Raises a `LenslabError` naming the problem otherwise."""
    out: list[Supernode] = []
    known = set(graph.nodes)
    owner: dict[str, str] = {}
    for sn in map(_one, supernodes or ()):
        label = sn.label.strip()
        if not label:
            raise LenslabError(f"a supernode needs a label: got an empty one for nodes {list(sn.members)}")
        if label in known:
            raise LenslabError(f"supernode label {label!r} is the name of a node of the graph: pick another label")
        if any(label == o.label for o in out):
            raise LenslabError(f"two supernodes are labelled {label!r}: each needs its own label")
        if len(set(sn.members)) != len(sn.members):
            raise LenslabError(f"supernode {label!r} names a node twice: {list(sn.members)}")
        if len(sn.members) < 2:
            raise LenslabError(f"supernode {label!r} needs at least two nodes to group, got {list(sn.members)}")
        for m in sn.members:
            if m not in known:
                raise LenslabError(
                    f"supernode {label!r}: {m!r} is not a node of this graph{did_you_mean(m, graph.nodes)}"
                    " (pruning may have dropped it)"
                )
            if m in owner:
                raise LenslabError(f"node {m!r} is in two supernodes ({owner[m]!r} and {label!r}): a node joins one")
            owner[m] = label
        out.append(Supernode(label, tuple(sn.members)))
    return out


def add_supernode(graph: AttributionGraph, supernodes: Iterable, label: str, members: Sequence[str]) -> list[Supernode]:
    """`supernodes` plus the supernode `label` grouping `members`, all checked against `graph`
    (`check_supernodes`): the app's "group the pinned nodes" button."""
    return check_supernodes(graph, [*supernodes, Supernode(str(label).strip(), tuple(members))])


@dataclass(frozen=True, eq=False)
class MergedGraph:
    """An attribution graph with its supernodes merged (`merge_supernodes`).

    Attributes:
        graph: the graph merged (as given: usually pruned); supernodes: the checked supernodes.
        nodes: the merged nodes, in the graph's order (a supernode where its first member was):
            a supernode's label, or the node's own label.
        members: per merged node, the graph's nodes it stands for (one for an ordinary node).
        adjacency: `[len(nodes), len(nodes)]`, `adjacency[target, source]` = the sum of the graph's
            edges from the source's members to the target's members; 0 on the diagonal.
        internal: per supernode, the sum of the edges among its own members (left out of `adjacency`).
    """

    graph: AttributionGraph
    supernodes: tuple[Supernode, ...]
    nodes: list[str]
    members: list[tuple[str, ...]]
    adjacency: Tensor
    internal: dict[str, float]

    def is_supernode(self, i: int) -> bool:
        return self.nodes[i] in self.internal

    def table(self, what: str = "nodes"):
        """`what="nodes"`: one row per merged node (`node`, `kind`, `members`, `activation`: the
        sum of the members', `influence`: the sum of the members' influence in the graph);
        `what="edges"`: one row per nonzero merged edge (`source`, `target`, `weight`), strongest first."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        if what == "edges":
            tgt, src = self.adjacency.nonzero(as_tuple=True)
            w = self.adjacency[tgt, src]
            order = w.abs().argsort(descending=True)
            return pd.DataFrame(
                {
                    "source": [self.nodes[int(src[i])] for i in order],
                    "target": [self.nodes[int(tgt[i])] for i in order],
                    "weight": [float(w[i]) for i in order],
                }
            )
        if what != "nodes":
            raise LenslabError(f"table() shows 'nodes' or 'edges', got {what!r}")
        index = {x: i for i, x in enumerate(self.graph.nodes)}
        infl = self.graph.node_influence()
        kinds = [n.kind for n in self.graph.parsed]
        return pd.DataFrame(
            {
                "node": self.nodes,
                "kind": [
                    "supernode" if self.is_supernode(i) else kinds[index[m[0]]] for i, m in enumerate(self.members)
                ],
                "members": [", ".join(m) for m in self.members],
                "activation": [sum(float(self.graph.activations[index[x]]) for x in m) for m in self.members],
                "influence": [sum(float(infl[index[x]]) for x in m) for m in self.members],
            }
        )

    def to_dict(self) -> dict:
        """The graph's `to_dict`, with the supernodes (`[label, member, ...]` lists) in its provenance."""
        d = self.graph.to_dict()
        if self.supernodes:
            d["provenance"] = dict(d["provenance"], supernodes=[s.as_list() for s in self.supernodes])
        return d

    def to_json(self, path=None) -> str:
        """`to_dict` as the graph's JSON (`AttributionGraph.from_json` reads it back; the supernodes
        ride in `provenance["supernodes"]`)."""
        g = dataclasses.replace(self.graph, provenance=self.to_dict()["provenance"])
        return g.to_json(path)

    def figure(self, max_edges: int = 300):
        """The graph's figure (`AttributionGraph.figure`: nodes by position and layer, the
        `max_edges` strongest edges, width by |weight|, red positive, blue negative), with each
        supernode drawn as one labelled diamond at the mean place of its members and its summed
        edges. Without supernodes, the graph's own figure."""
        if not self.supernodes:
            return self.graph.figure(max_edges=max_edges)
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        g = self.graph
        place = dict(zip(g.nodes, node_positions(g)))
        xy = [(sum(place[m][0] for m in ms) / len(ms), sum(place[m][1] for m in ms) / len(ms)) for ms in self.members]
        colors = {"feature": "#3b6ea8", "error": "#999999", "token": "#31a354", "logit": "#e6550d", "target": "#e6550d"}
        kinds = {x: n.kind for x, n in zip(g.nodes, g.parsed)}
        fig = go.Figure()
        add_edge_traces(fig, self.adjacency, xy, max_edges)
        table = self.table("nodes")
        plain = [i for i in range(len(self.nodes)) if not self.is_supernode(i)]
        sup = [i for i in range(len(self.nodes)) if self.is_supernode(i)]
        hover = [
            f"{n} act={a:.3g} infl={f:.3g}" for n, a, f in zip(table["node"], table["activation"], table["influence"])
        ]
        fig.add_trace(
            go.Scatter(
                x=[xy[i][0] for i in plain],
                y=[xy[i][1] for i in plain],
                mode="markers",
                marker=dict(size=9, color=[colors[kinds[self.members[i][0]]] for i in plain]),
                text=[hover[i] for i in plain],
                hoverinfo="text",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[xy[i][0] for i in sup],
                y=[xy[i][1] for i in sup],
                mode="markers+text",
                marker=dict(size=16, symbol="diamond", color="#756bb1", line=dict(color="white", width=1)),
                text=[self.nodes[i] for i in sup],
                textposition="top center",
                hovertext=[f"supernode {hover[i]}: {', '.join(self.members[i])}" for i in sup],
                hoverinfo="text",
                name="supernodes",
                showlegend=False,
            )
        )
        fig.update_layout(
            xaxis=dict(tickmode="array", tickvals=list(range(len(g.str_tokens))), ticktext=g.str_tokens),
            yaxis=dict(
                tickmode="array",
                tickvals=[-1, *range(g.n_layers), g.n_layers],
                ticktext=["embed", *[labels.layer(i) for i in range(g.n_layers)], "targets"],
            ),
            height=520,
            width=max(600, 90 * len(g.str_tokens)),
        )
        title = (
            f"attribution graph · model {g.provenance.get('model', '?')} · {len(g.nodes)} nodes, "
            f"{len(self.supernodes)} supernode{'s' if len(self.supernodes) != 1 else ''}: {len(self.nodes)} drawn"
        )
        return figures.style(
            fig, f"{title} · replacement {g.replacement_score:.3f} · completeness {g.completeness_score:.3f}"
        )


def merge_supernodes(graph: AttributionGraph, supernodes: Iterable = ()) -> MergedGraph:
    """`graph` with each supernode merged into one node (see the module's docstring): its edges are
    the sums of its members' edges, the edges among its own members are left out (kept in
    `internal`), every other node and edge is the graph's. `supernodes`: `Supernode`s,
    `"LABEL=NODE,NODE"` strings, `(label, [nodes])` pairs or `[label, node, ...]` lists.

    >>> import torch
    >>> from lenslab.probes.attribution_graph import AttributionGraph
    >>> a = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0.5, 0, 0, 0], [1.0, 2.0, 3.0, 0]])
    >>> g = AttributionGraph(nodes=["L0F1@0", "L0F2@0", "L1F3@0", "logit5@0"], adjacency=a,
    ...     activations=torch.ones(4), inputs=torch.zeros(4), biases=torch.zeros(4),
    ...     target_weights=torch.ones(1), tokens=[5], str_tokens=["a"], n_layers=2)
    >>> m = merge_supernodes(g, ["pair=L0F1@0,L1F3@0"])
    >>> m.nodes, m.adjacency[-1].tolist(), m.internal
    (['pair', 'L0F2@0', 'logit5@0'], [4.0, 2.0, 0.0], {'pair': 0.5})
    """
    if not isinstance(graph, AttributionGraph):
        raise LenslabError(f"merge_supernodes needs an AttributionGraph, got {type(graph).__name__}")
    sns = check_supernodes(graph, supernodes)
    index = {x: i for i, x in enumerate(graph.nodes)}
    owner = {m: s for s in sns for m in s.members}
    nodes, members = [], []
    for x in graph.nodes:  # a supernode takes the place of its first member in the graph's order
        s = owner.get(x)
        if s is None:
            nodes.append(x)
            members.append((x,))
        elif s.label not in nodes:
            nodes.append(s.label)
            members.append(s.members)
    membership = torch.zeros(len(nodes), len(graph.nodes))
    for i, ms in enumerate(members):
        membership[i, [index[m] for m in ms]] = 1.0
    a = graph.adjacency.float()
    merged = membership @ a @ membership.T
    internal = {}
    for i, x in enumerate(nodes):
        if len(members[i]) > 1:
            internal[x] = float(merged[i, i])
            merged[i, i] = 0.0
    return MergedGraph(
        graph=graph, supernodes=tuple(sns), nodes=nodes, members=members, adjacency=merged, internal=internal
    )
