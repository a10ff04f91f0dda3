"""Node labels: one spelling for every model component a result, graph or page names.

| component | label | example |
|---|---|---|
| the embeddings | `input` | `input` |
| the unembedding | `logits` | `logits` |
| a layer (an axis label) | `L{layer}` | `L3` |
| attention head | `L{layer}H{head}` | `L3H1` |
| an MLP | `MLP{layer}` | `MLP3` |
| an MLP neuron | `L{layer}N{neuron}` | `L2N117` |
| a routed MoE expert | `L{layer}e{expert}` | `L1e2` |
| a shared MoE expert | `L{layer}shared` | `L1shared` |
| the residual stream | `{layer}_pre`, `{layer}_mid`, `final_post` | `2_pre` |
| the token / position embedding (a DLA term) | `embed`, `pos_embed` | `embed` |
| a layer's attention output bias | `L{layer}.b_O` | `L3.b_O` |
| an MLP's output bias | `MLP{layer}.b_out` | `MLP3.b_out` |
| the final norm's bias and `b_U`, read through a direction | `final_bias` | `final_bias` |
| attribution-graph feature: layer, feature, position | `L{layer}F{feature}@{pos}` | `L1F37@5` |
| attribution-graph error node: an MLP's transcoder error at a position | `MLP{layer}.err@{pos}` | `MLP1.err@5` |
| attribution-graph token node: the embeddings at a position | `embed@{pos}` | `embed@0` |
| attribution-graph logit node: a token's logit at a position | `logit{token}@{pos}` | `logit117@9` |
| attribution-graph target along any other direction (the k-th) | `target{k}@{pos}` | `target0@9` |

The residual-stream labels are TransformerLens's own (`ActivationCache.accumulated_resid`).
Attribution-graph nodes (`lenslab.probes.attribution_graph`) carry a position after `@`.
`parse` reads any of them back into a `Node`; `label` prints a `Node`.

>>> head(3, 1), expert(1, 2), parse("L3H1")
('L3H1', 'L1e2', Node(kind='head', layer=3, index=1, pos=None))
>>> label(parse("MLP2")), parse("logits").kind
('MLP2', 'logits')
>>> feature(1, 37, 5), parse("L1F37@5")
('L1F37@5', Node(kind='feature', layer=1, index=37, pos=5))
"""

from __future__ import annotations

import re
from typing import NamedTuple

from lenslab._errors import LenslabError

__all__ = [
    "EMBED",
    "FINAL_BIAS",
    "INPUT",
    "LOGITS",
    "POS_EMBED",
    "SHARED",
    "Node",
    "attn_bias",
    "error_node",
    "expert",
    "feature",
    "head",
    "label",
    "layer",
    "logit_node",
    "mlp",
    "mlp_bias",
    "neuron",
    "parse",
    "resid",
    "target_node",
    "token_node",
]

INPUT = "input"
LOGITS = "logits"
SHARED = -1  # the expert index of a shared MoE expert
EMBED, POS_EMBED, FINAL_BIAS = "embed", "pos_embed", "final_bias"
_NAMED = {INPUT: ("input", -1), LOGITS: ("logits", None), "final_post": ("final_post", None)} | {
    name: (name, None) for name in (EMBED, POS_EMBED, FINAL_BIAS)
}
_RESID = ("pre", "mid", "post")
_PATTERNS = [
    ("attn_bias", re.compile(r"L(\d+)\.b_O()")),
    ("mlp_bias", re.compile(r"MLP(\d+)\.b_out()")),
    ("head", re.compile(r"L(\d+)H(\d+)")),
    ("mlp", re.compile(r"MLP(\d+)()")),
    ("neuron", re.compile(r"L(\d+)N(\d+)")),
    ("expert", re.compile(r"L(\d+)e(\d+)")),
    ("expert", re.compile(r"L(\d+)(shared)")),
    ("layer", re.compile(r"L(\d+)()")),
    ("resid_pre", re.compile(r"(\d+)_pre()")),
    ("resid_mid", re.compile(r"(\d+)_mid()")),
    ("resid_post", re.compile(r"(\d+)_post()")),
]
# attribution-graph nodes: (kind, pattern of the part before "@{pos}"); groups: layer, index
_POS_PATTERNS = [
    ("feature", re.compile(r"L(\d+)F(\d+)")),
    ("error", re.compile(r"MLP(\d+)\.err()")),
    ("token", re.compile(r"embed()()")),
    ("logit", re.compile(r"logit()(\d+)")),
    ("target", re.compile(r"target()(\d+)")),
]
_AT = re.compile(r"(.+)@(\d+)")


class Node(NamedTuple):
    """A parsed label: `kind` ("input", "logits", "layer", "head", "mlp", "neuron", "expert",
    "resid_pre", "resid_mid", "resid_post", "final_post", "embed", "pos_embed", "attn_bias",
    "mlp_bias", "final_bias", and the attribution-graph nodes "feature", "error", "token",
    "logit", "target"), its layer (-1 for input, None for logits, final_post, the embeddings,
    final_bias, token, logit and target nodes) and its index within the layer (head, neuron,
    expert; `SHARED`; a feature; a logit node's token id; a target's number; else None), and
    for attribution-graph nodes the position (else None)."""

    kind: str
    layer: int | None
    index: int | None = None
    pos: int | None = None


def layer(l: int) -> str:
    """`L3`: a layer, as an axis label."""
    return f"L{int(l)}"


def head(l: int, h: int) -> str:
    """`L3H1`: head `h` of layer `l`."""
    return f"L{int(l)}H{int(h)}"


def mlp(l: int) -> str:
    """`MLP3`: the MLP of layer `l`."""
    return f"MLP{int(l)}"


def neuron(l: int, n: int) -> str:
    """`L2N117`: neuron `n` of layer `l`'s MLP."""
    return f"L{int(l)}N{int(n)}"


def expert(l: int, e: int) -> str:
    """`L1e2`: routed expert `e` of MoE layer `l`; `L1shared` for `e == SHARED`."""
    return f"L{int(l)}shared" if e == SHARED else f"L{int(l)}e{int(e)}"


def attn_bias(l: int) -> str:
    """`L3.b_O`: the attention output bias of layer `l` (its `attn_out` minus its heads)."""
    return f"L{int(l)}.b_O"


def mlp_bias(l: int) -> str:
    """`MLP3.b_out`: the output bias of layer `l`'s MLP (its output minus its neurons)."""
    return f"MLP{int(l)}.b_out"


def resid(l: int | None, where: str = "pre") -> str:
    """`2_pre` / `2_mid` / `2_post`: the residual stream at layer `l`; `final_post` for `l=None`."""
    if where not in _RESID:
        raise LenslabError(f"residual stream point {where!r} is not one of {', '.join(_RESID)}")
    return "final_post" if l is None else f"{int(l)}_{where}"


def feature(l: int, f: int, pos: int) -> str:
    """`L1F37@5`: transcoder feature `f` of layer `l` at position `pos` (an attribution-graph node)."""
    return f"L{int(l)}F{int(f)}@{int(pos)}"


def error_node(l: int, pos: int) -> str:
    """`MLP1.err@5`: the transcoder error of layer `l`'s MLP at position `pos` (an attribution-graph node)."""
    return f"MLP{int(l)}.err@{int(pos)}"


def token_node(pos: int) -> str:
    """`embed@0`: the embeddings (token and position) at position `pos` (an attribution-graph node)."""
    return f"embed@{int(pos)}"


def logit_node(token: int, pos: int) -> str:
    """`logit117@9`: the logit of token id `token` at position `pos` (an attribution-graph node)."""
    return f"logit{int(token)}@{int(pos)}"


def target_node(k: int, pos: int) -> str:
    """`target0@9`: the `k`-th target along a given direction at position `pos` (an attribution-graph node)."""
    return f"target{int(k)}@{int(pos)}"


def parse(text: str) -> Node:
    """The `Node` a label names; a `LenslabError` listing the forms for anything else."""
    s = str(text).strip()
    if s in _NAMED:
        return Node(*_NAMED[s])
    at = _AT.fullmatch(s)
    if at:
        for kind, pat in _POS_PATTERNS:
            m = pat.fullmatch(at.group(1))
            if m:
                lay, idx = m.group(1), m.group(2)
                return Node(kind, int(lay) if lay else None, int(idx) if idx else None, int(at.group(2)))
    for kind, pat in _PATTERNS:
        m = pat.fullmatch(s)
        if m:
            idx = m.group(2)
            index = SHARED if idx == "shared" else (int(idx) if idx else None)
            return Node(kind, int(m.group(1)), index)
    raise LenslabError(
        f"{text!r} is not a node label: use input, logits, L3 (layer), L3H1 (head), MLP3, L2N117 (neuron), "
        "L1e2 or L1shared (expert), 2_pre / 2_mid / 2_post / final_post (residual stream), embed, pos_embed, "
        "L3.b_O / MLP3.b_out (output biases), final_bias, and the attribution-graph nodes L1F37@5 (feature), "
        "MLP1.err@5 (error), embed@0 (token), logit117@9 (logit), target0@9 (a direction)"
    )


def label(node: Node) -> str:
    """The label of a `Node` (the inverse of `parse`)."""
    k, l, i, p = node
    printers = {name: (lambda name=name: name) for name, _ in _NAMED.values()} | {
        "input": lambda: INPUT,
        "layer": lambda: layer(l),
        "head": lambda: head(l, i),
        "mlp": lambda: mlp(l),
        "neuron": lambda: neuron(l, i),
        "expert": lambda: expert(l, i),
        "resid_pre": lambda: resid(l, "pre"),
        "resid_mid": lambda: resid(l, "mid"),
        "resid_post": lambda: resid(l, "post"),
        "attn_bias": lambda: attn_bias(l),
        "mlp_bias": lambda: mlp_bias(l),
        "feature": lambda: feature(l, i, p),
        "error": lambda: error_node(l, p),
        "token": lambda: token_node(p),
        "logit": lambda: logit_node(i, p),
        "target": lambda: target_node(i, p),
    }
    if k not in printers:
        raise LenslabError(f"node kind {k!r} is not one of {', '.join(printers)}")
    return printers[k]()
