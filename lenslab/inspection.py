"""Inspecting a model on one prompt (the app's Model page): tokenization, attention patterns,
the logit lens, next-token predictions and a model card, with their figures.

Everything here takes a TransformerLens model (`HookedTransformer`, or a `TransformerBridge`,
which exposes the same hook names) and a prompt string and runs one forward pass:

- `tokenize` -> `Tokenized`: the prompt's tokens as the model reads them.
- `attention_patterns` -> a `[layer, head, query_pos, key_pos]` tensor, drawn by
  `attention_heatmap` (one head) and `attention_heads` (all heads of a layer).
- `logit_lens` -> `LogitLens`, a `Result`: `table()`, `figure()` (`logit_lens_heatmap`), JSON.
  The same Result holds the tuned lens's reading (`lens="tuned"`, `lenslab.probes.lenses`);
  `lens_result` builds one from any lens's per-layer logits.
- `top_predictions` -> `Predictions`, a `Result` that is also the list of `Prediction`
  `(token, id, prob, logit)` it holds: `table()`, `figure()` (`predictions_bar`), JSON.
- `model_card`: Markdown describing the model.

The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") reads each layer's
residual stream as if it were the last one: apply the final LayerNorm (recomputing its
statistics for that layer's residual) and the unembedding, and see which token the model
"would" predict so far. It is what TransformerLens's
`cache.accumulated_resid(apply_ln=True)` followed by the unembedding computes.

>>> import torch
>>> import lenslab
>>> from lenslab import inspection
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> tok = inspection.tokenize(model, "t1 t2 t3")
>>> tok.str_tokens[0] == model.tokenizer.bos_token
True
>>> patterns = inspection.attention_patterns(model, "t1 t2 t3 t1 t2")
>>> patterns.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)
True
>>> patterns.sum(-1).allclose(torch.tensor(1.0))
True
>>> fig = inspection.attention_heatmap(patterns, inspection.tokenize(model, "t1 t2 t3 t1 t2").str_tokens,
...                                    layer=0, head=0, model="zoo/induction-2l")
>>> ll = inspection.logit_lens(model, "t1 t2 t3 t1 t2", k=3)
>>> ll.top_ids.shape == (model.cfg.n_layers + 1, len(ll.str_tokens), 3)
True
>>> preds = inspection.top_predictions(model, "t1 t2 t3 t1 t2", k=3)
>>> preds[0].prob >= preds[1].prob >= preds[2].prob
True
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenslab import zoo
from lenslab._errors import LenslabError
from lenslab.figures import style
from lenslab.results import Result, provenance
from lenslab.toolbox import model_name

__all__ = [
    "ATTENTION_SCALE",
    "PROB_SCALE",
    "LogitLens",
    "Prediction",
    "Predictions",
    "Tokenized",
    "attention_heads",
    "attention_heatmap",
    "attention_patterns",
    "config_summary",
    "logit_lens",
    "LENS_NAMES",
    "lens_result",
    "logit_lens_heatmap",
    "logit_lens_logits",
    "model_card",
    "model_name",
    "pos_labels",
    "predictions_bar",
    "tokenize",
    "top_predictions",
]

ATTENTION_SCALE = "Blues"
PROB_SCALE = "Viridis"
LENS_NAMES = {"logit": "Logit lens", "tuned": "Tuned lens"}  # `LogitLens.lens` -> its name in titles


# --- tokens ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Tokenized:
    """A prompt as the model sees it.

    Attributes:
        ids: `[pos]` int token ids (with the BOS token the model prepends, if any).
        str_tokens: one string per position.
        model: the model's name.
    """

    ids: Int[Tensor, " pos"]
    str_tokens: list[str]
    model: str

    def rows(self) -> list[dict]:
        """One dict per position: `{"pos", "token", "id"}` (for tables)."""
        return [
            {"pos": i, "token": t, "id": int(x)} for i, (t, x) in enumerate(zip(self.str_tokens, self.ids.tolist()))
        ]

    def __len__(self) -> int:
        return len(self.str_tokens)


def _tokens(model, text: str) -> Int[Tensor, "1 pos"]:
    """Validate `text` and tokenize it to `[1, pos]` on the model's device."""
    if not isinstance(text, str) or not text.strip():
        raise LenslabError("the prompt is empty: type some text for the model to read")
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError(f"model {model_name(model)!r} has no tokenizer, so it cannot read text; load one that has")
    try:
        tokens = model.to_tokens(text, truncate=False)  # TransformerLens truncates silently otherwise
    except TypeError:  # a model whose to_tokens has no `truncate`
        tokens = model.to_tokens(text)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        raise LenslabError(
            f"the prompt is {tokens.shape[-1]} tokens but {model_name(model)!r} reads at most {n_ctx}: shorten it"
        )
    return tokens


def tokenize(model, text: str) -> Tokenized:
    """Tokenize `text` as the model does (including its BOS token)."""
    tokens = _tokens(model, text)
    str_tokens = list(model.to_str_tokens(tokens[0]))
    return Tokenized(ids=tokens[0].detach().cpu(), str_tokens=[str(s) for s in str_tokens], model=model_name(model))


def pos_labels(str_tokens: Sequence[str]) -> list[str]:
    """Unique axis labels `"0 <bos>", "1 a", ...` (plotly merges equal category labels)."""
    return [f"{i} {_show(t)}" for i, t in enumerate(str_tokens)]


def _show(token: str) -> str:
    """Make whitespace in a token visible (a leading space as '␣', newlines as '↵')."""
    return token.replace("\n", "↵").replace(" ", "␣") if token.strip() != token or not token else token


# --- attention ---------------------------------------------------------------------------------
def _pattern_hooks(model) -> list[str]:
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def attention_patterns(model, text: str) -> Float[Tensor, "layer head query_pos key_pos"]:
    """Attention probabilities of every head on `text`: `[layer, head, query_pos, key_pos]`.

    Row `[l, h, q]` is head `h` of layer `l`'s distribution over key positions when attending
    from position `q`; rows sum to 1 and are zero above the diagonal (causal mask). Read from the
    `blocks.{l}.attn.hook_pattern` hooks, on CPU in float32. Drawn by `attention_heatmap` and
    `attention_heads`.
    """
    tokens = _tokens(model, text)
    names = _pattern_hooks(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    missing = [n for n in names if n not in cache]
    if missing:
        raise LenslabError(
            f"model {model_name(model)!r} exposes no attention pattern hooks ({missing[0]}); "
            "it may not be a standard attention model"
        )
    return torch.stack([cache[n][0].detach().float().cpu() for n in names])


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
        patterns: from `attention_patterns`, `[layer, head, query_pos, key_pos]`.
        str_tokens: the prompt's tokens (`tokenize(...).str_tokens`), one per position.
        layer, head: which head to draw.
        model: the model's name, for the title.
    """
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

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
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
    from plotly.subplots import make_subplots  # deferred: as above

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


# --- logit lens --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LogitLens(Result):
    """A lens's reading of one prompt: what each layer's residual stream predicts at each position.

    The one Result of the lens family: `lens` says which lens read the residual streams, the
    logit lens (`"logit"`: the final norm and unembedding applied as they are) or the tuned lens
    (`"tuned"`: a trained affine translator first; `lenslab.probes.lenses.tuned_lens`).
    Rows ("layers") are the residual stream before each block (`0_pre`, `1_pre`, ...) and after
    the last one (`final_post`), as in TransformerLens's `accumulated_resid` labels; the last
    row is the model's own output (for either lens). `table()`: one row per layer, position and
    rank; `figure()`: `logit_lens_heatmap`.

    Attributes:
        top_ids: `[layer, pos, k]` ids of the k most probable next tokens.
        top_probs: `[layer, pos, k]` their probabilities (softmax over the vocabulary).
        top_tokens: `[layer][pos][k]` their strings.
        final_prob: `[layer, pos]` probability each layer gives to the token the full model
            predicts at that position (the last row's top-1).
        layer_labels: one label per row, e.g. `["0_pre", "1_pre", "final_post"]`.
        str_tokens: the prompt's tokens, one per position.
        model: the model's name.
        lens: which lens read the residual streams: `"logit"` or `"tuned"` (a key of `LENS_NAMES`).
        provenance: model, prompt, versions, time (see `lenslab.results.provenance`).
    """

    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_tokens: list[list[list[str]]]
    final_prob: Float[Tensor, "layer pos"]
    layer_labels: list[str]
    str_tokens: list[str]
    model: str
    lens: str = "logit"
    provenance: dict = field(default_factory=dict)
    KIND = "LogitLens"

    @property
    def k(self) -> int:
        return self.top_ids.shape[-1]

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.detach().cpu().float().tolist(),
            "top_tokens": self.top_tokens,
            "final_prob": self.final_prob.detach().cpu().float().tolist(),
            "layer_labels": self.layer_labels,
            "str_tokens": self.str_tokens,
            "model": self.model,
            "lens": self.lens,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LogitLens:
        return cls(
            top_ids=torch.tensor(d["top_ids"], dtype=torch.long),
            top_probs=torch.tensor(d["top_probs"], dtype=torch.float32),
            top_tokens=[[list(c) for c in row] for row in d["top_tokens"]],
            final_prob=torch.tensor(d["final_prob"], dtype=torch.float32),
            layer_labels=list(d["layer_labels"]),
            str_tokens=list(d["str_tokens"]),
            model=d["model"],
            lens=d.get("lens", "logit"),  # JSON written before the tuned lens: a logit lens
            provenance=d.get("provenance") or {},
        )

    def table(self):
        """Long format: one row per layer, position and rank: the input token there, the layer's
        prediction (`prediction`, `id`, `prob`) and `p_final`, the probability the layer gives to
        the full model's prediction at that position."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        probs, ids, final = self.top_probs.tolist(), self.top_ids.tolist(), self.final_prob.tolist()
        rows = [
            {
                "layer": label,
                "pos": p,
                "token": tok,
                "rank": r,
                "prediction": self.top_tokens[li][p][r],
                "id": ids[li][p][r],
                "prob": probs[li][p][r],
                "p_final": final[li][p],
            }
            for li, label in enumerate(self.layer_labels)
            for p, tok in enumerate(self.str_tokens)
            for r in range(self.k)
        ]
        return pd.DataFrame(rows, columns=["layer", "pos", "token", "rank", "prediction", "id", "prob", "p_final"])

    def figure(self, value: str = "top"):
        """`logit_lens_heatmap(self, value)`: layers x positions, coloured by `value` ("top" or "final")."""
        return logit_lens_heatmap(self, value=value)


@torch.no_grad()
def logit_lens_logits(model, text: str) -> tuple[Float[Tensor, "layer pos d_vocab"], list[str]]:
    """Logits read from every residual stream: `ln_final` (recomputed per layer), then unembed.

    Returns `([n_layers + 1, pos, d_vocab] logits, labels)`; row `n_layers` equals the model's
    logits. Float32 on CPU.
    """
    tokens = _tokens(model, text)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    resid = torch.stack([cache[n] for n in names])  # [layer, 1, pos, d_model]
    ln_final = getattr(model, "ln_final", None)
    out = []
    for r in resid:  # ln_final recomputes the normalisation statistics of each layer's residual
        x = ln_final(r) if ln_final is not None else r
        out.append(model.unembed(x)[0].float().cpu())
    labels = [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    return torch.stack(out), labels


def logit_lens(model, text: str, k: int = 5) -> LogitLens:
    """Top-k next-token predictions of every layer's residual stream at every position.

    Args:
        model: a TransformerLens model.
        text: the prompt (BOS is prepended as the model does).
        k: how many top tokens to keep per layer and position.
    """
    _check_k(model, k)  # before the forward pass
    logits, labels = logit_lens_logits(model, text)
    return lens_result(model, text, logits, labels, k=k, lens="logit")


def lens_result(
    model,
    text: str,
    logits: Float[Tensor, "layer pos d_vocab"],
    layer_labels: Sequence[str],
    *,
    k: int = 5,
    lens: str = "logit",
    **extra,
) -> LogitLens:
    """The `LogitLens` Result of any lens: the top-k of per-layer `logits` read on `text`.

    Args:
        model: the model that read `text` (for its tokenizer and name).
        text: the prompt.
        logits: `[layer, pos, d_vocab]`, one row per residual stream read; the last row is
            the model's own output (its top-1 gives `final_prob`).
        layer_labels: one label per row.
        k: how many top tokens to keep per layer and position.
        lens: the lens's name, a key of `LENS_NAMES` (`"logit"`, `"tuned"`).
        extra: further provenance entries (e.g. where the tuned lens came from).
    """
    if lens not in LENS_NAMES:
        raise LenslabError(f"unknown lens {lens!r}; lenses: {', '.join(LENS_NAMES)}")
    if logits.ndim != 3 or logits.shape[0] != len(layer_labels):
        raise LenslabError(
            f"logits must be [layer, pos, d_vocab] with one row per label ({len(layer_labels)}), got {tuple(logits.shape)}"
        )
    k = _check_k(model, k)
    logits = logits.detach().float().cpu()
    probs = logits.softmax(-1)  # [layer, pos, vocab]
    top_probs, top_ids = probs.topk(k, dim=-1)
    final_top = top_ids[-1, :, 0]  # [pos]
    final_prob = probs.gather(-1, final_top[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]
    tok = model.tokenizer
    top_tokens = [[[_tok_str(tok, i) for i in pos_ids] for pos_ids in layer_ids] for layer_ids in top_ids.tolist()]
    return LogitLens(
        top_ids=top_ids,
        top_probs=top_probs,
        top_tokens=top_tokens,
        final_prob=final_prob,
        layer_labels=list(layer_labels),
        str_tokens=tokenize(model, text).str_tokens,
        model=model_name(model),
        lens=lens,
        provenance=provenance(model, method=f"{lens}_lens", prompt=text, k=k, **extra),
    )


def logit_lens_heatmap(lens_result: LogitLens, value: str = "top"):
    """A lens's reading as a heatmap: rows = layer (residual stream read), columns = position.

    Each cell is labelled with that layer's top next-token prediction at that position.

    Args:
        lens_result: a `LogitLens`.
        value: colour by `"top"` (probability of the layer's own top-1 token) or `"final"`
            (probability the layer gives to the full model's final prediction).
    """
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

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
    return style(fig, f"{LENS_NAMES.get(ll.lens, ll.lens)} · {ll.model} · {what}")


# --- next-token predictions --------------------------------------------------------------------
class Prediction(NamedTuple):
    """One candidate next token."""

    token: str
    id: int
    prob: float
    logit: float


@dataclass(frozen=True, eq=False)
class Predictions(Result, Sequence):
    """The most probable next tokens after a prompt, best first: a sequence of `Prediction`
    `(token, id, prob, logit)` (indexing, `len`, iteration; equal to a list of the same
    predictions), with `table()` (one row per prediction) and `figure()` (`predictions_bar`).

    Attributes:
        items: the predictions, best first.
        model: the model's name.
        prompt: the text they follow.
        provenance: model, versions, time (see `lenslab.results.provenance`).
    """

    items: tuple[Prediction, ...]
    model: str = "model"
    prompt: str = ""
    provenance: dict = field(default_factory=dict)
    KIND = "Predictions"

    def __getitem__(self, i):
        return list(self.items[i]) if isinstance(i, slice) else self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __eq__(self, other) -> bool:
        if isinstance(other, Predictions):
            return self.items == other.items
        if isinstance(other, (list, tuple)):
            return list(self.items) == list(other)
        return NotImplemented

    __hash__ = None  # like the list it stands for

    def __repr__(self) -> str:
        return f"Predictions({list(self.items)!r}, model={self.model!r})"

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "model": self.model,
            "prompt": self.prompt,
            "predictions": [p._asdict() for p in self.items],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Predictions:
        return cls(
            items=tuple(
                Prediction(str(p["token"]), int(p["id"]), float(p["prob"]), float(p["logit"])) for p in d["predictions"]
            ),
            model=d.get("model", "model"),
            prompt=d.get("prompt", ""),
            provenance=d.get("provenance") or {},
        )

    def table(self):
        """One row per prediction, best first: rank, token, id, prob, logit."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [{"rank": r, **p._asdict()} for r, p in enumerate(self.items)],
            columns=["rank", "token", "id", "prob", "logit"],
        )

    def figure(self):
        """`predictions_bar(self)`: probabilities as horizontal bars, best on top."""
        return predictions_bar(self, model=self.model)


@torch.no_grad()
def top_predictions(model, text: str, k: int = 10) -> Predictions:
    """The k most probable next tokens after `text`: `(token, id, prob, logit)`, best first."""
    k = _check_k(model, k)
    tokens = _tokens(model, text)
    logits = model(tokens, return_type="logits")[0, -1].float().cpu()  # [vocab]
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k)
    return Predictions(
        items=tuple(
            Prediction(_tok_str(model.tokenizer, i), int(i), float(p), float(logits[i]))
            for p, i in zip(top_p.tolist(), top_i.tolist())
        ),
        model=model_name(model),
        prompt=text,
        provenance=provenance(model, method="top_predictions", prompt=text, k=k),
    )


def predictions_bar(predictions: Sequence[Prediction], *, model: str | None = None):
    """Horizontal bar chart of `top_predictions` (best on top); `model` names it in the title
    (default: the `Predictions`' own model)."""
    import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

    if model is None:
        model = getattr(predictions, "model", "model")
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


# --- model card --------------------------------------------------------------------------------
def model_card(model) -> str:
    """Markdown describing the model: the zoo card for zoo models, a config summary otherwise."""

    name = model_name(model)
    card = ""
    if name.startswith(zoo.PREFIX):
        try:
            card = zoo.read_card(name).strip()
        except LenslabError:
            card = ""
    else:
        local = Path(name).expanduser() / "card.md"
        if local.is_file():
            card = local.read_text().strip()
    return card + "\n\n" + config_summary(model) if card else f"### {name}\n\n" + config_summary(model)


def config_summary(model) -> str:
    """A Markdown table of the model's main config fields (layers, widths, heads, vocabulary...)."""
    cfg = model.cfg
    fields = [
        ("architecture", "original_architecture"),
        ("layers", "n_layers"),
        ("d_model", "d_model"),
        ("heads", "n_heads"),
        ("d_head", "d_head"),
        ("key/value heads", "n_key_value_heads"),
        ("d_mlp", "d_mlp"),
        ("attention only", "attn_only"),
        ("experts", "num_experts"),
        ("experts per token", "experts_per_token"),
        ("context", "n_ctx"),
        ("vocabulary", "d_vocab"),
        ("activation", "act_fn"),
        ("normalization", "normalization_type"),
        ("positional embedding", "positional_embedding_type"),
        ("dtype", "dtype"),
        ("device", "device"),
    ]
    rows = []
    for label, attr in fields:
        v = getattr(cfg, attr, None)
        if v is None or (attr == "d_mlp" and getattr(cfg, "attn_only", False)):
            continue
        rows.append(f"| {label} | `{v}` |")
    return "| config | value |\n|---|---|\n" + "\n".join(rows)


def _check_k(model, k: int) -> int:
    vocab = int(model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) > 0 else model.cfg.d_vocab)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise LenslabError(f"k must be a positive integer (how many top tokens to show), got {k!r}")
    return min(k, vocab)


def _tok_str(tokenizer, i: int) -> str:
    """Readable string of one token id (keeps leading spaces; shows special tokens as themselves)."""
    s = tokenizer.decode([int(i)])
    return s if s != "" else tokenizer.convert_ids_to_tokens(int(i)) or json.dumps(s)
