"""Publication figures for results, and one export function for every figure.

`save_figure(fig, path)` writes by extension: `.json` (plotly JSON), `.html`, and `.svg`,
`.png`, `.pdf` through kaleido, which drives a locally installed Chromium (Debian's
`chromium`; set `BROWSER_PATH` to use another).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lenslab._errors import LenslabError

STATIC = {".svg", ".png", ".pdf"}
FORMATS = (".json", ".html", *sorted(STATIC))
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)


def style(fig, title: str | None = None):
    """Consistent styling: white background, readable font, title."""
    fig.update_layout(template="plotly_white", font=FONT, margin=dict(l=70, r=30, t=70, b=60))
    if title is not None:
        fig.update_layout(title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)))
    return fig


def result_heatmap(result, normalize: bool = False):
    """Heatmap of a `PatchResult`: rows = first axis, columns = second; a 3-axis result gets one
    panel per index of its last axis (up to 16), a 1-axis result a bar chart.

    The colour scale is diverging and centred at the unpatched baseline (exact patching) or at
    zero (normalised scores and attributions).
    """
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
    from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

    scores = result.normalized() if normalize else result.scores
    scores = scores.detach().cpu().float()
    centre = 0.0 if (normalize or result.method != "exact" or result.baseline is None) else result.baseline
    if normalize and result.direction == "noise":
        centre = 1.0
    label = "normalised metric" if normalize else (result.metric if result.method == "exact" else "attribution")
    lab = lambda ax, n: result.labels.get(ax, [str(i) for i in range(n)])
    span = float((scores - centre).abs().max()) or 1.0
    common = dict(colorscale="RdBu", zmid=centre, zmin=centre - span, zmax=centre + span)
    if scores.ndim == 1:
        ax = result.axes[0]
        fig = go.Figure(go.Bar(x=lab(ax, scores.shape[0]), y=scores.tolist(), marker_color="#3b6ea8"))
        fig.update_layout(xaxis_title=ax, yaxis_title=label)
    elif scores.ndim == 2:
        r, c = result.axes
        fig = go.Figure(
            go.Heatmap(
                z=scores.tolist(),
                x=unique_labels(lab(c, scores.shape[1])),
                y=unique_labels(lab(r, scores.shape[0])),
                colorbar=dict(title=label),
                hovertemplate=f"{r}: %{{y}}<br>{c}: %{{x}}<br>{label}: %{{z:.4g}}<extra></extra>",
                **common,
            )
        )
        fig.update_layout(xaxis_title=c, yaxis_title=r, yaxis_autorange="reversed")
    elif scores.ndim == 3:
        r, c, f = result.axes
        n = min(scores.shape[2], 16)
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fl = lab(f, scores.shape[2])
        fig = make_subplots(
            rows=rows,
            cols=cols,
            subplot_titles=[f"{f} {fl[i]}" for i in range(n)],
            horizontal_spacing=0.04,
            vertical_spacing=0.12,
        )
        for i in range(n):
            fig.add_trace(
                go.Heatmap(
                    z=scores[:, :, i].tolist(),
                    x=unique_labels(lab(c, scores.shape[1])),
                    y=unique_labels(lab(r, scores.shape[0])),
                    showscale=i == 0,
                    colorbar=dict(title=label),
                    hovertemplate=f"{f}: {fl[i]}<br>{r}: %{{y}}<br>{c}: %{{x}}<br>{label}: %{{z:.4g}}<extra></extra>",
                    **common,
                ),
                row=i // cols + 1,
                col=i % cols + 1,
            )
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(height=max(350, 260 * rows))
    else:
        raise LenslabError(f"cannot draw a {scores.ndim}-axis result as a heatmap; use table()")
    return style(fig, result.title())


def unique_labels(labels: list[str]) -> list[str]:
    """Plotly merges equal category labels; make them unique ('the', 'the' -> 'the', 'the·1')."""
    seen: dict[str, int] = {}
    out = []
    for s in labels:
        k = seen.get(s, 0)
        out.append(s if k == 0 else f"{s}·{k}")
        seen[s] = k + 1
    return out


def _browser_path() -> str | None:
    for cand in (
        os.environ.get("BROWSER_PATH"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if cand and Path(cand).exists():
            return cand
    return None


def save_figure(fig, path: str | Path, *, width: int = 900, height: int | None = None, scale: float = 2.0) -> Path:
    """Write `fig` to `path`; the format follows the extension (.json .html .svg .png .pdf)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise LenslabError(f"cannot export a figure to {path.name!r}: use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".json":
        path.write_text(fig.to_json())
    elif ext == ".html":
        fig.write_html(str(path), include_plotlyjs=True)
    else:
        browser = _browser_path()
        if browser is None:
            raise LenslabError(
                f"exporting {ext} needs Chromium for kaleido: install it (Debian: apt-get install chromium) "
                "or set BROWSER_PATH; .json and .html exports work without it"
            )
        os.environ.setdefault("BROWSER_PATH", browser)
        h = height or int(fig.layout.height or 520)
        fig.write_image(str(path), format=ext[1:], width=width, height=h, scale=scale if ext == ".png" else 1)
    return path


METHOD_COLOURS = {"atp": "#d62728", "atp*": "#ff7f0e", "relp": "#1f77b4", "ig": "#2ca02c"}


def faithfulness_scatter(faith):
    """Estimate vs exact change, one panel per site, one colour per method, with the y = x line."""
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
    from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

    sites = list(faith.exact)
    methods = list(faith.estimates)
    fig = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, horizontal_spacing=0.06)
    corr = {(r["site"], r["method"]): r["pearson"] for r in faith.rows}
    for j, site in enumerate(sites):
        lo, hi = 0.0, 0.0
        for m in methods:
            x, y = faith.pairs(m, site)
            lo, hi = min(lo, float(x.min()), float(y.min())), max(hi, float(x.max()), float(y.max()))
            fig.add_trace(
                go.Scatter(
                    x=x.tolist(),
                    y=y.tolist(),
                    mode="markers",
                    name=f"{m} (r={corr[(site, m)]:.2f})",
                    legendgroup=m,
                    showlegend=True,
                    marker=dict(size=6, opacity=0.7, color=METHOD_COLOURS.get(m)),
                    hovertemplate=f"{m}<br>exact %{{x:.4g}}<br>estimate %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=j + 1,
            )
        fig.add_trace(
            go.Scatter(
                x=[lo, hi],
                y=[lo, hi],
                mode="lines",
                line=dict(color="#888", dash="dot"),
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=j + 1,
        )
        fig.update_xaxes(title_text="exact patching (change)", row=1, col=j + 1)
    fig.update_yaxes(title_text="attribution estimate", row=1, col=1)
    ex = next(iter(faith.exact.values()))
    p = ex.provenance
    fig.update_layout(height=420, width=max(500, 380 * len(sites)))
    return style(
        fig,
        f"Faithfulness vs exact patching · model {p.get('model', '?')} · task {p.get('task', '?')} · metric {ex.metric}",
    )


def export(result, path: str | Path) -> Path:
    """Write any lenslab result: `.json` -> `result.to_json()` (data with provenance); a figure
    format (.svg .png .pdf .html) -> `result.figure()` exported with `save_figure`."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        path.parent.mkdir(parents=True, exist_ok=True)
        result.to_json(path)
        return path
    return save_figure(result.figure(), path)
