"""Measuring an SAE: token corpora for it, and how well it stands in for the activation it reads.

- `corpus_tokens`: documents, token-id lists or a token tensor as right-padded token rows
  `[n, context_size]` (what `train_sae` and `sae_metrics` read); `excluded_tokens` / `keep_mask`:
  which positions they leave out (padding).
- `sae_metrics` -> `SaeMetrics`: MSE, explained variance, next-token loss clean / with the SAE
  spliced in / with the activation zero-ablated, the loss recovered, L0 and the dead-feature fraction
  (`table()`: one row per metric; `to_markdown()`: the metrics as Markdown; `figure()`: bars).
- `read_metrics` / `write_metrics`: the `metrics.json` an SAE folder is saved with.

Re-exported by `lenslab.probes.sae`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.probes.sae_load import check_sae, zoo_sae_path
from lenslab.probes.sae_splice import encode_decode, sae_input, splice_hooks, zero_hooks
from lenslab.results import Result, provenance
from lenslab.toolbox import model_device

__all__ = [
    "SaeMetrics",
    "corpus_tokens",
    "excluded_tokens",
    "keep_mask",
    "read_metrics",
    "sae_metrics",
    "write_metrics",
]


# --- corpora -----------------------------------------------------------------------------------
def _pad_id(model) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return None


def corpus_tokens(model, corpus: list[str] | list[list[int]] | Tensor, context_size: int | None = None) -> Tensor:
    """Token rows `[n, context_size]` for SAE training or measurement.

    A token tensor `[n, pos]` is used as is (cut to `context_size`); token-id lists are cut and
    right-padded like documents. A list of documents gives one
    row per document: the model's tokens (with `<bos>` when the model prepends it), cut to
    `context_size` (default: the longest document, at most `n_ctx`) and right-padded with the
    tokenizer's pad token; `train_sae` and `sae_metrics` skip pad positions.
    """
    if isinstance(corpus, Tensor):
        toks = corpus[None] if corpus.ndim == 1 else corpus
        if toks.ndim != 2 or toks.shape[0] == 0 or toks.shape[1] < 2 or toks.dtype.is_floating_point:
            raise LenslabError(
                f"a token corpus must be an integer [n, pos] tensor with pos >= 2, got {tuple(corpus.shape)} {corpus.dtype}"
            )
        return toks[:, :context_size].long().cpu() if context_size else toks.long().cpu()
    if isinstance(corpus, str):
        corpus = [corpus]
    if corpus and all(isinstance(d, (list, tuple)) for d in corpus):  # token-id lists: pad them
        ids = [[int(t) for t in d] for d in corpus if len(d)]
        pad = _pad_id(model)
        if not ids or pad is None:
            raise LenslabError("token-id lists need at least one non-empty list and a tokenizer with a pad token")
        width = min(context_size or max(map(len, ids)), int(getattr(model.cfg, "n_ctx", 0) or 10**9))
        return torch.tensor([d[:width] + [pad] * (width - len(d[:width])) for d in ids], dtype=torch.long)
    docs = [d for d in (corpus or []) if isinstance(d, str) and d.strip()]
    if not docs:
        raise LenslabError(
            "the corpus is empty: pass documents (a list of non-empty strings) or a [n, pos] token tensor"
        )
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError("the model has no tokenizer: pass the corpus as a [n, pos] token tensor")
    pad = _pad_id(model)
    if pad is None:
        raise LenslabError(
            "the model's tokenizer has no pad or eos token to pad documents with: pass a [n, pos] token tensor"
        )
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0) or None
    rows = [model.to_tokens(d, truncate=False)[0].tolist() for d in docs]
    width = context_size or max(len(r) for r in rows)
    if n_ctx:
        width = min(width, n_ctx)
    if width < 2:
        raise LenslabError(f"context_size must be at least 2 tokens, got {width}")
    return torch.tensor([r[:width] + [pad] * (width - len(r[:width])) for r in rows], dtype=torch.long)


def excluded_tokens(model, exclude_tokens: list[int] | None) -> list[int]:
    """Token ids whose positions are left out of training and measurement: `exclude_tokens`, else the
    pad token (which is also `<bos>` for tokenizers such as GPT-2's that have no pad token of their own)."""
    if exclude_tokens is not None:
        return [int(t) for t in exclude_tokens]
    pad = _pad_id(model)
    return [] if pad is None else [pad]


def keep_mask(tokens: Tensor, exclude: list[int]) -> Tensor:
    """`[batch, pos]` bool: True where `tokens` `[batch, pos]` holds none of the token ids `exclude`."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for t in exclude:
        keep &= tokens != t
    return keep


# --- metrics -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class SaeMetrics(Result):
    """How well an SAE stands in for the activation it reads, measured on a set of tokens.

    Attributes:
        hook_name, d_in, d_sae, architecture: the SAE.
        n_tokens: activations measured (positions whose token is not excluded, e.g. not padding).
        n_predictions: next-token predictions in the losses.
        mse: mean over tokens of the squared error summed over `d_in`, `||x - x_hat||^2` (sae-lens's
            convention; divide by `d_in` for the per-dimension MSE).
        explained_variance: `1 - E||x - x_hat||^2 / E||x - E[x]||^2` over all measured tokens
            (sae-lens's `explained_variance`).
        ce_loss_clean / ce_loss_spliced / ce_loss_zero: mean next-token cross-entropy (nats) of the
            model as is, with the SAE's reconstruction spliced in at the hook, and with the
            activation set to zero there.
        loss_recovered: `(zero - spliced) / (zero - clean)`: 1 when splicing the SAE in costs
            nothing, 0 when it is as bad as deleting the activation (sae-lens's `ce_loss_score`).
        l0: mean number of active features per token.
        dead_fraction: share of the `d_sae` features that never fire on these tokens.
        provenance: model, hook, SAE, versions.
    """

    hook_name: str
    d_in: int
    d_sae: int
    architecture: str
    n_tokens: int
    n_predictions: int
    mse: float
    explained_variance: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero: float
    loss_recovered: float
    l0: float
    dead_fraction: float
    provenance: dict = field(default_factory=dict)
    KIND = "SaeMetrics"

    _FIELDS = (
        "hook_name",
        "d_in",
        "d_sae",
        "architecture",
        "n_tokens",
        "n_predictions",
        "mse",
        "explained_variance",
        "ce_loss_clean",
        "ce_loss_spliced",
        "ce_loss_zero",
        "loss_recovered",
        "l0",
        "dead_fraction",
    )

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **{k: getattr(self, k) for k in self._FIELDS}, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> SaeMetrics:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(**{k: d[k] for k in cls._FIELDS}, provenance=d.get("provenance") or {})

    _METRICS = (
        ("n_tokens", "tokens measured"),
        ("n_predictions", "next-token predictions"),
        ("mse", "MSE, mean over tokens of ||x - x_hat||^2"),
        ("explained_variance", "explained variance"),
        ("l0", "L0 (active features per token)"),
        ("dead_fraction", "dead features (never active here), fraction"),
        ("ce_loss_clean", "next-token loss, clean"),
        ("ce_loss_spliced", "next-token loss, SAE spliced in"),
        ("ce_loss_zero", "next-token loss, activation zeroed"),
        ("loss_recovered", "loss recovered"),
    )

    def table(self):
        """One row per metric: `metric` (the field name), `description` and `value` (a float)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [{"metric": k, "description": d, "value": float(getattr(self, k))} for k, d in self._METRICS],
            columns=["metric", "description", "value"],
        )

    def to_markdown(self, digits: int = 4) -> str:
        """The metrics as a two-column Markdown table, each in its own format (`digits` is unused)."""
        rows = [
            ("tokens measured", f"{self.n_tokens:,}"),
            ("MSE, mean over tokens of ||x - x_hat||^2", f"{self.mse:.4g}"),
            ("explained variance", f"{self.explained_variance:.3f}"),
            ("L0 (active features per token)", f"{self.l0:.2f}"),
            ("dead features (never active here)", f"{self.dead_fraction:.1%} of {self.d_sae}"),
            ("next-token loss, clean", f"{self.ce_loss_clean:.4f}"),
            ("next-token loss, SAE spliced in", f"{self.ce_loss_spliced:.4f}"),
            ("next-token loss, activation zeroed", f"{self.ce_loss_zero:.4f}"),
            ("loss recovered", f"{self.loss_recovered:.3f}"),
        ]
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"

    def figure(self):
        """Bars: the next-token loss clean / SAE spliced in / activation zeroed (left), and the
        shares explained variance, loss recovered and dead features (right)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: as above

        fig = make_subplots(
            rows=1, cols=2, subplot_titles=["next-token loss (nats)", "shares"], horizontal_spacing=0.12
        )
        losses = [
            ("clean", self.ce_loss_clean),
            ("SAE spliced in", self.ce_loss_spliced),
            ("zeroed", self.ce_loss_zero),
        ]
        shares = [
            ("explained variance", self.explained_variance),
            ("loss recovered", self.loss_recovered),
            ("dead features", self.dead_fraction),
        ]
        for col, pairs, colour in ((1, losses, "#3b6ea8"), (2, shares, "#e6550d")):
            fig.add_trace(
                go.Bar(
                    x=[a for a, _ in pairs],
                    y=[b for _, b in pairs],
                    marker_color=colour,
                    showlegend=False,
                    hovertemplate="%{x}: %{y:.4g}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_layout(height=420, width=900)
        p = self.provenance
        return figures.style(
            fig,
            f"SAE metrics · {self.hook_name} · {self.architecture} d_sae={self.d_sae} · model {p.get('model', '?')} "
            f"· {self.n_tokens:,} tokens · L0 {self.l0:.2f}",
        )


@torch.no_grad()
def sae_metrics(
    model,
    sae,
    tokens: Tensor | list[str],
    *,
    loss_mask: Tensor | None = None,
    exclude_tokens: list[int] | None = None,
    batch_size: int = 64,
    check: bool = True,
) -> SaeMetrics:
    """Reconstruction, sparsity and spliced-in loss of `sae` on `model` over `tokens`.

    Args:
        tokens: `[batch, pos]` token ids, or documents (see `corpus_tokens`).
        loss_mask: `[batch, pos - 1]` bool: which next-token predictions count in the losses
            (prediction `t` is of `tokens[:, t + 1]`); default all whose target is not excluded.
        exclude_tokens: token ids whose positions are left out of everything (default: the pad
            token). Excluded positions still run through the model (they are right padding, so
            they do not change the other positions' activations).
        batch_size: rows per forward pass.
        check: run `check_sae` first.

    Returns:
        `SaeMetrics` (see its attributes for the definitions).

    >>> import lenslab
    >>> from lenslab import tasks
    >>> from lenslab.probes.sae import load_sae
    >>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
    >>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
    >>> tokens = tasks.induction(model, n=16, seq_len=16, seed=0).clean_tokens   # [16, 32]
    >>> m = sae_metrics(model, sae, tokens)
    >>> round(m.explained_variance, 2), round(m.loss_recovered, 2), m.l0
    (0.95, 1.0, 16.0)
    """
    if check:
        check_sae(model, sae)
    toks = corpus_tokens(model, tokens).to(model_device(model))
    exclude = excluded_tokens(model, exclude_tokens)
    keep = keep_mask(toks, exclude)
    pred = keep[:, 1:]
    if loss_mask is not None:
        if tuple(loss_mask.shape) != (toks.shape[0], toks.shape[1] - 1):
            raise LenslabError(
                f"loss_mask must be [batch, pos - 1] = {[toks.shape[0], toks.shape[1] - 1]}, got {list(loss_mask.shape)}"
            )
        pred = pred & loss_mask.to(pred.device).bool()
    if not keep.any() or not pred.any():
        raise LenslabError("no tokens left to measure: every position is excluded (padding?) or masked out")
    hook = sae.cfg.metadata.hook_name
    splice, zero = splice_hooks(sae), zero_hooks(sae, hook)

    sum_x = None
    sum_sq = sq_err = 0.0
    n_tok = 0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    nll = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_pred = 0
    for i in range(0, toks.shape[0], batch_size):
        t, k, p = toks[i : i + batch_size], keep[i : i + batch_size], pred[i : i + batch_size]
        logits, cache = model.run_with_cache(t, names_filter=[hook])
        x, f, x_hat = encode_decode(
            sae, sae_input(sae, cache[hook][k]).to(sae.device, sae.dtype)
        )  # [n, d_in], [n, d_sae]
        x64, xh64 = x.double().cpu(), x_hat.double().cpu()
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        sum_sq += float(x64.pow(2).sum())
        sq_err += float((x64 - xh64).pow(2).sum())
        n_tok += x.shape[0]
        active = (f != 0).cpu()
        l0_sum += float(active.sum())
        fired |= active.any(0)
        nll["clean"] += _nll_sum(logits, t, p)
        nll["spliced"] += _nll_sum(model.run_with_hooks(t, fwd_hooks=splice), t, p)
        nll["zero"] += _nll_sum(model.run_with_hooks(t, fwd_hooks=zero), t, p)
        n_pred += int(p.sum())
    total_var = sum_sq / n_tok - float(sum_x.div(n_tok).pow(2).sum())
    mse = sq_err / n_tok
    clean, spliced, zero_l = (nll[k] / n_pred for k in ("clean", "spliced", "zero"))
    denom = zero_l - clean
    return SaeMetrics(
        hook_name=hook,
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        architecture=sae.cfg.architecture(),
        n_tokens=n_tok,
        n_predictions=n_pred,
        mse=mse,
        explained_variance=1.0 - mse / total_var if total_var > 1e-12 else float("nan"),
        ce_loss_clean=clean,
        ce_loss_spliced=spliced,
        ce_loss_zero=zero_l,
        loss_recovered=(zero_l - spliced) / denom if abs(denom) > 1e-12 else float("nan"),
        l0=l0_sum / n_tok,
        dead_fraction=float((~fired).float().mean()),
        provenance=provenance(
            model,
            method="sae_metrics",
            hook_name=hook,
            sae_model=sae.cfg.metadata.model_name,
            exclude_tokens=exclude,
            loss_mask=loss_mask is not None,
        ),
    )


def _nll_sum(logits: Tensor, tokens: Tensor, pred: Tensor) -> float:
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return float(nll[pred].double().sum())


def write_metrics(path: Path, metrics: dict[str, SaeMetrics]) -> None:
    """Write `{predictions: SaeMetrics}` to `path` (`metrics.json`, read back by `read_metrics`), without
    the provenance's time, so that a rebuild writes the same file."""
    out = {}
    for name, m in metrics.items():
        d = m.to_dict()
        d["provenance"] = {k: v for k, v in d["provenance"].items() if k != "time"}  # a rebuild writes the same file
        out[name] = d
    path.write_text(json.dumps(out, indent=1) + "\n")


def read_metrics(name: str | Path) -> dict[str, SaeMetrics]:
    """The metrics an SAE folder (or zoo SAE) was saved with (`metrics.json`): `{predictions: SaeMetrics}`,
    e.g. `{"all next-token predictions": ..., "objective: ...": ...}`; `{}` when it has none."""
    path = Path(name).expanduser()
    folder = path if path.is_dir() else zoo_sae_path(str(name))
    f = folder / "metrics.json"
    if not f.exists():
        return {}
    return {k: SaeMetrics.from_dict(v) for k, v in json.loads(f.read_text()).items()}
