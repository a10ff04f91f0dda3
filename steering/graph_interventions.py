"""Interventions from attribution-graph nodes: ablate, clamp or steer transcoder features.

An attribution graph (`lenslab.probes.attribution_graph`) names its feature nodes `L1F37@5`:
transcoder feature 37 of layer 1 at position 5. `node_intervention` turns one such node, or a
group of them (a *supernode*, with a name), into an ordinary `Intervention`, so `apply`,
`generate` / `stream` (side-by-side generation), presets and the app's pages take it like any
other; `intervention_effect` measures the next-token logits before and after
(`NodeIntervention`).

A transcoder reads the MLP's input (`blocks.{l}.ln2.hook_normalized`) and writes its output
(`blocks.{l}.hook_mlp_out`; a cross-layer transcoder's layer-`l` features write to every later
layer's too). The edits act on the live model the way `lenslab.probes.graph_validation` ablates a
graph's features (tested equal to its `ablation_hooks`): the feature's activation `a` is read from
the live MLP input with the transcoder's own encoder, and each MLP output it writes is shifted by
what the change of `a` writes there, so the transcoders' error is kept and everything else the
model computes (attention, norms, the other features) is recomputed downstream.

| mode | edit at the MLP output(s) | the feature's activation |
|---|---|---|
| `ablate` | `feature` edit, target 0 (`+ (0 - a) * W_dec[f]`) | 0 |
| `clamp`, `value=c` | `feature` edit, target c | c |
| `clamp`, `factor=m` | `feature` edit, target `m × a_graph` (the node's activation in the graph) | `m × a_graph` |
| `steer`, `value=v` | `add` edit, `v * W_dec[f]` | `a + v` (not recomputed: a pure add) |

Each edit acts at the node's own position (`positions="node"`, the default) or at the positions
named (`"all"`, `"last"`, `"prompt"`, `"generated"` or indices: see `Edit`); "all" keeps steering
every generated token. Only feature nodes can be intervened on: error, token and logit / target
nodes raise a `LenslabError`.

>>> import lenslab
>>> from lenslab.probes import attribution_graph as AG
>>> from lenslab.steering import generate
>>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
>>> prompt = "When Mary and John went to the store, John gave a drink to"
>>> g = AG.attribution_graph(model, prompt, "zoo/ioi-4l/per-layer", max_feature_nodes=32)
>>> iv = node_intervention("zoo/ioi-4l/per-layer", ["L0F195@3", "L0F81@3"], "ablate", graph=g, name="and-features")
>>> [(e.hook, e.op, e.positions) for e in iv.edits]
[('blocks.0.hook_mlp_out', 'feature', (3,)), ('blocks.0.hook_mlp_out', 'feature', (3,))]
>>> res = intervention_effect(model, g, iv)   # the logit of 'Mary' minus the mean logit, before and after
>>> res.target_token, round(res.target_before, 2), round(res.target_after, 2)
('Mary', 21.92, 22.16)
>>> round(res.predicted, 2)   # the graph's first-order prediction of the change (attention and norms frozen)
-3.75
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.attribution_graph import AttributionGraph
from lenslab.probes.transcoders import CrossLayerTranscoder, load_transcoders
from lenslab.results import Result, provenance
from lenslab.steering.edit_hooks import apply
from lenslab.steering.intervention import Edit, FeatureRead, Intervention, Positions
from lenslab.toolbox import model_device, model_name

__all__ = ["MODES", "NodeIntervention", "graph_prompt", "intervention_effect", "node_intervention"]

MODES = ("ablate", "clamp", "steer")
METHOD = "graph node intervention"
NODE_KINDS = (
    "only feature nodes can be intervened on (L1F37@5: layer 1, feature 37, position 5); a graph's other nodes "
    "are errors (MLP1.err@5: the transcoder's residual, not a feature), tokens (embed@0) and logits or "
    "targets (logit117@9, target0@9)"
)


# --- the intervention ---------------------------------------------------------------------------------
def _finite(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise LenslabError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _feature_nodes(nodes: str | Sequence[str], tc, graph: AttributionGraph | None) -> list[labels.Node]:
    """The parsed feature nodes, checked against the transcoders and the graph."""
    given = [nodes] if isinstance(nodes, str) else list(nodes)
    if not given:
        raise LenslabError("no nodes given: name one or more feature nodes, e.g. 'L1F37@5'")
    parsed = []
    for text in given:
        n = labels.parse(text)
        if n.kind != "feature":
            raise LenslabError(f"{text!r} is {'an' if n.kind[0] in 'aeiou' else 'a'} {n.kind} node: {NODE_KINDS}")
        lab = labels.label(n)
        if lab in [labels.label(m) for m in parsed]:
            raise LenslabError(f"node {lab} is listed twice; list each node once")
        if n.layer not in tc.layers:
            raise LenslabError(f"node {lab}: the transcoders cover layers {tc.layers}, not layer {n.layer}")
        if not 0 <= n.index < tc.d_transcoder:
            raise LenslabError(
                f"node {lab}: feature {n.index} is out of range for transcoders of {tc.d_transcoder} features"
            )
        if graph is not None:
            if lab not in graph.nodes:
                features = [x for x in graph.nodes if labels.parse(x).kind == "feature"]
                raise LenslabError(
                    f"node {lab} is not in the graph{did_you_mean(lab, features)}; pick one of its "
                    f"{len(features)} feature nodes (graph.table())"
                )
        parsed.append(n)
    return parsed


def _read(tc, layer: int, feature: int, target: float) -> FeatureRead:
    """How the live model's `feature` of transcoder layer `layer` is read: the transcoder's encoder at its input hook."""
    if isinstance(tc, CrossLayerTranscoder):
        W_enc, b_enc = tc.W_enc[layer], tc.b_enc[layer]  # [d_tc, d_model], [d_tc]
        threshold = tc.threshold[layer] if tc.threshold is not None else None
        activation, k = tc.activation, tc.k
    else:
        t = tc[layer]
        W_enc, b_enc, threshold, activation, k = t.W_enc, t.b_enc, t.threshold, t.activation, t.k
    W_enc, b_enc = W_enc.detach().to("cpu", torch.float32), b_enc.detach().to("cpu", torch.float32)
    hook = tc.input_hook.format(l=layer)
    if activation == "topk":
        return FeatureRead(
            index=feature, kind="topk", encoder=W_enc.T.contiguous(), bias=b_enc.clone(), k=int(k), target=target,
            hook=hook,
        )  # fmt: skip
    thr = 0.0
    if activation == "jumprelu":
        thr = float(threshold[feature].detach())
        if thr < 0:
            raise LenslabError(
                f"feature {feature} of layer {layer} has a negative JumpReLU threshold ({thr:.4g}): its activation "
                "can be negative, which a feature edit does not read; ablate it with "
                "lenslab.probes.graph_validation.ablation_hooks instead"
            )
    return FeatureRead(
        index=feature,
        kind="jumprelu" if activation == "jumprelu" else "relu",
        encoder=W_enc[feature].contiguous(),
        bias=b_enc[feature].clone(),
        threshold=thr,
        target=target,
        hook=hook,
    )


def _writes(tc, layer: int, feature: int) -> list[tuple[str, Tensor]]:
    """(output hook, decoder row `[d_model]`) for each MLP output the feature writes to."""
    if isinstance(tc, CrossLayerTranscoder):
        W = tc.W_dec[layer].detach().to("cpu", torch.float32)  # [d_tc, n_layers - layer, d_model]
        return [(tc.output_hook.format(l=layer + j), W[feature, j].clone()) for j in range(W.shape[1])]
    return [(tc.output_hook.format(l=layer), tc[layer].W_dec[feature].detach().to("cpu", torch.float32).clone())]


def node_intervention(
    transcoders,
    nodes: str | Sequence[str],
    mode: str = "ablate",
    value: float | None = None,
    *,
    factor: float | None = None,
    graph: AttributionGraph | None = None,
    positions: Positions = "node",
    strength: float = 1.0,
    name: str | None = None,
) -> Intervention:
    """An `Intervention` on the transcoder features of attribution-graph feature nodes.

    Args:
        transcoders: the transcoders the graph was computed with (a `TranscoderSet`, a
            `CrossLayerTranscoder` or a name for `load_transcoders`, e.g. "zoo/ioi-4l/per-layer").
        nodes: one feature-node label (`"L0F195@3"`) or several: a supernode, acted on together.
        mode: "ablate" (activation 0), "clamp" (to `value`, or to `factor` × the node's activation
            in `graph`) or "steer" (add `value` × the feature's decoder row(s)).
        value: the clamp value or the steering amount (in the feature's activation units).
        factor: clamp only, instead of `value`: multiply the activation the graph records at the
            node (needs `graph`).
        graph: the `AttributionGraph` the nodes come from: they must be in it (a check; and the
            activations `factor` multiplies).
        positions: "node" (each node's own position) or the positions of every edit (`Edit`).
        strength: the edits' strength: 0 leaves the model unchanged, 1 is the full effect.
        name: the intervention's name, a supernode's label (default: mode and nodes).

    Returns:
        An `Intervention` with one edit per node and MLP output it writes (`feature` edits for
        ablate and clamp, `add` edits for steer), its provenance naming the nodes and mode.
    """
    if mode not in MODES:
        raise LenslabError(f"mode {mode!r} is not one of {', '.join(MODES)}{did_you_mean(str(mode), MODES)}")
    tc = load_transcoders(transcoders) if isinstance(transcoders, str) else transcoders
    if graph is not None and not isinstance(graph, AttributionGraph):
        raise LenslabError(
            f"graph must be an AttributionGraph (lenslab.probes.attribution_graph), got {type(graph).__name__}"
        )
    parsed = _feature_nodes(nodes, tc, graph)
    if mode == "ablate" and (value is not None or factor is not None):
        raise LenslabError("ablate sets the activation to 0 and takes no value or factor; use clamp to set a value")
    if mode == "steer":
        if factor is not None:
            raise LenslabError(
                "factor is for clamp (a multiple of the node's activation); steer adds value × the decoder row"
            )
        if value is None:
            raise LenslabError("steer needs value=: how much of the feature's decoder row to add (e.g. 5.0)")
    if mode == "clamp":
        if (value is None) == (factor is None):
            raise LenslabError(
                "clamp needs exactly one of value= (the activation to hold) and factor= (× the node's activation)"
            )
        if factor is not None and graph is None:
            raise LenslabError(
                "factor= multiplies the node's activation recorded in the graph: pass graph= (or clamp to a value=)"
            )
    value = None if value is None else _finite(value, f"{mode} value")
    factor = None if factor is None else _finite(factor, "factor")
    if positions == "node":
        where = lambda n: (n.pos,)
    else:
        where = lambda n: positions
    targets: list[float | None] = []
    edits: list[Edit] = []
    for n in parsed:
        writes = _writes(tc, n.layer, n.index)
        if mode == "steer":
            targets.append(None)
            edits += [
                Edit(hook=h, op="add", vector=value * row, positions=where(n), strength=strength) for h, row in writes
            ]
            continue
        if mode == "ablate":
            target = 0.0
        elif factor is not None:
            target = factor * float(graph.activations[graph.nodes.index(labels.label(n))])
        else:
            target = value
        targets.append(target)
        read = _read(tc, n.layer, n.index, target)
        edits += [
            Edit(hook=h, op="feature", vector=row, feature=read, positions=where(n), strength=strength)
            for h, row in writes
        ]
    node_labels = [labels.label(n) for n in parsed]
    if name is None:
        what = node_labels[0] if len(node_labels) == 1 else "{" + ", ".join(node_labels) + "}"
        amount = "" if mode == "ablate" else f" ×{factor:g}" if factor is not None else f" {value:g}"
        name = f"{mode} {what}{amount}"
    prov = {
        "method": METHOD,
        "mode": mode,
        "nodes": node_labels,
        "value": value,
        "factor": factor,
        "targets": targets,
        "positions": positions if isinstance(positions, str) else list(positions),
        "transcoders": transcoders if isinstance(transcoders, str) else getattr(tc, "kind", type(tc).__name__),
        "transcoder_model": getattr(tc, "model_name", "") or None,
    }
    return Intervention(edits=tuple(edits), name=str(name), provenance=prov)


# --- before / after ------------------------------------------------------------------------------------
@dataclass
class NodeIntervention(Result):
    """Next-token logits before and after an intervention (usually `node_intervention`'s).

    Attributes:
        name: the intervention's name (a supernode's label).
        nodes / mode: the graph nodes intervened on and how (from the intervention's provenance;
            empty for other interventions).
        str_tokens: the prompt; `pos` the position read (the last).
        token_ids / tokens: the tokens shown: the top `k` before, then those that entered the top
            `k` after, then the target if it is in neither.
        logits_before / logits_after / probs_before / probs_after: theirs, `[n]`.
        target / target_token: the tracked token (the graph's heaviest logit target by default).
        target_before / target_after: its logit minus the mean logit at `pos` (what a graph's
            logit node reads), before and after.
        predicted: the graph's first-order prediction of the target's change: the sum over the
            nodes of `edge × (new activation − activation) / activation` (its direct effects,
            attention and norms frozen; pruning drops small edges), or None when there is no
            graph, the target is not one of its logit nodes or the edits act beyond the nodes.
    """

    name: str
    nodes: list[str]
    mode: str
    str_tokens: list[str]
    pos: int
    token_ids: list[int]
    tokens: list[str]
    logits_before: Tensor
    logits_after: Tensor
    probs_before: Tensor
    probs_after: Tensor
    target: int
    target_token: str
    target_before: float
    target_after: float
    predicted: float | None = None
    provenance: dict = field(default_factory=dict)
    KIND = "NodeIntervention"

    def target_change(self) -> float:
        """How much the target (logit minus mean logit) moved: after − before."""
        return self.target_after - self.target_before

    def to_dict(self) -> dict:
        f = lambda t: t.detach().cpu().float().tolist()
        return {
            "kind": self.KIND,
            "name": self.name,
            "nodes": list(self.nodes),
            "mode": self.mode,
            "str_tokens": list(self.str_tokens),
            "pos": self.pos,
            "token_ids": list(self.token_ids),
            "tokens": list(self.tokens),
            "logits_before": f(self.logits_before),
            "logits_after": f(self.logits_after),
            "probs_before": f(self.probs_before),
            "probs_after": f(self.probs_after),
            "target": self.target,
            "target_token": self.target_token,
            "target_before": self.target_before,
            "target_after": self.target_after,
            "predicted": self.predicted,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NodeIntervention:
        t = lambda x: torch.tensor(x, dtype=torch.float32)
        return cls(
            name=d["name"],
            nodes=list(d["nodes"]),
            mode=d["mode"],
            str_tokens=list(d["str_tokens"]),
            pos=int(d["pos"]),
            token_ids=[int(i) for i in d["token_ids"]],
            tokens=list(d["tokens"]),
            logits_before=t(d["logits_before"]),
            logits_after=t(d["logits_after"]),
            probs_before=t(d["probs_before"]),
            probs_after=t(d["probs_after"]),
            target=int(d["target"]),
            target_token=d["target_token"],
            target_before=float(d["target_before"]),
            target_after=float(d["target_after"]),
            predicted=None if d.get("predicted") is None else float(d["predicted"]),
            provenance=dict(d.get("provenance", {})),
        )

    def table(self):
        import pandas as pd  # deferred: pandas is only needed to render

        return pd.DataFrame(
            {
                "token": self.tokens,
                "id": self.token_ids,
                "logit before": self.logits_before.tolist(),
                "logit after": self.logits_after.tolist(),
                "change": (self.logits_after - self.logits_before).tolist(),
                "prob before": self.probs_before.tolist(),
                "prob after": self.probs_after.tolist(),
            }
        )

    def figure(self):
        import plotly.graph_objects as go  # deferred: plotly is only needed to draw

        from lenslab import figures  # deferred: figures styles plots only when one is drawn

        shown = [repr(t) for t in self.tokens]
        fig = go.Figure()
        fig.add_bar(x=shown, y=self.probs_before.tolist(), name="before")
        fig.add_bar(x=shown, y=self.probs_after.tolist(), name="after")
        pred = "" if self.predicted is None else f" (graph, first order: {self.predicted:+.3f})"
        fig.update_layout(barmode="group", yaxis_title="next-token probability", xaxis_title="token")
        return figures.style(
            fig,
            f"{self.name} · target {self.target_token!r}: {self.target_before:.3f} → {self.target_after:.3f}{pred}",
        )


def _tokens(model, source) -> tuple[Tensor, AttributionGraph | None]:
    if isinstance(source, AttributionGraph):
        return torch.tensor(source.tokens, dtype=torch.long), source
    if isinstance(source, str):
        if not source:
            raise LenslabError("the prompt is empty: give a prompt or an AttributionGraph")
        return model.to_tokens(source)[0].cpu(), None
    t = torch.as_tensor(source).reshape(-1).long()
    if t.numel() == 0:
        raise LenslabError("the prompt has no tokens: give a prompt, token ids or an AttributionGraph")
    return t, None


def _target(model, target, graph: AttributionGraph | None, before: Tensor) -> int:
    d_vocab = before.shape[-1]
    if target is None:
        if graph is not None:
            logit_nodes = [(i, n) for i, n in enumerate(graph.parsed) if n.kind == "logit"]
            if logit_nodes:
                w = graph.target_weights.float()
                first = len(graph.nodes) - len(w)
                return int(max(logit_nodes, key=lambda x: float(w[x[0] - first]))[1].index)
        return int(before.argmax())
    if isinstance(target, str):
        ids = model.to_tokens(target, prepend_bos=False)[0]
        if len(ids) != 1:
            raise LenslabError(
                f"target {target!r} is {len(ids)} tokens, not one token (quote a leading space: ' Mary')"
            )
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < d_vocab:
        raise LenslabError(f"target must be a one-token string or a token id in 0..{d_vocab - 1}, got {target!r}")
    return int(target)


def _predicted(graph: AttributionGraph | None, iv: Intervention, target: int, pos: int) -> float | None:
    """The graph's direct-effect (first-order) prediction of the target's change, or None."""
    prov = iv.provenance
    if graph is None or prov.get("method") != METHOD or prov.get("positions") != "node":
        return None
    label = labels.logit_node(target, pos)
    strengths = set(iv.strengths())
    if label not in graph.nodes or len(strengths) != 1 or any(n not in graph.nodes for n in prov["nodes"]):
        return None
    (s,) = strengths
    ti, total = graph.nodes.index(label), 0.0
    for node, new in zip(prov["nodes"], prov["targets"]):
        i = graph.nodes.index(node)
        a = float(graph.activations[i])
        if a == 0:
            return None
        delta = s * prov["value"] if prov["mode"] == "steer" else s * (new - a)
        total += float(graph.adjacency[ti, i]) * delta / a
    return total


def intervention_effect(
    model, source, intervention: Intervention, *, target: int | str | None = None, k: int = 10
) -> NodeIntervention:
    """The next-token logits of `source` before and after `intervention`.

    Args:
        model: the model the graph was computed on.
        source: an `AttributionGraph` (its prompt; it also gives the default target and the
            first-order prediction) or a prompt (a string or token ids).
        intervention: usually `node_intervention`'s; any `Intervention` works.
        target: the token to track (a one-token string or an id); default the graph's heaviest
            logit target, else the top token before.
        k: the top tokens shown, before and after.

    Returns:
        A `NodeIntervention`.
    """
    if not isinstance(intervention, Intervention):
        raise LenslabError(f"expected an Intervention (e.g. node_intervention's), got {type(intervention).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LenslabError(f"k must be a positive integer, got {k!r}")
    tokens, graph = _tokens(model, source)
    if graph is not None and graph.provenance.get("model") not in (None, model_name(model)):
        raise LenslabError(
            f"the graph was computed on {graph.provenance['model']!r}, not on model {model_name(model)!r}: "
            "load the graph's model"
        )
    made_for = intervention.provenance.get("transcoder_model")
    if made_for and made_for != model_name(model):
        raise LenslabError(
            f"the intervention's transcoders were trained on {made_for!r}, not on model {model_name(model)!r}"
        )
    toks = tokens.reshape(1, -1).to(model_device(model))
    n = toks.shape[1]
    with torch.no_grad():
        before = model(toks)[0, -1].float().cpu()
        with apply(model, intervention, prompt_len=n):
            after = model(toks)[0, -1].float().cpu()
    t = _target(model, target, graph, before)
    k = min(k, before.shape[-1])
    ids = before.topk(k).indices.tolist()
    ids += [i for i in after.topk(k).indices.tolist() if i not in ids]
    if t not in ids:
        ids.append(t)
    pb, pa = before.softmax(-1), after.softmax(-1)
    idx = torch.tensor(ids)
    prov = intervention.provenance
    return NodeIntervention(
        name=intervention.name,
        nodes=list(prov.get("nodes", [])) if prov.get("method") == METHOD else [],
        mode=str(prov.get("mode", "")) if prov.get("method") == METHOD else "",
        str_tokens=graph.str_tokens if graph is not None else model.to_str_tokens(toks[0]),
        pos=n - 1,
        token_ids=ids,
        tokens=[model.to_single_str_token(i) for i in ids],
        logits_before=before[idx],
        logits_after=after[idx],
        probs_before=pb[idx],
        probs_after=pa[idx],
        target=t,
        target_token=model.to_single_str_token(t),
        target_before=float(before[t] - before.mean()),
        target_after=float(after[t] - after.mean()),
        predicted=_predicted(graph, intervention, t, n - 1),
        provenance=provenance(model, intervention=intervention.name, intervention_provenance=prov, k=k),
    )


def graph_prompt(model, graph: AttributionGraph) -> str:
    """The prompt text of `graph` (its tokens decoded, without the BOS `model.to_tokens` prepends),
    for generation; a `LenslabError` when the text does not encode back to the graph's tokens."""
    toks = list(graph.tokens)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    prepends = bool(getattr(model.cfg, "default_prepend_bos", True))
    body = toks[1:] if prepends and bos is not None and toks and toks[0] == bos else toks
    text = model.to_string(torch.tensor(body)) if body else ""
    if not text or model.to_tokens(text)[0].tolist() != toks:
        raise LenslabError(
            "the graph's tokens do not decode to a prompt that encodes back to them: generate from the prompt "
            "the graph was computed on"
        )
    return text
