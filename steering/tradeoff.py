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

import hashlib
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.jobs import Shard, run_job, share_model, worker_model
from lenslab.results import JsonResult, provenance
from lenslab.steering import evaluate
from lenslab.steering.edit_hooks import validate
from lenslab.steering.intervention import Intervention
from lenslab.toolbox import check_layers, length_batches, model_device, model_name

__all__ = [
    "TradeoffResult",
    "bootstrap_ci",
    "standalone_perplexity",
    "tradeoff",
    "tradeoff_cell",
    "tradeoff_seeds",
    "tradeoff_sweep",
]

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


def tradeoff_cell(
    model, intervention: Intervention | None, prompts: Sequence[str], *, max_new_tokens: int = 12
) -> dict:
    """One cell of a trade-off sweep: greedy continuations of `prompts` under `intervention` (at
    its own strength; None = unsteered) and their two perplexities under the unsteered model.

    Every number of a `tradeoff` row comes from its cell alone (the prompts batch within the
    cell), so cells run anywhere give the rows one process gives.

    Returns:
        `{"texts": [continuation per prompt], "perplexity": of the continuations on their own,
        "perplexity_in_context": after their prompts (NaN when every continuation is empty)}`.
    """
    runs = {"cell": intervention}
    texts = evaluate.continuations(model, runs, {"eval": list(prompts)}, max_new_tokens=max_new_tokens, progress=False)[
        "cell"
    ]["eval"]
    # in context: teacher-forced after the prompt (empty continuations skipped)
    kept = [(p, t) for p, t in zip(prompts, texts) if t.strip()]
    in_context = float("nan")
    if kept:
        ppl = evaluate.perplexity(
            model, {"unsteered": None}, {"cell": [p for p, _ in kept]}, {"cell": [t for _, t in kept]}, progress=False
        )
        in_context = float(ppl.value("unsteered", "cell"))
    return {
        "texts": texts,
        "perplexity": standalone_perplexity(model, texts),
        "perplexity_in_context": in_context,
    }


def _cell_work(payload: dict) -> dict:
    """A job's work function: `tradeoff_cell` of one (method, strength) in a worker."""
    model = worker_model(payload["model"])
    return tradeoff_cell(model, payload["intervention"], payload["prompts"], max_new_tokens=payload["max_new_tokens"])


def _digest(*parts, interventions: Mapping[str, Intervention] | None = None) -> str:
    """A fingerprint of a sweep's inputs (for resume folders): parts by repr, interventions by their
    preset and tensors."""
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
    for name, iv in (interventions or {}).items():
        spec, tensors = iv.to_preset()
        h.update(name.encode() + json.dumps(spec, sort_keys=True, default=repr).encode())
        for key in sorted(tensors):
            h.update(key.encode() + tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    cluster: str | None = None,
    resume: str | Path | None = None,
) -> TradeoffResult:
    """Concept rate and fluency of greedy continuations for each intervention at each strength.

    Each (method, strength) is one cell (`tradeoff_cell`), run as one shard of a job
    (`lenslab.jobs.run_job`): in this process by default, or on a Ray cluster. The cells are
    whole (every prompt of a cell batches as in one process), so the result is the same bit
    for bit wherever they run.

    Args:
        model: a lenslab model with a tokenizer.
        interventions: `{method name: Intervention}` (fitted at strength 1; each is rescaled).
        prompts: evaluation prompts (e.g. negative contexts to steer towards positive).
        score: continuation text -> bool, the concept detector (run here, on the driver).
        strengths: the strengths to sweep (0 = unsteered).
        max_new_tokens: tokens generated per prompt.
        progress: one bar counting the cells done.
        cluster: None (this process), "local", "auto" or a Ray address: where the cells run.
        resume: a folder that keeps finished cells; a rerun with the same folder (and the same
            model, prompts and interventions) computes only the rest.

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
    if not all(isinstance(p, str) and p for p in prompts):
        raise LenslabError("prompts must be a non-empty list of non-empty strings")
    if model.tokenizer is None:
        raise LenslabError("this model has no tokenizer: the trade-off generates text and needs one")
    if max_new_tokens < 1:
        raise LenslabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    handle = share_model(model, cluster)
    cells = [(name, s) for name in interventions for s in strengths]
    shards = [
        Shard(
            key=f"{name}@{s:g}",
            payload={
                "model": handle,
                "intervention": interventions[name].with_strength(s),
                "prompts": list(prompts),
                "max_new_tokens": max_new_tokens,
            },
        )
        for name, s in cells
    ]
    fp = _digest(model_name(model), list(prompts), max_new_tokens, interventions=interventions)
    out = run_job(
        _cell_work, shards, cluster=cluster, resume=resume, desc="tradeoff", progress=progress, fingerprint=fp
    )
    rows, examples = [], {}
    units = {name: iv.n_units(model) for name, iv in interventions.items()}
    for (name, s), cell in zip(cells, out):
        c = cell["texts"]
        hits = [bool(score(t)) for t in c]
        rows.append(
            {
                "method": name,
                "strength": s,
                "units": units[name],
                "n": len(c),
                "n_seeds": 1,
                "concept_rate": sum(hits) / len(c),
                "concept_rate_std": None,
                "concept_rate_ci": bootstrap_ci(hits),
                "perplexity": cell["perplexity"],
                "perplexity_std": None,
                "perplexity_in_context": cell["perplexity_in_context"],
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
    cluster: str | None = None,
    resume: str | Path | None = None,
) -> TradeoffResult:
    """`tradeoff` once per seed, with the methods refitted and the evaluation prompts redrawn each time.

    Args:
        fit: seed -> `{method name: Intervention}` fitted on that seed's fitting set (here, on
            the driver).
        prompts: seed -> that seed's held-out evaluation prompts.
        seeds: two or more seeds.
        cluster: where each seed's cells run (see `tradeoff`).
        resume: a folder; seed s keeps its finished cells in its subfolder `seed{s}`.

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
            cluster=cluster,
            resume=None if resume is None else Path(resume) / f"seed{seed}",
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


def _fit_work(payload: dict) -> Intervention:
    """A job's work function: one method fitted at one layer, in a worker."""
    model = worker_model(payload["model"])
    iv = payload["fit"](model, payload["layer"])
    if not isinstance(iv, Intervention):
        raise LenslabError(
            f"fit[{payload['method']!r}] returned a {type(iv).__name__} at layer {payload['layer']}, not an Intervention"
        )
    return iv


def tradeoff_sweep(
    model,
    fit: Mapping[str, Callable[[object, int], Intervention]],
    layers: Sequence[int],
    prompts: Sequence[str],
    score: Callable[[str], bool],
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 12,
    n_examples: int = 3,
    progress: bool = True,
    cluster: str | None = None,
    resume: str | Path | None = None,
) -> TradeoffResult:
    """The trade-off of every method fitted at every layer: methods × layers × strengths.

    Two jobs (`lenslab.jobs.run_job`), both in this process by default or on a Ray cluster:
    first each (method, layer) is fitted by `fit[method](model, layer)` in a worker, on the
    worker's copy of the model; then every (method, layer, strength) cell runs as in `tradeoff`.
    Fitting in the workers spreads the expensive fits (LinEAS's optimisation) as well; the
    fitted interventions come back as data, so the result equals fitting and evaluating in one
    process (bit for bit for the deterministic fits: DiffMean, ActAdd, probes, AUSteer; LinEAS
    only where its optimiser runs identically on the worker's threads).

    Args:
        fit: `{method name: (model, layer) -> Intervention}`, e.g.
            `{"DiffMean": lambda m, l: mean_difference(m, pos, neg, layers=l)}`. On a cluster
            the callables are pickled (cloudpickle): let them use the `model` they are given,
            never capture the driver's.
        layers: the layers to sweep.
        prompts, score, strengths, max_new_tokens, n_examples, progress: as `tradeoff`.
        cluster: None (this process), "local", "auto" or a Ray address.
        resume: a folder; the fits are kept in `fit/`, the cells in `eval/`.

    Returns:
        `TradeoffResult` with methods named `"{method} L{layer}"` and rows that also hold the
        `layer`.

    >>> import lenslab
    >>> from lenslab.data import sentiment
    >>> from lenslab.steering import mean_difference
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
    >>> res = tradeoff_sweep(model, {"DiffMean": lambda m, l: mean_difference(m, pos, neg, layers=l)}, [0, 1],
    ...                      sentiment.prompts(8, "negative", seed=99), sentiment.is_positive,
    ...                      strengths=[0, 1], max_new_tokens=6, progress=False)
    >>> [(r["method"], r["layer"], r["strength"], r["concept_rate"]) for r in res.rows]
    [('DiffMean L0', 0, 0.0, 0.0), ('DiffMean L0', 0, 1.0, 0.0), ('DiffMean L1', 1, 0.0, 0.0), ('DiffMean L1', 1, 1.0, 1.0)]
    """
    if not isinstance(fit, Mapping) or not fit:
        raise LenslabError("fit is empty: pass {method name: (model, layer) -> Intervention}")
    for name, f in fit.items():
        if not callable(f):
            raise LenslabError(f"fit[{name!r}] is a {type(f).__name__}, not a callable (model, layer) -> Intervention")
    layers = check_layers(model, layers)
    handle = share_model(model, cluster)
    cells = [(name, layer) for name in fit for layer in layers]
    shards = [
        Shard(key=f"{name} L{layer}", payload={"model": handle, "fit": fit[name], "method": name, "layer": layer})
        for name, layer in cells
    ]
    fitted = run_job(
        _fit_work,
        shards,
        cluster=cluster,
        resume=None if resume is None else Path(resume) / "fit",
        desc="fit",
        progress=progress,
        fingerprint=_digest(model_name(model), sorted(fit), layers),
    )
    ivs = {f"{name} L{layer}": iv for (name, layer), iv in zip(cells, fitted)}
    res = tradeoff(
        model,
        ivs,
        prompts,
        score,
        strengths=strengths,
        max_new_tokens=max_new_tokens,
        n_examples=n_examples,
        progress=progress,
        cluster=cluster,
        resume=None if resume is None else Path(resume) / "eval",
    )
    layer_of = {f"{name} L{layer}": layer for name, layer in cells}
    rows = [dict(r, layer=layer_of[r["method"]]) for r in res.rows]
    prov = dict(res.provenance, method="tradeoff_sweep", layers=layers, methods=list(fit))
    return TradeoffResult(rows=rows, examples=res.examples, provenance=prov)
