"""Feature dashboards: one feature from a store as a figure, Neuronpedia-like JSON and a standalone HTML page.

`FeatureDashboard.from_store(store, feature)` gathers a feature's statistics, top contexts,
activation histogram and logit effects; `table()` lists the top contexts, `figure()` draws the
histogram and logit effects, `to_html` writes the page with every context token shaded
by the feature's activation (the app's Dashboard tab offers it as a download).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.figures import FORMATS, export
from lenslab.probes.features.plumbing import LOGIT_K, check_feature, logit_summary
from lenslab.probes.features.store import Context, FeatureStore
from lenslab.results import Result

__all__ = ["FeatureDashboard"]


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureDashboard(Result):
    """One feature from a store: statistics, top contexts, activation histogram, logit effects.

    `to_dict()` / `to_json()` use Neuronpedia's feature field names (`modelId`, `layer`, `index`,
    `maxActApprox`, `frac_nonzero`, `pos_str` / `pos_values`, `neg_str` / `neg_values`,
    `freq_hist_data_bar_heights` / `freq_hist_data_bar_values` (bar centres, parallel to the
    heights), `logits_hist_data_bar_heights` / `..._values`, and `activations`: one entry per
    context with `tokens`, `values`, `maxValue`, `maxValueTokenIndex`, `minValue`), plus lenslab's
    own (`kind`, `hookName`, `n_fire`, `total_tokens`, `mean_act`, `hist_edges`, contexts'
    `prompt_id` / `pos` / `start` / `token_ids`, `provenance`). Unlike Neuronpedia's, the
    frequency histogram is over activation values on log-spaced bins (`hist_edges`).
    """

    feature: int
    model: str
    hook: str
    sae: str
    n_fire: int
    total_tokens: int
    max_act: float
    mean_act: float
    hist_edges: list[float]
    hist_counts: list[int]
    contexts: list[Context]
    pos_logits: list[tuple[str, float]]
    neg_logits: list[tuple[str, float]]
    logit_hist_heights: list[int] = field(default_factory=list)
    logit_hist_edges: list[float] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    KIND = "FeatureDashboard"

    @property
    def density(self) -> float:
        return self.n_fire / self.total_tokens if self.total_tokens else 0.0

    @classmethod
    def from_store(
        cls,
        store: FeatureStore | str | Path,
        feature: int,
        model=None,
        sae=None,
        *,
        n_contexts: int | None = None,
        k_logits: int = LOGIT_K,
    ) -> FeatureDashboard:
        """The dashboard of `feature`. With `model` and `sae` (checked against the store) the logit
        effects are computed now (`k_logits` each way); without, they come from the store."""
        own = not isinstance(store, FeatureStore)
        st = FeatureStore(store) if own else store
        try:
            st.check(model, sae)
            s = st.stats(feature)
            ctx = st.contexts(feature, n_contexts)
            if model is not None and sae is not None:
                check_feature(feature, int(sae.cfg.d_sae))
                v = sae.W_dec[feature].float()[None] @ model.W_U.float().to(sae.W_dec.device)
                pi, pv, ni, nv, lh, le = logit_summary(v, k_logits)[0]
                pos, neg = list(zip(pi, pv)), list(zip(ni, nv))
            else:
                lg = st.logits(feature)
                pos, neg = lg["pos"][:k_logits], lg["neg"][:k_logits]
                lh, le = lg["hist_heights"], lg["hist_edges"]
            m = st.meta
            return cls(
                feature=int(feature),
                model=m["model"],
                hook=m["hook"],
                sae=m.get("sae_source") or m["sae_hash"],
                n_fire=s.n_fire,
                total_tokens=s.total_tokens,
                max_act=s.max_act,
                mean_act=s.mean_act,
                hist_edges=s.hist_edges,
                hist_counts=s.hist_counts,
                contexts=ctx,
                pos_logits=[(st.token_strs([i])[0], float(x)) for i, x in pos],
                neg_logits=[(st.token_strs([i])[0], float(x)) for i, x in neg],
                logit_hist_heights=lh,
                logit_hist_edges=le,
                provenance={
                    "store": str(st.path),
                    "model": m["model"],
                    "hook": m["hook"],
                    "sae_hash": m["sae_hash"],
                    "sae_source": m.get("sae_source"),
                    "store_complete": st.complete,
                    "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            )
        finally:
            if own:
                st.close()

    # -- exports -----------------------------------------------------------------------------
    def _hist_centres(self) -> list[float]:
        e = self.hist_edges
        return [math.sqrt(e[i] * e[i + 1]) for i in range(len(e) - 1)]

    def to_dict(self) -> dict:
        le = self.logit_hist_edges
        return {
            "kind": self.KIND,
            "modelId": self.model,
            "layer": self.hook,
            "hookName": self.hook,
            "index": str(self.feature),
            "sae": self.sae,
            "maxActApprox": self.max_act,
            "frac_nonzero": self.density,
            "n_fire": self.n_fire,
            "total_tokens": self.total_tokens,
            "mean_act": self.mean_act,
            "pos_str": [t for t, _ in self.pos_logits],
            "pos_values": [v for _, v in self.pos_logits],
            "neg_str": [t for t, _ in self.neg_logits],
            "neg_values": [v for _, v in self.neg_logits],
            "freq_hist_data_bar_heights": self.hist_counts,
            "freq_hist_data_bar_values": self._hist_centres(),
            "hist_edges": self.hist_edges,
            "logits_hist_data_bar_heights": self.logit_hist_heights,
            "logits_hist_data_bar_values": [(le[i] + le[i + 1]) / 2 for i in range(len(le) - 1)],
            "logits_hist_edges": le,
            "activations": [
                {
                    "tokens": c.tokens,
                    "values": c.acts,
                    "maxValue": c.act,
                    "maxValueTokenIndex": c.index,
                    "minValue": min(c.acts) if c.acts else 0.0,
                    "prompt_id": c.prompt_id,
                    "pos": c.pos,
                    "start": c.start,
                    "token_ids": c.token_ids,
                }
                for c in self.contexts
            ],
            "explanations": [],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureDashboard:
        return cls(
            feature=int(d["index"]),
            model=d["modelId"],
            hook=d["hookName"],
            sae=d["sae"],
            n_fire=int(d["n_fire"]),
            total_tokens=int(d["total_tokens"]),
            max_act=float(d["maxActApprox"]),
            mean_act=float(d["mean_act"]),
            hist_edges=[float(x) for x in d["hist_edges"]],
            hist_counts=[int(x) for x in d["freq_hist_data_bar_heights"]],
            contexts=[
                Context(
                    prompt_id=int(a["prompt_id"]),
                    pos=int(a["pos"]),
                    act=float(a["maxValue"]),
                    start=int(a["start"]),
                    token_ids=[int(i) for i in a["token_ids"]],
                    tokens=list(a["tokens"]),
                    acts=[float(v) for v in a["values"]],
                )
                for a in d["activations"]
            ],
            pos_logits=list(zip(d["pos_str"], d["pos_values"])),
            neg_logits=list(zip(d["neg_str"], d["neg_values"])),
            logit_hist_heights=[int(x) for x in d.get("logits_hist_data_bar_heights", [])],
            logit_hist_edges=[float(x) for x in d.get("logits_hist_edges", [])],
            provenance=d.get("provenance") or {},
        )

    def table(self):
        """One row per top activating context, strongest first: rank, prompt_id, pos, activation,
        the token there and the context window's text."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [
                {
                    "rank": r,
                    "prompt_id": c.prompt_id,
                    "pos": c.pos,
                    "activation": c.act,
                    "token": c.tokens[c.index] if 0 <= c.index < len(c.tokens) else "",
                    "context": "".join(c.tokens),
                }
                for r, c in enumerate(self.contexts)
            ],
            columns=["rank", "prompt_id", "pos", "activation", "token", "context"],
        )

    def title(self) -> str:
        return f"Feature {self.feature} · {self.hook} · model {self.model}"

    def figure(self):
        """Activation histogram (log-spaced bins) and the top promoted / suppressed logits."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: as above

        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.55, 0.45],
            horizontal_spacing=0.14,
            subplot_titles=[f"activation histogram (density {self.density:.3%})", "logit effect W_dec·W_U"],
        )
        counts, cen = self.hist_counts, self._hist_centres()
        nz = [i for i, c in enumerate(counts) if c]
        lo, hi = (nz[0], nz[-1] + 1) if nz else (0, len(counts))
        e = self.hist_edges
        fig.add_trace(
            go.Bar(
                x=cen[lo:hi],
                y=counts[lo:hi],
                width=[e[i + 1] - e[i] for i in range(lo, hi)],
                marker_color="#e6550d",
                name="tokens",
                showlegend=False,
                hovertemplate="activation ≈ %{x:.3g}<br>tokens %{y}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        fig.update_xaxes(type="log", title_text="activation (log scale)", row=1, col=1)
        fig.update_yaxes(title_text="tokens", row=1, col=1)
        logit_rows = list(reversed(self.neg_logits)) + list(self.pos_logits)[::-1]
        labels = figures.unique_labels([repr(t) for t, _ in logit_rows])
        fig.add_trace(
            go.Bar(
                x=[v for _, v in logit_rows],
                y=labels,
                orientation="h",
                showlegend=False,
                marker_color=["#1f5fb4" if v > 0 else "#c0392b" for _, v in logit_rows],
                hovertemplate="%{y}: %{x:.4g}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=2)
        fig.update_layout(height=max(420, 18 * len(logit_rows) + 160), width=1000)
        return figures.style(fig, self.title())

    def contexts_html(self) -> str:
        """The top contexts as HTML rows (inline styles, so a Streamlit page and the standalone page
        show the same): every token (`span.tok`) shaded by the feature's activation, hover shows the
        value, the firing token outlined (`span.tok.here`)."""
        top = max([self.max_act] + [max(c.acts, default=0.0) for c in self.contexts]) or 1.0

        def tok_span(t: str, a: float, here: bool) -> str:
            alpha = max(0.0, min(1.0, a / top))
            outline = " outline: 1px solid #333;" if here else ""
            cls = "tok here" if here else "tok"
            return (
                f'<span class="{cls}" style="background: rgba(230, 85, 13, {alpha:.3f});{outline} padding: 1px 0" title="{a:.4g}">'
                f"{html.escape(t).replace(' ', '&nbsp;') or '&nbsp;'}</span>"
            )

        rows = [
            '<div class="ctx" style="font-family: Menlo, Consolas, monospace; margin: 4px 0; line-height: 1.7">'
            f'<b class="val" style="display: inline-block; min-width: 5em">{c.act:.4g}</b> '
            f'<span class="where" style="color: #888; font-size: 0.8em; display: inline-block; min-width: 10em">'
            f"prompt {c.prompt_id}, pos {c.pos}</span> "
            + "".join(tok_span(t, a, i == c.index) for i, (t, a) in enumerate(zip(c.tokens, c.acts)))
            + "</div>"
            for c in self.contexts
        ]
        return "\n".join(rows) or "<p>(the feature never fired on the indexed corpus)</p>"

    def to_html(self, path: str | Path | None = None) -> str:
        """A standalone HTML page (plain HTML, inline plotly JS): statistics, contexts with every token
        shaded by the feature's activation (hover shows the value), logit tables and the figure."""
        esc = html.escape
        ctx_html = self.contexts_html()

        def logit_table(rows, head):
            body = "".join(f"<tr><td><code>{esc(repr(t))}</code></td><td>{v:+.4g}</td></tr>" for t, v in rows)
            return f'<table class="logits"><tr><th>{head}</th><th>value</th></tr>{body}</table>'

        fig_html = self.figure().to_html(include_plotlyjs=True, full_html=False)
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title())}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 2em 1em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }}
.logits-wrap {{ display: flex; }}
</style></head><body>
<h1>Feature {self.feature}</h1>
<p>model <b>{esc(self.model)}</b> · hook <code>{esc(self.hook)}</code> · SAE <code>{esc(str(self.sae))}</code></p>
<table class="stats">
<tr><th>density</th><td>{self.density:.4%} ({self.n_fire} of {self.total_tokens} tokens)</td></tr>
<tr><th>max activation</th><td>{self.max_act:.4g}</td></tr>
<tr><th>mean activation when firing</th><td>{self.mean_act:.4g}</td></tr>
</table>
<h2>Top activating contexts</h2>
{ctx_html}
<h2>Logit effects (W_dec[{self.feature}] @ W_U)</h2>
<div class="logits-wrap">{logit_table(self.pos_logits, "promoted")}{logit_table(self.neg_logits, "suppressed")}</div>
<h2>Activation histogram and logits</h2>
{fig_html}
</body></html>
"""
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(page)
        return page

    def save(self, path: str | Path) -> Path:
        """Write `.json` (the Neuronpedia-like dict) or `.html` (the standalone page); other
        extensions go to `figures.export` (the figure)."""
        path = Path(path)
        ext = path.suffix.lower()
        if ext == ".html":
            self.to_html(path)
            return path
        if ext not in FORMATS:
            raise LenslabError(
                f"cannot export a dashboard to {path.name!r}: use .html, .json or one of {', '.join(FORMATS)}"
            )
        return export(self, path)
