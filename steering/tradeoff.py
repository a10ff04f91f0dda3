"""What steering buys and what it costs: concept rate against fluency, across strengths.

For each named intervention and each strength, greedy continuations of the evaluation prompts
are generated with the intervention at that strength (`evaluate.continuations`), then

- **concept rate**: the share of continuations for which `score(text)` is True (for the zoo
  model `zoo/steer-sentiment`: `lenslab.data.sentiment.is_positive`; for `zoo/english-4l`:
  `lenslab.data.english.is_positive`; `lenslab.data.sentiment_data(model)` picks the module);
- **fluency**: the perplexity of those continuations under the *unsteered* model, read on their
  own (after BOS only): steering that writes gibberish or repeats itself scores high, while
  fluent text with the steered concept does not (`perplexity`). Also reported: the perplexity
  teacher-forced after the prompt (`perplexity_in_context`, `evaluate.perplexity`), which
  mixes fluency with surprise: a model that keeps its context's sentiment finds a steered
  positive word after a negative context improbable however fluent it is;
- **units**: how many (hook, unit) entries the intervention edits (`Intervention.n_units`).

Strength 0 is the unsteered model (every op is the identity there), so each curve starts at the
baseline. `TradeoffResult.figure()` plots concept rate against perplexity, one line per method.

**Spread.** One run on one prompt set is one draw: the concept rate of a steering method moves
with the prompts it was fitted on and the prompts it is evaluated on. `tradeoff` reports a 95%
bootstrap interval of the concept rate over its evaluation prompts (`concept_rate_ci`);
`tradeoff_seeds` refits every method on a fresh fitting set and evaluates it on a fresh held-out
set per seed, and reports the mean and standard deviation across seeds of the concept rate and
the perplexity (`*_std`; the per-seed rows are kept in `per_seed`).

>>> import lenslab
>>> from lenslab.data import sentiment
>>> from lenslab.steering import mean_difference
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> iv = mean_difference(model, sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative"), layers=1)
>>> prompts = sentiment.prompts(8, "negative", seed=99)   # negative contexts, steered towards positive
>>> res = tradeoff(model, {"DiffMean": iv}, prompts, score=sentiment.is_positive, strengths=[0, 0.5, 1],
...                max_new_tokens=6, progress=False)
>>> print(res.to_markdown())
| method | strength | units | concept rate [95% CI] | perplexity | perplexity in context |
|---|---|---|---|---|---|
| DiffMean | 0 | 96 | 0.00 [0.00, 0.00] | 79.9 | 3.93 |
| DiffMean | 0.5 | 96 | 0.12 [0.00, 0.38] | 140 | 6.1 |
| DiffMean | 1 | 96 | 1.00 [1.00, 1.00] | 8.11e+03 | 5.74e+03 |
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.results import JsonResult, provenance
from lenslab.steering import evaluate
from lenslab.steering.edit_hooks import validate
from lenslab.steering.intervention import Intervention
from lenslab.toolbox import length_batches, model_device

__all__ = ["TradeoffResult", "bootstrap_ci", "standalone_perplexity", "tradeoff", "tradeoff_seeds"]

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class TradeoffResult(JsonResult):
    """One row per (method, strength).

    Attributes:
        rows: dicts with method, strength, units, n (prompts per seed), n_seeds, concept_rate,
            concept_rate_std (across seeds; None for one seed), concept_rate_ci (95% bootstrap
            interval over the prompts, one seed; None for several), perplexity (of the
            continuations on their own), perplexity_std, and perplexity_in_context (after their
            prompts). With several seeds the values are means across seeds.
        examples: per method and strength, the first few continuations (for reading).
        per_seed: with several seeds, every seed's own rows (each with its "seed").
        provenance: model, prompts, max_new_tokens, seeds, versions, time.
    """

    rows: list[dict]
    examples: dict = field(default_factory=dict)
    per_seed: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    KIND = "TradeoffResult"

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def row(self, method: str, strength: float) -> dict:
        for r in self.rows:
            if r["method"] == method and r["strength"] == float(strength):
                return r
        raise LenslabError(f"no row for method {method!r} at strength {strength:g}; methods: {self.methods()}")

    def seed_row(self, method: str, strength: float, seed: int) -> dict:
        """The row of one seed (`per_seed`, from `tradeoff_seeds`) for `method` at `strength`."""
        for r in self.per_seed:
            if r["method"] == method and r["strength"] == float(strength) and r["seed"] == seed:
                return r
        raise LenslabError(f"no per-seed row for method {method!r} at strength {strength:g}, seed {seed}")

    def best(self, max_perplexity: float) -> dict[str, dict]:
        """Per method, the row with the highest concept rate whose perplexity is at most `max_perplexity`."""
        out = {}
        for m in self.methods():
            ok = [r for r in self.rows if r["method"] == m and r["perplexity"] <= max_perplexity]
            if ok:
                out[m] = max(ok, key=lambda r: (r["concept_rate"], -r["perplexity"]))
        return out

    def best_within(self, budget: float) -> dict[str, dict]:
        """Per method, over `per_seed`: each seed's best concept rate with perplexity at most `budget`
        times that seed's unsteered (strength 0) perplexity, then across seeds `rate` (mean), `std`
        (ddof=1), `rates`, the `strengths` chosen and `ppl_ratio` (mean perplexity / unsteered)."""
        seeds = list(dict.fromkeys(r["seed"] for r in self.per_seed))
        if len(seeds) < 2:
            raise LenslabError("best_within needs the per-seed rows of several seeds (tradeoff_seeds)")
        out = {}
        for m in self.methods():
            picks, ratios = [], []
            for s in seeds:
                rows = [r for r in self.per_seed if r["seed"] == s and r["method"] == m]
                base = next(r["perplexity"] for r in rows if r["strength"] == 0)
                ok = [r for r in rows if r["perplexity"] <= budget * base]
                picks.append(max(ok, key=lambda r: (r["concept_rate"], -r["perplexity"])))
                ratios.append(picks[-1]["perplexity"] / base)
            rates = [p["concept_rate"] for p in picks]
            out[m] = {
                "rate": statistics.fmean(rates),
                "std": statistics.stdev(rates),
                "rates": rates,
                "strengths": [p["strength"] for p in picks],
                "ppl_ratio": statistics.fmean(ratios),
            }
        return out

    def n_seeds(self) -> int:
        return max((int(r.get("n_seeds", 1)) for r in self.rows), default=1)

    def table(self):
        """One row per (method, strength): units, concept rate, perplexities (and their spread across seeds)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(self.rows)

    def to_markdown(self) -> str:
        """A Markdown table: mean ± std across seeds, or the rate with its 95% bootstrap interval."""
        several = self.n_seeds() > 1
        head = (
            "| method | strength | units | concept rate (mean ± std) | perplexity (mean ± std) | perplexity in context |"
            if several
            else "| method | strength | units | concept rate [95% CI] | perplexity | perplexity in context |"
        )
        lines = [head, "|---|---|---|---|---|---|"]
        for r in self.rows:
            if several:
                rate = f"{r['concept_rate']:.2f} ± {r['concept_rate_std']:.2f}"
                ppl = f"{r['perplexity']:.3g} ± {r['perplexity_std']:.2g}"
            else:
                ci = r.get("concept_rate_ci")
                rate = f"{r['concept_rate']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                ppl = f"{r['perplexity']:.3g}"
            lines.append(
                f"| {r['method']} | {r['strength']:g} | {r['units']} | {rate} | {ppl} | "
                f"{r['perplexity_in_context']:.3g} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "rows": self.rows,
            "examples": self.examples,
            "per_seed": self.per_seed,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TradeoffResult:
        return cls(
            rows=[dict(r) for r in d["rows"]],
            examples=d.get("examples") or {},
            per_seed=[dict(r) for r in d.get("per_seed") or []],
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Concept rate (y) against perplexity under the unsteered model (x), one line per method,
        points labelled by strength."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        fig = go.Figure()
        several = self.n_seeds() > 1
        for m in self.methods():
            rs = sorted((r for r in self.rows if r["method"] == m), key=lambda r: r["strength"])
            if several:  # ± one standard deviation across seeds, both axes
                err_y = dict(type="data", array=[r["concept_rate_std"] for r in rs], thickness=1)
                err_x = dict(type="data", array=[r["perplexity_std"] for r in rs], thickness=1)
            else:  # the 95% bootstrap interval of the rate over the prompts
                cis = [r.get("concept_rate_ci") or [r["concept_rate"]] * 2 for r in rs]
                err_y = dict(
                    type="data",
                    symmetric=False,
                    thickness=1,
                    array=[hi - r["concept_rate"] for r, (_, hi) in zip(rs, cis)],
                    arrayminus=[r["concept_rate"] - lo for r, (lo, _) in zip(rs, cis)],
                )
                err_x = None
            fig.add_trace(
                go.Scatter(
                    x=[r["perplexity"] for r in rs],
                    y=[r["concept_rate"] for r in rs],
                    mode="lines+markers+text",
                    error_y=err_y,
                    error_x=err_x,
                    name=f"{m} ({rs[-1]['units']} units)",
                    text=[f"{r['strength']:g}" for r in rs],
                    textposition="top center",
                    hovertemplate=f"{m}<br>strength %{{text}}<br>concept rate %{{y:.2f}}<br>perplexity %{{x:.2f}}<extra></extra>",
                )
            )
        fig.update_layout(
            xaxis_title="perplexity of the continuation under the unsteered model",
            xaxis_type="log",
            yaxis_title="concept rate",
            yaxis_range=[-0.05, 1.05],
        )
        spread = f"{self.n_seeds()} seeds (mean ± std)" if several else "95% bootstrap interval"
        return figures.style(
            fig,
            f"Steering trade-off · model {self.provenance.get('model', '?')} · "
            f"{self.provenance.get('n_prompts', '?')} prompts · {spread}",
        )


def bootstrap_ci(hits: Sequence[bool], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval `[lo, hi]` of the share of True in `hits` (seeded, resampling the prompts)."""
    x = np.asarray([bool(h) for h in hits], dtype=np.float64)
    if x.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def standalone_perplexity(model, texts: Sequence[str], *, batch_size: int = 64) -> float:
    """Perplexity of `texts` on their own under `model` (each as BOS + its tokens; exp of the mean
    NLL over all their tokens). Empty texts are skipped; NaN when all are empty."""

    bos = getattr(model.tokenizer, "bos_token_id", None)
    rows = [model.to_tokens(t, prepend_bos=False)[0].cpu() for t in texts if t.strip()]
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos]), r]) for r in rows]
    rows = [r for r in rows if r.shape[0] > 1]
    if not rows:
        return float("nan")
    device = model_device(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in length_batches(rows, batch_size):
            toks = torch.stack([rows[i] for i in chunk]).to(device)  # [batch, pos]
            logp = model(toks).float().log_softmax(-1)[:, :-1]  # [batch, pos-1, vocab]
            nll -= float(logp.gather(-1, toks[:, 1:, None]).sum())
            count += toks[:, 1:].numel()
    return math.exp(nll / count)


def tradeoff(
    model,
    interventions: Mapping[str, Intervention],
    prompts: Sequence[str],
    score: Callable[[str], bool],
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 12,
    n_examples: int = 3,
    progress: bool = True,
) -> TradeoffResult:
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
    texts = evaluate.continuations(
        model, runs, {"eval": list(prompts)}, max_new_tokens=max_new_tokens, progress=progress
    )
    conts = {k: v["eval"] for k, v in texts.items()}
    standalone = {k: standalone_perplexity(model, c) for k, c in conts.items()}
    # in context: teacher-forced after the prompt (empty continuations skipped)
    sets = {k: [p for p, t in zip(prompts, c) if t.strip()] for k, c in conts.items()}
    answers = {k: [t for t in c if t.strip()] for k, c in conts.items()}
    nonempty = [k for k in runs if sets[k]]
    ppl = (
        evaluate.perplexity(
            model,
            {"unsteered": None},
            {k: sets[k] for k in nonempty},
            {k: answers[k] for k in nonempty},
            progress=progress,
        )
        if nonempty
        else None
    )
    rows, examples = [], {}
    for name, iv in interventions.items():
        units = iv.n_units(model)
        for s in strengths:
            key = f"{name}@{s:g}"
            c = conts[key]
            p = float(ppl.value("unsteered", key)) if ppl is not None and key in nonempty else float("nan")
            hits = [bool(score(t)) for t in c]
            rows.append(
                {
                    "method": name,
                    "strength": s,
                    "units": units,
                    "n": len(c),
                    "n_seeds": 1,
                    "concept_rate": sum(hits) / len(c),
                    "concept_rate_std": None,
                    "concept_rate_ci": bootstrap_ci(hits),
                    "perplexity": standalone[key],
                    "perplexity_std": None,
                    "perplexity_in_context": p,
                }
            )
            examples.setdefault(name, {})[f"{s:g}"] = c[:n_examples]
    return TradeoffResult(
        rows=rows,
        examples=examples,
        provenance=provenance(
            model,
            method="tradeoff",
            strengths=strengths,
            max_new_tokens=max_new_tokens,
            n_prompts=len(prompts),
            prompts=list(prompts),
            interventions={k: v.to_preset()[0] for k, v in interventions.items()},
        ),
    )


def tradeoff_seeds(
    model,
    fit: Callable[[int], Mapping[str, Intervention]],
    prompts: Callable[[int], Sequence[str]],
    score: Callable[[str], bool],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 12,
    n_examples: int = 3,
    progress: bool = True,
) -> TradeoffResult:
    """`tradeoff` once per seed, with the methods refitted and the evaluation prompts redrawn each time.

    Args:
        fit: seed -> `{method name: Intervention}` fitted on that seed's fitting set.
        prompts: seed -> that seed's held-out evaluation prompts.
        seeds: two or more seeds.

    Returns:
        `TradeoffResult` whose rows hold, per (method, strength), the mean across seeds of the
        concept rate, perplexity and perplexity in context, the standard deviations
        (`concept_rate_std`, `perplexity_std`, with ddof=1) and `n_seeds`; `per_seed` keeps
        every seed's rows.
    """

    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise LenslabError(f"seeds must be two or more distinct integers (got {seeds}); for one run use tradeoff()")
    runs = []
    for seed in seeds:
        if progress:
            print(f"tradeoff: seed {seed} ({seeds.index(seed) + 1}/{len(seeds)})", flush=True)
        res = tradeoff(
            model,
            fit(seed),
            list(prompts(seed)),
            score,
            strengths=strengths,
            max_new_tokens=max_new_tokens,
            n_examples=n_examples,
            progress=False,
        )
        runs.append((seed, res))
    first = runs[0][1]
    rows, per_seed = [], []
    for r0 in first.rows:
        same = [res.row(r0["method"], r0["strength"]) for _, res in runs]
        rates = [r["concept_rate"] for r in same]
        ppls = [r["perplexity"] for r in same]
        ctx = [r["perplexity_in_context"] for r in same]
        rows.append(
            {
                "method": r0["method"],
                "strength": r0["strength"],
                "units": r0["units"],
                "n": r0["n"],
                "n_seeds": len(seeds),
                "concept_rate": statistics.fmean(rates),
                "concept_rate_std": statistics.stdev(rates),
                "concept_rate_ci": None,
                "perplexity": statistics.fmean(ppls),
                "perplexity_std": statistics.stdev(ppls),
                "perplexity_in_context": statistics.fmean(ctx),
            }
        )
    for seed, res in runs:
        per_seed += [dict(r, seed=seed) for r in res.rows]
    prov = dict(
        first.provenance,
        method="tradeoff_seeds",
        seeds=seeds,
        prompts={str(seed): res.provenance.get("prompts") for seed, res in runs},
    )
    return TradeoffResult(rows=rows, examples=first.examples, per_seed=per_seed, provenance=prov)
