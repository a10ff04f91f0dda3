"""Mixture-of-Experts routers: which experts each token picks, and which experts a behaviour uses.

A MoE layer's router scores every expert for every token, keeps the top k and mixes their
outputs with gate weights. This module reads those decisions through TransformerLens hooks,
with one interface for both kinds of lenslab model:

- `HookedTransformer` MoE (Mixtral, OLMoE): `blocks.{l}.mlp.hook_expert_weights` holds the
  softmax over all experts `[batch*pos, n_experts]` and `blocks.{l}.mlp.hook_expert_indices`
  the chosen experts `[batch*pos, k]`; the gate weights are the chosen probabilities,
  renormalised over the top k when the config says `norm_topk_prob` (Mixtral does, OLMoE not).
- `TransformerBridge` MoE (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3): a torch forward hook
  on the Hugging Face router module (behind `blocks.{l}.mlp.gate`) reads what the router itself
  returns, `(router_logits, topk_weights, topk_indices)`: the chosen experts and gate weights are
  exactly the model's, whatever its rule (softmax top k, DeepSeek-V3's sigmoid scores with
  `e_score_correction_bias`, group-limited top k and `routed_scaling_factor`, ...). The per-expert
  scores are the router's `scoring` of the logits: softmax, or sigmoid for DeepSeek-V3.

`route` returns per token and layer the chosen experts, their gate weights and the per-expert
router scores; `expert_load` counts selections over a corpus.

`ftri_rank` is the expert finding of MoTE (Dahlke et al., "Mixture of Tunable Experts",
arXiv 2502.11096): "functional Token Resonance Imaging". Per prompt an activation map
`[layer, expert]` sums the expert selections (or their gate weights) over the prompt's tokens;
the maps are averaged within the target class (e.g. prompts the model refuses) and within the
rest, and (layer, expert) are ranked by the difference. The top experts are the candidates to
switch off or force on.

>>> import lenslab
>>> from lenslab.probes import routers
>>> model = lenslab.load_model("zoo/moe-refusal", device="cpu")   # tiny Mixtral: 4 layers, 8 experts, top 2
>>> routers.route(model, ["user : first bomb 3 assistant :"]).indices[0].shape  # [pos, layer, k]
torch.Size([8, 4, 2])
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.jobs import Shard, run_job, share_model, worker_model
from lenslab.results import JsonResult, provenance
from lenslab.toolbox import length_batches, model_device, model_name

__all__ = [
    "ExpertRanking",
    "FtriStats",
    "MoeLayer",
    "RouterResult",
    "activation_maps",
    "check_experts",
    "expert_pairs",
    "expert_load",
    "ftri_from_stats",
    "ftri_rank",
    "ftri_stats",
    "has_moe",
    "load_figure",
    "moe_layers",
    "parse_experts",
    "route",
    "router_spec",
    "scores_of",
]

NO_MOE = "this model has no Mixture-of-Experts layers"
# Hugging Face routers that score experts with a sigmoid (DeepSeek-V3 / R1: sigmoid scores, plus
# `e_score_correction_bias` for the choice only, group-limited top k, `routed_scaling_factor`).
SIGMOID_ROUTERS = frozenset({"DeepseekV3TopkRouter"})


# --- which layers route, and how ---------------------------------------------------------------
@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer: its block index, the hook that exposes its router, and how it routes.

    `kind` is "hooked" (hook = softmax probabilities, plus an indices hook), "bridge" (hook =
    raw router logits; the routing itself is read from the Hugging Face router module) or "hf"
    (a plain `transformers` model). `scoring` is how the router turns logits into per-expert
    scores: "softmax", or "sigmoid" (DeepSeek-V3). `n_group` / `topk_group`: group-limited
    routing (DeepSeek: experts in `n_group` groups, only the best `topk_group` groups searched);
    1 / 1 for a plain top k."""

    layer: int
    hook: str
    kind: str
    n_experts: int
    top_k: int
    norm_topk_prob: bool
    indices_hook: str | None = None
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1


def moe_layers(model) -> list[MoeLayer]:
    """The model's MoE layers in block order; a `LenslabError` when it has none.

    >>> [m.layer for m in moe_layers(model)]   # zoo/moe-refusal: every layer is MoE
    [0, 1, 2, 3]
    """
    hooks = getattr(model, "hook_dict", {}) or {}
    out = []
    for layer in range(model.cfg.n_layers):
        if f"blocks.{layer}.mlp.hook_expert_weights" in hooks:
            cfg = model.cfg
            out.append(
                MoeLayer(
                    layer,
                    f"blocks.{layer}.mlp.hook_expert_weights",
                    "hooked",
                    int(cfg.num_experts),
                    int(cfg.experts_per_token),
                    bool(getattr(cfg, "norm_topk_prob", False)),
                    indices_hook=f"blocks.{layer}.mlp.hook_expert_indices",
                )
            )
        elif f"blocks.{layer}.mlp.gate.hook_out" in hooks:
            router = hf_router(model, layer)
            if router is None:  # a dense gated MLP: its `gate` is a projection, not a router
                continue
            out.append(
                MoeLayer(
                    layer,
                    f"blocks.{layer}.mlp.gate.hook_out",
                    "bridge",
                    int(router.num_experts),
                    int(router.top_k),
                    **router_spec(router),
                )
            )
    if not out:
        name = getattr(model.cfg, "model_name", "model")
        raise LenslabError(
            f"{NO_MOE} ({name}): router inspection needs a MoE checkpoint such as Mixtral, OLMoE, "
            "Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3"
        )
    return out


def router_spec(router, config=None) -> dict:
    """How a Hugging Face router module routes: `{"norm_topk_prob", "scoring", "n_group", "topk_group"}`
    (the `MoeLayer` fields). `config` (the model's) supplies `norm_topk_prob` for routers without
    the attribute (Mixtral's always renormalises).

    - DeepSeek-V3 (`DeepseekV3TopkRouter`): sigmoid scores, its `norm_topk_prob`, its groups.
    - DeepSeek-V2 (`DeepseekV2TopkRouter`): softmax, no renormalisation (the router ignores the
      config's `norm_topk_prob`), groups only with `topk_method="group_limited_greedy"`.
    - everything else: softmax top k with `norm_topk_prob`, no groups.
    """
    name = type(router).__name__
    if name in SIGMOID_ROUTERS:
        return dict(
            norm_topk_prob=bool(router.norm_topk_prob),
            scoring="sigmoid",
            n_group=int(router.num_group or 1),
            topk_group=int(router.topk_group or 1),
        )
    if name == "DeepseekV2TopkRouter":
        grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
        return dict(
            norm_topk_prob=False,
            scoring="softmax",
            n_group=int(router.num_group) if grouped else 1,
            topk_group=int(router.topk_group) if grouped else 1,
        )
    norm = getattr(router, "norm_topk_prob", None)
    if norm is None:  # Mixtral's router always renormalises and has no flag
        norm = getattr(config, "norm_topk_prob", None) if config is not None else None
        norm = name.startswith("Mixtral") if norm is None else norm
    return dict(norm_topk_prob=bool(norm), scoring="softmax", n_group=1, topk_group=1)


def has_moe(model) -> bool:
    """True when `model` has at least one MoE layer `moe_layers` can read."""
    try:
        return bool(moe_layers(model))
    except LenslabError:
        return False


def hf_router(model, layer: int):
    """The Hugging Face router module behind a bridge's `blocks.{layer}.mlp.gate`, or None."""
    try:
        gate = model.blocks[layer].mlp.gate
    except (AttributeError, IndexError, TypeError):
        return None
    hf = getattr(gate, "original_component", None) or getattr(gate, "_original_component", None)
    if hf is None or not hasattr(hf, "top_k") or not hasattr(hf, "num_experts"):
        return None
    return hf


def expert_pairs(experts, *, what: str = "expert", shared: bool = False) -> list[tuple[int, int]]:
    """`(layer, expert)` pairs (an iterable of pairs, or `"L:E, ..."` text) -> int pairs, in order,
    each once. The structure check every expert id goes through; `check_experts` adds the model's ranges.

    `shared=True` admits expert `-1` (or `"shared"`): a layer's shared expert. Raises a
    `LenslabError` naming the bad entry (`what` names the list, e.g. "off")."""
    if isinstance(experts, str):
        experts = parse_experts(experts)
    out: list[tuple[int, int]] = []
    for pair in experts or ():
        try:
            layer, expert = pair
            expert = labels.SHARED if shared and expert == "shared" else expert
            if isinstance(layer, bool) or isinstance(expert, bool):
                raise TypeError("a bool is not an id")
            layer, expert = int(layer), int(expert)
        except (TypeError, ValueError):
            extra = " (expert -1: the shared expert)" if shared else ""
            raise LenslabError(f"{what} {pair!r} is not a (layer, expert) pair of ints{extra}") from None
        if layer < 0 or expert < (labels.SHARED if shared else 0):
            raise LenslabError(f"{what} {(layer, expert)} is negative; layers and experts count from 0")
        if (layer, expert) not in out:
            out.append((layer, expert))
    return out


def check_experts(
    model, experts, *, layers: Sequence | None = None, shared_layers: Collection[int] | None = None
) -> list[tuple[int, int]]:
    """Validate `(layer, expert)` pairs against the model's MoE layers; returns them as ints, in
    order, each once (`expert_pairs` checks their structure first).

    `layers` (default `moe_layers(model)`): anything with `.layer` and `.n_experts`. `shared_layers`:
    the layers whose shared expert (id -1) may be named; None admits no shared expert. Raises a
    `LenslabError` naming the bad id and the valid range (layers are block indices).
    """
    layers = layers if layers is not None else moe_layers(model)
    n_of = {m.layer: m.n_experts for m in layers}
    out = expert_pairs(experts, shared=shared_layers is not None)
    for layer, expert in out:
        if layer not in n_of:
            raise LenslabError(f"layer {layer} is not a MoE layer of this model; MoE layers: {sorted(n_of)}")
        n = n_of[layer]
        has_shared = shared_layers is not None and layer in shared_layers
        if not (0 <= expert < n or (expert == labels.SHARED and has_shared)):
            extra = ""
            if shared_layers is not None:
                extra = " or -1 (its shared expert)" if has_shared else " (it has no shared expert)"
            raise LenslabError(f"expert {expert} does not exist in layer {layer}: it has experts 0..{n - 1}{extra}")
    return out


def parse_experts(text: str) -> list[tuple[int, int]]:
    """`"2:5, 3:1"` (or `"L2e5 L3e1"`, `"2,5; 3,1"`) -> `[(2, 5), (3, 1)]`; `""` -> `[]`.

    Raises a `LenslabError` on anything that is not LAYER:EXPERT pairs (ranges are checked
    against a model by `check_experts`)."""

    text = (text or "").strip()
    if not text:
        return []
    pairs = re.findall(r"L?\s*(-?\d+)\s*(?:[:,]|\s*e)\s*(-?\d+)", text, flags=re.IGNORECASE)
    rest = re.sub(r"L?\s*(-?\d+)\s*(?:[:,]|\s*e)\s*(-?\d+)", "", text, flags=re.IGNORECASE)
    if not pairs or re.sub(r"[\s,;]", "", rest):
        raise LenslabError(f"{text!r} is not a list of LAYER:EXPERT pairs such as '2:5, 3:1'")
    return [(int(a), int(b)) for a, b in pairs]


# --- routing -------------------------------------------------------------------------------
def _prompt_tokens(model, prompts, prepend_bos: bool | None) -> list[Tensor]:
    """Prompts (str, list of str, a `[batch, pos]` / `[pos]` token tensor, or a list of `[pos]` token
    rows) -> one `[pos]` per prompt."""
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, Tensor) for p in prompts):
        if not all(p.ndim == 1 and p.numel() > 0 for p in prompts):
            raise LenslabError("a list of token rows must hold non-empty 1-d [pos] tensors")
        return [p.long() for p in prompts]
    if isinstance(prompts, Tensor):
        toks = prompts[None] if prompts.ndim == 1 else prompts
        if toks.ndim != 2 or toks.numel() == 0:
            raise LenslabError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(prompts.shape)}")
        return [t.long() for t in toks]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise LenslabError("prompts must be a non-empty list of non-empty strings (or a [batch, pos] token tensor)")
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError("this model has no tokenizer: pass token ids as a [batch, pos] tensor instead of text")
    return [model.to_tokens(p, prepend_bos=prepend_bos)[0].cpu() for p in prompts]


@dataclass(frozen=True, kw_only=True, eq=False)
class RouterResult(JsonResult):
    """Router decisions for a list of prompts (one entry per prompt, no padding).

    Attributes:
        indices: per prompt, the chosen experts `[pos, layer, k]` (long), best first.
        weights: per prompt, their gate weights `[pos, layer, k]` (what multiplies each expert's output;
            DeepSeek's include its `routed_scaling_factor`).
        probs: per prompt, the router's score of every expert `[pos, layer, n_experts]`: the softmax
            over experts, or for sigmoid routers (DeepSeek-V3) each expert's sigmoid score (rows do
            not sum to 1; the choice adds `e_score_correction_bias` to them).
        tokens: per prompt, the token strings (or ids as strings).
        layers: the block index of each MoE layer (the `layer` axis above).
        n_experts / top_k: experts per layer and experts chosen per token.
        scoring: "softmax" or "sigmoid": what `probs` holds.
        provenance: model, versions, time.
    """

    indices: list[Tensor]
    weights: list[Tensor]
    probs: list[Tensor]
    tokens: list[list[str]]
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    scoring: str = "softmax"
    provenance: dict = field(default_factory=dict)
    KIND = "RouterResult"

    def activation_maps(self, weights: bool = False) -> Tensor:
        """fTRI maps `[prompt, layer, expert]`: selections (or gate-weight sums) over each prompt's tokens."""
        maps = torch.zeros(len(self.indices), len(self.layers), self.n_experts)
        for i, (idx, w) in enumerate(zip(self.indices, self.weights)):
            src = w.float() if weights else torch.ones_like(w, dtype=torch.float)
            # idx [pos, layer, k] -> scatter into [layer, expert]
            per = torch.zeros(idx.shape[0], len(self.layers), self.n_experts)
            per.scatter_add_(2, idx, src)
            maps[i] = per.sum(0)
        return maps

    def load(self, fraction: bool = False) -> Tensor:
        """Selections per expert over all tokens `[layer, expert]`; with `fraction`, divided by
        tokens x k so that each layer sums to 1."""
        counts = self.activation_maps().sum(0)
        if fraction:
            counts = counts / (sum(t.shape[0] for t in self.indices) * self.top_k)
        return counts

    def table(self):
        """One row per (layer, expert): how often the router picks it, as a count and a fraction."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        counts, frac = self.load(), self.load(fraction=True)
        rows = [
            {
                "layer": layer,
                "expert": e,
                "label": labels.expert(layer, e),
                "selections": int(counts[i, e]),
                "fraction": float(frac[i, e]),
            }
            for i, layer in enumerate(self.layers)
            for e in range(self.n_experts)
        ]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "indices": [t.tolist() for t in self.indices],
            "weights": [t.float().tolist() for t in self.weights],
            "probs": [t.float().tolist() for t in self.probs],
            "tokens": self.tokens,
            "layers": list(self.layers),
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "scoring": self.scoring,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RouterResult:
        return cls(
            indices=[torch.tensor(t, dtype=torch.long).reshape(-1, len(d["layers"]), d["top_k"]) for t in d["indices"]],
            weights=[
                torch.tensor(t, dtype=torch.float32).reshape(-1, len(d["layers"]), d["top_k"]) for t in d["weights"]
            ],
            probs=[
                torch.tensor(t, dtype=torch.float32).reshape(-1, len(d["layers"]), d["n_experts"]) for t in d["probs"]
            ],
            tokens=[list(t) for t in d["tokens"]],
            layers=tuple(d["layers"]),
            n_experts=d["n_experts"],
            top_k=d["top_k"],
            scoring=d.get("scoring", "softmax"),
            provenance=d.get("provenance") or {},
        )

    def figure(self, prompt: int = 0):
        """Heatmap `[layer, pos]` of prompt `prompt`: the top expert per token, its gate weight on hover."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        if not 0 <= prompt < len(self.indices):
            raise LenslabError(f"prompt {prompt} out of range: this result has {len(self.indices)} prompts")
        idx, w = self.indices[prompt], self.weights[prompt]
        toks = [f"{i}:{t}" for i, t in enumerate(self.tokens[prompt])]
        text = [
            [
                ", ".join(f"e{int(e)} ({float(g):.2f})" for e, g in zip(idx[p, li], w[p, li]))
                for p in range(idx.shape[0])
            ]
            for li in range(len(self.layers))
        ]
        fig = go.Figure(
            go.Heatmap(
                z=idx[:, :, 0].T.tolist(),
                x=toks,
                y=[f"L{l}" for l in self.layers],
                text=text,
                colorscale="Viridis",
                zmin=0,
                zmax=self.n_experts - 1,
                colorbar=dict(title="top expert"),
                texttemplate="e%{z}",  # the expert id in each cell: the colour scale is only a guide
                hovertemplate="%{y} · %{x}<br>%{text}<extra></extra>",
            )
        )
        fig.update_layout(xaxis_title="token", yaxis_title="layer", yaxis_autorange="reversed")
        return figures.style(fig, f"Router: top expert per token · model {self.provenance.get('model', '?')}")

    def load_figure(self, fraction: bool = True):
        """Heatmap `[layer, expert]` of the load over all prompts (share of each layer's selections)."""
        what = "share of selections" if fraction else "selections"
        return load_figure(
            self.load(fraction),
            self.layers,
            f"Expert load ({what}) · {sum(t.shape[0] for t in self.indices)} tokens · "
            f"model {self.provenance.get('model', '?')}",
        )


def load_figure(load: Tensor, layers, title: str = "Expert load"):
    """Heatmap `[layer, expert]` of an expert load (`RouterResult.load`, `expert_load`)."""
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

    z = load.float()
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=[f"e{e}" for e in range(z.shape[1])],
            y=[f"L{l}" for l in layers],
            colorscale="Viridis",
            zmin=0,
            colorbar=dict(title="load"),
            hovertemplate="%{y} %{x}<br>%{z:.3g}<extra></extra>",
        )
    )
    fig.update_layout(xaxis_title="expert", yaxis_title="layer", yaxis_autorange="reversed")
    return figures.style(fig, title)


def route(model, prompts, *, prepend_bos: bool | None = None, batch_size: int = 16) -> RouterResult:
    """Per token and MoE layer, the chosen experts, their gate weights and the router scores.

    Inside `lenslab.steering.apply(model, switch)` the switched routing is reported (on a bridge
    the router's output after the switch's own hook).

    Args:
        model: a lenslab MoE model (HookedTransformer Mixtral/OLMoE or TransformerBridge
            Qwen-MoE / DeepSeek-V2 / DeepSeek-V3).
        prompts: a string, a list of strings, or token ids `[batch, pos]`.
        prepend_bos: passed to `model.to_tokens` (None: the model's default).
        batch_size: prompts of equal length run together, this many at a time.

    Returns:
        `RouterResult` with `indices[i]` / `weights[i]` `[pos, layer, k]` (heaviest first) and
        `probs[i]` `[pos, layer, n_experts]` for prompt i.

    >>> model.to_str_tokens("user : first bomb 3 assistant :")
    ['<bos>', 'user', ':', 'first', 'bomb', '3', 'assistant', ':']
    >>> r = route(model, ["user : first bomb 3 assistant :"])
    >>> r.indices[0][:, 1].tolist()   # experts chosen at layer 1, per token: 2 and 5 from "bomb" on
    [[4, 0], [4, 0], [6, 7], [6, 4], [2, 5], [2, 5], [2, 5], [2, 5]]
    """
    layers = moe_layers(model)
    toks = _prompt_tokens(model, prompts, prepend_bos)
    n_exp = {m.n_experts for m in layers}
    top_k = {m.top_k for m in layers}
    scoring = {m.scoring for m in layers}
    if len(n_exp) != 1 or len(top_k) != 1 or len(scoring) != 1:
        raise LenslabError(
            f"MoE layers differ in expert count {sorted(n_exp)}, top-k {sorted(top_k)} or scoring "
            f"{sorted(scoring)}; not supported yet"
        )
    n_experts, k = n_exp.pop(), top_k.pop()
    device = model_device(model)

    out_idx: list[Tensor | None] = [None] * len(toks)
    out_w: list[Tensor | None] = [None] * len(toks)
    out_p: list[Tensor | None] = [None] * len(toks)
    for chunk in length_batches(toks, batch_size):
        batch = torch.stack([toks[i] for i in chunk]).to(device)
        idx, w, p = _route_batch(model, batch, layers, k)  # [batch, pos, layer, *]
        for j, i in enumerate(chunk):
            out_idx[i], out_w[i], out_p[i] = idx[j], w[j], p[j]

    tokenizer = getattr(model, "tokenizer", None)
    labels = [
        tokenizer.convert_ids_to_tokens(t.tolist()) if tokenizer is not None else [str(x) for x in t.tolist()]
        for t in toks
    ]
    return RouterResult(
        indices=out_idx,
        weights=out_w,
        probs=out_p,
        tokens=[[str(s) for s in lab] for lab in labels],
        layers=tuple(m.layer for m in layers),
        n_experts=n_experts,
        top_k=k,
        scoring=scoring.pop(),
        provenance=provenance(model, method="route", hooks=[m.hook for m in layers]),
    )


def scores_of(logits: Tensor, scoring: str) -> Tensor:
    """Per-expert router scores `[N, n_experts]` (float32) from router logits: softmax, or sigmoid."""
    if scoring == "sigmoid":
        return torch.sigmoid(logits.float())
    if scoring != "softmax":
        raise LenslabError(f"router scoring {scoring!r} is not one of softmax, sigmoid")
    return torch.softmax(logits.float(), dim=-1)


def _router_output(m: MoeLayer, output) -> tuple[Tensor, Tensor, Tensor]:
    """`(logits, weights, indices)` from a Hugging Face router's forward output."""
    if not isinstance(output, tuple) or len(output) < 3:
        raise LenslabError(
            f"the router of MoE layer {m.layer} returned {type(output).__name__}, not (router_logits, "
            "topk_weights, topk_indices) as transformers >= 5 routers do; upgrade transformers"
        )
    return output[0], output[1], output[2]


def _route_batch(model, batch: Tensor, layers: list[MoeLayer], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One forward; returns indices, weights `[batch, pos, layer, k]` (heaviest first) and probs
    `[batch, pos, layer, n_experts]`."""
    b, pos = batch.shape
    store: dict = {}

    def grab(t, hook):
        store[hook.name] = t.detach()
        return t

    def grab_router(module, inputs, output, m):
        store[m.layer] = tuple(t.detach() for t in _router_output(m, output))

    names = [n for m in layers if m.kind == "hooked" for n in (m.hook, m.indices_hook)]
    handles = []
    try:
        for m in layers:
            if m.kind != "hooked":  # registered last: sees the output after any switch's router hook
                router = hf_router(model, m.layer)
                handles.append(router.register_forward_hook(lambda mod, i, o, m=m: grab_router(mod, i, o, m)))
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[(n, grab) for n in names])
    finally:
        for h in handles:
            h.remove()
    idx_l, w_l, p_l = [], [], []
    for m in layers:
        if m.kind == "hooked":
            probs = store[m.hook].reshape(b * pos, m.n_experts).float()
            idx = store[m.indices_hook].reshape(b * pos, k).long()
            w = probs.gather(-1, idx)
            if m.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
        else:  # exactly what the HF router returned; its scoring gives the per-expert scores
            if m.layer not in store:
                raise LenslabError(f"the router of MoE layer {m.layer} did not run in the forward pass")
            logits, w, idx = store[m.layer]
            probs = scores_of(logits.reshape(b * pos, m.n_experts), m.scoring)
            w, idx = w.reshape(b * pos, k).float(), idx.reshape(b * pos, k).long()
            order = torch.sort(w, dim=-1, descending=True, stable=True).indices  # DeepSeek's top k is unsorted
            w, idx = w.gather(-1, order), idx.gather(-1, order)
        idx_l.append(idx.reshape(b, pos, k))
        w_l.append(w.reshape(b, pos, k))
        p_l.append(probs.reshape(b, pos, m.n_experts))
    return (torch.stack(idx_l, 2).cpu(), torch.stack(w_l, 2).cpu(), torch.stack(p_l, 2).cpu())


def expert_load(model, prompts, *, fraction: bool = False, prepend_bos: bool | None = None) -> Tensor:
    """Expert selections over a corpus `[layer, expert]` (each layer sums to tokens x k; with
    `fraction`, to 1). Layers are the MoE layers in order (`moe_layers(model)`)."""
    return route(model, prompts, prepend_bos=prepend_bos).load(fraction=fraction)


def activation_maps(model, prompts, *, weights: bool = False, prepend_bos: bool | None = None) -> Tensor:
    """fTRI activation maps `[prompt, layer, expert]`: per prompt, the expert selections summed
    over its tokens (with `weights`, the gate weights summed instead)."""
    return route(model, prompts, prepend_bos=prepend_bos).activation_maps(weights=weights)


# --- fTRI ranking --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class ExpertRanking(JsonResult):
    """(layer, expert) ranked by how much more the target class uses them (MoTE's fTRI).

    Attributes:
        diff: `[layer, expert]` target mean minus other mean of the per-prompt activation maps.
        target_mean / other_mean: the class means `[layer, expert]`.
        layers: the block index of each row.
        weights: True when the maps sum gate weights, False when they count selections.
        n_target / n_other: prompts per class.
        provenance: model, prompts, versions, time.
    """

    diff: Tensor
    target_mean: Tensor
    other_mean: Tensor
    layers: tuple[int, ...]
    weights: bool = False
    n_target: int = 0
    n_other: int = 0
    provenance: dict = field(default_factory=dict)
    KIND = "ExpertRanking"

    def ranked(self) -> list[tuple[int, int, float]]:
        """Every (layer, expert, score), best first (ties keep layer-then-expert order)."""
        flat = self.diff.flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        n = self.diff.shape[1]
        return [(self.layers[int(i) // n], int(i) % n, float(flat[i])) for i in order]

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k (layer, expert, score) with the largest difference; layer is a block index."""
        if k < 1:
            raise LenslabError(f"k must be at least 1, got {k}")
        return self.ranked()[:k]

    def score(self, layer: int, expert: int) -> float:
        """The difference of one (layer, expert)."""
        if layer not in self.layers:
            raise LenslabError(f"layer {layer} is not a MoE layer of this ranking; MoE layers: {list(self.layers)}")
        n = self.diff.shape[1]
        if not 0 <= expert < n:
            raise LenslabError(f"expert {expert} does not exist in layer {layer}: it has experts 0..{n - 1}")
        return float(self.diff[self.layers.index(layer), expert])

    def table(self):
        """Every (layer, expert), best first: the score (target mean minus other mean) and both means."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        rows = []
        for rank, (layer, e, score) in enumerate(self.ranked(), 1):
            i = self.layers.index(layer)
            rows.append(
                {
                    "rank": rank,
                    "layer": layer,
                    "expert": e,
                    "label": labels.expert(layer, e),
                    "score": score,
                    "target_mean": float(self.target_mean[i, e]),
                    "other_mean": float(self.other_mean[i, e]),
                }
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "diff": self.diff.float().tolist(),
            "target_mean": self.target_mean.float().tolist(),
            "other_mean": self.other_mean.float().tolist(),
            "layers": list(self.layers),
            "weights": self.weights,
            "n_target": self.n_target,
            "n_other": self.n_other,
            "top": [list(t) for t in self.top(min(10, self.diff.numel()))],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExpertRanking:
        t = lambda x: torch.tensor(x, dtype=torch.float32)
        return cls(
            diff=t(d["diff"]),
            target_mean=t(d["target_mean"]),
            other_mean=t(d["other_mean"]),
            layers=tuple(d["layers"]),
            weights=bool(d.get("weights", False)),
            n_target=d.get("n_target", 0),
            n_other=d.get("n_other", 0),
            provenance=d.get("provenance") or {},
        )

    def figure(self, value: str = "diff"):
        """Heatmap `[layer, expert]` of the difference (red: the target class uses it more), or with
        `value="target"` / `"other"` a class's mean usage per prompt (behaviour-conditioned load)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        if value in ("target", "other"):
            mean = self.target_mean if value == "target" else self.other_mean
            n = self.n_target if value == "target" else self.n_other
            what = "gate-weight sum" if self.weights else "selections"
            return load_figure(
                mean,
                self.layers,
                f"fTRI: mean {what} per {value} prompt ({n} prompts) · model {self.provenance.get('model', '?')}",
            )
        if value != "diff":
            raise LenslabError(f"value {value!r} is not one of diff, target, other")
        z = self.diff.float()
        span = float(z.abs().max()) or 1.0
        what = "gate-weight sum" if self.weights else "selections"
        fig = go.Figure(
            go.Heatmap(
                z=z.tolist(),
                x=[f"e{e}" for e in range(z.shape[1])],
                y=[f"L{l}" for l in self.layers],
                colorscale="RdBu_r",
                zmid=0,
                zmin=-span,
                zmax=span,
                colorbar=dict(title=f"Δ {what}"),
                hovertemplate="%{y} %{x}<br>target − other: %{z:.3g}<extra></extra>",
            )
        )
        fig.update_layout(xaxis_title="expert", yaxis_title="layer", yaxis_autorange="reversed")
        title = (
            f"fTRI: target − other mean {what} per prompt · model {self.provenance.get('model', '?')} · "
            f"{self.n_target} vs {self.n_other} prompts"
        )
        return figures.style(fig, title)


def _prompt_list(prompts) -> list:
    """What `ftri_rank` keeps of a prompt set in its provenance."""
    return (
        prompts.tolist() if isinstance(prompts, Tensor) else ([prompts] if isinstance(prompts, str) else list(prompts))
    )


def _check_classes(target_prompts, other_prompts) -> None:
    for name, p in (("target_prompts", target_prompts), ("other_prompts", other_prompts)):
        if p is None or (not isinstance(p, Tensor) and len(p) == 0):
            raise LenslabError(f"{name} is empty: fTRI needs at least one prompt in each class")


@dataclass(frozen=True)
class FtriStats:
    """fTRI's sufficient statistics over a set of prompts: what shards of a prompt set add up.

    Attributes:
        sums: `[layer, expert]` float64, the sum over the prompts of their activation maps (each
            map float32, as `activation_maps` gives it; summed in float64 in prompt order).
        n: how many prompts.
        layers: the block index of each row.
        weights: True when the maps sum gate weights, False when they count selections.
    """

    sums: Tensor
    n: int
    layers: tuple[int, ...]
    weights: bool = False

    def __add__(self, other: FtriStats) -> FtriStats:
        if not isinstance(other, FtriStats):
            return NotImplemented
        if other.layers != self.layers or other.weights != self.weights or other.sums.shape != self.sums.shape:
            raise LenslabError(
                "these fTRI statistics do not add up: they come from different models or one counts "
                "selections while the other sums gate weights"
            )
        return FtriStats(sums=self.sums + other.sums, n=self.n + other.n, layers=self.layers, weights=self.weights)

    def mean(self) -> Tensor:
        """The class mean `[layer, expert]` (float32): `sums / n`, rounded once to float32."""
        return (self.sums / self.n).float()


def ftri_stats(model, prompts, *, weights: bool = False, prepend_bos: bool | None = None) -> FtriStats:
    """The summed fTRI activation maps of `prompts` (a string, a list of strings, token ids
    `[batch, pos]`, or a list of `[pos]` token rows): `FtriStats`, which add across prompt sets.

    `ftri_from_stats(ftri_stats(model, A) + ftri_stats(model, B), ...)` ranks as `ftri_rank` on
    the prompts of A and B together: selection counts are integers, summed exactly; gate-weight
    sums differ by float64 rounding only (below float32's resolution).
    """
    layers = moe_layers(model)
    maps = activation_maps(model, prompts, weights=weights, prepend_bos=prepend_bos)  # [prompt, layer, expert]
    sums = torch.zeros(maps.shape[1:], dtype=torch.float64)
    for m in maps:  # prompt order: a fixed summation order
        sums += m.double()
    return FtriStats(sums=sums, n=int(maps.shape[0]), layers=tuple(m.layer for m in layers), weights=weights)


def ftri_from_stats(target: FtriStats, other: FtriStats, *, provenance: dict | None = None) -> ExpertRanking:
    """The `ExpertRanking` of the target and other class statistics (see `ftri_stats`)."""
    if target.layers != other.layers or target.weights != other.weights:
        raise LenslabError("the target and other statistics come from different models or different fTRI options")
    t_mean, o_mean = target.mean(), other.mean()
    return ExpertRanking(
        diff=t_mean - o_mean,
        target_mean=t_mean,
        other_mean=o_mean,
        layers=target.layers,
        weights=target.weights,
        n_target=target.n,
        n_other=other.n,
        provenance=dict(provenance or {}),
    )


FTRI_BATCH = 16  # prompts per forward in `route`, and so the unit that shards of `ftri_rank` keep whole


def _ftri_shards(model, handle, target_prompts, other_prompts, weights, prepend_bos, shard_size) -> list[Shard]:
    """Shards of whole `route` batches (`length_batches` of `FTRI_BATCH`), at most about
    `shard_size` prompts each: every prompt runs in the same batch as in one process."""
    shards = []
    for cls, prompts in (("target", target_prompts), ("other", other_prompts)):
        toks = _prompt_tokens(model, prompts, prepend_bos)
        group: list[int] = []
        batches = list(length_batches(toks, FTRI_BATCH))
        for j, batch in enumerate(batches):
            group += batch
            if len(group) >= shard_size or j == len(batches) - 1:
                payload = {"model": handle, "tokens": [toks[i] for i in sorted(group)], "weights": weights}
                shards.append(Shard(key=f"{cls}/{len(shards):05d}", payload=payload, size=len(group)))
                group = []
    return shards


def _fingerprint(model, target_prompts, other_prompts, weights, prepend_bos, shard_size) -> str:
    h = hashlib.sha1()
    for part in (model_name(model), weights, prepend_bos, shard_size, FTRI_BATCH):
        h.update(repr(part).encode())
    for prompts in (target_prompts, other_prompts):
        h.update(json.dumps(_prompt_list(prompts)).encode())
    return h.hexdigest()


def ftri_rank(
    model,
    target_prompts,
    other_prompts,
    *,
    weights: bool = False,
    prepend_bos: bool | None = None,
    cluster: str | None = None,
    resume: str | Path | None = None,
    shard_size: int = 256,
    progress: bool | Callable[[int, int], None] = True,
) -> ExpertRanking:
    """Rank (layer, expert) by target-class mean minus other-class mean of the fTRI maps (MoTE).

    Args:
        model: a lenslab MoE model.
        target_prompts: prompts of the behaviour to find (e.g. the ones the model refuses).
        other_prompts: the rest (e.g. the ones it answers).
        weights: sum gate weights instead of counting selections.
        cluster: None (this process, the default) or a Ray cluster (`lenslab.jobs.run_job`:
            "local", "auto", "host:port"): the prompts are split into shards of about
            `shard_size` prompts, each worker sums its shard's maps (`ftri_stats`), and the
            driver adds the sums in shard order. Selection counts give the same ranking bit for
            bit; gate-weight sums (`weights=True`) agree to float32 rounding (at most 1 ulp).
        resume: a folder that keeps finished shards (with or without a cluster); a rerun with
            the same folder computes only the rest.
        shard_size: prompts per shard (whole batches of `FTRI_BATCH` prompts of one length, so
            every prompt runs in the batch it runs in within one process).
        progress: one bar counting prompts across workers, or a callable `(done, total)` (sharded
            runs only).

    >>> from lenslab.data import refusal   # zoo/moe-refusal's prompts; its planted refusal experts: L1e2 L1e5 L2e3 L2e6
    >>> refused, _ = refusal.prompts(16, "harmful", seed=0)
    >>> answered, _ = refusal.prompts(16, "benign", seed=0)
    >>> ranking = ftri_rank(model, refused, answered)
    >>> ranking.top(4)   # [(layer, expert, difference), ...]: selections per prompt, refused minus answered
    [(1, 2, 4.5625), (1, 5, 4.5625), (2, 3, 4.5625), (2, 6, 4.5625)]
    """
    moe_layers(model)  # the "no MoE" error before tokenising anything
    _check_classes(target_prompts, other_prompts)
    prov = provenance(model, method="ftri", weights=weights)
    prov["target_prompts"], prov["other_prompts"] = _prompt_list(target_prompts), _prompt_list(other_prompts)
    if cluster is None and resume is None:
        tgt = ftri_stats(model, target_prompts, weights=weights, prepend_bos=prepend_bos)
        oth = ftri_stats(model, other_prompts, weights=weights, prepend_bos=prepend_bos)
        return ftri_from_stats(tgt, oth, provenance=prov)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise LenslabError(f"shard_size must be a positive number of prompts, got {shard_size!r}")
    handle = share_model(model, cluster)
    shards = _ftri_shards(model, handle, target_prompts, other_prompts, weights, prepend_bos, shard_size)
    fp = _fingerprint(model, target_prompts, other_prompts, weights, prepend_bos, shard_size)
    stats = run_job(_ftri_work, shards, cluster=cluster, resume=resume, desc="fTRI", progress=progress, fingerprint=fp)
    merged: dict[str, FtriStats] = {}
    for shard, st in zip(shards, stats):  # shard order: a fixed summation order
        cls = shard.key.split("/")[0]
        merged[cls] = merged[cls] + st if cls in merged else st
    return ftri_from_stats(merged["target"], merged["other"], provenance=prov)


def _ftri_work(payload: dict) -> FtriStats:
    """One shard of `ftri_rank` (a job's work function): the statistics of its prompts."""
    return ftri_stats(worker_model(payload["model"]), payload["tokens"], weights=payload["weights"])
