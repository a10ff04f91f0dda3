"""Attention sinks and massive activations.

Modern language models park attention on the first token ("attention sinks") and carry a few
residual-stream scalars hundreds to thousands of times larger than the rest ("massive
activations"); the two go together: the massive activations sit on the sink token and the heads
that attend to it read them through their keys.

- `attention_sinks` (Gu et al., "When Attention Sink Emerges in Language Models", ICLR 2025,
  sail-sg/Attention-Sink `eval_sink_open_source.py`): for head h of layer l and key position k,
  alpha_k = mean over the queries t >= k of A[t, k] (the mean attention key k receives from the
  queries that can see it). The sink rate is the share of (sample, layer, head) with
  alpha_0 > epsilon, epsilon = 0.3. Also the raw alpha_0 per head and a value-norm-weighted
  variant, mean over t >= k of A[t, k] * ||v_k||, which discounts sinks whose values are ~0.
- `massive_activations` (Sun, Chen, Kolter, Liu, "Massive Activations in Large Language Models",
  2024, locuslab/massive-activations): per layer output (`blocks.{l}.hook_resid_post`), the
  largest |a| with their token and dimension, the median |a|, and the entries that are massive:
  |a| > 100 and |a| >= 1000 x the median (`MassiveRule`; ratio-only for small models).
- `ablate_massive`: set the massive entries to zero or to their mean at the layer where they
  first appear and measure the loss and the sink rate (Sun et al. Sec. 3: zero breaks the model,
  the mean leaves it intact; Gu et al.: without them the sinks go).

MoE super experts (Su et al. 2025), the experts whose down-projection outputs create the massive
activations, are found by `lenslab.probes.super_experts`.

The planted models the tests hold these detectors to (a massive activation and a sink head set by
hand; the MoE one with the massive activation written by a planted super expert) are in
`lenslab.zoo.planted`; the names `planted_model`, `planted_moe_model`, `planted_tokens`, `PLANTED`
and `PLANTED_MOE` here are deprecated aliases of them, for one release.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.results import JsonResult, provenance
from lenslab.toolbox import check_layers, model_device
from lenslab.zoo import planted

__all__ = [
    "AblationResult",
    "MassiveResult",
    "MassiveRule",
    "SinkResult",
    "ablate_massive",
    "attention_sinks",
    "massive_activations",
    "check_threshold",
    "prompt_batches",
    "prompt_record",
    "str_tokens",
    "tensor_list",
]

DEFAULT_SINK_THRESHOLD = 0.3


# --- inputs -----------------------------------------------------------------------------------
def prompt_batches(model, prompts, prepend_bos: bool | None = None) -> list[Tensor]:
    """Prompts (str, list of str, or a token tensor `[batch, pos]` / `[pos]`) -> token batches,
    one `[batch, pos]` tensor per distinct length (no padding, so no mask is needed)."""
    if isinstance(prompts, Tensor):
        toks = prompts[None] if prompts.ndim == 1 else prompts
        if toks.ndim != 2 or toks.numel() == 0:
            raise LenslabError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(prompts.shape)}")
        batches = [toks.long()]
    else:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p for p in (prompts or []) if isinstance(p, str) and p.strip()]
        if not prompts:
            raise LenslabError("prompts is empty: pass at least one non-empty prompt (or a [batch, pos] token tensor)")
        if getattr(model, "tokenizer", None) is None:
            raise LenslabError("this model has no tokenizer: pass token ids as a [batch, pos] tensor instead of text")
        by_len: dict[int, list[Tensor]] = {}
        for p in prompts:
            t = model.to_tokens(p, prepend_bos=prepend_bos)[0]
            by_len.setdefault(t.shape[0], []).append(t)
        batches = [torch.stack(v) for _, v in sorted(by_len.items())]
    n_ctx = model.cfg.n_ctx
    for b in batches:
        if b.shape[1] > n_ctx:
            raise LenslabError(f"a prompt has {b.shape[1]} tokens but the model's context is {n_ctx}; shorten it")
    return [b.to(model_device(model)) for b in batches]


def check_threshold(threshold: float) -> float:
    """`threshold` as a float in (0, 1), the attention share that makes a sink; a `LenslabError` otherwise."""
    if not isinstance(threshold, (int, float)) or not 0 < float(threshold) < 1:
        raise LenslabError(f"threshold {threshold!r} must lie strictly between 0 and 1 (Gu et al. use 0.3)")
    return float(threshold)


def str_tokens(model, toks: Tensor) -> list[str]:
    """Token strings of `toks` `[pos]`; the ids as strings for a model without a tokenizer."""
    if getattr(model, "tokenizer", None) is None:
        return [str(int(t)) for t in toks]
    return list(model.to_str_tokens(toks))


def prompt_record(model, batches: list[Tensor]) -> dict:
    """What a result records of its inputs: sample count, lengths, and the prompts (or token ids)."""
    rows = [b for batch in batches for b in batch]
    rec = {"n_samples": len(rows), "seq_lens": [int(r.shape[0]) for r in rows]}
    if getattr(model, "tokenizer", None) is not None:
        rec["prompts"] = [model.to_string(r) for r in rows]
    else:
        rec["tokens"] = [r.tolist() for r in rows]
    return rec


# --- results ---------------------------------------------------------------------------------
def tensor_list(x) -> list:
    """A tensor as nested float lists, for JSON."""
    return x.detach().cpu().float().tolist()


@dataclass(frozen=True, kw_only=True, eq=False)
class SinkResult(JsonResult):
    """Attention-sink statistics of every analysed head.

    Attributes:
        key_attention: `[layer, head, pos]` alpha_k, the mean attention key k receives from the
            queries t >= k, averaged over the samples that have position k.
        value_weighted: `[layer, head, pos]` the same with each A[t, k] times ||v_k|| (the norm
            of the value vector head h reads at k).
        sink_fraction: `[layer, head]` share of samples with alpha_0 > threshold.
        layers: the model layers the rows stand for.
        threshold: epsilon of the sink rate.
        pos_labels: tokens of the first sample (one per position, up to the longest sample).
        provenance: model, prompts, versions, time.
    """

    KIND = "SinkResult"
    key_attention: Tensor
    value_weighted: Tensor
    sink_fraction: Tensor
    layers: list[int]
    threshold: float = DEFAULT_SINK_THRESHOLD
    pos_labels: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    @property
    def attn_to_first(self) -> Tensor:
        """`[layer, head]` the raw mean attention to the first token (alpha_0)."""
        return self.key_attention[..., 0]

    @property
    def sink_rate(self) -> float:
        """Share of (sample, layer, head) with alpha_0 > threshold (Gu et al.'s Sink_1 / 100)."""
        return float(self.sink_fraction.float().mean())

    def sink_heads(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose mean attention to the first token exceeds the threshold."""
        idx = (self.attn_to_first > self.threshold).nonzero().tolist()
        return [(self.layers[i], h) for i, h in idx]

    def table(self):
        """One row per (layer, head): mean attention to the first token, its value-weighted
        variant, the share of samples where it is a sink, and whether the head is a sink head."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        a0, vw = self.attn_to_first, self.value_weighted[..., 0]
        frac = self.sink_fraction.float()
        rows = [
            {
                "layer": layer,
                "head": h,
                "attn_to_first": float(a0[i, h]),
                "value_weighted": float(vw[i, h]),
                "sink_fraction": float(frac[i, h]),
                "sink": bool(a0[i, h] > self.threshold),
            }
            for i, layer in enumerate(self.layers)
            for h in range(a0.shape[1])
        ]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "key_attention": tensor_list(self.key_attention),
            "value_weighted": tensor_list(self.value_weighted),
            "sink_fraction": tensor_list(self.sink_fraction),
            "layers": list(self.layers),
            "threshold": self.threshold,
            "sink_rate": self.sink_rate,
            "sink_heads": self.sink_heads(),
            "pos_labels": self.pos_labels,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SinkResult:
        return cls(
            key_attention=torch.tensor(d["key_attention"]),
            value_weighted=torch.tensor(d["value_weighted"]),
            sink_fraction=torch.tensor(d["sink_fraction"]),
            layers=list(d["layers"]),
            threshold=d["threshold"],
            pos_labels=list(d.get("pos_labels", [])),
            provenance=d.get("provenance") or {},
        )

    def attention_heatmap(self, *, showscale: bool = True):
        """alpha_0 per head as one plotly Heatmap trace (rows `L<layer>`, columns `H<head>`), for the
        side-by-side panels of the ablation and pruning figures."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        return go.Heatmap(
            z=tensor_list(self.attn_to_first),
            x=[f"H{h}" for h in range(self.attn_to_first.shape[1])],
            y=[f"L{l}" for l in self.layers],
            colorscale="Blues",
            zmin=0,
            zmax=1,
            showscale=showscale,
            colorbar=dict(title="α₀"),
        )

    def figure(self, value: str = "attention"):
        """Per-head heatmap (rows layers, columns heads) of alpha_0 (`value="attention"`), the
        value-weighted alpha_0 (`"value_weighted"`) or the share of samples past the threshold (`"fraction"`)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        grids = {
            "attention": (self.attn_to_first, "mean attention to token 0"),
            "value_weighted": (self.value_weighted[..., 0], "attention × ‖v‖ to token 0"),
            "fraction": (self.sink_fraction, f"share of samples with α₀ > {self.threshold:g}"),
        }
        if value not in grids:
            raise LenslabError(f"value {value!r} is not one of {', '.join(grids)}")
        z, label = grids[value]
        n_heads = z.shape[1]
        fig = go.Figure(
            go.Heatmap(
                z=tensor_list(z),
                x=[f"H{h}" for h in range(n_heads)],
                y=[f"L{l}" for l in self.layers],
                colorscale="Blues",
                zmin=0,
                zmax=1 if value != "value_weighted" else None,
                colorbar=dict(title=label),
                texttemplate="%{z:.2f}",
                hovertemplate="%{y}%{x}<br>" + label + ": %{z:.4g}<extra></extra>",
            )
        )
        fig.update_layout(
            xaxis_title="head",
            yaxis_title="layer",
            yaxis_autorange="reversed",
            height=max(300, 40 * len(self.layers) + 160),
        )
        return figures.style(
            fig,
            f"Attention sinks · model {self.provenance.get('model', '?')} · "
            f"sink rate {100 * self.sink_rate:.1f}% (ε = {self.threshold:g})",
        )


@dataclass(frozen=True, kw_only=True)
class MassiveRule:
    """Which residual entries are massive: |a| > `absolute` and |a| >= `ratio` x the median |a| of
    that hidden state (Sun et al.: 100 and about 1000). Set either to None to drop it, e.g.
    `MassiveRule(absolute=None, ratio=100)` for small models."""

    absolute: float | None = 100.0
    ratio: float | None = 1000.0

    def __post_init__(self) -> None:
        if self.absolute is None and self.ratio is None:
            raise LenslabError("MassiveRule needs absolute, ratio or both (Sun et al.: absolute=100, ratio=1000)")
        for name in ("absolute", "ratio"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v <= 0):
                raise LenslabError(f"MassiveRule.{name} must be a positive number or None, got {v!r}")

    def mask(self, x: Tensor, median: Tensor) -> Tensor:
        """`x` `[..., d_model]`, `median` broadcastable -> bool mask of massive entries."""
        a = x.abs()
        m = torch.ones_like(a, dtype=torch.bool)
        if self.absolute is not None:
            m &= a > self.absolute
        if self.ratio is not None:
            m &= a >= self.ratio * median
        return m


@dataclass(frozen=True, kw_only=True, eq=False)
class MassiveResult(JsonResult):
    """Residual-stream magnitudes per layer output and the massive entries.

    Attributes:
        magnitudes: `[layer, d_model]` max |a| over samples and positions.
        medians: `[layer]` median |a| of the hidden state, averaged over samples.
        top_values: `[layer, k]` the k largest |a| per layer.
        top_dims: `[layer, k]` their residual dimensions.
        top_pos: `[layer, k]` their positions.
        top_sample: `[layer, k]` their sample indices.
        top_tokens: their token strings.
        massive: one dict per massive entry: layer, dim, pos, token, sample, value, ratio.
        layers: the layers read.
        rule: the `MassiveRule` applied.
        hook: the hook read ("resid_post").
        provenance: model, prompts, versions, time.
    """

    KIND = "MassiveResult"
    magnitudes: Tensor
    medians: Tensor
    top_values: Tensor
    top_dims: Tensor
    top_pos: Tensor
    top_sample: Tensor
    top_tokens: list[list[str]]
    massive: list[dict]
    layers: list[int]
    rule: MassiveRule = field(default_factory=MassiveRule)
    hook: str = "resid_post"
    provenance: dict = field(default_factory=dict)

    @property
    def massive_dims(self) -> list[int]:
        """The residual dimensions with a massive entry anywhere."""
        return sorted({m["dim"] for m in self.massive})

    @property
    def massive_positions(self) -> list[int]:
        """The token positions with a massive entry anywhere."""
        return sorted({m["pos"] for m in self.massive})

    def first_layer(self) -> int | None:
        """The first layer whose output has a massive entry."""
        return min((m["layer"] for m in self.massive), default=None)

    def table(self):
        """The top entries per layer as a pandas DataFrame (layer, rank, value, dim, pos, token, ratio, massive)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        flagged = {(m["layer"], m["dim"], m["pos"], m["sample"]) for m in self.massive}
        rows = []
        for i, l in enumerate(self.layers):
            for r in range(self.top_values.shape[1]):
                d, p, s = int(self.top_dims[i, r]), int(self.top_pos[i, r]), int(self.top_sample[i, r])
                v = float(self.top_values[i, r])
                rows.append(
                    {
                        "layer": l,
                        "rank": r + 1,
                        "value": v,
                        "dim": d,
                        "pos": p,
                        "token": self.top_tokens[i][r],
                        "sample": s,
                        "ratio_to_median": abs(v) / max(float(self.medians[i]), 1e-30),
                        "massive": (l, d, p, s) in flagged,
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "magnitudes": tensor_list(self.magnitudes),
            "medians": tensor_list(self.medians),
            "top_values": tensor_list(self.top_values),
            "top_dims": self.top_dims.tolist(),
            "top_pos": self.top_pos.tolist(),
            "top_sample": self.top_sample.tolist(),
            "top_tokens": self.top_tokens,
            "massive": self.massive,
            "massive_dims": self.massive_dims,
            "layers": list(self.layers),
            "rule": {"absolute": self.rule.absolute, "ratio": self.rule.ratio},
            "hook": self.hook,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MassiveResult:
        return cls(
            magnitudes=torch.tensor(d["magnitudes"]),
            medians=torch.tensor(d["medians"]),
            top_values=torch.tensor(d["top_values"]),
            top_dims=torch.tensor(d["top_dims"], dtype=torch.long),
            top_pos=torch.tensor(d["top_pos"], dtype=torch.long),
            top_sample=torch.tensor(d["top_sample"], dtype=torch.long),
            top_tokens=d["top_tokens"],
            massive=list(d["massive"]),
            layers=list(d["layers"]),
            rule=MassiveRule(**d["rule"]),
            hook=d.get("hook", "resid_post"),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Layer-by-dimension heatmap of log10 max |a|, massive dimensions marked on the axis."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        z = torch.log10(self.magnitudes.clamp_min(1e-6))
        dims = self.massive_dims
        fig = go.Figure(
            go.Heatmap(
                z=tensor_list(z),
                x=list(range(z.shape[1])),
                y=[f"L{l}" for l in self.layers],
                colorscale="Viridis",
                colorbar=dict(title="log10 max |a|"),
                customdata=tensor_list(self.magnitudes.expand(z.shape)),
                hovertemplate="%{y} dim %{x}<br>max |a| = %{customdata:.4g}<extra></extra>",
            )
        )
        for d in dims:
            fig.add_annotation(x=d, y=1.0, yref="paper", text=f"dim {d}", showarrow=True, arrowhead=2, ay=-25)
        fig.update_layout(
            xaxis_title="residual dimension",
            yaxis_title=f"layer ({self.hook})",
            yaxis_autorange="reversed",
            height=max(320, 40 * len(self.layers) + 180),
        )
        rule = " and ".join(
            s
            for s in (
                f"|a| > {self.rule.absolute:g}" if self.rule.absolute else "",
                f"≥ {self.rule.ratio:g}× median" if self.rule.ratio else "",
            )
            if s
        )
        return figures.style(
            fig,
            f"Residual magnitudes · model {self.provenance.get('model', '?')} · massive dims {dims or 'none'} ({rule})",
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class AblationResult(JsonResult):
    """Loss and sinks with and without the massive activations.

    Attributes:
        mode: "zero" or "mean"; layer: where they were set; entries: the (dim, pos, sample, value
            set) changed; loss_clean / loss_ablated: mean next-token loss; sinks_clean /
            sinks_ablated: `SinkResult` of the two runs; provenance.
    """

    KIND = "AblationResult"
    mode: str
    layer: int
    dims: list[int]
    entries: list[dict]
    loss_clean: float
    loss_ablated: float
    sinks_clean: SinkResult
    sinks_ablated: SinkResult
    provenance: dict = field(default_factory=dict)

    def table(self):
        """Two rows, clean and ablated: the loss and the sink rate."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [
                {"run": "clean", "loss": self.loss_clean, "sink_rate": self.sinks_clean.sink_rate},
                {"run": f"ablated ({self.mode})", "loss": self.loss_ablated, "sink_rate": self.sinks_ablated.sink_rate},
            ]
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "mode": self.mode,
            "layer": self.layer,
            "dims": self.dims,
            "entries": self.entries,
            "loss_clean": self.loss_clean,
            "loss_ablated": self.loss_ablated,
            "sink_rate_clean": self.sinks_clean.sink_rate,
            "sink_rate_ablated": self.sinks_ablated.sink_rate,
            "sinks_clean": self.sinks_clean.to_dict(),
            "sinks_ablated": self.sinks_ablated.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AblationResult:
        return cls(
            mode=d["mode"],
            layer=d["layer"],
            dims=list(d["dims"]),
            entries=list(d["entries"]),
            loss_clean=d["loss_clean"],
            loss_ablated=d["loss_ablated"],
            sinks_clean=SinkResult.from_dict(d["sinks_clean"]),
            sinks_ablated=SinkResult.from_dict(d["sinks_ablated"]),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Before/after: loss and sink rate bars, and the per-head attention to token 0 of both runs."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

        fig = make_subplots(
            rows=1,
            cols=4,
            column_widths=[0.18, 0.18, 0.32, 0.32],
            horizontal_spacing=0.07,
            subplot_titles=["loss", "sink rate (%)", "α₀ before", f"α₀ after ({self.mode})"],
        )
        colours = ["#3b6ea8", "#c0392b"]
        fig.add_trace(
            go.Bar(
                x=["before", "after"],
                y=[self.loss_clean, self.loss_ablated],
                marker_color=colours,
                showlegend=False,
                texttemplate="%{y:.3g}",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=["before", "after"],
                y=[100 * self.sinks_clean.sink_rate, 100 * self.sinks_ablated.sink_rate],
                marker_color=colours,
                showlegend=False,
                texttemplate="%{y:.1f}",
            ),
            row=1,
            col=2,
        )
        for j, s in enumerate((self.sinks_clean, self.sinks_ablated)):
            fig.add_trace(s.attention_heatmap(showscale=j == 1), row=1, col=3 + j)
            fig.update_yaxes(autorange="reversed", row=1, col=3 + j)
        fig.update_layout(height=380, width=1100)
        return figures.style(
            fig,
            f"Massive activations set to {self.mode} at layer {self.layer} (dims {self.dims}) · "
            f"model {self.provenance.get('model', '?')}",
        )


# --- analyses --------------------------------------------------------------------------------
def _sink_stats(model, batches: list[Tensor], layers: list[int], threshold: float, hooks_for=None):
    """Sums over samples of alpha_k and of the value-weighted alpha_k, the per-position sample
    counts and the per-head count of samples past the threshold."""
    n_heads = model.cfg.n_heads
    T = max(b.shape[1] for b in batches)
    att = torch.zeros(len(layers), n_heads, T)
    vw = torch.zeros(len(layers), n_heads, T)
    count = torch.zeros(T)
    past = torch.zeros(len(layers), n_heads)
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers} | {f"blocks.{l}.attn.hook_v" for l in layers}
    for bi, toks in enumerate(batches):
        b, t = toks.shape
        with torch.no_grad(), model.hooks(fwd_hooks=hooks_for(bi) if hooks_for else []):
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        n_seen = torch.arange(t, 0, -1, dtype=torch.float32)  # queries t' >= k: T - k of them
        for i, l in enumerate(layers):
            pat = cache[f"blocks.{l}.attn.hook_pattern"].float().cpu()  # [batch, head, q, k]
            v = cache[f"blocks.{l}.attn.hook_v"].float().cpu()  # [batch, pos, kv_head, d_head]
            if v.shape[2] != n_heads:  # grouped-query attention: each kv head serves n_heads / n_kv heads
                v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
            vnorm = v.norm(dim=-1).transpose(1, 2)  # [batch, head, pos]
            alpha = pat.sum(2) / n_seen  # [batch, head, k]
            att[i, :, :t] += alpha.sum(0)
            vw[i, :, :t] += (alpha * vnorm).sum(0)
            past[i] += (alpha[:, :, 0] > threshold).float().sum(0)
        count[:t] += b
    return att, vw, count, past


def attention_sinks(
    model, prompts, *, threshold: float = DEFAULT_SINK_THRESHOLD, layers=None, prepend_bos: bool | None = None
) -> SinkResult:
    """Attention-sink statistics of every head (Gu et al. 2025).

    Args:
        model: a TransformerLens model (`lenslab.load_model`).
        prompts: a string, a list of strings, or token ids `[batch, pos]`. Gu et al. use 64-token
            samples; on short prompts a uniform head already gives alpha_0 = H_T / T (0.34 at T = 8).
        threshold: epsilon of the sink rate, in (0, 1); default 0.3.
        layers: layers to analyse (default all).
        prepend_bos: passed to `model.to_tokens` for text prompts (default: the model's).

    Returns:
        `SinkResult` with `key_attention` and `value_weighted` `[layer, head, pos]`,
        `sink_fraction` `[layer, head]`, `attn_to_first`, `sink_rate`, `sink_heads()`.

    >>> from lenslab.zoo import planted
    >>> model = planted.planted_model()
    >>> attention_sinks(model, planted.planted_tokens()).sink_heads()
    [(1, 0)]
    """
    threshold = check_threshold(threshold)
    layers = sorted(set(check_layers(model, layers)))
    return _sinks(model, prompt_batches(model, prompts, prepend_bos), layers, threshold)


def _sinks(model, batches: list[Tensor], layers: list[int], threshold: float, hooks_for=None, **extra) -> SinkResult:
    att, vw, count, past = _sink_stats(model, batches, layers, threshold, hooks_for)
    c = count.clamp_min(1)
    return SinkResult(
        key_attention=att / c,
        value_weighted=vw / c,
        sink_fraction=past / count[0],
        layers=layers,
        threshold=threshold,
        pos_labels=str_tokens(model, max(batches, key=lambda b: b.shape[1])[0]),
        provenance=provenance(model, method="attention_sinks", **prompt_record(model, batches), **extra),
    )


def massive_activations(
    model, prompts, *, rule: MassiveRule | None = None, top_k: int = 3, layers=None, prepend_bos: bool | None = None
) -> MassiveResult:
    """The largest residual-stream entries per layer output and which of them are massive (Sun et al. 2024).

    Args:
        model: a TransformerLens model.
        prompts: a string, a list of strings, or token ids `[batch, pos]`.
        rule: `MassiveRule` (default |a| > 100 and >= 1000x the median of that hidden state).
        top_k: how many of the largest |a| to keep per layer (Sun et al. show 3).
        layers: layers whose output `blocks.{l}.hook_resid_post` to read (default all).

    Returns:
        `MassiveResult`: `magnitudes` `[layer, d_model]`, `medians` `[layer]`, the top entries and
        the massive ones (`massive`, `massive_dims`, `massive_positions`).

    >>> from lenslab.zoo import planted
    >>> model = planted.planted_model()
    >>> massive_activations(model, planted.planted_tokens()).massive_dims
    [7]
    """
    rule = rule or MassiveRule()
    if not isinstance(rule, MassiveRule):
        raise LenslabError(f"rule must be a MassiveRule, got {type(rule).__name__}")
    if not isinstance(top_k, int) or top_k < 1:
        raise LenslabError(f"top_k must be a positive integer, got {top_k!r}")
    return _massive(
        model, prompt_batches(model, prompts, prepend_bos), rule, top_k, sorted(set(check_layers(model, layers)))
    )


def _massive(model, batches: list[Tensor], rule: MassiveRule, top_k: int, layers: list[int]) -> MassiveResult:
    names = {f"blocks.{l}.hook_resid_post" for l in layers}
    d_model = model.cfg.d_model
    mags = torch.zeros(len(layers), d_model)
    med_sum = torch.zeros(len(layers))
    cand: list[list[tuple[float, int, int, int]]] = [[] for _ in layers]  # (value, dim, pos, sample)
    massive: list[dict] = []
    tokens_of: list[Tensor] = []
    offset = 0
    for toks in batches:
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        tokens_of.extend(toks.cpu())
        for i, l in enumerate(layers):
            x = cache[f"blocks.{l}.hook_resid_post"].float().cpu()  # [batch, pos, d_model]
            a = x.abs()
            mags[i] = torch.maximum(mags[i], a.amax(dim=(0, 1)))
            med = a.flatten(1).median(dim=1).values  # [batch], median |a| of each sample's hidden state
            med_sum[i] += med.sum()
            k = min(top_k, a[0].numel())
            vals, idx = a.flatten(1).topk(k, dim=1)
            for s in range(x.shape[0]):
                for j in idx[s].tolist():
                    p, d = divmod(j, d_model)
                    cand[i].append((float(x[s, p, d]), d, p, offset + s))
            mask = rule.mask(x, med[:, None, None])
            for s, p, d in mask.nonzero().tolist():
                massive.append(
                    {
                        "layer": l,
                        "dim": d,
                        "pos": p,
                        "sample": offset + s,
                        "value": float(x[s, p, d]),
                        "ratio": float(a[s, p, d] / med[s].clamp_min(1e-30)),
                    }
                )
        offset += toks.shape[0]
    n = offset
    k = min(top_k, min(len(c) for c in cand))
    top = [_distinct(sorted(c, key=lambda r: -abs(r[0])), k) for c in cand]
    tok_str = lambda s, p: str_tokens(model, tokens_of[s][p : p + 1])[0]
    for m in massive:
        m["token"] = tok_str(m["sample"], m["pos"])
    return MassiveResult(
        magnitudes=mags,
        medians=med_sum / n,
        top_values=torch.tensor([[r[0] for r in t] for t in top]),
        top_dims=torch.tensor([[r[1] for r in t] for t in top]),
        top_pos=torch.tensor([[r[2] for r in t] for t in top]),
        top_sample=torch.tensor([[r[3] for r in t] for t in top]),
        top_tokens=[[tok_str(r[3], r[2]) for r in t] for t in top],
        massive=massive,
        layers=layers,
        rule=rule,
        provenance=provenance(model, method="massive_activations", **prompt_record(model, batches)),
    )


def _distinct(rows: list[tuple], k: int) -> list[tuple]:
    """The first k rows with distinct (dim, pos): the top entries of a layer, not one entry per sample."""
    seen, out = set(), []
    for r in rows:
        if (r[1], r[2]) not in seen:
            seen.add((r[1], r[2]))
            out.append(r)
    return (out + rows)[:k] if len(out) < k else out[:k]


def ablate_massive(
    model,
    prompts,
    *,
    mode: str = "mean",
    massive: MassiveResult | None = None,
    layer: int | None = None,
    rule: MassiveRule | None = None,
    threshold: float = DEFAULT_SINK_THRESHOLD,
    prepend_bos: bool | None = None,
) -> AblationResult:
    """Set the massive activations to zero or to their mean and measure loss and sinks (Sun et al. Sec. 3).

    The massive entries of `layer`'s output (default: the first layer that has any) are found on
    these prompts; a hook on `blocks.{layer}.hook_resid_post` sets exactly those (sample, pos,
    dim) entries to 0 (`mode="zero"`) or to the mean of that dimension's massive entries
    (`mode="mean"`). Later layers see the change; earlier ones do not.

    Args:
        model, prompts: as in `attention_sinks` (needs at least 2 tokens per sample for a loss).
        mode: "zero" or "mean".
        massive: a `MassiveResult` for these prompts (computed with `rule` when None).
        layer: the layer whose output is changed.
        threshold: epsilon of the sink rates reported.

    Returns:
        `AblationResult` with the loss and `SinkResult` of the clean and the ablated run.

    >>> from lenslab.zoo import planted
    >>> model = planted.planted_model()
    >>> r = ablate_massive(model, planted.planted_tokens(), mode="zero")
    >>> r.sinks_clean.sink_rate > r.sinks_ablated.sink_rate
    True
    """
    if mode not in ("zero", "mean"):
        raise LenslabError(f"mode {mode!r} is not one of 'zero', 'mean'")
    threshold = check_threshold(threshold)
    batches = prompt_batches(model, prompts, prepend_bos)
    if min(b.shape[1] for b in batches) < 2:
        raise LenslabError("each prompt needs at least 2 tokens to measure a next-token loss")
    if massive is None:
        massive = _massive(model, batches, rule or MassiveRule(), 3, list(range(model.cfg.n_layers)))
    if layer is None:
        layer = massive.first_layer()
        if layer is None:
            raise LenslabError(
                "no massive activations found on these prompts: nothing to ablate "
                "(try a relative rule for small models, e.g. MassiveRule(absolute=None, ratio=100))"
            )
    layer = check_layers(model, [layer])[0]
    entries = [m for m in massive.massive if m["layer"] == layer]
    if not entries:
        raise LenslabError(
            f"layer {layer} has no massive activations on these prompts; they appear at layers "
            f"{sorted({m['layer'] for m in massive.massive}) or 'none'}"
        )
    dims = sorted({m["dim"] for m in entries})
    mean = {d: sum(m["value"] for m in entries if m["dim"] == d) / sum(m["dim"] == d for m in entries) for d in dims}
    changed = [
        {
            "dim": m["dim"],
            "pos": m["pos"],
            "sample": m["sample"],
            "was": m["value"],
            "set_to": 0.0 if mode == "zero" else mean[m["dim"]],
        }
        for m in entries
    ]
    starts = [sum(b.shape[0] for b in batches[:i]) for i in range(len(batches))]

    def hooks_for(bi: int) -> list:
        lo, hi = starts[bi], starts[bi] + batches[bi].shape[0]
        mine = [c for c in changed if lo <= c["sample"] < hi]

        def hook(x, hook):
            for c in mine:
                x[c["sample"] - lo, c["pos"], c["dim"]] = c["set_to"]
            return x

        return [(f"blocks.{layer}.hook_resid_post", hook)] if mine else []

    def loss(hf) -> float:
        total, n_tok = 0.0, 0
        for bi, toks in enumerate(batches):
            with torch.no_grad(), model.hooks(fwd_hooks=hf(bi) if hf else []):
                n = toks.shape[0] * (toks.shape[1] - 1)
                total, n_tok = total + float(model(toks, return_type="loss")) * n, n_tok + n
        return total / n_tok

    all_layers = list(range(model.cfg.n_layers))
    return AblationResult(
        mode=mode,
        layer=layer,
        dims=dims,
        entries=changed,
        loss_clean=loss(None),
        loss_ablated=loss(hooks_for),
        sinks_clean=_sinks(model, batches, all_layers, threshold),
        sinks_ablated=_sinks(model, batches, all_layers, threshold, hooks_for, ablated=f"massive:{mode}@L{layer}"),
        provenance=provenance(model, method=f"ablate_massive:{mode}", **prompt_record(model, batches)),
    )


# names that moved to lenslab.zoo.planted; deprecated aliases here for one release
MOVED_TO_ZOO = ("PLANTED", "PLANTED_MOE", "planted_model", "planted_moe_model", "planted_tokens")


def __getattr__(name: str):
    """Deprecated aliases: `sinks.super_experts` (of `lenslab.probes.super_experts.super_experts`) and
    the planted models (`sinks.planted_model` etc., of `lenslab.zoo.planted.planted_model` etc.)."""
    if name in MOVED_TO_ZOO:
        warnings.warn(
            f"lenslab.probes.sinks.{name} is deprecated; use lenslab.zoo.planted.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(planted, name)
    if name == "super_experts":
        warnings.warn(
            "lenslab.probes.sinks.super_experts is deprecated; use lenslab.probes.super_experts.super_experts",
            DeprecationWarning,
            stacklevel=2,
        )
        from lenslab.probes.super_experts import super_experts  # deferred: a deprecated alias; the module imports sinks

        return super_experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
