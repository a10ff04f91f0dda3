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

The residual-stream labels are TransformerLens's own (`ActivationCache.accumulated_resid`).
`parse` reads any of them back into a `Node`; `label` prints a `Node`.

>>> head(3, 1), expert(1, 2), parse("L3H1")
('L3H1', 'L1e2', Node(kind='head', layer=3, index=1))
>>> label(parse("MLP2")), parse("logits").kind
('MLP2', 'logits')
"""

from __future__ import annotations

import re
from typing import NamedTuple

from lenslab._errors import LenslabError

__all__ = [
    "INPUT",
    "LOGITS",
    "SHARED",
    "Node",
    "expert",
    "head",
    "label",
    "layer",
    "mlp",
    "neuron",
    "parse",
    "resid",
]

INPUT = "input"
LOGITS = "logits"
SHARED = -1  # the expert index of a shared MoE expert
_RESID = ("pre", "mid", "post")
_PATTERNS = [
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


class Node(NamedTuple):
    """A parsed label: `kind` ("input", "logits", "layer", "head", "mlp", "neuron", "expert",
    "resid_pre", "resid_mid", "resid_post", "final_post"), its layer (-1 for input, None for
    logits and final_post) and its index within the layer (head, neuron, expert; `SHARED`; else None)."""

    kind: str
    layer: int | None
    index: int | None = None


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


def resid(l: int | None, where: str = "pre") -> str:
    """`2_pre` / `2_mid` / `2_post`: the residual stream at layer `l`; `final_post` for `l=None`."""
    if where not in _RESID:
        raise LenslabError(f"residual stream point {where!r} is not one of {', '.join(_RESID)}")
    return "final_post" if l is None else f"{int(l)}_{where}"


def parse(text: str) -> Node:
    """The `Node` a label names; a `LenslabError` listing the forms for anything else."""
    s = str(text).strip()
    if s == INPUT:
        return Node("input", -1)
    if s == LOGITS:
        return Node("logits", None)
    if s == "final_post":
        return Node("final_post", None)
    for kind, pat in _PATTERNS:
        m = pat.fullmatch(s)
        if m:
            idx = m.group(2)
            index = SHARED if idx == "shared" else (int(idx) if idx else None)
            return Node(kind, int(m.group(1)), index)
    raise LenslabError(
        f"{text!r} is not a node label: use input, logits, L3 (layer), L3H1 (head), MLP3, L2N117 (neuron), "
        "L1e2 or L1shared (expert), 2_pre / 2_mid / 2_post / final_post (residual stream)"
    )


def label(node: Node) -> str:
    """The label of a `Node` (the inverse of `parse`)."""
    k, l, i = node
    printers = {
        "input": lambda: INPUT,
        "logits": lambda: LOGITS,
        "final_post": lambda: "final_post",
        "layer": lambda: layer(l),
        "head": lambda: head(l, i),
        "mlp": lambda: mlp(l),
        "neuron": lambda: neuron(l, i),
        "expert": lambda: expert(l, i),
        "resid_pre": lambda: resid(l, "pre"),
        "resid_mid": lambda: resid(l, "mid"),
        "resid_post": lambda: resid(l, "post"),
    }
    if k not in printers:
        raise LenslabError(f"node kind {k!r} is not one of {', '.join(printers)}")
    return printers[k]()
