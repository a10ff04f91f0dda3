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

**How, and in what memory.** One forward of the prompt (one copy) is kept with its autograd
graph, and every batch of targets is one vectorised backward pass through it
(`FrozenReplacement.tape` / `gradients`; circuit-tracer keeps a forward of `batch_size` copies
instead). A feature's edges come from the gradient at its layer's MLP output by one batched
matmul over its decoder rows (`_FeatureGather`), never the dense `[targets, P, d_transcoder]`
product. `memory_budget=` bounds the peak (`plan_memory`: fewer targets per pass, the rows in a
temporary file), and `prune` holds no `n × n` temporary: blocks of rows, the edge threshold by a
histogram of the scores' bits (`find_threshold`), the edge mask as bits (`prune_bytes`).

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
the adjacency is dense (its n² floats bound the graph's size). An attention-only model (no MLPs) takes
`transcoders=None`: its graph has token and target nodes only. Edges split by the attention
head that carries them: `lenslab.probes.graph_heads`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError
from lenslab.kernels.config import parse_bytes
from lenslab.probes.transcoders import CrossLayerTranscoder, check_transcoders, load_transcoders
from lenslab.results import Result, provenance
from lenslab.tasks import Task
from lenslab.toolbox import model_device, model_name

__all__ = [
    "AttributionGraph",
    "CHUNK_ELEMENTS",
    "RULES",
    "FrozenReplacement",
    "HEADROOM",
    "MemoryPlan",
    "Target",
    "attribution_graph",
    "feature_target",
    "find_threshold",
    "graph_scores",
    "make_targets",
    "node_influence",
    "PRUNE_RANKINGS",
    "plan_memory",
    "prune",
    "prune_bytes",
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


def _decoder(tc, src: int, dst: int) -> Tensor | None:
    """`[d_transcoder, d_model]`: what layer `src`'s features write into MLP layer `dst`'s output
    (None where they write nothing there)."""
    if isinstance(tc, CrossLayerTranscoder):
        return tc.W_dec[src][:, dst - src] if dst >= src else None
    return tc[src].W_dec if dst == src else None


def _bias_and_skip(tc, layer: int, x: Tensor) -> Tensor:
    """The transcoder output at `layer` that no feature writes: `b_dec` plus the skip path of `x`
    (the MLP input, live)."""
    if isinstance(tc, CrossLayerTranscoder):
        b, W = tc.b_dec[layer], None if tc.W_skip is None else tc.W_skip[layer]
    else:
        b, W = tc[layer].b_dec, None if tc[layer].W_skip is None else tc[layer].W_skip.T
    return b if W is None else b + x.to(W.dtype) @ W


def _z(pattern: Tensor, v: Tensor, z: Tensor) -> Tensor:
    """The heads' outputs `z [S, P, n_heads, d_head]` from a pattern shared by the `S` copies
    (`pattern[0]`) and their values `v [S, P, n_kv_heads, d_head]`: one `[P, P] @ [S, P, d_head]`
    matmul per head, the same numbers as TransformerLens's batched product. In the tape's vectorised
    backward this is what keeps the attention fast: the batched `pattern @ v` of TransformerLens makes
    the vmapped backward copy the pattern once per target, a 2-D matmul folds the targets into its
    columns instead (4x at 512 tokens)."""
    H = z.shape[2]
    rep = H // v.shape[2]
    return torch.stack([torch.matmul(pattern[0, h], v[:, :, h // rep]) for h in range(H)], 2).to(z.dtype)


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

    **How the rows are computed** (circuit-tracer's scheme, one step further). The frozen model is
    linear, so its backward passes need no activation of the forward, only its graph: one forward
    of the prompt (a *tape*: one copy, or one per head stream for `head_rows`) is kept
    (`retain_graph`) and every batch of targets is one vectorised backward pass through it
    (`torch.autograd.grad(..., is_grads_batched=True)`). The gradients are taken at the
    embeddings and at what each MLP layer's sources write (the error plus the decoded
    features, a constant); a feature's edge is its activation times its decoder row · that
    gradient. The tape's true MLPs run on a detached input (their output is replaced) and it
    stops at the unembedding's input, so neither is in the graph.
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
        # the MLP input hook feeds the true MLP only (its output is replaced): the tape detaches it there
        self._detach_in = tc is not None and tc.input_hook.endswith("ln2.hook_normalized")
        self._tapes: dict = {}

    def writes(self, values: dict) -> dict[int, Tensor]:
        """What each MLP layer's sources write at `values`: its error plus its transcoder's decoded
        features (every layer's, for a cross-layer transcoder), without `b_dec` and the skip path:
        `{layer: [P, d_model]}`."""
        out = {}
        for layer in self.error_layers:
            w = values["errors"][layer]
            for src in self.layers:
                dec = _decoder(self.tc, src, layer)
                if dec is not None:
                    w = w + values["features"][src].to(dec.dtype) @ dec
            out[layer] = w
        return out

    def _run(
        self,
        values: dict,
        streams: int,
        reads: list[str],
        *,
        heads: Tensor | None = None,
        cut: Tensor | None = None,
        inject: Tensor | None = None,
        live: bool = False,
        logits: bool = False,
        tape: bool = False,
    ) -> tuple[Tensor | None, dict, dict]:
        """Forward of `streams` copies of the prompt at `values` (unbatched sources): the logits
        (only with `logits`), the activations at `reads` (`got[name]`) and the attention layers
        that ran before each read (`got[name, "after"]`), and the points the sources enter at
        (`{"embed", "pos_embed": [streams, P, d], "writes": {layer: [streams, P, d]}}`).

        Per stream: `heads [streams, n_layers, n_heads]` multiplies each head's `z` (0 switches
        its OV path off under the frozen pattern); where `cut [streams, n_layers]` is set, the
        residual after that layer's attention is the attention output alone (the skip around the
        attention is dropped); `inject [streams, n_layers]` multiplies what each MLP layer's
        sources write (`writes`), not `b_dec` and the skip path. `live`: norm scales and patterns
        are the live forward's, detached (RelP's LN- and AH-rules). `tape`: the entry points are
        leaves that take gradients and the autograd graph is built (call under `enable_grad`)."""
        tc, got, xs = self.tc, {}, {}
        fired: list[int] = []
        S = streams

        def entry(t):
            x = t.unsqueeze(0).expand(S, *t.shape)
            return x.clone().requires_grad_(True) if tape else x

        points = {
            "embed": entry(values["embed"]),
            "pos_embed": entry(values["pos_embed"]) if self.has_pos else None,
            "writes": {k: entry(v) for k, v in self.writes(values).items()},
        }
        hooks = [("hook_embed", lambda act, hook=None: points["embed"].to(act.dtype))]
        if self.has_pos:
            hooks.append(("hook_pos_embed", lambda act, hook=None: points["pos_embed"].to(act.dtype)))
        for name, val in self.frozen.items():
            if live:
                hooks.append((name, lambda act, hook=None: act.detach()))
            else:
                hooks.append((name, lambda act, hook=None, val=val: val.expand(S, *val.shape[1:]).to(act.dtype)))
        for layer in self.error_layers:

            def read_in(act, hook=None, layer=layer):
                xs[layer] = act

            def write_out(act, hook=None, layer=layer):
                out = points["writes"][layer]
                if inject is not None:
                    out = out * inject[:, layer, None, None].to(out.dtype)
                if layer in self.layers:
                    out = out + _bias_and_skip(tc, layer, xs[layer])
                return out.to(act.dtype)

            hooks += [(tc.input_hook.format(l=layer), read_in), (tc.output_hook.format(l=layer), write_out)]
        attn_out: dict[int, Tensor] = {}
        after = "hook_resid_post" if getattr(self.model.cfg, "attn_only", False) else "hook_resid_mid"
        if tape and (S == 1 or not live):  # z from the (frozen) pattern by one matmul per head (see _z)
            pats, vs = {}, {}
            for layer in range(self.n_layers):
                hooks += [
                    (
                        f"blocks.{layer}.attn.hook_pattern",
                        lambda act, hook=None, layer=layer: pats.update({layer: act}),
                    ),
                    (f"blocks.{layer}.attn.hook_v", lambda act, hook=None, layer=layer: vs.update({layer: act})),
                    (f"blocks.{layer}.attn.hook_z", lambda z, hook=None, layer=layer: _z(pats[layer], vs[layer], z)),
                ]
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
        if tape and self._detach_in:  # after the reads: the skip path and the feature targets keep the live input
            hooks += [
                (tc.input_hook.format(l=layer), lambda act, hook=None: act.detach()) for layer in self.error_layers
            ]
        toks = self.tokens.expand(S, -1)
        if logits:
            return self.model.run_with_hooks(toks, fwd_hooks=hooks), got, points
        with self.model.hooks(fwd_hooks=hooks):  # the blocks, then the final norm up to the unembedding's input
            resid = self.model(toks, stop_at_layer=self.n_layers)
            if any(name not in got for name in reads):
                if self.model.cfg.normalization_type is not None:
                    resid = self.model.ln_final(resid)
                self.model.unembed.hook_in(resid)
        missing = [name for name in reads if name not in got]
        if missing:
            raise LenslabError(
                f"hook(s) {missing} did not fire before the unembedding: targets must read there or earlier"
            )
        return None, got, points

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
            return self._run(values or self.values, 1, [], heads=self._head_mask(heads), logits=True)[0]

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

    def tape(self, hooks, *, streams: int = 1, key=None, **run) -> dict:
        """The forward that backward passes run through: `streams` copies of the prompt at the
        clean sources, with its autograd graph kept and its reads at `hooks` (plus every MLP
        input and the unembedding's input). Cached per `key` (one per stream setting) and rebuilt
        only if a later target reads elsewhere; `release()` frees them. Its forward ran at the
        values of the moment; the edges multiply its gradients by the current `values` (the
        gradients do not depend on them, except under `rule="relp"`'s live scales and patterns)."""
        key = (key, streams, bool(run.get("live")))
        old = self._tapes.get(key)
        want = set(hooks) | {FINAL_HOOK} | {self.tc.input_hook.format(l=layer) for layer in self.error_layers}
        if old is not None and want <= old["reads"]:
            return old
        if old is not None:
            want |= old["reads"]
        self._tapes.pop(key, None)
        with torch.enable_grad():
            _, got, points = self._run(self.values, streams, sorted(want), tape=True, **run)
        self._tapes[key] = {"got": got, "points": points, "reads": want, "streams": streams}
        return self._tapes[key]

    def release(self) -> None:
        """Free the kept forwards (`tape`)."""
        self._tapes.clear()

    def gradients(self, tape: dict, targets: list[Target]) -> dict:
        """One backward pass through `tape`, vectorised over `targets`: the gradient of each
        target's input at the entry points, `{"embed", "pos_embed": [n, streams, P, d] (None without
        a position embedding), "writes": {layer: [n, streams, P, d]}}` (zeros where a target
        does not depend on a point)."""
        n, got, pts = len(targets), tape["got"], tape["points"]
        names = sorted({t.hook for t in targets})
        outs, seeds = [], []
        for name in names:
            act = got[name]
            idx = [i for i, t in enumerate(targets) if t.hook == name]
            seed = act.new_zeros(n, *act.shape)
            vec = torch.stack([targets[i].vector for i in idx]).to(device=act.device, dtype=act.dtype)
            pos = torch.tensor([targets[i].pos for i in idx], device=act.device)
            seed[torch.tensor(idx, device=act.device), :, pos] = vec[:, None]
            outs.append(act)
            seeds.append(seed)
        ins = [pts["embed"]] + ([pts["pos_embed"]] if self.has_pos else [])
        ins += [pts["writes"][layer] for layer in self.error_layers]
        grads = torch.autograd.grad(outs, ins, seeds, retain_graph=True, is_grads_batched=True, allow_unused=True)
        grads = [g if g is not None else x.new_zeros(n, *x.shape) for g, x in zip(grads, ins)]
        k = 2 if self.has_pos else 1
        return {
            "embed": grads[0],
            "pos_embed": grads[1] if self.has_pos else None,
            "writes": dict(zip(self.error_layers, grads[k:])),
        }

    def _grads(self, targets: list[Target], streams: int, key=None, **run) -> tuple[dict, dict]:
        """Source value × gradient of each target, per stream: `[n, streams, ...]`, dense over the
        features (`{"features": {layer: [n, S, P, d_transcoder]}, "errors": [n, S, n_mlp_layers, P],
        "tokens": [n, S, P]}`), and the attention layers that ran before each target's read."""
        tape = self.tape({t.hook for t in targets}, streams=streams, key=key, **run)
        g, v = self.gradients(tape, targets), self.values
        n, P = len(targets), self.n_pos
        feats = {}
        for src in self.layers:
            acc = None
            for layer in self.error_layers:
                dec = _decoder(self.tc, src, layer)
                if dec is not None:
                    part = g["writes"][layer] @ dec.T.to(g["writes"][layer].dtype)
                    acc = part if acc is None else acc + part
            feats[src] = (acc * v["features"][src]).detach()
        errors = [(g["writes"][layer] * v["errors"][layer]).sum(-1).detach() for layer in self.error_layers]
        tokens = (g["embed"] * v["embed"]).sum(-1)
        if self.has_pos:
            tokens = tokens + (g["pos_embed"] * v["pos_embed"]).sum(-1)
        out = {
            "features": feats,
            "errors": torch.stack(errors, 2) if errors else torch.zeros(n, streams, 0, P),
            "tokens": tokens.detach(),
        }
        return out, {t.hook: tape["got"][t.hook, "after"] for t in targets}

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
        same or None}`; heads whose layer runs after the target's read are zero. The streams'
        forward is taped once per `one_hop` setting and reused by later calls.
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
        out, after = self._grads(
            targets, S, key=("heads", one_hop), heads=heads.to(dev), cut=cut.to(dev), inject=inject.to(dev)
        )
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


# --- influence (circuit-tracer's graph.py), a block of rows at a time ----------------------------
# floats in one block of a dense n x n (or rows x columns) pass: 4 MiB; fixed, so no result depends on a budget
CHUNK_ELEMENTS = 1 << 20
F32 = 4


def _normalize(a: Tensor) -> Tensor:
    a = a.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))


def _row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _masked(a: Tensor, b: slice, keep: Tensor | None) -> Tensor:
    """Rows `b` of `a` with the rows and columns of the nodes outside `keep` set to 0 (a kept
    entry times 1.0 is itself; a dropped one becomes ±0, which `abs` and `!= 0` read as 0)."""
    if keep is None:
        return a[b]
    out = a[b] * keep.to(a.dtype)
    out[~keep[b]] = 0.0
    return out


def _vecmat(v: Tensor, a: Tensor, keep: Tensor | None = None) -> Tensor:
    """`v @ Â`, `Â` the row-normalised |a| (outside `keep` zeroed), a block of rows at a time;
    blocks where `v` is 0 are skipped (exactly: they add 0)."""
    out = torch.zeros(a.shape[1])
    for b in _row_blocks(a.shape[0], a.shape[1]):
        if v[b].any():
            out += v[b] @ _normalize(_masked(a, b, keep))
    return out


def _influence(a: Tensor, weights: Tensor, keep: Tensor | None = None, max_iter: int = 1000) -> Tensor:
    """`w · Σ_k Â^k` (`Â`: the row-normalised |a|, rows and columns outside `keep` zeroed)."""
    cur = _vecmat(weights, a, keep)
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            break
        cur = _vecmat(cur, a, keep)
        total += cur
    return total


def _partial_influence(store: _RowStore, row_nodes: Tensor, weights: Tensor, max_iter: int = 128) -> Tensor:
    """circuit-tracer's `compute_partial_influences`: influence on the targets through the rows
    computed so far (`store`, row `i` is node `row_nodes[i]`), a chunk of rows at a time."""
    prod = weights.clone()
    total = torch.zeros(store.n_cols)
    for _ in range(max_iter):
        p = prod[row_nodes]
        prod = torch.zeros(store.n_cols)
        for s, rows in store.chunks():
            if p[s : s + len(rows)].any():
                prod += p[s : s + len(rows)] @ _normalize(rows)
        if not prod.any():
            break
        total += prod
        prod = torch.cat([prod, torch.zeros(weights.shape[0] - prod.shape[0])])
    return total


def _bits(s: Tensor) -> Tensor:
    """The float32 bit patterns of scores >= 0, int32 (they order like the scores)."""
    return s.reshape(-1).float().abs().view(torch.int32)


def _exact(key: int, count: int = 1) -> int:
    """`count` times the float32 with bit pattern `key` (>= 0), exactly, in units of 2^-149."""
    e = key >> 23
    return count * ((key & 0x7FFFFF) | (0x800000 if e else 0)) << max(e - 1, 0)


def find_threshold(blocks: Callable[[], Iterable[Tensor]], fraction: float) -> Tensor:
    """circuit-tracer's cumulative threshold without sorting: over the scores (>= 0) that `blocks()`
    yields, in descending order, the first score at which the running sum reaches `fraction` of the
    total; `scores >= it` keeps exactly those (ties included). Two passes: a histogram over the top
    16 bits of the scores' float32 bit patterns (which order non-negative floats; a bucket's scores
    share their exponent) finds the bucket that holds it, a count of the low 15 bits in that bucket
    the value. The sums are exact (integers: a bucket's significands in int64, then Python ints), so
    no rounding decides which scores are kept."""
    cnt = torch.zeros(1 << 16, dtype=torch.long)
    sig = torch.zeros(1 << 16, dtype=torch.long)
    for s in blocks():
        key = _bits(s)
        hi = key >> 15
        cnt += torch.bincount(hi, minlength=1 << 16)
        key &= 0x7FFFFF  # the significand (below 2^24, so a block's float64 sums of them are exact)
        key[hi >= 256] |= 0x800000
        sig += torch.bincount(hi, weights=key, minlength=1 << 16).long()
    buckets = cnt.nonzero()[:, 0].tolist()[::-1]  # non-empty, largest scores first
    if not buckets:
        raise LenslabError("find_threshold got no scores")
    sums = [int(sig[b]) << max((b >> 8) - 1, 0) for b in buckets]  # exact, in units of 2^-149
    num, den = _check_fraction("fraction", fraction).as_integer_ratio()
    need = num * sum(sums)  # running sum x den must reach it
    above, hi = 0, buckets[-1]
    for b, sb in zip(buckets, sums):
        if (above + sb) * den >= need:
            hi = b
            break
        above += sb
    lo_cnt = torch.zeros(1 << 15, dtype=torch.long)
    for s in blocks():
        key = _bits(s)
        lo_cnt += torch.bincount(key[(key >> 15) == hi] & 0x7FFF, minlength=1 << 15)
    los = lo_cnt.nonzero()[:, 0].tolist()[::-1]
    lo = los[-1]
    for x in los:
        above += _exact((hi << 15) | x, int(lo_cnt[x]))
        if above * den >= need:
            lo = x
            break
    return torch.tensor([(hi << 15) | lo], dtype=torch.int32).view(torch.float32)[0]


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
        xy = node_positions(self)
        fig = go.Figure()
        add_edge_traces(fig, self.adjacency, xy, max_edges)
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
def node_positions(graph: AttributionGraph) -> list[tuple[float, float]]:
    """Where `AttributionGraph.figure` draws each node: x = the position (nodes sharing a cell
    shifted by 0.12), y = the layer (embeddings at -1, errors at layer + 0.3, targets at n_layers)."""
    ys = {"token": -1.0, "logit": float(graph.n_layers), "target": float(graph.n_layers)}
    xy, seen = [], {}
    for n in graph.parsed:
        y = ys[n.kind] if n.kind in ys else float(n.layer) + (0.3 if n.kind == "error" else 0.0)
        k = seen.get((n.pos, y), 0)
        seen[(n.pos, y)] = k + 1
        xy.append((n.pos + 0.12 * k, y))
    return xy


def add_edge_traces(fig, adjacency: Tensor, xy: list[tuple[float, float]], max_edges: int) -> None:
    """Draw the `max_edges` strongest edges of `adjacency` (`[target, source]`) between the node
    places `xy` on the plotly figure `fig`: red positive, blue negative, three widths by |weight|
    relative to the strongest."""
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

    tgt, src = adjacency.nonzero(as_tuple=True)
    w = adjacency[tgt, src]
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


def _target_weights_full(adjacency: Tensor, weights: Tensor) -> Tensor:
    w = torch.zeros(adjacency.shape[0])
    w[adjacency.shape[0] - len(weights) :] = weights.float()
    return w


def node_influence(adjacency: Tensor, target_weights: Tensor) -> Tensor:
    """circuit-tracer's `compute_node_influence`: `w · Σ_k Â^k` with `Â` the row-normalised |adjacency|."""
    return _influence(adjacency.float(), _target_weights_full(adjacency, target_weights))


def graph_scores(adjacency: Tensor, nodes: list[str], target_weights: Tensor) -> tuple[float, float]:
    """circuit-tracer's `compute_graph_scores`: (replacement score, completeness score).

    Replacement: the tokens' share of the influence that reaches the targets from tokens and
    errors. Completeness: the influence-weighted share of each node's input that is not error."""
    kinds = [labels.parse(n).kind for n in nodes]
    err = torch.tensor([k == "error" for k in kinds])
    tok = torch.tensor([k == "token" for k in kinds])
    a = adjacency.float()
    w = _target_weights_full(a, target_weights)
    infl = _influence(a, w)
    ti, ei = infl[tok].sum(), infl[err].sum()
    replacement = float(ti / (ti + ei)) if float(ti + ei) > 0 else float("nan")
    non_error = torch.cat([1 - _normalize(a[b])[:, err].sum(-1) for b in _row_blocks(*a.shape)] or [torch.zeros(0)])
    out = infl + w
    return replacement, float((non_error * out).sum() / out.sum())


def _unpack(bits: np.ndarray, n: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits, axis=1, count=n).view(np.bool_))


def prune_bytes(n: int) -> int:
    """`prune`'s working memory on an `n`-node graph, beyond the graph and the pruned result: one
    block of rows in its dense passes (about 8 float32 copies of it, the histogram's float64
    weights and int64 keys included) and the edge mask, one bit per edge."""
    block = min(n * n, max(1, CHUNK_ELEMENTS // max(1, n)) * n)
    return 40 * block + -(-n // 8) * n + 64 * n + 3 * (1 << 16) * 8


PRUNE_RANKINGS = ("features", "all")


def prune(
    graph: AttributionGraph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    node_ranking: str = "features",
    memory_budget: int | str | None = None,
) -> AttributionGraph:
    """circuit-tracer's `prune_graph`: keep the features whose influence makes up `node_threshold`
    of the features' total, then the edges whose influence makes up `edge_threshold` of the total,
    then drop feature and error nodes left without outgoing (features: or incoming) edges. Tokens
    and targets stay. Returns the pruned graph (kept nodes only); a `LenslabError` if no edge is left.

    `node_ranking`: `"features"` (the default, as above: the node step ranks the features only and
    keeps every error node) or `"all"`, circuit-tracer 0.5.0's `prune_graph` exactly: the node step
    ranks every node against the total influence of all nodes (tokens and errors included, which
    usually hold most of it), so it keeps fewer features and can drop error nodes (checked against
    circuit-tracer's own masks: tests/probes/test_circuit_tracer_reference.py).

    Memory: no `n × n` temporary. Every dense step runs a block of rows (`CHUNK_ELEMENTS` floats)
    at a time, the edge threshold is found by two histogram passes over the scores' float bits
    instead of a sort of all n² of them (`find_threshold`: the same edges as the full sort, ties
    included), and the edge mask is kept as bits. So beyond the graph and the pruned result it
    needs `prune_bytes(n)` (~170 MiB plus n²/8 bytes past 2,048 nodes). `memory_budget` (bytes or
    `"2GiB"`; None: no check) bounds that plus the pruned result: a `LenslabError` with the minimum
    if it is less."""
    node_threshold = _check_fraction("node_threshold", node_threshold)
    edge_threshold = _check_fraction("edge_threshold", edge_threshold)
    if node_ranking not in PRUNE_RANKINGS:
        raise LenslabError(f"node_ranking must be one of {PRUNE_RANKINGS}, got {node_ranking!r}")
    nf, ne, nt, nk = graph._counts()
    a = graph.adjacency.float()
    n = a.shape[0]
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    if budget is not None and prune_bytes(n) > budget:
        raise LenslabError(
            f"memory_budget={_mib(budget)} is too small to prune a {n:,}-node graph: it needs at least "
            f"{_mib(prune_bytes(n))} (one block of rows and a one-bit edge mask), plus the pruned graph"
        )
    blocks = _row_blocks(n, n)
    if not any(bool(a[b].any()) for b in blocks):  # a block at a time: `a.any()` would make an n x n bool
        raise LenslabError("the attribution graph has no edges: nothing to prune (the pruned graph would be empty)")
    w = _target_weights_full(a, graph.target_weights)
    infl = _influence(a, w)
    node_mask = torch.ones(n, dtype=torch.bool)
    if node_ranking == "all":
        node_mask = infl >= find_threshold(lambda: [infl], node_threshold)
        node_mask[nf + ne :] = True
    elif nf:
        node_mask[:nf] = infl[:nf] >= find_threshold(lambda: [infl[:nf]], node_threshold)
    pinfl = _influence(a, w, node_mask) + w
    scores = lambda: (_normalize(_masked(a, b, node_mask)) * pinfl[b, None] for b in blocks)
    tau = find_threshold(scores, edge_threshold)
    bits = np.empty((n, -(-n // 8)), dtype=np.uint8)  # the edge mask, one bit per edge (one array: no heap holes)
    for b, s in zip(blocks, scores()):
        bits[b] = np.packbits(((s >= tau) & (_masked(a, b, node_mask) != 0)).numpy(), axis=1)
    nsrc = nf + ne
    while True:
        col_any, row_any = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        for b in blocks:
            e = _unpack(bits[b], n) & node_mask[b, None] & node_mask[None, :]
            col_any |= e.any(0)
            row_any[b] = e.any(1)
        new = node_mask.clone()
        new[:nsrc] &= col_any[:nsrc]
        new[:nf] &= row_any[:nf]
        if torch.equal(new, node_mask):
            break
        node_mask = new
    if not row_any.any():
        raise LenslabError(
            f"pruning with node_threshold={node_threshold}, edge_threshold={edge_threshold} left no edge: "
            "raise the thresholds"
        )
    keep = node_mask.nonzero()[:, 0]
    m = len(keep)
    if budget is not None and prune_bytes(n) + F32 * m * m > budget:
        raise LenslabError(
            f"memory_budget={_mib(budget)} is too small for this pruned graph: its {m:,} nodes need "
            f"{_mib(F32 * m * m)} on top of the {_mib(prune_bytes(n))} pruning works in"
        )
    adj = torch.zeros(m, m)
    done = 0
    for b in blocks:
        rows = keep[(keep >= b.start) & (keep < b.stop)]
        if len(rows):
            e = _unpack(bits[b], n) & node_mask[b, None] & node_mask[None, :]
            local = rows - b.start
            adj[done : done + len(rows)] = (a[b][local] * e[local])[:, keep]
            done += len(rows)
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


# --- the graph's rows: feature gather, row store, memory plan -------------------------------------


class _FeatureGather:
    """The active features' edges from the gradients at each MLP layer's writes, without the dense
    `[n, P, d_transcoder]` product: per source layer, the active features are laid out in segments
    of at most `c` features of one position, their decoder rows padded to `[segments, c, d_model]`,
    and one batched matmul per (source, written) layer gives every segment's dots; one advanced
    index reads them out in the graph's column order. `edge = activation × (gradient · decoder row)`."""

    def __init__(self, frozen: FrozenReplacement, active: Tensor):
        self.parts, self.n = [], len(active)
        tc, P = frozen.tc, frozen.n_pos
        start = 0
        for src in frozen.layers:
            m = int((active[:, 0] == src).sum())
            if not m:
                continue
            pos, f = active[start : start + m, 1], active[start : start + m, 2]
            counts = torch.bincount(pos, minlength=P)
            c = max(1, -(-m // max(1, int((counts > 0).sum()))))  # slots per segment: the mean per position
            nseg = (counts + c - 1) // c
            seg_pos = torch.repeat_interleave(torch.arange(P), nseg)
            rank = torch.arange(m) - (counts.cumsum(0) - counts)[pos]  # place among its position's features
            flat = ((nseg.cumsum(0) - nseg)[pos] + rank // c) * c + rank % c
            pads = {}
            for dst in frozen.error_layers:
                dec = _decoder(tc, src, dst)
                if dec is not None:
                    w = torch.zeros(len(seg_pos) * c, dec.shape[1], dtype=dec.dtype, device=dec.device)
                    w[flat.to(dec.device)] = dec.detach()[f.to(dec.device)]
                    pads[dst] = w.reshape(len(seg_pos), c, -1).transpose(1, 2)  # [segments, d_model, c]
            dev = frozen.tokens.device
            acts = frozen.values["features"][src][pos.to(dev), f.to(dev)].float()
            self.parts.append((slice(start, start + m), seg_pos.to(dev), flat.to(dev), acts, pads))
            start += m

    @staticmethod
    def bytes_per_target(frozen: FrozenReplacement, active: Tensor, d_model: int) -> int:
        """Peak temporary bytes of one call, per target: the segment gradients and dots of the
        largest layer (at most twice its features or positions in padding)."""
        if not len(active):
            return 0
        m = int(torch.bincount(active[:, 0]).max())
        return F32 * (2 * frozen.n_pos * d_model + 3 * 2 * m)

    def __call__(self, writes: dict[int, Tensor], n: int) -> Tensor:
        """`writes`: the gradients `{layer: [n, 1, P, d]}` of `n` targets -> the features' edges `[n, n_active]`."""
        out = torch.zeros(n, self.n)
        for cols, seg_pos, flat, acts, pads in self.parts:
            dots = None
            for dst, w in pads.items():
                g = writes[dst][:, 0].transpose(0, 1)[seg_pos]  # [segments, n, d]
                r = torch.bmm(g.to(w.dtype), w)  # [segments, n, c]
                dots = r if dots is None else dots + r
            out[:, cols] = (dots.permute(1, 0, 2).reshape(n, -1)[:, flat].float() * acts).cpu()
        return out


class _RowStore:
    """The rows of the graph's adjacency as they are computed, `[n, n_cols]` float32, in the order
    appended: in memory, or (`on_disk`) in an unlinked temporary file, read back in chunks of
    `CHUNK_ELEMENTS`."""

    def __init__(self, capacity: int, n_cols: int, *, on_disk: bool):
        self.n_cols, self.n, self.on_disk = n_cols, 0, on_disk
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, n_cols))
        self.file = tempfile.TemporaryFile() if on_disk else None
        self.mem = None if on_disk else torch.empty(capacity, n_cols)

    def append(self, rows: Tensor) -> None:
        rows = rows.float().cpu().contiguous()
        if self.on_disk:
            self.file.seek(self.n * self.n_cols * F32)
            self.file.write(rows.numpy().tobytes())
        else:
            self.mem[self.n : self.n + len(rows)] = rows
        self.n += len(rows)

    def read(self, start: int, stop: int) -> Tensor:
        if not self.on_disk:
            return self.mem[start:stop]
        out = np.empty((stop - start, self.n_cols), dtype=np.float32)
        self.file.seek(start * self.n_cols * F32)
        self.file.readinto(memoryview(out).cast("B"))
        return torch.from_numpy(out)

    def chunks(self):
        """(first row, rows) in order, `CHUNK_ELEMENTS` at a time."""
        for s in range(0, self.n, self.chunk):
            yield s, self.read(s, min(s + self.chunk, self.n))

    def take(self, rows: list[int], cols: Tensor, out: Tensor) -> None:
        """`out[k] = row rows[k], columns cols`, a chunk of rows at a time."""
        for s in range(0, len(rows), self.chunk):
            idx = rows[s : s + self.chunk]
            if self.on_disk:
                block = torch.stack([self.read(i, i + 1)[0] for i in idx])
            else:
                block = self.mem[torch.tensor(idx, dtype=torch.long)]
            out[s : s + len(idx)] = block[:, cols]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.mem = None


# a plan fills at most this share of the budget: the rest is for what it does not count (the
# allocator's slack, Python objects)
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    """How `attribution_graph` fits its `memory_budget` (bytes; estimates): `batch_size` targets
    per backward pass, the rows in memory or on disk (`offload`), and the parts of the peak:
    `fixed` (the clean run's cache, the taped forward, the decoder layout), `per_target` (one
    target's share of a backward pass and its row), `rows` (every computed row, over all active
    features), `adjacency` (the dense result, `n × n`). `peak` is the larger of the row phase
    and the assembly; `plan_memory` keeps it under `HEADROOM` of the budget."""

    batch_size: int
    offload: bool
    fixed: int
    per_target: int
    rows: int
    adjacency: int
    budget: int | None

    @property
    def peak(self) -> int:
        chunk = 3 * min(CHUNK_ELEMENTS * F32, self.rows)  # one chunk of rows, normalised (ranking, assembly)
        kept = 0 if self.offload else self.rows
        return kept + chunk + max(self.fixed + self.batch_size * self.per_target, self.adjacency)


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def plan_memory(
    frozen: FrozenReplacement, active: Tensor, n_targets: int, n_features: int, batch_size: int, budget: int | None
) -> MemoryPlan:
    """The `MemoryPlan` of a graph on `frozen` with `active` features `[n, 3]`, `n_targets` targets
    and `n_features` selected features under `budget` bytes (None: no bound: `batch_size`, rows
    in memory): the most targets per pass (at most `batch_size`) whose peak fits `HEADROOM` of the
    budget, rows in memory or on disk, whichever allows more; a `LenslabError` naming the minimum
    when not even one target per pass fits. Measured (benchmarks/RESULTS.md): the peak RSS stays
    within a few percent of the plan."""
    L, P, d = frozen.n_layers, frozen.n_pos, int(frozen.model.cfg.d_model)
    n_err = len(frozen.error_layers)
    d_tc = int(frozen.tc.d_transcoder) if frozen.tc is not None else 0
    n_cols = len(active) + n_err * P + P
    pairs = sum(_decoder(frozen.tc, s, t) is not None for s in frozen.layers for t in frozen.error_layers)
    cache = F32 * (len(frozen.layers) * P * d_tc + (n_err + 2) * P * d + L * frozen.n_heads * P * P + 4 * L * P)
    taped = F32 * P * d * (10 * L + 4)  # the tape's saved activations, one copy (measured: ~7-9 x P x d per layer)
    layout = F32 * 2 * len(active) * d * max(1, pairs // max(1, len(frozen.layers)))
    fixed = cache + taped + layout
    per_target = F32 * P * d * (2 * (L + 2) + 12) + _FeatureGather.bytes_per_target(frozen, active, d)
    per_target += F32 * 2 * n_cols
    rows = F32 * (n_targets + n_features) * n_cols
    n = n_features + n_err * P + P + n_targets
    adjacency = F32 * n * n
    k = max(1, int(batch_size))
    if budget is None:
        return MemoryPlan(k, False, fixed, per_target, rows, adjacency, None)
    best, room = None, int(HEADROOM * budget)
    for offload in (False, True):
        base = MemoryPlan(0, offload, fixed, per_target, rows, adjacency, budget).peak - max(fixed, adjacency)
        if base + adjacency <= room and base + fixed + per_target <= room:
            fit = min(k, (room - base - fixed) // per_target)
            if best is None or fit > best.batch_size:
                best = MemoryPlan(int(fit), offload, fixed, per_target, rows, adjacency, budget)
    if best is not None:
        return best
    need = -(-MemoryPlan(1, True, fixed, per_target, rows, adjacency, budget).peak // HEADROOM)
    raise LenslabError(
        f"memory_budget={_mib(budget)} is too small for this graph: it needs at least {_mib(need)} "
        f"(one target per backward pass, rows on disk; the dense adjacency alone is {_mib(adjacency)} for {n:,} nodes). "
        "Raise memory_budget, or lower max_feature_nodes or the prompt's length"
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
    memory_budget: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AttributionGraph:
    """The attribution graph of `model` on `prompt` (a string or token ids; `None` with a Task
    target: its first clean prompt) through `transcoders` (a `TranscoderSet`, a
    `CrossLayerTranscoder` or a name for `load_transcoders`; `None` for an attention-only model,
    whose graph has token and target nodes only), at the last position.

    `targets`: `None` (the salient logits: `max_n_logits`, `desired_logit_prob`), a list of
    tokens (ids or one-token strings), a `Task` (its first prompt's logit difference, correct −
    incorrect unembedding), or directions `[d_model]` / `[k, d_model]` read at the unembedding's
    input (`unembed.hook_in`). `max_feature_nodes`: keep that many features, chosen by influence as circuit-tracer
    (None: every active feature). `batch_size`: targets per backward pass (at most: the budget
    may lower it). `memory_budget`: bytes or a string such as `"2GiB"`; the graph's extra peak
    memory (the clean run's cache, the kept forward, the backward passes, the rows and the dense
    result; not the model) is planned to stay under it by lowering the batch size and, if the
    rows do not fit, keeping them in a temporary file (`plan_memory`, estimates; the plan is in
    the provenance). Too small for one target per pass or for the result itself: a
    `LenslabError` with the minimum. None: no bound. The graph does not depend on either.
    `progress`: called as `progress(rows done, rows in all)` after each backward pass (the
    targets' rows, then the features'), e.g. the app's progress bar.

    `rule`: `"gradient"` (circuit-tracer's backward through the frozen replacement) or `"relp"`
    (RelP's LRP rules, Rezaei Jafari et al. 2025: LN-rule, identity rule, half rule, AH-rule, run
    on the live forward with norm scales and patterns detached). On this graph the two are the
    same: every rule acts on a part the replacement model already holds constant, and what is
    left is linear, where LRP-0 is the gradient (docs/transcoders.md, "RelP edge weights").
    Head-resolved edges: `lenslab.probes.graph_heads.head_edges`.

    >>> import lenslab
    >>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    >>> g = attribution_graph(model, "When Mary and John went to the store, John gave a drink to",
    ...                       "zoo/ioi-4l/per-layer", max_feature_nodes=64, memory_budget="256MiB")
    >>> g.nodes[-1].startswith("logit"), 0 < g.replacement_score <= 1
    (True, True)
    """
    desired_logit_prob = _check_fraction("desired_logit_prob", desired_logit_prob)
    if rule not in RULES:
        raise LenslabError(f"rule must be one of {RULES}, got {rule!r}")
    if max_feature_nodes is not None and int(max_feature_nodes) < 0:
        raise LenslabError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    if int(batch_size) < 1:
        raise LenslabError(f"batch_size must be >= 1, got {batch_size}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
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
    active = torch.cat(
        [
            torch.cat([torch.full((len(nz), 1), layer), nz], 1)
            for layer in frozen.layers
            for nz in [(frozen.values["features"][layer] != 0).nonzero().cpu()]
        ]
        or [torch.zeros(0, 3, dtype=torch.long)]
    )
    n_act, n_err, nk = len(active), len(frozen.error_layers) * P, len(tgts)
    n_cols = n_act + n_err + P
    limit = n_act if max_feature_nodes is None else min(int(max_feature_nodes), n_act)
    plan = plan_memory(frozen, active, nk, limit, batch_size, budget)
    k = plan.batch_size
    gather = _FeatureGather(frozen, active)
    store = _RowStore(nk + limit, n_cols, on_disk=plan.offload)
    tape = frozen.tape({t.hook for t in tgts}, live=rule == "relp")  # every MLP input too: the feature targets' reads
    act_list = active.tolist()

    def add_rows(ts: list[Target]) -> None:
        for i in range(0, len(ts), k):
            g = frozen.gradients(tape, ts[i : i + k])
            v = frozen.values
            parts = [gather(g["writes"], len(ts[i : i + k]))]
            parts += [
                (g["writes"][layer][:, 0] * v["errors"][layer]).sum(-1).float().cpu() for layer in frozen.error_layers
            ]
            tok = (g["embed"][:, 0] * v["embed"]).sum(-1)
            if frozen.has_pos:
                tok = tok + (g["pos_embed"][:, 0] * v["pos_embed"]).sum(-1)
            store.append(torch.cat(parts + [tok.float().cpu()], 1))
            if progress is not None:
                progress(store.n, nk + limit)

    try:
        add_rows(tgts)  # store rows 0..nk-1: the targets; then the features in the order visited
        visited: list[int] = []
        if limit == n_act:
            visited = list(range(n_act))
            add_rows([feature_target(tc, *act_list[j]) for j in visited])
        else:
            w_all = torch.cat([torch.zeros(n_cols), weights.float()])
            while len(visited) < limit:
                row_nodes = torch.tensor(list(range(n_cols, n_cols + nk)) + visited, dtype=torch.long)
                infl = _partial_influence(store, row_nodes, w_all)[:n_act]
                infl[visited] = -1.0
                take = infl.argsort(descending=True, stable=True)[: min(k, limit - len(visited))].tolist()
                add_rows([feature_target(tc, *act_list[j]) for j in take])
                visited += take
        frozen.release()
        gather = tape = None  # free the kept forward and the decoder layout before the assembly
        sel = sorted(visited)
        row_of = {j: nk + i for i, j in enumerate(visited)}
        # assemble: nodes = selected features, errors, tokens, targets
        nf = len(sel)
        n = nf + n_err + P + nk
        cols = torch.tensor(sel + list(range(n_act, n_cols)), dtype=torch.long)
        adj = torch.zeros(n, n)
        store.take([row_of[j] for j in sel], cols, adj[:nf, : nf + n_err + P])
        store.take(list(range(nk)), cols, adj[n - nk :, : nf + n_err + P])
    finally:
        store.close()
    nodes = (
        [labels.feature(act_list[j][0], act_list[j][2], act_list[j][1]) for j in sel]
        + [labels.error_node(layer, p) for layer in frozen.error_layers for p in range(P)]
        + [labels.token_node(p) for p in range(P)]
        + [t.label for t in tgts]
    )
    sel_targets = [feature_target(tc, *act_list[j]) for j in sel] + tgts
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
    if nf:
        a = active[torch.tensor(sel, dtype=torch.long)]
        acts[:nf] = _feature_values(frozen, a)
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
            **(
                {}
                if budget is None
                else {"memory_budget": budget, "batch_size": k, "rows_on_disk": plan.offload, "planned_peak": plan.peak}
            ),
        ),
    )


def _feature_values(frozen: FrozenReplacement, active: Tensor) -> Tensor:
    """The activations of features `active [n, 3]` (layer, pos, feature), in that order."""
    out = torch.zeros(len(active))
    for layer in frozen.layers:
        m = active[:, 0] == layer
        if m.any():
            v = frozen.values["features"][layer]
            out[m] = v[active[m, 1].to(v.device), active[m, 2].to(v.device)].float().cpu()
    return out
