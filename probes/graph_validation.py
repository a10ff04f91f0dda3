"""Validating an attribution graph by intervention: ablate its feature nodes in the real model and
compare how the targets move against ablating random features of the same number.

A graph claims that its feature nodes carry the computation of its targets. `ablate_graph` tests
that claim on the unfrozen model (attention and norms recomputed, unlike the frozen replacement the
graph was computed on): every transcoder feature is read from the live MLP input, and the MLP
output of each layer is shifted by what the ablated features wrote there,
`out + tc.output(layer, ablated) - tc.output(layer, feats)` (so the transcoders' error is kept:
without ablation the model is unchanged, exactly). The same is done for `n_random` sets of active
features that are not in the graph, each as large as the graph's set.

>>> import lenslab
>>> from lenslab.probes import attribution_graph as ag
>>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
>>> g = ag.prune(ag.attribution_graph(model, "When Mary and John went to the store, John gave a drink to",
...                                   "zoo/ioi-4l/per-layer", max_feature_nodes=48))
>>> res = ablate_graph(model, g, "zoo/ioi-4l/per-layer", n_random=4)
>>> res.graph_effect() > res.random_effect()[0]
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import labels
from lenslab._errors import LenslabError
from lenslab.probes.attribution_graph import AttributionGraph
from lenslab.probes.transcoders import check_transcoders, load_transcoders
from lenslab.results import Result, provenance
from lenslab.toolbox import model_device

__all__ = ["GraphAblation", "ablate_graph", "ablation_hooks"]


@dataclass
class GraphAblation(Result):
    """Target values after ablating a graph's feature nodes, and after ablating random features.

    Attributes:
        targets: the graph's logit-node labels (`logit117@9`).
        weights: their weights in the graph (probabilities), `[k]`.
        clean: each target's value without ablation: its logit minus the mean logit at its
            position, `[k]` (the direction circuit-tracer's logit nodes read).
        graph: the same after zeroing every feature node of the graph, `[k]`.
        random: the same after zeroing each of `n_random` random sets of active features outside
            the graph, each the size of the graph's set, `[n_random, k]`.
        n_features: how many features each ablation zeroes.
    """

    targets: list[str]
    weights: Tensor
    clean: Tensor
    graph: Tensor
    random: Tensor
    n_features: int
    provenance: dict = field(default_factory=dict)
    KIND = "GraphAblation"

    def _effect(self, values: Tensor) -> Tensor:
        w = self.weights / self.weights.sum()
        return ((self.clean - values) * w).sum(-1)

    def graph_effect(self) -> float:
        """The weighted drop of the targets when the graph's features are ablated."""
        return float(self._effect(self.graph))

    def random_effect(self) -> tuple[float, float]:
        """Mean and standard deviation of the weighted drop over the random ablations."""
        e = self._effect(self.random)
        return float(e.mean()), float(e.std()) if len(e) > 1 else 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "targets": list(self.targets),
            "weights": self.weights.tolist(),
            "clean": self.clean.tolist(),
            "graph": self.graph.tolist(),
            "random": self.random.tolist(),
            "n_features": self.n_features,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GraphAblation:
        k = len(d["targets"])
        return cls(
            targets=list(d["targets"]),
            weights=torch.tensor(d["weights"]),
            clean=torch.tensor(d["clean"]),
            graph=torch.tensor(d["graph"]),
            random=torch.tensor(d["random"]).reshape(-1, k),
            n_features=int(d["n_features"]),
            provenance=d.get("provenance", {}),
        )

    def table(self):
        import pandas as pd  # deferred: pandas is only needed to render

        return pd.DataFrame(
            {
                "target": self.targets,
                "weight": self.weights.tolist(),
                "clean": self.clean.tolist(),
                "graph ablated": self.graph.tolist(),
                "random ablated (mean)": self.random.mean(0).tolist(),
                "random ablated (std)": (self.random.std(0) if len(self.random) > 1 else 0 * self.clean).tolist(),
            }
        )

    def figure(self):
        import plotly.graph_objects as go  # deferred: plotly is only needed to draw

        fig = go.Figure()
        fig.add_bar(x=self.targets, y=(self.clean - self.graph).tolist(), name="graph's features ablated")
        fig.add_bar(
            x=self.targets,
            y=(self.clean - self.random.mean(0)).tolist(),
            error_y={
                "type": "data",
                "array": (self.random.std(0) if len(self.random) > 1 else 0 * self.clean).tolist(),
            },
            name=f"random features ablated (mean of {len(self.random)})",
        )
        fig.update_layout(
            title=f"Drop of each target when {self.n_features} features are ablated",
            yaxis_title="clean - ablated (logit - mean logit)",
            barmode="group",
        )
        return fig


def ablation_hooks(tc, ablate: dict[int, list[tuple[int, int]]], n_layers: int) -> list[tuple[str, object]]:
    """TransformerLens hooks that zero transcoder features in the live model.

    `ablate`: layer -> [(pos, feature), ...]. Features are read at `tc.input_hook` of each
    transcoder layer; at `tc.output_hook` of every layer the MLP output gets
    `tc.output(layer, ablated) - tc.output(layer, feats)` (`[batch, pos, d_model]`; a cross-layer
    transcoder's earlier features write to later layers too).
    """
    xs: dict[int, Tensor] = {}
    feats: dict[int, Tensor] = {}
    cut: dict[int, Tensor] = {}
    hooks = []
    for layer in tc.layers:

        def read(act, hook=None, layer=layer):
            x = act.float()
            xs[layer] = x
            f = tc.features(layer, x)
            feats[layer] = f
            g = f.clone()
            for pos, feature in ablate.get(layer, []):
                g[:, pos, feature] = 0.0
            cut[layer] = g

        hooks.append((tc.input_hook.format(l=layer), read))
    for layer in range(n_layers):
        if layer not in tc.layers:
            continue

        def write(act, hook=None, layer=layer):
            before = {k: v for k, v in feats.items() if k <= layer}
            after = {k: v for k, v in cut.items() if k <= layer}
            delta = tc.output(layer, after, xs) - tc.output(layer, before, xs)
            return act + delta.to(act.dtype)

        hooks.append((tc.output_hook.format(l=layer), write))
    return hooks


def ablate_graph(model, graph: AttributionGraph, transcoders, *, n_random: int = 20, seed: int = 0) -> GraphAblation:
    """Ablate `graph`'s feature nodes in `model` (unfrozen) and `n_random` random same-size sets of
    the prompt's other active features; each target's logit minus the mean logit, before and after.

    `graph`: an `AttributionGraph` whose targets are logit nodes (salient logits or explicit
    tokens), usually pruned; `transcoders`: the ones it was computed with (a set or a name).
    """
    tc = load_transcoders(transcoders) if isinstance(transcoders, str) else transcoders
    check_transcoders(model, tc)
    parsed = graph.parsed
    targets = [(i, n) for i, n in enumerate(parsed) if n.kind in ("logit", "target")]
    if any(n.kind == "target" for _, n in targets):
        raise LenslabError(
            "ablate_graph reads logit targets; this graph's targets are directions (a Task or vectors): "
            "compute the graph with targets=None (salient logits) or explicit tokens to validate it"
        )
    chosen = sorted({(n.layer, n.pos, n.index) for n in parsed if n.kind == "feature"})
    if not chosen:
        raise LenslabError("the graph has no feature nodes to ablate (prune less, or raise max_feature_nodes)")
    if n_random < 0:
        raise LenslabError(f"n_random must be >= 0, got {n_random}")
    n_layers = int(model.cfg.n_layers)
    tokens = torch.tensor([graph.tokens], device=model_device(model))
    clean_act: dict[int, Tensor] = {}
    reads = [
        (tc.input_hook.format(l=layer), lambda act, hook=None, layer=layer: clean_act.__setitem__(layer, act.float()))
        for layer in tc.layers
    ]

    def values(logits: Tensor) -> Tensor:
        rows = logits[0].float()
        return torch.tensor([float(rows[n.pos, n.index] - rows[n.pos].mean()) for _, n in targets])

    def run(ablate: list[tuple[int, int, int]]) -> Tensor:
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, pos, feature in ablate:
            by_layer.setdefault(layer, []).append((pos, feature))
        with torch.no_grad():
            return values(model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(tc, by_layer, n_layers)))

    with torch.no_grad():
        clean = values(model.run_with_hooks(tokens, fwd_hooks=reads))
        active = []
        for layer in tc.layers:
            f = tc.features(layer, clean_act[layer])[0]
            active += [(layer, p, i) for p, i in (f != 0).nonzero().tolist()]
    missing = sorted(set(chosen) - set(active))
    if missing:
        layer, pos, feature = missing[0]
        raise LenslabError(
            f"feature {labels.feature(layer, feature, pos)} of the graph is not active on its prompt in these "
            "transcoders: pass the transcoders the graph was computed with"
        )
    others = sorted(set(active) - set(chosen))
    if n_random and len(others) < len(chosen):
        raise LenslabError(
            f"only {len(others)} active features lie outside the graph's {len(chosen)}: too few for random "
            "ablations of the same size (prune harder, or n_random=0)"
        )
    gen = torch.Generator().manual_seed(seed)
    random = [
        run([others[j] for j in torch.randperm(len(others), generator=gen)[: len(chosen)].tolist()])
        for _ in range(n_random)
    ]
    k = len(targets)
    return GraphAblation(
        targets=[graph.nodes[i] for i, _ in targets],
        weights=graph.target_weights.float().reshape(k).clone(),
        clean=clean,
        graph=run(chosen),
        random=torch.stack(random) if random else torch.zeros(0, k),
        n_features=len(chosen),
        provenance=provenance(
            model,
            transcoders=transcoders if isinstance(transcoders, str) else graph.provenance.get("transcoders"),
            n_random=n_random,
            seed=seed,
            graph_pruned=graph.pruned,
        ),
    )
