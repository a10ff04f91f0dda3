"""Search: features by a token, by tokens containing a substring, or one feature's summary, over a store
(`search` -> `SearchResult`: `table()`, one row per hit; `to_text()`; `figure()`, bars; JSON). The
matched tokens' rows of the token table are aggregated per feature by DuckDB
(`FeatureStore.token_hits`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenslab import figures
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.features.store import FeatureStore
from lenslab.results import Result

__all__ = ["SEARCH_ORDERS", "FeatureHit", "SearchResult", "search"]

SEARCH_ORDERS = ("max", "mean", "share")
"""The orders `search(..., by=)` ranks features in."""


@dataclass(frozen=True)
class FeatureHit:
    """One feature found by `search`: its activation on the matched tokens (or overall for a
    feature query) and its global density; `tokens`: the matched tokens on which it fires (or,
    for a feature query, the tokens it is most active on); `share`: the fraction of all the
    feature's firing tokens that are matched tokens (1.0 for a feature query)."""

    feature: int
    max_act: float
    mean_act: float
    n_fire: int
    density: float
    tokens: list[str]
    share: float = 1.0

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "max_act": self.max_act,
            "mean_act": self.mean_act,
            "n_fire": self.n_fire,
            "density": self.density,
            "tokens": self.tokens,
            "share": self.share,
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchResult(Result):
    """What `search` found: the query and the hits, strongest first."""

    query: dict
    hits: list[FeatureHit]
    matched_tokens: list[str]
    store: str
    KIND = "SearchResult"

    @property
    def features(self) -> list[int]:
        return [h.feature for h in self.hits]

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "query": self.query,
            "hits": [h.to_dict() for h in self.hits],
            "matched_tokens": self.matched_tokens,
            "store": self.store,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchResult:
        return cls(
            query=d["query"],
            hits=[FeatureHit(**h) for h in d["hits"]],
            matched_tokens=list(d["matched_tokens"]),
            store=d["store"],
        )

    def table(self):
        """One row per hit, strongest first: feature, max_act, mean_act, n_fire, share, density, tokens."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [h.to_dict() for h in self.hits],
            columns=["feature", "max_act", "mean_act", "n_fire", "share", "density", "tokens"],
        )

    def to_text(self) -> str:
        """A plain-text table, one line per hit (what `lenslab sae search` prints)."""
        lines = [f"{'feature':>7}  {'max':>8}  {'mean':>8}  {'fires':>6}  {'share':>6}  {'density':>8}  tokens"]
        for h in self.hits:
            toks = " ".join(repr(t) for t in h.tokens[:6])
            lines.append(
                f"{h.feature:>7}  {h.max_act:>8.4g}  {h.mean_act:>8.4g}  {h.n_fire:>6}  {h.share:>6.1%}  "
                f"{h.density:>8.3%}  {toks}"
            )
        return "\n".join(lines)

    def figure(self):
        """The hits' maximum activations as bars, strongest first."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        fig = go.Figure(
            go.Bar(
                x=[f"f{h.feature}" for h in self.hits],
                y=[h.max_act for h in self.hits],
                marker_color="#e6550d",
                hovertemplate="%{x}: max %{y:.4g}<extra></extra>",
            )
        )
        fig.update_layout(xaxis_title="feature", yaxis_title="max activation", xaxis_type="category")
        q = ", ".join(f"{k}={v!r}" for k, v in self.query.items())
        return figures.style(fig, f"Feature search: {q}")


def _normal(s: str) -> str:
    return s.replace("Ġ", " ").replace("▁", " ").strip().lower()


def search(
    store: FeatureStore | str | Path,
    *,
    token: str | int | None = None,
    substring: str | None = None,
    feature: int | None = None,
    k: int = 10,
    by: str = "max",
) -> SearchResult:
    """Features most active on a token, on tokens containing a substring, or one feature's summary.

    Give exactly one of: `token` (a token string, matched exactly or, failing that, ignoring
    case, surrounding spaces and BPE space markers; or a token id), `substring` (every token whose
    string contains it, ignoring case), `feature` (an id: its statistics and top tokens).

    `by` ranks the features that fire on the matched tokens: "max" (their maximum activation
    there, the default), "mean" (their mean activation there) or "share" (the fraction of the
    feature's firing tokens that are matched tokens: features specific to the token first, not
    dense features that also fire on it), over the indexed corpus; ties by feature id.
    """
    if by not in SEARCH_ORDERS:
        raise LenslabError(f"by={by!r} is not one of {', '.join(SEARCH_ORDERS)}{did_you_mean(by, SEARCH_ORDERS)}")
    given = [x for x in (token, substring, feature) if x is not None]
    if len(given) != 1:
        raise LenslabError("search takes exactly one of token=, substring= or feature=")
    own = not isinstance(store, FeatureStore)
    st = FeatureStore(store) if own else store
    try:
        n_all = st.arrays()["n_fire"]
        dens = n_all / max(st.total_tokens, 1)
        if feature is not None:
            s = st.stats(int(feature))
            hit = FeatureHit(
                feature=int(feature),
                max_act=s.max_act,
                mean_act=s.mean_act,
                n_fire=s.n_fire,
                density=s.density,
                tokens=[t for t, _, _ in st.top_tokens(int(feature), 10)],
            )
            return SearchResult(query={"feature": int(feature)}, hits=[hit], matched_tokens=[], store=str(st.path))
        vocab = st.vocab()
        if token is not None:
            if isinstance(token, (int, np.integer)):
                if int(token) not in vocab:
                    raise LenslabError(f"token id {token} is not in the model's vocabulary (0 .. {len(vocab) - 1})")
                ids = [int(token)]
            else:
                ids = [i for i, t in vocab.items() if t == token] or [
                    i for i, t in vocab.items() if _normal(t) == _normal(token)
                ]
                if not ids:
                    raise LenslabError(
                        f"no token {token!r} in the model's vocabulary{did_you_mean(token, list(vocab.values()))}; "
                        "try substring= for partial matches"
                    )
            query = {"token": token}
        else:
            if not substring:
                raise LenslabError("substring must be a non-empty string")
            sub = substring.lower()
            ids = [i for i, t in vocab.items() if sub in t.lower()]
            if not ids:
                raise LenslabError(f"no token of the model's vocabulary contains {substring!r}")
            query = {"substring": substring}
        hits = [
            FeatureHit(
                feature=int(f),
                max_act=float(mx),
                mean_act=float(sm) / n if n else 0.0,
                n_fire=int(n),
                density=float(dens[f]),
                tokens=[vocab.get(int(t), str(t)) for t in toks],
                share=int(n) / int(n_all[f]) if n_all[f] else 0.0,
            )
            for f, mx, n, sm, toks in st.token_hits(ids)  # one DuckDB GROUP BY over the token table
        ]
        key = {"max": lambda h: h.max_act, "mean": lambda h: h.mean_act, "share": lambda h: h.share}[by]
        hits = sorted(hits, key=lambda h: (-key(h), h.feature))[:k]
        query["by"] = by
        return SearchResult(query=query, hits=hits, matched_tokens=[vocab[i] for i in ids], store=str(st.path))
    finally:
        if own:
            st.close()
