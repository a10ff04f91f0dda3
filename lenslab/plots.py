"""Plotly figures for the Model page's analyses (`lenslab.lens`).

Each builder takes a result from `lenslab.lens` and returns a `plotly.graph_objects.Figure`
whose title names the model; export any of them with `lenslab.figures.save_figure`.

>>> import lenslab
>>> from lenslab import lens, plots
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> fig = plots.attention_heatmap(lens.attention_patterns(model, "t1 t2 t3"), lens.tokenize(model, "t1 t2 t3").str_tokens,
...                               layer=0, head=0, model="zoo/induction-2l")
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.figures import style

__all__ = ["attention_heads", "attention_heatmap", "logit_lens_heatmap", "pos_labels", "predictions_bar"]

ATTENTION_SCALE = "Blues"
PROB_SCALE = "Viridis"


def pos_labels(str_tokens: Sequence[str]) -> list[str]:
    """Unique axis labels `"0 <bos>", "1 a", ...` (plotly merges equal category labels)."""
    return [f"{i} {_show(t)}" for i, t in enumerate(str_tokens)]


def _show(token: str) -> str:
    """Make whitespace in a token visible (a leading space as '␣', newlines as '↵')."""
    return token.replace("\n", "↵").replace(" ", "␣") if token.strip() != token or not token else token


def _check_layer_head(patterns: Tensor, layer: int, head: int | None) -> None:
    n_layers, n_heads = patterns.shape[:2]
    if not 0 <= layer < n_layers:
        raise LenslabError(f"layer {layer} does not exist: the model has layers 0..{n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise LenslabError(f"head {head} does not exist: each layer has heads 0..{n_heads - 1}")


def attention_heatmap(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    str_tokens: Sequence[str],
    *,
    layer: int,
    head: int,
    model: str = "model",
):
    """Heatmap of one head's attention: rows = query (attending) token, columns = key token.

    Args:
        patterns: from `lens.attention_patterns`, `[layer, head, query_pos, key_pos]`.
        str_tokens: the prompt's tokens (`lens.tokenize(...).str_tokens`), one per position.
        layer, head: which head to draw.
        model: the model's name, for the title.
    """
    import plotly.graph_objects as go

    _check_layer_head(patterns, layer, head)
    labels = pos_labels(str_tokens)
    z = patterns[layer, head].detach().float().cpu()
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=labels,
            y=labels,
            colorscale=ATTENTION_SCALE,
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="attention"),
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    n = len(labels)
    fig.update_xaxes(title_text="key (attended-to) token", tickangle=-45 if n > 8 else 0)
    fig.update_yaxes(title_text="query (attending) token", autorange="reversed")
    size = min(760, max(380, 34 * n + 200))
    fig.update_layout(height=size, width=size + 80)
    return style(fig, f"Attention · {model} · layer {layer} head {head}")


def attention_heads(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    str_tokens: Sequence[str],
    *,
    layer: int,
    model: str = "model",
    max_heads: int = 16,
):
    """All heads of one layer side by side (up to `max_heads`), same colour scale [0, 1]."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _check_layer_head(patterns, layer, None)
    n = min(patterns.shape[1], max_heads)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    labels = pos_labels(str_tokens)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[f"head {h}" for h in range(n)],
        horizontal_spacing=0.03,
        vertical_spacing=0.08,
    )
    for h in range(n):
        fig.add_trace(
            go.Heatmap(
                z=patterns[layer, h].detach().float().cpu().tolist(),
                x=labels,
                y=labels,
                colorscale=ATTENTION_SCALE,
                zmin=0.0,
                zmax=1.0,
                showscale=h == 0,
                colorbar=dict(title="attention"),
                hovertemplate=f"head {h}<br>query %{{y}}<br>key %{{x}}<br>attention %{{z:.3f}}<extra></extra>",
            ),
            row=h // cols + 1,
            col=h % cols + 1,
        )
    fig.update_yaxes(autorange="reversed")
    show_ticks = len(labels) <= 20
    fig.update_xaxes(showticklabels=show_ticks, tickangle=-45)
    fig.update_yaxes(showticklabels=show_ticks)
    fig.update_layout(height=max(360, 280 * rows))
    return style(fig, f"Attention · {model} · layer {layer}, all heads")


def logit_lens_heatmap(lens_result, value: str = "top"):
    """Logit lens as a heatmap: rows = layer (residual stream read), columns = position.

    Each cell is labelled with that layer's top next-token prediction at that position.

    Args:
        lens_result: a `lens.LogitLens`.
        value: colour by `"top"` (probability of the layer's own top-1 token) or `"final"`
            (probability the layer gives to the full model's final prediction).
    """
    import plotly.graph_objects as go

    if value not in ("top", "final"):
        raise LenslabError(f"value must be 'top' or 'final', got {value!r}")
    ll = lens_result
    z = ll.top_probs[..., 0] if value == "top" else ll.final_prob  # [layer, pos]
    top = [[_show(cands[0]) for cands in row] for row in ll.top_tokens]
    final_tok = [_show(c[0]) for c in ll.top_tokens[-1]]
    custom = [
        [
            [top[r][c], f"{float(ll.top_probs[r, c, 0]):.3f}", final_tok[c], f"{float(ll.final_prob[r, c]):.3f}"]
            for c in range(len(final_tok))
        ]
        for r in range(len(top))
    ]
    n_pos = len(ll.str_tokens)
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=pos_labels(ll.str_tokens),
            y=ll.layer_labels,
            text=top,
            texttemplate="%{text}" if n_pos <= 24 else None,
            textfont=dict(size=11),
            customdata=custom,
            colorscale=PROB_SCALE,
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="p(top-1)" if value == "top" else "p(final)"),
            hovertemplate=(
                "layer %{y}<br>input %{x}<br>top: %{customdata[0]} (p=%{customdata[1]})"
                "<br>final prediction %{customdata[2]}: p=%{customdata[3]}<extra></extra>"
            ),
        )
    )
    fig.update_xaxes(title_text="input position (prediction is for the next token)", tickangle=-45 if n_pos > 8 else 0)
    fig.update_yaxes(title_text="residual stream read")
    fig.update_layout(height=max(300, 46 * len(ll.layer_labels) + 200))
    what = "probability of each layer's top token" if value == "top" else "probability of the final prediction"
    return style(fig, f"Logit lens · {ll.model} · {what}")


def predictions_bar(predictions, *, model: str = "model"):
    """Horizontal bar chart of `lens.top_predictions` (best on top)."""
    import plotly.graph_objects as go

    toks = [f"{_show(p.token)} ({p.id})" for p in predictions]
    fig = go.Figure(
        go.Bar(
            x=[p.prob for p in predictions],
            y=toks,
            orientation="h",
            marker_color="#3b6ea8",
            customdata=[[p.logit] for p in predictions],
            hovertemplate="%{y}<br>p=%{x:.4f}<br>logit %{customdata[0]:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="probability", range=[0, max([p.prob for p in predictions] + [0.01]) * 1.1])
    fig.update_layout(height=max(260, 28 * len(predictions) + 140))
    return style(fig, f"Next-token predictions · {model}")
