"""Attribution graphs (circuit-tracer's, Ameisen et al. 2025): direct effects among transcoder features.

**What is computed.** On one prompt, the clean run fixes every attention pattern and every
normalisation denominator (the `hook_scale` of each LayerNorm / RMSNorm), and every MLP is
replaced by its transcoder plus an *error node* per (layer, position), `error = true MLP out −
transcoder out` (a constant; a layer the transcoders do not cover is all error). The model is
then linear from its sources (the active features' activations, the errors and the embeddings
at each position, `embed@p`) to the logits, and it reproduces the original logits. For each
target node the *read vector* is injected at its input (a feature's encoder row at the
transcoders' input hook, `blocks.{l}.ln2.hook_normalized` for the shipped ones; a logit's
unembedding column minus the vocabulary's mean at the unembedding's input `unembed.hook_in`; or
any given direction there) and one backward pass through the frozen linear model, batched over targets, with stop-gradients at every feature and error
output, gives the *direct* effect of every source: `edge = source value × gradient`. Each
target's input is therefore exactly the sum of its incoming edges plus a constant (`biases`:
the biases and the frozen constants).

**Where it lives.** This module needs the transcoders, and `lenslab.circuits` may not import
`lenslab.probes` (docs/design.md, "Layers"), so the graph lives in the probes area beside
`lenslab.probes.transcoders`; it imports the core only, plus that module.

**Versus circuit-tracer so far.** Same linearisation, the same salient-logit targets (top
logits up to cumulative probability `desired_logit_prob`, at most `max_n_logits`, direction
`W_U[:, t] − mean_v W_U[:, v]`), the same influence-ranked feature selection (targets' rows
first, then batches of the not-yet-visited features with the highest influence estimated from
the rows computed so far, until `max_feature_nodes`), `prune_graph` (node and edge thresholds on
the row-normalised |adjacency|; exactly with `prune(..., node_ranking="all")`) and
`compute_graph_scores` (replacement and completeness scores); the adjacency equals
circuit-tracer 0.5.0's on the nodes both define alike (tests/probes/test_circuit_tracer_reference.py).
Differences: the embeddings node at a position holds the token *and* the position embedding;
features and errors at the first position (BOS) are kept (circuit-tracer zeroes them); `prune`'s
default node step ranks the features only; targets may be explicit tokens or arbitrary directions
(a Task's logit difference), weighted by their probability (tokens) or equally (directions);
the dense adjacency is meant for small graphs. An attention-only model (no MLPs) takes
`transcoders=None`: its graph has token and target nodes only. Edges split by the attention
head that carries them: `lenslab.probes.graph_heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.probes.transcoders import CrossLayerTranscoder, check_transcoders, load_transcoders
from lenslab.results import Result, provenance
from lenslab.tasks import Task
from lenslab.toolbox import model_device, model_name

__all__ = [
    "AttributionGraph",
    "RULES",
    "FrozenReplacement",
    "Target",
    "attribution_graph",
    "feature_target",
    "graph_scores",
    "make_targets",
    "node_influence",
    "PRUNE_RANKINGS",
    "prune",
    "resolve_transcoders",
    "salient_logits",
]

FINAL_HOOK = "unembed.hook_in"  # the unembedding's input (the final norm's output, after its weight and bias)


@dataclass(frozen=True)
class Target:
    """A node with an input: reads `vector` at hook `hook`, position `pos`, plus `bias_term`
    (a feature's `b_enc`, else 0). `label` is its lenslab label."""

    label: str
    hook: str
    pos: int
    vector: Tensor
    bias_term: float = 0.0


# --- the frozen replacement model ---------------------------------------------------------------
RULES = ("gradient", "relp")


class FrozenReplacement:
    """`model` on one prompt with attention patterns and norm scales frozen at the clean run and
    the MLPs replaced by `tc` plus constant errors: linear in its sources.

    `values`: the clean sources, `{"embed": [P, d], "pos_embed": [P, d] or None, "features":
    {layer: [P, d_transcoder]}, "errors": {layer: [P, d]}}`. `logits(values)` and
    `read(targets, values, heads=)` run the frozen model at other source values and with heads'
    OV paths switched off (interventions); `rows(targets)` gives the direct effects of every
    source on each target, `head_rows(targets)` the same split by the attention head each path
    crosses last. An attention-only model takes `tc=None` (no MLPs, so no features and no errors).
    `rule="relp"`: `rows` runs its backward with RelP's rules (norm scales and patterns detached
    from the live forward instead of replaced by the cached ones; see `attribution_graph`).
    """

    def __init__(self, model, tokens: Tensor, tc, *, rule: str = "gradient"):
        if rule not in RULES:
            raise LenslabError(f"rule must be one of {RULES}, got {rule!r}")
        self.model, self.tc, self.rule = model, tc, rule
        self.tokens = tokens.reshape(1, -1).to(model_device(model))
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        self.layers = list(tc.layers) if tc is not None else []
        mlp_layers = range(self.n_layers) if tc is not None else range(0)
        self.has_pos = "hook_pos_embed" in model.hook_dict
        ins = [tc.input_hook.format(l=layer) for layer in mlp_layers]
        outs = [tc.output_hook.format(l=layer) for layer in mlp_layers]
        keep = lambda name: (
            (name.endswith("hook_scale") or name.endswith("hook_pattern") or name in ins or name in outs)
            or name in ("hook_embed", "hook_pos_embed")
        )
        with torch.no_grad():
            self.clean_logits, cache = model.run_with_cache(self.tokens, names_filter=keep)
        self.frozen = {
            k: v.detach() for k, v in cache.items() if k.endswith("hook_scale") or k.endswith("hook_pattern")
        }
        xs = {layer: cache[ins[layer]][0].float() for layer in self.layers}
        with torch.no_grad():
            feats = {layer: tc.features(layer, xs[layer]) for layer in self.layers}
            errors = {}
            for layer in mlp_layers:
                y = cache[outs[layer]][0].float()
                errors[layer] = y - tc.output(layer, feats, xs) if layer in self.layers else y
        self.values = {
            "embed": cache["hook_embed"][0].detach(),
            "pos_embed": cache["hook_pos_embed"][0].detach() if self.has_pos else None,
            "features": {k: v.detach() for k, v in feats.items()},
            "errors": {k: v.detach() for k, v in errors.items()},
        }
        self.error_layers = list(mlp_layers)
        self.n_pos = self.tokens.shape[1]

    def _run(
        self,
        values: dict,
        batch: int,
        reads: list[str],
        *,
        heads: Tensor | None = None,
        cut: Tensor | None = None,
        inject: Tensor | None = None,
        live: bool = False,
    ) -> tuple[Tensor, dict, dict]:
        """Forward at `values` (each source `[batch, ...]` or unbatched); the activations at `reads`
        (`got[name]`) and the attention layers that ran before each read (`got[name, "after"]`).

        Per batch element: `heads [batch, n_layers, n_heads]` multiplies each head's `z` (0 switches
        its OV path off under the frozen pattern); where `cut [batch, n_layers]` is set, the
        residual after that layer's attention is the attention output alone (the skip around the
        attention is dropped); `inject [batch, n_layers]` multiplies what each MLP layer's sources
        (its features' decoder writes and its error) add, not the transcoders' skip path. `live`:
        norm scales and patterns are the live forward's, detached (RelP's LN- and AH-rules)."""
        tc, got, leaves, xs = self.tc, {}, {}, {}
        fired: list[int] = []

        def b(t):
            return t if t.dim() == 3 else t.unsqueeze(0).expand(batch, *t.shape)

        leaves["embed"] = b(values["embed"])
        if self.has_pos:
            leaves["pos_embed"] = b(values["pos_embed"])
        feats = {k: b(v) for k, v in values["features"].items()}
        errs = {k: b(v) for k, v in values["errors"].items()}
        hooks = [("hook_embed", lambda act, hook=None: leaves["embed"].to(act.dtype))]
        if self.has_pos:
            hooks.append(("hook_pos_embed", lambda act, hook=None: leaves["pos_embed"].to(act.dtype)))
        for name, val in self.frozen.items():
            if live:
                hooks.append((name, lambda act, hook=None: act.detach()))
            else:
                hooks.append((name, lambda act, hook=None, val=val: val.expand(batch, *val.shape[1:]).to(act.dtype)))
        for layer in self.error_layers:

            def read_in(act, hook=None, layer=layer):
                xs[layer] = act

            def write_out(act, hook=None, layer=layer):
                m = None if inject is None else inject[:, layer].to(act.dtype)
                f = feats if m is None else {k: v * m[:, None, None] for k, v in feats.items()}
                out = errs[layer] if m is None else errs[layer] * m[:, None, None]
                if layer in f:
                    out = out + tc.output(layer, f, xs)
                return out.to(act.dtype)

            hooks += [(tc.input_hook.format(l=layer), read_in), (tc.output_hook.format(l=layer), write_out)]
        attn_out: dict[int, Tensor] = {}
        after = "hook_resid_post" if getattr(self.model.cfg, "attn_only", False) else "hook_resid_mid"
        for layer in range(self.n_layers):

            def at_z(z, hook=None, layer=layer):
                return z if heads is None else z * heads[:, layer, None, :, None].to(z.dtype)

            def at_attn_out(act, hook=None, layer=layer):
                fired.append(layer)
                attn_out[layer] = act

            def at_after(act, hook=None, layer=layer):
                return act if cut is None else torch.where(cut[:, layer, None, None], attn_out[layer], act)

            hooks += [
                (f"blocks.{layer}.attn.hook_z", at_z),
                (f"blocks.{layer}.hook_attn_out", at_attn_out),
                (f"blocks.{layer}.{after}", at_after),
            ]
        for name in reads:

            def grab(act, hook=None, name=name):
                got[name] = act
                got[name, "after"] = set(fired)

            hooks.append((name, grab))
        logits = self.model.run_with_hooks(self.tokens.expand(batch, -1), fwd_hooks=hooks)
        return logits, got, {"features": feats, "errors": errs, **leaves}

    def _head_mask(self, heads: Tensor | None) -> Tensor | None:
        if heads is None:
            return None
        h = torch.as_tensor(heads, dtype=torch.float32)
        if tuple(h.shape) != (self.n_layers, self.n_heads):
            raise LenslabError(
                f"heads must be a [n_layers, n_heads] = [{self.n_layers}, {self.n_heads}] mask, got {tuple(h.shape)}"
            )
        return h.unsqueeze(0).to(self.tokens.device)

    def logits(self, values: dict | None = None, *, heads: Tensor | None = None) -> Tensor:
        """`[1, pos, vocab]` logits of the frozen model at `values` (default: the clean sources);
        `heads [n_layers, n_heads]` multiplies each head's OV output (0: that path is off)."""
        with torch.no_grad():
            return self._run(values or self.values, 1, [], heads=self._head_mask(heads))[0]

    def without(self, node: str) -> dict:
        """The clean sources with source `node` (a feature, error or `embed@p` label) set to zero, for
        `logits` / `read`: the frozen model's response to removing one source, which is its edges."""
        v = self.values
        out = {
            "embed": v["embed"].clone(),
            "pos_embed": v["pos_embed"].clone() if v["pos_embed"] is not None else None,
            "features": {k: x.clone() for k, x in v["features"].items()},
            "errors": {k: x.clone() for k, x in v["errors"].items()},
        }
        n = labels.parse(node)
        if n.kind == "feature":
            out["features"][n.layer][n.pos, n.index] = 0
        elif n.kind == "error":
            out["errors"][n.layer][n.pos] = 0
        elif n.kind == "token":
            out["embed"][n.pos] = 0
            if out["pos_embed"] is not None:
                out["pos_embed"][n.pos] = 0
        else:
            raise LenslabError(f"{node!r} is not a source node (a feature, error or embed@p node)")
        return out

    def read(self, targets: list[Target], values: dict | None = None, *, heads: Tensor | None = None) -> Tensor:
        """Each target's input (`vector · activation + bias_term`) at `values` (default: clean),
        with `heads [n_layers, n_heads]` multiplying each head's OV output (default: all 1)."""
        with torch.no_grad():
            _, got, _ = self._run(
                values or self.values, 1, sorted({t.hook for t in targets}), heads=self._head_mask(heads)
            )
        return torch.stack([got[t.hook][0, t.pos].float() @ t.vector + t.bias_term for t in targets])

    def _grads(self, targets: list[Target], copies: int, **run) -> tuple[dict, dict]:
        """Source value × gradient of each target, per copy of the sources: `[n, copies, ...]`."""
        n, v = len(targets), self.values
        B = n * copies
        req = lambda t: t.unsqueeze(0).expand(B, *t.shape).clone().requires_grad_(True)
        vals = {
            "embed": req(v["embed"]),
            "pos_embed": req(v["pos_embed"]) if self.has_pos else None,
            "features": {k: req(x) for k, x in v["features"].items()},
            "errors": {k: req(x) for k, x in v["errors"].items()},
        }
        with torch.enable_grad():
            _, got, _ = self._run(vals, B, sorted({t.hook for t in targets}), **run)
            s = sum(
                (got[t.hook][i * copies : (i + 1) * copies, t.pos].float() @ t.vector).sum()
                for i, t in enumerate(targets)
            )
            fl = [vals["features"][k] for k in self.layers]
            el = [vals["errors"][k] for k in self.error_layers]
            emb = [vals["embed"]] + ([vals["pos_embed"]] if self.has_pos else [])
            grads = torch.autograd.grad(s, fl + el + emb, allow_unused=True)
        z = lambda g, x: torch.zeros_like(x) if g is None else g
        gf, ge, gm = grads[: len(fl)], grads[len(fl) : len(fl) + len(el)], grads[len(fl) + len(el) :]
        r = lambda t: t.reshape(n, copies, *t.shape[1:])
        P = self.n_pos
        errors = [r((z(g, x) * x).sum(-1).detach()) for g, x in zip(ge, el)]
        out = {
            "features": {k: r((z(g, x) * x).detach()) for k, g, x in zip(self.layers, gf, fl)},
            "errors": torch.stack(errors, 2) if errors else torch.zeros(n, copies, 0, P),
            "tokens": r(sum((z(g, x) * x).sum(-1) for g, x in zip(gm, emb)).detach()),
        }
        return out, {t.hook: got[t.hook, "after"] for t in targets}

    def rows(self, targets: list[Target]) -> dict:
        """Direct effects on each target: `{"features": {layer: [n, P, d_transcoder]}, "errors":
        [n, n_mlp_layers, P], "tokens": [n, P]}` (source value × gradient, in one batched backward)."""
        out, _ = self._grads(targets, 1, live=self.rule == "relp")
        return {
            "features": {k: x[:, 0] for k, x in out["features"].items()},
            "errors": out["errors"][:, 0],
            "tokens": out["tokens"][:, 0],
        }

    def head_rows(self, targets: list[Target], *, one_hop: bool = True) -> dict:
        """The direct effects of `rows`, split by the attention head each path crosses *last*.

        A direct path from a source to a target is linear: it runs through the residual stream,
        the transcoders' skip paths and the heads' OV circuits under the frozen patterns. Every
        path either crosses no head (`"residual"`: same position only) or has a last head (l, h)
        before the target reads: the stream of (l, h) keeps every path up to layer l's attention,
        then head h alone, then no attention (later sources are not injected). So
        `rows = residual + sum over heads`, exactly. `one_hop`: also each head's share that
        crosses no earlier head (its own OV only). Returns `{"residual": rows-like, "heads":
        rows-like with a head axis [.., n_layers * n_heads, ..] after the target axis, "one_hop":
        same or None}`; heads whose layer runs after the target's read are zero.
        """
        L, H = self.n_layers, self.n_heads
        K = L * H
        S = 1 + K + (K if one_hop else 0)
        heads = torch.zeros(S, L, H)
        cut = torch.zeros(S, L, dtype=torch.bool)
        inject = torch.ones(S, L)
        for l in range(L):
            for h in range(H):
                for s in (1 + l * H + h, 1 + K + l * H + h) if one_hop else (1 + l * H + h,):
                    if s <= K:
                        heads[s, :l] = 1.0  # last head: any path before it
                    heads[s, l, h] = 1.0
                    cut[s, l] = True
                    inject[s, l:] = 0.0
        n = len(targets)
        dev = self.tokens.device
        rep = lambda t: t.unsqueeze(0).expand(n, *t.shape).reshape(n * S, *t.shape[1:]).to(dev)
        out, after = self._grads(targets, S, heads=rep(heads), cut=rep(cut), inject=rep(inject))
        # a head whose layer runs after the target's read carries nothing to it: zero its stream
        ok = torch.ones(n, S, dtype=torch.bool)
        for i, t in enumerate(targets):
            for l in range(L):
                if l not in after[t.hook]:
                    ok[i, 1 + l * H : 1 + (l + 1) * H] = False
                    if one_hop:
                        ok[i, 1 + K + l * H : 1 + K + (l + 1) * H] = False

        def part(sl):
            m = ok[:, sl].to(out["tokens"].dtype)
            f = lambda x: x[:, sl] * m.reshape(*m.shape, *([1] * (x.dim() - 2)))
            return {"features": {k: f(x) for k, x in out["features"].items()}, "errors": f(out["errors"]),
                    "tokens": f(out["tokens"])}  # fmt: skip

        sq = lambda d: {"features": {k: x[:, 0] for k, x in d["features"].items()}, "errors": d["errors"][:, 0],
                        "tokens": d["tokens"][:, 0]}  # fmt: skip
        return {
            "residual": sq(part(slice(0, 1))),
            "heads": part(slice(1, 1 + K)),
            "one_hop": part(slice(1 + K, S)) if one_hop else None,
        }


# --- targets --------------------------------------------------------------------------------------
def _unembed(model) -> Tensor:
    return model.W_U.detach().float()


def salient_logits(
    logits: Tensor, W_U: Tensor, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[Tensor, Tensor, Tensor]:
    """circuit-tracer's `compute_salient_logits`: the top tokens of `logits [vocab]` until their
    cumulative probability reaches `desired_logit_prob` (at most `max_n_logits`): (token ids,
    probabilities, directions `[k, d_model]` = unembedding column minus the vocabulary mean)."""
    probs = torch.softmax(logits.float(), -1)
    top_p, top_idx = probs.topk(min(int(max_n_logits), probs.shape[-1]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    top_p, top_idx = top_p[:cutoff], top_idx[:cutoff]
    return top_idx, top_p, (W_U[:, top_idx] - W_U.mean(-1, keepdim=True)).T


def _single_token(model, t) -> int:
    if isinstance(t, int):
        if not 0 <= t < int(model.cfg.d_vocab):
            raise LenslabError(f"target token id {t} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return t
    ids = model.to_tokens(str(t), prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise LenslabError(f"target token {t!r} is not one token: it tokenizes to {len(ids)} tokens {ids}")
    return int(ids[0])


def _check_fraction(name: str, x: float) -> float:
    if not isinstance(x, (int, float)) or not 0 < x <= 1:
        raise LenslabError(f"{name} must be in (0, 1], got {x!r}")
    return float(x)


# --- influence (circuit-tracer's graph.py) -------------------------------------------------------
def _normalize(a: Tensor) -> Tensor:
    a = a.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def _influence(a_norm: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    cur = weights @ a_norm
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            break
        cur = cur @ a_norm
        total += cur
    return total


def _partial_influence(rows: Tensor, row_nodes: Tensor, weights: Tensor, max_iter: int = 128) -> Tensor:
    """circuit-tracer's `compute_partial_influences`: influence on the targets through the rows computed so far."""
    a = _normalize(rows)
    prod = weights.clone()
    total = torch.zeros(rows.shape[1])
    for _ in range(max_iter):
        prod = prod[row_nodes] @ a
        if not prod.any():
            break
        total += prod
        prod = torch.cat([prod, torch.zeros(weights.shape[0] - prod.shape[0])])
    return total


# --- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class AttributionGraph(Result):
    """An attribution graph on one prompt.

    Attributes:
        nodes: lenslab labels, in the order features (`L1F37@5`), errors (`MLP1.err@5`), tokens
            (`embed@0`), targets (`logit117@9` or `target0@9`).
        adjacency: `[n, n]` direct effects, `adjacency[target, source]` (rows of errors and
            tokens are zero).
        activations: per node: a feature's activation, a target's value, else 0.
        inputs / biases: per node with an input (features, targets): its input (a feature's
            pre-activation, a target's value) and the constant part of it; `inputs = adjacency
            row sum + biases` on an unselected, unpruned graph. 0 for the other nodes.
        target_weights: per target (the last nodes), its weight (probability, or equal).
        tokens / str_tokens: the prompt. n_layers: the model's layers.
        replacement_score / completeness_score: circuit-tracer's `compute_graph_scores`.
        pruned: the (node_threshold, edge_threshold) of `prune`, or None.
        provenance: model, transcoders, options, versions.
    """

    nodes: list[str]
    adjacency: Tensor
    activations: Tensor
    inputs: Tensor
    biases: Tensor
    target_weights: Tensor
    tokens: list[int]
    str_tokens: list[str]
    n_layers: int
    replacement_score: float = float("nan")
    completeness_score: float = float("nan")
    pruned: tuple[float, float] | None = None
    provenance: dict = field(default_factory=dict)
    KIND = "AttributionGraph"

    @property
    def parsed(self) -> list[labels.Node]:
        return [labels.parse(n) for n in self.nodes]

    def _counts(self) -> tuple[int, int, int, int]:
        kinds = [n.kind for n in self.parsed]
        return tuple(
            sum(k in group for k in kinds) for group in (("feature",), ("error",), ("token",), ("logit", "target"))
        )

    def node_influence(self) -> Tensor:
        """Each node's influence on the targets (circuit-tracer's `compute_node_influence`)."""
        return node_influence(self.adjacency, self.target_weights)

    def to_dict(self) -> dict:
        f = lambda t: t.detach().cpu().float().tolist()
        return {
            "kind": self.KIND,
            "nodes": list(self.nodes),
            "adjacency": f(self.adjacency),
            "activations": f(self.activations),
            "inputs": f(self.inputs),
            "biases": f(self.biases),
            "target_weights": f(self.target_weights),
            "tokens": list(self.tokens),
            "str_tokens": list(self.str_tokens),
            "n_layers": self.n_layers,
            "replacement_score": self.replacement_score,
            "completeness_score": self.completeness_score,
            "pruned": list(self.pruned) if self.pruned else None,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AttributionGraph:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        t = lambda x: torch.tensor(x, dtype=torch.float32)
        n = len(d["nodes"])
        return cls(
            nodes=list(d["nodes"]),
            adjacency=t(d["adjacency"]).reshape(n, n),
            activations=t(d["activations"]),
            inputs=t(d["inputs"]),
            biases=t(d["biases"]),
            target_weights=t(d["target_weights"]),
            tokens=list(d["tokens"]),
            str_tokens=list(d["str_tokens"]),
            n_layers=int(d["n_layers"]),
            replacement_score=float(d["replacement_score"]),
            completeness_score=float(d["completeness_score"]),
            pruned=tuple(d["pruned"]) if d.get("pruned") else None,
            provenance=dict(d.get("provenance", {})),
        )

    def table(self, what: str = "nodes"):
        """`what="nodes"`: one row per node (label, kind, layer, pos, index, activation, influence);
        `what="edges"`: one row per nonzero edge (source, target, weight), strongest first."""
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
        infl = self.node_influence()
        p = self.parsed
        return pd.DataFrame(
            {
                "node": self.nodes,
                "kind": [n.kind for n in p],
                "layer": [n.layer for n in p],
                "pos": [n.pos for n in p],
                "token": [self.str_tokens[n.pos] for n in p],
                "index": [n.index for n in p],
                "activation": self.activations.tolist(),
                "influence": infl.tolist(),
            }
        )

    def figure(self, max_edges: int = 300):
        """Nodes by position (x) and layer (y: embeddings at the bottom, targets at the top),
        edges (the `max_edges` strongest) with width by |weight| and colour by sign."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        p = self.parsed
        colors = {"feature": "#3b6ea8", "error": "#999999", "token": "#31a354", "logit": "#e6550d", "target": "#e6550d"}
        ys = {"token": -1.0, "logit": float(self.n_layers), "target": float(self.n_layers)}
        xy = []
        seen: dict[tuple, int] = {}
        for n in p:
            y = ys[n.kind] if n.kind in ys else float(n.layer) + (0.3 if n.kind == "error" else 0.0)
            k = seen.get((n.pos, y), 0)
            seen[(n.pos, y)] = k + 1
            xy.append((n.pos + 0.12 * k, y))
        fig = go.Figure()
        tgt, src = self.adjacency.nonzero(as_tuple=True)
        w = self.adjacency[tgt, src]
        order = w.abs().argsort(descending=True)[:max_edges]
        wmax = float(w.abs().max()) if len(w) else 1.0
        for sign, color in ((1, "rgba(214,39,40,0.5)"), (-1, "rgba(31,119,180,0.5)")):
            for lo, hi, width in ((0.5, 1.01, 5), (0.15, 0.5, 2.5), (0.0, 0.15, 0.8)):
                xs_, ys_ = [], []
                for i in order.tolist():
                    r = abs(float(w[i])) / wmax
                    if (float(w[i]) > 0) == (sign > 0) and lo <= r < hi:
                        (x0, y0), (x1, y1) = xy[int(src[i])], xy[int(tgt[i])]
                        xs_ += [x0, x1, None]
                        ys_ += [y0, y1, None]
                if xs_:
                    fig.add_trace(
                        go.Scatter(
                            x=xs_, y=ys_, mode="lines", line=dict(color=color, width=width), hoverinfo="skip",
                            showlegend=False,
                        )
                    )  # fmt: skip
        infl = self.node_influence()
        fig.add_trace(
            go.Scatter(
                x=[a for a, _ in xy],
                y=[b for _, b in xy],
                mode="markers",
                marker=dict(size=9, color=[colors[n.kind] for n in p]),
                text=[
                    f"{lab} act={float(a):.3g} infl={float(i):.3g}"
                    for lab, a, i in zip(self.nodes, self.activations, infl)
                ],
                hoverinfo="text",
                showlegend=False,
            )
        )
        fig.update_layout(
            xaxis=dict(tickmode="array", tickvals=list(range(len(self.str_tokens))), ticktext=self.str_tokens),
            yaxis=dict(
                tickmode="array",
                tickvals=[-1, *range(self.n_layers), self.n_layers],
                ticktext=["embed", *[labels.layer(i) for i in range(self.n_layers)], "targets"],
            ),
            height=520,
            width=max(600, 90 * len(self.str_tokens)),
        )
        title = f"attribution graph · model {self.provenance.get('model', '?')} · {len(self.nodes)} nodes"
        return figures.style(
            fig,
            f"{title} · replacement {self.replacement_score:.3f} · completeness {self.completeness_score:.3f}",
        )


# --- scores and pruning ---------------------------------------------------------------------------
def _target_weights_full(adjacency: Tensor, weights: Tensor) -> Tensor:
    w = torch.zeros(adjacency.shape[0])
    w[adjacency.shape[0] - len(weights) :] = weights.float()
    return w


def node_influence(adjacency: Tensor, target_weights: Tensor) -> Tensor:
    """circuit-tracer's `compute_node_influence`: `w · Σ_k Â^k` with `Â` the row-normalised |adjacency|."""
    return _influence(_normalize(adjacency.float()), _target_weights_full(adjacency, target_weights))


def graph_scores(adjacency: Tensor, nodes: list[str], target_weights: Tensor) -> tuple[float, float]:
    """circuit-tracer's `compute_graph_scores`: (replacement score, completeness score).

    Replacement: the tokens' share of the influence that reaches the targets from tokens and
    errors. Completeness: the influence-weighted share of each node's input that is not error."""
    kinds = [labels.parse(n).kind for n in nodes]
    err = torch.tensor([k == "error" for k in kinds])
    tok = torch.tensor([k == "token" for k in kinds])
    w = _target_weights_full(adjacency, target_weights)
    a = _normalize(adjacency.float())
    infl = _influence(a, w)
    ti, ei = infl[tok].sum(), infl[err].sum()
    replacement = float(ti / (ti + ei)) if float(ti + ei) > 0 else float("nan")
    non_error = 1 - a[:, err].sum(-1)
    out = infl + w
    return replacement, float((non_error * out).sum() / out.sum())


def _find_threshold(scores: Tensor, threshold: float) -> Tensor:
    s = scores.sort(descending=True).values
    cum = s.cumsum(0) / s.sum()
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold))), len(cum) - 1)
    return s[i]


PRUNE_RANKINGS = ("features", "all")


def prune(
    graph: AttributionGraph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    node_ranking: str = "features",
) -> AttributionGraph:
    """circuit-tracer's `prune_graph`: keep the features whose influence makes up `node_threshold`
    of the features' total, then the edges whose influence makes up `edge_threshold` of the total,
    then drop feature and error nodes left without outgoing (features: or incoming) edges. Tokens
    and targets stay. Returns the pruned graph (kept nodes only); a `LenslabError` if no edge is left.

    `node_ranking`: `"features"` (the default, as above: the node step ranks the features only and
    keeps every error node) or `"all"`, circuit-tracer 0.5.0's `prune_graph` exactly: the node step
    ranks every node against the total influence of all nodes (tokens and errors included, which
    usually hold most of it), so it keeps fewer features and can drop error nodes (checked against
    circuit-tracer's own masks: tests/probes/test_circuit_tracer_reference.py)."""
    node_threshold = _check_fraction("node_threshold", node_threshold)
    edge_threshold = _check_fraction("edge_threshold", edge_threshold)
    if node_ranking not in PRUNE_RANKINGS:
        raise LenslabError(f"node_ranking must be one of {PRUNE_RANKINGS}, got {node_ranking!r}")
    nf, ne, nt, nk = graph._counts()
    a = graph.adjacency.float()
    if not a.any():
        raise LenslabError("the attribution graph has no edges: nothing to prune (the pruned graph would be empty)")
    w = _target_weights_full(a, graph.target_weights)
    infl = _influence(_normalize(a), w)
    node_mask = torch.ones(a.shape[0], dtype=torch.bool)
    if node_ranking == "all":
        node_mask = infl >= _find_threshold(infl, node_threshold)
        node_mask[nf + ne :] = True
    elif nf:
        node_mask[:nf] = infl[:nf] >= _find_threshold(infl[:nf], node_threshold)
    pa = a.clone()
    pa[~node_mask] = 0
    pa[:, ~node_mask] = 0
    pn = _normalize(pa)
    pinfl = _influence(pn, w) + w
    edge_scores = pn * pinfl[:, None]
    edge_mask = edge_scores >= _find_threshold(edge_scores.flatten(), edge_threshold)
    edge_mask &= pa != 0
    nsrc = nf + ne
    old = None
    while old is None or not torch.equal(old, node_mask):
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:nsrc] &= edge_mask[:, :nsrc].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
    if not edge_mask.any():
        raise LenslabError(
            f"pruning with node_threshold={node_threshold}, edge_threshold={edge_threshold} left no edge: "
            "raise the thresholds"
        )
    keep = node_mask.nonzero()[:, 0]
    adj = (a * edge_mask)[keep][:, keep]
    nodes = [graph.nodes[i] for i in keep.tolist()]
    rep, comp = graph_scores(adj, nodes, graph.target_weights)
    return AttributionGraph(
        nodes=nodes,
        adjacency=adj,
        activations=graph.activations[keep],
        inputs=graph.inputs[keep],
        biases=graph.biases[keep],
        target_weights=graph.target_weights,
        tokens=graph.tokens,
        str_tokens=graph.str_tokens,
        n_layers=graph.n_layers,
        replacement_score=rep,
        completeness_score=comp,
        pruned=(node_threshold, edge_threshold),
        provenance=dict(
            graph.provenance,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            **({"node_ranking": node_ranking} if node_ranking != "features" else {}),
        ),
    )


# --- building -------------------------------------------------------------------------------------
def _prompt_tokens(model, prompt) -> Tensor:
    if isinstance(prompt, str):
        return model.to_tokens(prompt)[0]
    t = torch.as_tensor(prompt)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise LenslabError(f"the prompt must be a string or one row of token ids, got shape {tuple(t.shape)}")
    return t.long()


def feature_target(tc, layer: int, pos: int, f: int) -> Target:
    """The `Target` of feature `f` of layer `layer` at `pos`: its encoder row read at the transcoders' input hook, plus `b_enc`."""
    if isinstance(tc, CrossLayerTranscoder):
        vec, b = tc.W_enc[layer, f], tc.b_enc[layer, f]
    else:
        vec, b = tc[layer].W_enc[f], tc[layer].b_enc[f]
    return Target(labels.feature(layer, f, pos), tc.input_hook.format(l=layer), pos, vec.detach().float(), float(b))


def resolve_transcoders(model, transcoders):
    """`transcoders` loaded (a name) and checked against `model`; `None` for an attention-only
    model (no MLPs to replace), and only there."""
    if transcoders is None:
        if not getattr(model.cfg, "attn_only", False):
            raise LenslabError(
                f"model {model_name(model)!r} has MLPs: give transcoders (a TranscoderSet, a CrossLayerTranscoder or a "
                "zoo name such as 'zoo/ioi-4l/per-layer'); only an attention-only model takes transcoders=None"
            )
        return None
    tc = load_transcoders(transcoders) if isinstance(transcoders, str) else transcoders
    check_transcoders(model, tc)
    if tc.model_name and tc.model_name != model_name(model):
        raise LenslabError(f"these transcoders were trained on {tc.model_name!r}, not on model {model_name(model)!r}")
    return tc


def make_targets(
    model, frozen: FrozenReplacement, targets, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[list[Target], Tensor]:
    """The target nodes of a graph on `frozen`'s prompt and their weights, from `targets` as
    `attribution_graph` takes it (None, tokens, a Task, directions)."""
    last = frozen.n_pos - 1
    W_U = _unembed(model)
    if FINAL_HOOK not in model.hook_dict:
        raise LenslabError(f"model {model_name(model)!r} has no hook {FINAL_HOOK!r} to read the logit targets at")
    final_hook = FINAL_HOOK
    mean_dir = W_U.mean(-1)
    if targets is None:
        ids, weights, dirs = salient_logits(
            frozen.clean_logits[0, last], W_U, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob
        )
        tgts = [Target(labels.logit_node(int(t), last), final_hook, last, d) for t, d in zip(ids.tolist(), dirs)]
    elif isinstance(targets, Task):
        c, i = (int(x) for x in targets.answer_tokens[0])
        tgts = [Target(labels.target_node(0, last), final_hook, last, W_U[:, c] - W_U[:, i])]
        weights = torch.ones(1)
    elif isinstance(targets, Tensor):
        d = targets.detach().float().reshape(-1, targets.shape[-1])
        if d.shape[-1] != int(model.cfg.d_model):
            raise LenslabError(f"target directions must have d_model={model.cfg.d_model} entries, got {d.shape[-1]}")
        tgts = [Target(labels.target_node(k, last), final_hook, last, v) for k, v in enumerate(d)]
        weights = torch.full((len(tgts),), 1.0 / len(tgts))
    else:
        ids = [_single_token(model, t) for t in (targets if isinstance(targets, (list, tuple)) else [targets])]
        if not ids:
            raise LenslabError("targets is an empty list: give tokens, a Task, directions or None")
        probs = torch.softmax(frozen.clean_logits[0, last].float(), -1)
        tgts = [Target(labels.logit_node(t, last), final_hook, last, W_U[:, t] - mean_dir) for t in ids]
        weights = probs[ids]
    return tgts, weights


def attribution_graph(
    model,
    prompt,
    transcoders,
    *,
    targets=None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 32,
    rule: str = "gradient",
) -> AttributionGraph:
    """The attribution graph of `model` on `prompt` (a string or token ids; `None` with a Task
    target: its first clean prompt) through `transcoders` (a `TranscoderSet`, a
    `CrossLayerTranscoder` or a name for `load_transcoders`; `None` for an attention-only model,
    whose graph has token and target nodes only), at the last position.

    `targets`: `None` (the salient logits: `max_n_logits`, `desired_logit_prob`), a list of
    tokens (ids or one-token strings), a `Task` (its first prompt's logit difference, correct −
    incorrect unembedding), or directions `[d_model]` / `[k, d_model]` read at the unembedding's
    input (`unembed.hook_in`). `max_feature_nodes`: keep that many features, chosen by influence as circuit-tracer
    (None: every active feature). `batch_size`: targets per backward pass.

    `rule`: `"gradient"` (circuit-tracer's backward through the frozen replacement) or `"relp"`
    (RelP's LRP rules, Rezaei Jafari et al. 2025: LN-rule, identity rule, half rule, AH-rule, run
    on the live forward with norm scales and patterns detached). On this graph the two are the
    same: every rule acts on a part the replacement model already holds constant, and what is
    left is linear, where LRP-0 is the gradient (docs/transcoders.md, "RelP edge weights").
    Head-resolved edges: `lenslab.probes.graph_heads.head_edges`.

    >>> import lenslab
    >>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    >>> g = attribution_graph(model, "When Mary and John went to the store, John gave a drink to",
    ...                       "zoo/ioi-4l/per-layer", max_feature_nodes=64)
    >>> g.nodes[-1].startswith("logit"), 0 < g.replacement_score <= 1
    (True, True)
    """
    desired_logit_prob = _check_fraction("desired_logit_prob", desired_logit_prob)
    if rule not in RULES:
        raise LenslabError(f"rule must be one of {RULES}, got {rule!r}")
    tc = resolve_transcoders(model, transcoders)
    if prompt is None:
        if not isinstance(targets, Task):
            raise LenslabError("give a prompt (or a Task as targets, whose first clean prompt is used)")
        prompt = targets.clean_tokens[0]
    toks = _prompt_tokens(model, prompt)
    frozen = FrozenReplacement(model, toks, tc, rule=rule)
    P = frozen.n_pos
    tgts, weights = make_targets(
        model, frozen, targets, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob
    )
    # the sources: active features (layer, pos, feature), then errors (layer-major), then tokens
    active = []
    for layer in frozen.layers:
        for p, f in (frozen.values["features"][layer] != 0).nonzero().tolist():
            active.append((layer, p, f))
    n_act, n_err = len(active), len(frozen.error_layers) * P
    n_cols = n_act + n_err + P

    def rows_of(ts: list[Target]) -> Tensor:
        out = torch.zeros(len(ts), n_cols)
        for i in range(0, len(ts), batch_size):
            r = frozen.rows(ts[i : i + batch_size])
            k = len(ts[i : i + batch_size])
            if active:
                feats = torch.stack([r["features"][layer][:, p, f] for layer, p, f in active], 1)
                out[i : i + k, :n_act] = feats.float().cpu()
            out[i : i + k, n_act : n_act + n_err] = r["errors"].reshape(k, -1).float().cpu()
            out[i : i + k, n_act + n_err :] = r["tokens"].float().cpu()
        return out

    target_rows = rows_of(tgts)
    limit = n_act if max_feature_nodes is None else min(int(max_feature_nodes), n_act)
    if max_feature_nodes is not None and int(max_feature_nodes) < 0:
        raise LenslabError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    feature_rows: list[Tensor] = []
    visited: list[int] = []
    if limit == n_act:
        visited = list(range(n_act))
        feature_rows = [rows_of([feature_target(tc, *active[j]) for j in visited])] if n_act else []
    else:
        w_all = torch.cat([torch.zeros(n_cols), weights.float()])
        while len(visited) < limit:
            rows = torch.cat([*feature_rows, target_rows]) if feature_rows else target_rows
            row_nodes = torch.tensor(visited + list(range(n_cols, n_cols + len(tgts))), dtype=torch.long)
            infl = _partial_influence(rows, row_nodes, w_all)[:n_act]
            infl[visited] = -1.0
            take = infl.argsort(descending=True, stable=True)[: min(batch_size, limit - len(visited))].tolist()
            feature_rows.append(rows_of([feature_target(tc, *active[j]) for j in take]))
            visited += take
    frows = torch.cat(feature_rows) if feature_rows else torch.zeros(0, n_cols)
    order = sorted(range(len(visited)), key=lambda i: active[visited[i]])
    sel = [visited[i] for i in order]
    frows = frows[order] if len(order) else frows
    # assemble: nodes = selected features, errors, tokens, targets
    nf, nk = len(sel), len(tgts)
    n = nf + n_err + P + nk
    cols = torch.tensor(sel + list(range(n_act, n_cols)), dtype=torch.long)
    adj = torch.zeros(n, n)
    adj[:nf, : nf + n_err + P] = frows[:, cols]
    adj[n - nk :, : nf + n_err + P] = target_rows[:, cols]
    nodes = (
        [labels.feature(active[j][0], active[j][2], active[j][1]) for j in sel]
        + [labels.error_node(layer, p) for layer in frozen.error_layers for p in range(P)]
        + [labels.token_node(p) for p in range(P)]
        + [t.label for t in tgts]
    )
    sel_targets = [feature_target(tc, *active[j]) for j in sel] + tgts
    inputs_sel = frozen.read(sel_targets)
    zero = {
        "embed": torch.zeros_like(frozen.values["embed"]),
        "pos_embed": torch.zeros_like(frozen.values["pos_embed"]) if frozen.has_pos else None,
        "features": {k: torch.zeros_like(v) for k, v in frozen.values["features"].items()},
        "errors": {k: torch.zeros_like(v) for k, v in frozen.values["errors"].items()},
    }
    biases_sel = frozen.read(sel_targets, zero)
    idx = torch.tensor(list(range(nf)) + list(range(n - nk, n)), dtype=torch.long)
    inputs, biases, acts = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    inputs[idx], biases[idx] = inputs_sel.float().cpu(), biases_sel.float().cpu()
    acts[:nf] = torch.tensor(
        [float(frozen.values["features"][layer][p, f]) for layer, p, f in (active[j] for j in sel)]
    )
    acts[n - nk :] = inputs_sel[nf:].float().cpu()
    rep, comp = graph_scores(adj, nodes, weights)
    return AttributionGraph(
        nodes=nodes,
        adjacency=adj,
        activations=acts,
        inputs=inputs,
        biases=biases,
        target_weights=weights.float().cpu(),
        tokens=toks.tolist(),
        str_tokens=model.to_str_tokens(toks.reshape(1, -1).to(model_device(model)))
        if getattr(model, "tokenizer", None) is not None
        else [str(t) for t in toks.tolist()],
        n_layers=frozen.n_layers,
        replacement_score=rep,
        completeness_score=comp,
        provenance=provenance(
            model,
            method="attribution_graph",
            transcoders=tc.kind if tc is not None else None,
            rule=rule,
            n_active_features=n_act,
            max_feature_nodes=max_feature_nodes,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
        ),
    )
