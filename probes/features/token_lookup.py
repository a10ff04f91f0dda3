"""Lookup: which SAE features fire on each token of a prompt (`lookup` -> `LookupResult`: `table()`, a
long DataFrame; `to_text()`, one line per token; `figure()`, a token x feature heatmap; JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.probes.features.plumbing import check_pair, feature_acts, sae_identity, str_tokens
from lenslab.results import Result, provenance

__all__ = ["LookupResult", "lookup"]


@dataclass(frozen=True, kw_only=True, eq=False)
class LookupResult(Result):
    """The top-k features of each token of one prompt.

    Attributes:
        prompt: the text.
        tokens / token_ids: the prompt's tokens (BOS included when prepended).
        features / values: `[pos, k]` feature ids and activations, strongest first (an
            activation of 0 means fewer than k features fire there).
        union: the features that are in some token's top k and fire, strongest first (at most 40).
        matrix: `[pos, len(union)]` activation of each of those features on each token.
        hook, k, provenance: where and how.
    """

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    features: list[list[int]]
    values: list[list[float]]
    union: list[int]
    matrix: list[list[float]]
    hook: str
    k: int
    provenance: dict = field(default_factory=dict)
    KIND = "LookupResult"

    def rows(self) -> list[dict]:
        """One dict per token: pos, token and its firing (feature, activation) pairs."""
        return [
            {"pos": i, "token": t, "features": [(f, v) for f, v in zip(fs, vs) if v > 0]}
            for i, (t, fs, vs) in enumerate(zip(self.tokens, self.features, self.values))
        ]

    def top(self, pos: int) -> list[tuple[int, float]]:
        """The firing (feature, activation) pairs of the token at `pos`."""
        return self.rows()[pos]["features"]

    def table(self):
        """Long format, one row per firing feature of each token: pos, token, rank, feature, activation."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        recs = [
            {"pos": r["pos"], "token": r["token"], "rank": j, "feature": f, "activation": v}
            for r in self.rows()
            for j, (f, v) in enumerate(r["features"])
        ]
        return pd.DataFrame(recs, columns=["pos", "token", "rank", "feature", "activation"])

    def to_text(self) -> str:
        """A plain-text table, one line per token: its firing features and activations (what
        `lenslab sae lookup` prints)."""
        w = max((len(repr(t)) for t in self.tokens), default=4)
        lines = [f"{'pos':>3}  {'token':<{w}}  top features (activation)"]
        for r in self.rows():
            feats = ", ".join(f"f{f} ({v:.3g})" for f, v in r["features"]) or "-"
            lines.append(f"{r['pos']:>3}  {repr(r['token']):<{w}}  {feats}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "features": self.features,
            "values": self.values,
            "union": self.union,
            "matrix": self.matrix,
            "hook": self.hook,
            "k": self.k,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LookupResult:
        return cls(
            prompt=d["prompt"],
            tokens=list(d["tokens"]),
            token_ids=[int(i) for i in d["token_ids"]],
            features=[[int(f) for f in r] for r in d["features"]],
            values=[[float(v) for v in r] for r in d["values"]],
            union=[int(f) for f in d["union"]],
            matrix=[[float(v) for v in r] for r in d["matrix"]],
            hook=d["hook"],
            k=int(d["k"]),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Token x feature heatmap of the union features' activations (hover: token, feature, value)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        toks = figures.unique_labels([f"{i} {t!r}" for i, t in enumerate(self.tokens)])
        cols = [f"f{f}" for f in self.union]
        z = self.matrix if self.union else [[0.0] for _ in self.tokens]
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=cols or ["(none)"],
                y=toks,
                colorscale=[[0, "#ffffff"], [1, "#e6550d"]],
                zmin=0,
                colorbar=dict(title="activation"),
                hovertemplate="token %{y}<br>feature %{x}<br>activation %{z:.4g}<extra></extra>",
            )
        )
        fig.update_layout(
            xaxis_title="feature",
            yaxis_title="token",
            yaxis_autorange="reversed",
            height=max(360, 22 * len(self.tokens) + 160),
            width=max(600, 28 * len(cols) + 260),
        )
        fig.update_xaxes(type="category")
        p = self.provenance
        return figures.style(fig, f"SAE features per token · {self.hook} · model {p.get('model', '?')} · top {self.k}")


@torch.no_grad()
def lookup(model, sae, prompt: str, k: int = 5, *, prepend_bos: bool = True, max_union: int = 40) -> LookupResult:
    """The `k` most active SAE features at each token of `prompt` (activations `[pos, k]`)."""
    if not isinstance(prompt, str) or not prompt:
        raise LenslabError("lookup needs a non-empty prompt string")
    if k < 1:
        raise LenslabError(f"k must be >= 1, got {k}")
    hook = check_pair(model, sae)
    toks = model.to_tokens(prompt, prepend_bos=prepend_bos)
    acts = feature_acts(model, sae, toks)[0].cpu()  # [pos, d_sae]
    kk = min(k, acts.shape[1])
    top = acts.topk(kk, dim=1)
    firing = top.indices[top.values > 0].unique()
    order = (
        acts[:, firing].max(0).values.argsort(descending=True) if len(firing) else torch.tensor([], dtype=torch.long)
    )
    union = firing[order][:max_union].tolist()
    ids = toks[0].tolist()
    return LookupResult(
        prompt=prompt,
        tokens=str_tokens(model, ids),
        token_ids=ids,
        features=top.indices.tolist(),
        values=top.values.tolist(),
        union=union,
        matrix=acts[:, union].tolist() if union else [[] for _ in ids],
        hook=hook,
        k=kk,
        provenance=provenance(model, method="sae-lookup", hook=hook, sae=sae_identity(sae)),
    )
