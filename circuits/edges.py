"""Edge attribution (EAP, EAP-IG) between embeddings, attention heads, MLPs and the logits.

Nodes, in this order (the graph's documented node order): "input" (the embeddings, i.e.
`blocks.0.hook_resid_pre`), then per layer its heads "L{l}H{h}" and its MLP "MLP{l}", then
"logits". An edge u -> v exists when u writes to the residual stream before v reads it.

EAP (Syed et al. 2023; Hanna et al. 2024, hannamw/EAP-IG `attribute.py`):
    s(u -> v) = (out_u(source) - out_u(base)) . dm/d(in_v)  at the base run,
summed over batch and positions, where out_u is what u adds to the residual stream
(`hook_result` per head, `hook_mlp_out`, the embeddings) and in_v is what v reads
(`hook_q_input + hook_k_input + hook_v_input` of a head, `hook_mlp_in`, the final residual
before `ln_final` for the logits). EAP-IG averages the gradient over `steps` runs whose input
embeddings are interpolated base + (k/steps)(source - base), k = 0..steps-1.
`patch_edge` is the real intervention an edge score estimates: v alone reads
in_v + (out_u(source) - out_u(base)).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.circuits.patching import validate_task
from lenslab.results import JsonResult, provenance
from lenslab.sites import DIRECTIONS
from lenslab.tasks import MetricLike, Task, get_metric
from lenslab.toolbox import model_device, progress_reporter


def node_names(model) -> list[str]:
    """All nodes in graph order: input, per layer heads then MLP, logits."""
    out = [labels.INPUT]
    for l in range(model.cfg.n_layers):
        out += [labels.head(l, h) for h in range(model.cfg.n_heads)]
        if not getattr(model.cfg, "attn_only", False):
            out.append(labels.mlp(l))
    return out + [labels.LOGITS]


def node_key(node: str) -> tuple[str, int, int]:
    """(kind, layer, head) of a circuit node ("input", "head", "mlp" or "logits"): the logits sort
    after every layer, and nodes that are not heads have head -1. The graph's sort key."""
    n = labels.parse(node)
    if n.kind not in ("input", "head", "mlp", "logits"):
        raise LenslabError(f"node {node!r} is not a circuit node: use 'input', 'logits', 'MLP3' or 'L3H1'")
    return n.kind, (10**9 if n.kind == "logits" else n.layer), (n.index if n.kind == "head" else -1)


def edge_exists(u: str, v: str) -> bool:
    """True when u writes to the residual stream before v reads it."""
    ku, lu, _ = node_key(u)
    kv, lv, _ = node_key(v)
    if ku == "logits" or kv == "input":
        return False
    if ku == "input":
        return True
    if ku == "head":
        return lu < lv or (lu == lv and kv == "mlp")
    return lu < lv  # an MLP feeds later layers


@dataclass(frozen=True, eq=False)
class EdgeScores(JsonResult):
    """Edge attribution scores: `scores[i, j]` for nodes[i] -> nodes[j] (NaN where no edge)."""

    nodes: list[str]
    scores: Tensor  # [n_nodes, n_nodes]
    method: str
    metric: str
    clean_value: float | None = None
    corrupt_value: float | None = None
    provenance: dict = field(default_factory=dict)
    KIND = "EdgeScores"

    def edges(self) -> list[tuple[str, str, float]]:
        """All existing edges as (source, target, score)."""
        idx = (~torch.isnan(self.scores)).nonzero().tolist()
        return [(self.nodes[i], self.nodes[j], float(self.scores[i, j])) for i, j in idx]

    def score(self, u: str, v: str) -> float:
        return float(self.scores[self.nodes.index(u), self.nodes.index(v)])

    def table(self):
        """One row per existing edge (source, target, score), largest |score| first."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        df = pd.DataFrame(self.edges(), columns=["source", "target", "score"])
        return df.reindex(df["score"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)

    def figure(self):
        """The edge scores as a source x target heatmap (blank where no edge exists)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        p = self.provenance
        fig = go.Figure(
            go.Heatmap(
                z=self.scores.detach().cpu().float().tolist(),
                x=self.nodes,
                y=self.nodes,
                colorscale="RdBu",
                zmid=0,
                colorbar={"title": "score"},
                hovertemplate="%{y} -> %{x}: %{z:.4g}<extra></extra>",
            )
        )
        fig.update_xaxes(title="target")
        fig.update_yaxes(title="source", autorange="reversed")
        return figures.style(
            fig,
            f"{self.method} edge scores · model {p.get('model', '?')} · task {p.get('task', '?')} · metric {self.metric}",
        )

    def to_dict(self) -> dict:
        return {
            "kind": "EdgeScores",
            "nodes": self.nodes,
            "edges": self.edges(),
            "method": self.method,
            "metric": self.metric,
            "clean_value": self.clean_value,
            "corrupt_value": self.corrupt_value,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EdgeScores:
        nodes = d["nodes"]
        scores = torch.full((len(nodes), len(nodes)), float("nan"))
        for u, v, s in d["edges"]:
            scores[nodes.index(u), nodes.index(v)] = s
        return cls(
            nodes=nodes,
            scores=scores,
            method=d["method"],
            metric=d["metric"],
            clean_value=d.get("clean_value"),
            corrupt_value=d.get("corrupt_value"),
            provenance=d.get("provenance") or {},
        )


@contextlib.contextmanager
def _edge_hooks_enabled(model):
    """Temporarily turn on the per-head input/output hooks EAP needs; restore the user's settings."""
    cfg = model.cfg
    old = (cfg.use_split_qkv_input, cfg.use_attn_result, cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    if not getattr(cfg, "attn_only", False):
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(old[0])
        model.set_use_attn_result(old[1])
        if not getattr(cfg, "attn_only", False):
            model.set_use_hook_mlp_in(old[2])


def _out_hooks(model) -> list[str]:
    names = ["blocks.0.hook_resid_pre"]
    for l in range(model.cfg.n_layers):
        names.append(f"blocks.{l}.attn.hook_result")
        if not getattr(model.cfg, "attn_only", False):
            names.append(f"blocks.{l}.hook_mlp_out")
    return names


def _in_hooks(model) -> list[str]:
    names = []
    for l in range(model.cfg.n_layers):
        names += [f"blocks.{l}.hook_{x}_input" for x in ("q", "k", "v")]
        if not getattr(model.cfg, "attn_only", False):
            names.append(f"blocks.{l}.hook_mlp_in")
    return names + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def _node_vectors(model, cache: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Per node: its output ('out') or its input gradient ('in') as `[batch, pos, d_model]`."""
    out: dict[str, Tensor] = {}
    n_layers = model.cfg.n_layers
    if kind == "out":
        out["input"] = cache["blocks.0.hook_resid_pre"]
    for l in range(n_layers):
        for h in range(model.cfg.n_heads):
            if kind == "out":
                out[labels.head(l, h)] = cache[f"blocks.{l}.attn.hook_result"][:, :, h]
            else:
                out[labels.head(l, h)] = sum(cache[f"blocks.{l}.hook_{x}_input"][:, :, h] for x in ("q", "k", "v"))
        if not getattr(model.cfg, "attn_only", False):
            out[labels.mlp(l)] = cache[f"blocks.{l}.hook_mlp_out" if kind == "out" else f"blocks.{l}.hook_mlp_in"]
    if kind == "in":
        out["logits"] = cache[f"blocks.{n_layers - 1}.hook_resid_post"]
    return out


def _grads_at_inputs(model, tokens, bound, embed: Tensor | None = None) -> dict[str, Tensor]:
    """Metric gradients at every node input hook (optionally with replaced input embeddings)."""
    names = _in_hooks(model)
    acts: dict[str, Tensor] = {}

    def first(act, hook):
        act = (embed if embed is not None else act).detach().requires_grad_(True)
        return act

    def keep(act, hook):
        acts[hook.name] = act
        return act

    fwd = [("blocks.0.hook_resid_pre", first)] + [(n, keep) for n in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        value = bound(model(tokens))
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(acts[n])).detach() for n, g in zip(names, grads)}


def attribute_edges(
    model,
    task: Task,
    method: str = "eap",
    *,
    metric: MetricLike = "logit_diff",
    direction: str = "denoise",
    steps: int = 5,
    progress: bool | Callable[[int, int], None] = True,
) -> EdgeScores:
    """EAP ("eap") or EAP-IG ("eap-ig", `steps` interpolation points) scores for every edge."""
    if method not in ("eap", "eap-ig"):
        raise LenslabError(f"edge method {method!r} must be 'eap' or 'eap-ig'")
    if direction not in DIRECTIONS:
        raise LenslabError(f"direction {direction!r} must be 'denoise' or 'noise'")
    if steps < 1:
        raise LenslabError(f"steps must be >= 1, got {steps}")
    validate_task(model, task)
    task = task.to(model_device(model))
    bound = get_metric(metric, model, task)
    base, source = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    nodes = node_names(model)
    with _edge_hooks_enabled(model), torch.no_grad():
        names = set(_out_hooks(model))
        _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in names)
        _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    n_runs = 1 if method == "eap" else steps
    report = progress_reporter(progress, n_runs, f"{method} edges")
    with _edge_hooks_enabled(model):
        total: dict[str, Tensor] | None = None
        e_base, e_src = base_cache["blocks.0.hook_resid_pre"], src_cache["blocks.0.hook_resid_pre"]
        for k in range(n_runs):
            embed = None if method == "eap" else e_base + (k / steps) * (e_src - e_base)
            g = _grads_at_inputs(model, base, bound, embed)
            total = g if total is None else {n: total[n] + g[n] for n in g}
            report()
        report(close=True)
        grads = {n: v / n_runs for n, v in total.items()}
        delta_out = {
            u: s - b
            for (u, s), b in zip(
                _node_vectors(model, src_cache, "out").items(), _node_vectors(model, base_cache, "out").values()
            )
        }
        grad_in = _node_vectors(model, grads, "in")
    scores = torch.full((len(nodes), len(nodes)), float("nan"))
    for i, u in enumerate(nodes):
        if u not in delta_out:
            continue
        for j, v in enumerate(nodes):
            if edge_exists(u, v):
                scores[i, j] = float((delta_out[u] * grad_in[v]).sum())
    return EdgeScores(
        nodes=nodes,
        scores=scores,
        method=method,
        metric=bound.name,
        clean_value=bound.clean_value,
        corrupt_value=bound.corrupt_value,
        provenance=provenance(model, task, direction=direction, steps=steps if method == "eap-ig" else None),
    )


def patch_edge(
    model, task: Task, u: str, v: str, *, metric: MetricLike = "logit_diff", direction: str = "denoise"
) -> float:
    """The real edge intervention: v alone reads in_v + (out_u(source) - out_u(base)).

    Returns the change of the metric (patched minus unpatched base run).
    """
    if not edge_exists(u, v):
        raise LenslabError(f"there is no edge {u} -> {v}: {u} must write before {v} reads")
    nodes = node_names(model)
    for n in (u, v):
        if n not in nodes:
            raise LenslabError(f"node {n!r} is not in this model (nodes: input, L0H0 .. , MLP0 .., logits)")
    validate_task(model, task)
    task = task.to(model_device(model))
    bound = get_metric(metric, model, task)
    base, source = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    with _edge_hooks_enabled(model), torch.no_grad():
        names = set(_out_hooks(model))
        _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in names)
        _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        delta = _node_vectors(model, src_cache, "out")[u] - _node_vectors(model, base_cache, "out")[u]
        kind, layer, head = node_key(v)
        if kind == "head":

            def add(act, hook):
                act = act.clone()
                act[:, :, head] += delta
                return act

            hooks = [(f"blocks.{layer}.hook_{x}_input", add) for x in ("q", "k", "v")]
        else:
            name = (
                f"blocks.{layer}.hook_mlp_in" if kind == "mlp" else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
            )
            hooks = [(name, lambda act, hook: act + delta)]
        logits = model.run_with_hooks(base, fwd_hooks=hooks)
        base_value = bound.corrupt_value if direction == "denoise" else bound.clean_value
        return float(bound(logits)) - base_value
