"""What steering buys and what it costs: concept rate against fluency, across strengths.

For each named intervention and each strength, greedy continuations of the evaluation prompts
are generated with the intervention at that strength (`evaluate.continuations`), then

- **concept rate**: the share of continuations for which `score(text)` is True (for the zoo
  model `zoo/steer-sentiment`: `lenslab._sentiment.is_positive`);
- **fluency**: the perplexity of those continuations under the *unsteered* model, read on their
  own (after BOS only): steering that writes gibberish or repeats itself scores high, while
  fluent text with the steered concept does not (`perplexity`). Also reported: the perplexity
  teacher-forced after the prompt (`perplexity_in_context`, `evaluate.perplexity`), which
  mixes fluency with surprise: a model that keeps its context's sentiment finds a steered
  positive word after a negative context improbable however fluent it is;
- **units**: how many (hook, unit) entries the intervention edits (`Intervention.n_units`).

Strength 0 is the unsteered model (every op is the identity there), so each curve starts at the
baseline. `TradeoffResult.figure()` plots concept rate against perplexity, one line per method.

>>> res = tradeoff(model, {"DiffMean": iv}, prompts, score=_sentiment.is_positive)  # doctest: +SKIP
>>> print(res.to_markdown())                                                       # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lenslab._errors import LenslabError
from lenslab.results import JsonResult, provenance
from lenslab.steering import evaluate
from lenslab.steering.intervention import Intervention, validate

__all__ = ["TradeoffResult", "standalone_perplexity", "tradeoff"]

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class TradeoffResult(JsonResult):
    """One row per (method, strength).

    Attributes:
        rows: dicts with method, strength, units, n (prompts), concept_rate, perplexity (of the
            continuations on their own) and perplexity_in_context (after their prompts).
        examples: per method and strength, the first few continuations (for reading).
        provenance: model, prompts, max_new_tokens, versions, time.
    """

    rows: list[dict]
    examples: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    KIND = "TradeoffResult"

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def row(self, method: str, strength: float) -> dict:
        for r in self.rows:
            if r["method"] == method and r["strength"] == float(strength):
                return r
        raise LenslabError(f"no row for method {method!r} at strength {strength:g}; methods: {self.methods()}")

    def best(self, max_perplexity: float) -> dict[str, dict]:
        """Per method, the row with the highest concept rate whose perplexity is at most `max_perplexity`."""
        out = {}
        for m in self.methods():
            ok = [r for r in self.rows if r["method"] == m and r["perplexity"] <= max_perplexity]
            if ok:
                out[m] = max(ok, key=lambda r: (r["concept_rate"], -r["perplexity"]))
        return out

    def to_markdown(self) -> str:
        lines = ["| method | strength | units | concept rate | perplexity | perplexity in context |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['method']} | {r['strength']:g} | {r['units']} | {r['concept_rate']:.2f} | "
                         f"{r['perplexity']:.3g} | {r['perplexity_in_context']:.3g} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "rows": self.rows, "examples": self.examples, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> TradeoffResult:
        return cls(rows=[dict(r) for r in d["rows"]], examples=d.get("examples") or {}, provenance=d.get("provenance") or {})

    def figure(self):
        """Concept rate (y) against perplexity under the unsteered model (x), one line per method,
        points labelled by strength."""
        import plotly.graph_objects as go

        from lenslab import figures

        fig = go.Figure()
        for m in self.methods():
            rs = sorted((r for r in self.rows if r["method"] == m), key=lambda r: r["strength"])
            fig.add_trace(go.Scatter(
                x=[r["perplexity"] for r in rs], y=[r["concept_rate"] for r in rs], mode="lines+markers+text",
                name=f"{m} ({rs[-1]['units']} units)", text=[f"{r['strength']:g}" for r in rs], textposition="top center",
                hovertemplate=f"{m}<br>strength %{{text}}<br>concept rate %{{y:.2f}}<br>perplexity %{{x:.2f}}<extra></extra>",
            ))
        fig.update_layout(xaxis_title="perplexity of the continuation under the unsteered model", xaxis_type="log",
                          yaxis_title="concept rate", yaxis_range=[-0.05, 1.05])
        return figures.style(fig, f"Steering trade-off · model {self.provenance.get('model', '?')} · "
                                  f"{self.provenance.get('n_prompts', '?')} prompts")


def standalone_perplexity(model, texts: Sequence[str], *, batch_size: int = 64) -> float:
    """Perplexity of `texts` on their own under `model` (each as BOS + its tokens; exp of the mean
    NLL over all their tokens). Empty texts are skipped; NaN when all are empty."""
    import math

    import torch

    bos = getattr(model.tokenizer, "bos_token_id", None)
    rows = [model.to_tokens(t, prepend_bos=False)[0].cpu() for t in texts if t.strip()]
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos]), r]) for r in rows]
    rows = [r for r in rows if r.shape[0] > 1]
    if not rows:
        return float("nan")
    device = next(model.parameters()).device
    by_len: dict[int, list] = {}
    for r in rows:
        by_len.setdefault(r.shape[0], []).append(r)
    nll, count = 0.0, 0
    with torch.no_grad():
        for group in by_len.values():
            for start in range(0, len(group), batch_size):
                toks = torch.stack(group[start: start + batch_size]).to(device)  # [batch, pos]
                logp = model(toks).float().log_softmax(-1)[:, :-1]  # [batch, pos-1, vocab]
                nll -= float(logp.gather(-1, toks[:, 1:, None]).sum())
                count += toks[:, 1:].numel()
    return math.exp(nll / count)


def tradeoff(model, interventions: Mapping[str, Intervention], prompts: Sequence[str], score: Callable[[str], bool], *,
             strengths: Sequence[float] = DEFAULT_STRENGTHS, max_new_tokens: int = 12, n_examples: int = 3,
             progress: bool = True) -> TradeoffResult:
    """Concept rate and fluency of greedy continuations for each intervention at each strength.

    Args:
        model: a lenslab model with a tokenizer.
        interventions: `{method name: Intervention}` (fitted at strength 1; each is rescaled).
        prompts: evaluation prompts (e.g. negative contexts to steer towards positive).
        score: continuation text -> bool, the concept detector.
        strengths: the strengths to sweep (0 = unsteered).
        max_new_tokens: tokens generated per prompt.

    Returns:
        `TradeoffResult` with one row per (method, strength).
    """
    if not interventions:
        raise LenslabError("interventions is empty: pass {method name: Intervention}")
    if isinstance(prompts, str) or not prompts:
        raise LenslabError("prompts must be a non-empty list of strings")
    strengths = [float(s) for s in strengths]
    if not strengths:
        raise LenslabError("strengths is empty: pass e.g. (0, 0.5, 1, 2)")
    for name, iv in interventions.items():
        if not isinstance(iv, Intervention):
            raise LenslabError(f"intervention {name!r} is a {type(iv).__name__}, not an Intervention")
        validate(model, iv)
    runs = {f"{name}@{s:g}": iv.with_strength(s) for name, iv in interventions.items() for s in strengths}
    texts = evaluate.continuations(model, runs, {"eval": list(prompts)}, max_new_tokens=max_new_tokens,
                                   progress=progress)
    conts = {k: v["eval"] for k, v in texts.items()}
    standalone = {k: standalone_perplexity(model, c) for k, c in conts.items()}
    # in context: teacher-forced after the prompt (empty continuations skipped)
    sets = {k: [p for p, t in zip(prompts, c) if t.strip()] for k, c in conts.items()}
    answers = {k: [t for t in c if t.strip()] for k, c in conts.items()}
    nonempty = [k for k in runs if sets[k]]
    ppl = evaluate.perplexity(model, {"unsteered": None}, {k: sets[k] for k in nonempty},
                              {k: answers[k] for k in nonempty}, progress=progress) if nonempty else None
    rows, examples = [], {}
    for name, iv in interventions.items():
        units = iv.n_units(model)
        for s in strengths:
            key = f"{name}@{s:g}"
            c = conts[key]
            p = float(ppl.value("unsteered", key)) if ppl is not None and key in nonempty else float("nan")
            rows.append({"method": name, "strength": s, "units": units, "n": len(c),
                         "concept_rate": sum(bool(score(t)) for t in c) / len(c), "perplexity": standalone[key],
                         "perplexity_in_context": p})
            examples.setdefault(name, {})[f"{s:g}"] = c[:n_examples]
    return TradeoffResult(rows=rows, examples=examples, provenance=provenance(
        model, method="tradeoff", strengths=strengths, max_new_tokens=max_new_tokens, n_prompts=len(prompts),
        prompts=list(prompts), interventions={k: v.to_dict()[0] for k, v in interventions.items()}))
