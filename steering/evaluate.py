"""Evaluate interventions: behaviour rates, answer accuracy and perplexity under several switches.

Every function takes a dict of named interventions (`None` = the unsteered model) and a dict of
named prompt sets, and returns a `RateTable` `[intervention, set]` that exports to JSON:

- `behaviour_rates`: greedy continuations scored by a `score(text) -> bool` (e.g. "is it a
  refusal"); the share of True per set.
- `answer_accuracy`: exact match of the greedy continuation against expected answers
  (compared as token ids of the stripped texts; `prefix=True` accepts a continuation that
  starts with the answer).
- `perplexity`: of given answers after their prompts, teacher-forced (exp of the mean
  negative log-likelihood over all answer tokens of a set).

Greedy decoding is the same as `lenslab.steering.generate` (no KV cache, stop at EOS, the
continuation is the decoded text after the prompt), batched over prompts of equal token length:
`continuations` returns the texts, and the rate functions accept them precomputed so that one
generation serves several scores.

`expert_switch_table` is the MoTE measurement: fTRI-ranked experts switched off and
forced on, random experts switched off as a control, with behaviour rates on two prompt sets and
a capability check.

>>> import lenslab
>>> from lenslab.data import refusal
>>> from lenslab.steering import evaluate, switch_experts
>>> model = lenslab.load_model("zoo/moe-refusal", device="cpu")
>>> harmful, _ = refusal.prompts(8, "harmful", split="test")
>>> off = switch_experts(off=[(1, 2), (1, 5), (2, 3), (2, 6)])   # the zoo model's planted refusal experts
>>> t = evaluate.behaviour_rates(model, {"baseline": None, "experts off": off}, {"harmful": harmful},
...                              score=refusal.is_refusal, progress=False)
>>> t.value("baseline", "harmful"), t.value("experts off", "harmful")   # refusal rates
(1.0, 0.0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenslab import figures, labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.data import refusal
from lenslab.probes.routers import ftri_rank, moe_layers
from lenslab.results import JsonResult, provenance
from lenslab.steering.edit_hooks import apply
from lenslab.steering.experts import switch_experts
from lenslab.steering.intervention import Intervention
from lenslab.toolbox import by_length, model_device

__all__ = [
    "RateTable",
    "SwitchTable",
    "answer_accuracy",
    "behaviour_rates",
    "continuations",
    "expert_switch_table",
    "perplexity",
]

Interventions = Mapping[str, Intervention | None]
PromptSets = Mapping[str, Sequence[str]]


# --- result tables -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class RateTable(JsonResult):
    """One number per (intervention, prompt set).

    Attributes:
        values: `[intervention, set]`: a rate in [0, 1] (behaviour rate, exact-match accuracy)
            or a perplexity, as `metric` says.
        interventions: row names.
        sets: column names.
        n: prompts per set.
        metric: what the values are, e.g. "refusal rate", "exact match", "perplexity".
        texts: `{intervention: {set: [continuation, ...]}}` (empty for perplexity).
        provenance: model, versions, time, the interventions' edits.
    """

    values: Tensor
    interventions: tuple[str, ...]
    sets: tuple[str, ...]
    n: tuple[int, ...]
    metric: str = "rate"
    texts: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    KIND = "RateTable"

    def value(self, intervention: str, prompt_set: str) -> float:
        """The value of one cell."""

        if intervention not in self.interventions:
            raise LenslabError(
                f"no intervention {intervention!r} in this table{did_you_mean(intervention, self.interventions)}; "
                f"it has {', '.join(self.interventions)}"
            )
        if prompt_set not in self.sets:
            raise LenslabError(
                f"no prompt set {prompt_set!r} in this table{did_you_mean(prompt_set, self.sets)}; "
                f"it has {', '.join(self.sets)}"
            )
        return float(self.values[self.interventions.index(intervention), self.sets.index(prompt_set)])

    def is_rate(self) -> bool:
        return self.metric != "perplexity"

    def table(self):
        """One row per intervention, one column per prompt set (rates in [0, 1], or perplexities)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            self.values.double().tolist(), index=pd.Index(self.interventions, name="intervention"), columns=self.sets
        ).reset_index()

    def to_markdown(self) -> str:
        """A Markdown table, rates in percent; the first column's header names the metric."""
        head = (
            f"| intervention ({self.metric}) | " + " | ".join(f"{s} (n={n})" for s, n in zip(self.sets, self.n)) + " |"
        )
        sep = "|---|" + "---:|" * len(self.sets)
        fmt = (lambda v: f"{100 * v:.1f}%") if self.is_rate() else (lambda v: f"{v:.3f}")
        rows = [
            f"| {iv} | " + " | ".join(fmt(float(v)) for v in self.values[i]) + " |"
            for i, iv in enumerate(self.interventions)
        ]
        return "\n".join([head, sep, *rows])

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "values": self.values.double().tolist(),
            "interventions": list(self.interventions),
            "sets": list(self.sets),
            "n": list(self.n),
            "metric": self.metric,
            "texts": self.texts,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RateTable:
        return cls(
            values=torch.tensor(d["values"], dtype=torch.float64),
            interventions=tuple(d["interventions"]),
            sets=tuple(d["sets"]),
            n=tuple(d["n"]),
            metric=d.get("metric", "rate"),
            texts=d.get("texts") or {},
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Grouped bars: one group per prompt set, one bar per intervention."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        scale = 100.0 if self.is_rate() else 1.0
        fig = go.Figure(
            [
                go.Bar(
                    name=iv,
                    x=[f"{s} (n={n})" for s, n in zip(self.sets, self.n)],
                    y=(self.values[i] * scale).tolist(),
                    hovertemplate="%{x}<br>%{y:.3g}<extra>" + iv + "</extra>",
                )
                for i, iv in enumerate(self.interventions)
            ]
        )
        fig.update_layout(
            barmode="group", yaxis_title=f"{self.metric}{' (%)' if self.is_rate() else ''}", xaxis_title="prompt set"
        )
        return figures.style(
            fig,
            f"{self.metric} under {len(self.interventions)} interventions · model {self.provenance.get('model', '?')}",
        )


# --- generation ----------------------------------------------------------------------------
def _check_inputs(interventions: Interventions, prompts: PromptSets) -> None:
    if not isinstance(interventions, Mapping) or not interventions:
        raise LenslabError(
            "interventions must be a non-empty dict {name: Intervention or None}; "
            "use {'baseline': None} for the unsteered model"
        )
    for name, iv in interventions.items():
        if iv is not None and not isinstance(iv, Intervention):
            raise LenslabError(f"intervention {name!r} is a {type(iv).__name__}, not a lenslab Intervention (or None)")
    if not isinstance(prompts, Mapping) or not prompts:
        raise LenslabError("prompts must be a non-empty dict {set name: [prompt, ...]}")
    for name, ps in prompts.items():
        if isinstance(ps, str) or not ps or not all(isinstance(p, str) and p for p in ps):
            raise LenslabError(f"prompt set {name!r} must be a non-empty list of non-empty strings")


def _greedy_group(model, tokens: Tensor, intervention: Intervention | None, max_new_tokens: int) -> list[str]:
    """Greedy continuations of `[batch, pos]` prompts of one length, as `generate` decodes them."""
    device = model_device(model)
    tokens = tokens.to(device)
    prompt_len = tokens.shape[1]
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    with torch.no_grad(), apply(model, intervention, prompt_len=prompt_len):
        for _ in range(max_new_tokens):
            nxt = model(tokens)[:, -1].float().argmax(-1)  # [batch]
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    out = []
    for row in tokens.cpu():
        gen = row[prompt_len:].tolist()
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos)]
        head = model.to_string(row[:prompt_len])
        full = model.to_string(torch.tensor(row[:prompt_len].tolist() + gen))
        out.append(full[len(head) :] if full.startswith(head) else model.to_string(torch.tensor(gen)))
    return out


def _by_length(model, prompts: Sequence[str]) -> dict[int, list[tuple[int, Tensor]]]:
    toks = [model.to_tokens(p)[0].cpu() for p in prompts]
    return {n: [(i, toks[i]) for i in idx] for n, idx in by_length(toks).items()}


def continuations(
    model,
    interventions: Interventions,
    prompts: PromptSets,
    *,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, dict[str, list[str]]]:
    """Greedy continuations `{intervention: {set: [text, ...]}}` (texts in prompt order).

    Prompts of equal token length run together, `batch_size` at a time; each row stops at EOS.
    """
    _check_inputs(interventions, prompts)
    if max_new_tokens < 1:
        raise LenslabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if model.tokenizer is None:
        raise LenslabError("this model has no tokenizer: generation-based evaluation needs one")
    groups = {name: _by_length(model, ps) for name, ps in prompts.items()}
    n_chunks = sum(math.ceil(len(m) / batch_size) for g in groups.values() for m in g.values()) * len(interventions)
    bar = tqdm(total=n_chunks, desc="generate", disable=not progress, leave=False)
    out: dict[str, dict[str, list[str]]] = {}
    for iv_name, iv in interventions.items():
        out[iv_name] = {}
        for set_name, ps in prompts.items():
            texts: list[str | None] = [None] * len(ps)
            for members in groups[set_name].values():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    res = _greedy_group(model, torch.stack([t for _, t in chunk]), iv, max_new_tokens)
                    for (i, _), text in zip(chunk, res):
                        texts[i] = text
                    bar.update(1)
            out[iv_name][set_name] = [str(t) for t in texts]
    bar.close()
    return out


def _prov(model, method: str, interventions: Interventions, **extra) -> dict:
    spec = {name: (None if iv is None else iv.to_preset()[0]) for name, iv in interventions.items()}
    return provenance(model, method=method, interventions=spec, **extra)


def _normalize(text: str) -> str:
    return " ".join(text.split())


def behaviour_rates(
    model,
    interventions: Interventions,
    prompts: PromptSets,
    score: Callable[[str], bool],
    *,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    metric: str = "behaviour rate",
    texts: dict | None = None,
    progress: bool = True,
) -> RateTable:
    """Share of greedy continuations with `score(text)` True, per intervention and prompt set.

    Args:
        model: a lenslab model with a tokenizer.
        interventions: `{name: Intervention or None}`.
        prompts: `{set name: [prompt, ...]}`.
        score: continuation text -> bool (e.g. `lenslab.data.refusal.is_refusal`).
        max_new_tokens: tokens generated per prompt (fewer when EOS comes first).
        texts: precomputed `continuations(...)` to score instead of generating.

    Returns:
        `RateTable` `[intervention, set]` of rates in [0, 1], with the continuations.
    """
    _check_inputs(interventions, prompts)
    texts = texts or continuations(
        model, interventions, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    hits = {iv: {s: [bool(score(t)) for t in texts[iv][s]] for s in prompts} for iv in interventions}
    prov = _prov(model, "behaviour_rates", interventions, max_new_tokens=max_new_tokens)
    return _rate_table(hits, prompts, texts, metric, prov)


def _rate_table(hits: dict, prompts: PromptSets, texts: dict, metric: str, prov: dict) -> RateTable:
    """`hits[intervention][set]`: one bool per prompt -> the `RateTable` of their shares."""
    interventions = tuple(hits)
    values = torch.tensor(
        [[sum(hits[iv][s]) / len(prompts[s]) for s in prompts] for iv in interventions], dtype=torch.float64
    )
    return RateTable(
        values=values,
        interventions=interventions,
        sets=tuple(prompts),
        n=tuple(len(p) for p in prompts.values()),
        metric=metric,
        texts={iv: {s: texts[iv][s] for s in prompts} for iv in interventions},
        provenance=prov,
    )


def _answer_lengths(model, answers: Sequence[str]) -> list[int]:
    return [int(model.to_tokens(a, prepend_bos=False).shape[-1]) for a in answers]


def answer_accuracy(
    model,
    interventions: Interventions,
    prompts: PromptSets,
    answers: Mapping[str, Sequence[str]],
    *,
    max_new_tokens: int | None = None,
    prefix: bool = False,
    batch_size: int = 64,
    texts: dict | None = None,
    progress: bool = True,
) -> RateTable:
    """Exact-match accuracy of greedy continuations against `answers`.

    A continuation matches when the token ids of its stripped, whitespace-normalised text equal
    those of the answer (so a decoder's spacing, "house." vs "house .", does not matter); with
    `prefix`, when they start with the answer's. `max_new_tokens` defaults to the longest
    answer's token count plus one (room for EOS).
    """
    _check_inputs(interventions, prompts)
    _check_answers(prompts, answers)
    if max_new_tokens is None:
        max_new_tokens = max(max(_answer_lengths(model, a)) for a in answers.values()) + 1
    texts = texts or continuations(
        model, interventions, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )

    def canon(text: str) -> list[int]:
        text = _normalize(text)
        return model.to_tokens(text, prepend_bos=False)[0].tolist() if text else []

    def hit(text: str, ans: str) -> bool:
        t, a = canon(text), canon(ans)
        return t[: len(a)] == a if prefix else t == a

    hits = {iv: {s: [hit(t, a) for t, a in zip(texts[iv][s], answers[s])] for s in prompts} for iv in interventions}
    prov = _prov(model, "answer_accuracy", interventions, max_new_tokens=max_new_tokens)
    return _rate_table(hits, prompts, texts, "prefix match" if prefix else "exact match", prov)


def _check_answers(prompts: PromptSets, answers) -> None:
    if not isinstance(answers, Mapping):
        raise LenslabError("answers must be a dict {set name: [answer, ...]} with the same sets as prompts")
    for name, ps in prompts.items():
        if name not in answers:
            raise LenslabError(f"no answers for prompt set {name!r}; give one answer per prompt")
        if len(answers[name]) != len(ps):
            raise LenslabError(
                f"prompt set {name!r} has {len(ps)} prompts but {len(answers[name])} answers; "
                "give exactly one answer per prompt"
            )
        if not all(isinstance(a, str) and a.strip() for a in answers[name]):
            raise LenslabError(f"answers of prompt set {name!r} must be non-empty strings")


def perplexity(
    model,
    interventions: Interventions,
    prompts: PromptSets,
    answers: Mapping[str, Sequence[str]],
    *,
    append_eos: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> RateTable:
    """Perplexity of `answers` after their prompts, teacher-forced, per intervention and set.

    Each answer is tokenized on its own (no BOS; give BPE answers their leading space) and
    appended to its prompt's tokens (plus EOS with `append_eos`). The value is
    `exp(sum of answer-token NLL / number of answer tokens)` over the set.
    """
    _check_inputs(interventions, prompts)
    _check_answers(prompts, answers)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if append_eos and eos is None:
        raise LenslabError("append_eos=True but the model's tokenizer has no EOS token")
    rows: dict[str, dict[int, list[tuple[Tensor, int]]]] = {}
    for s, ps in prompts.items():
        rows[s] = {}
        for p, a in zip(ps, answers[s]):
            pt = model.to_tokens(p)[0].cpu()
            at = model.to_tokens(a, prepend_bos=False)[0].cpu()
            if append_eos:
                at = torch.cat([at, torch.tensor([eos])])
            full = torch.cat([pt, at])
            rows[s].setdefault(full.shape[0], []).append((full, pt.shape[0]))
    device = model_device(model)
    n_chunks = sum(math.ceil(len(m) / batch_size) for g in rows.values() for m in g.values()) * len(interventions)
    bar = tqdm(total=n_chunks, desc="perplexity", disable=not progress, leave=False)
    values = torch.zeros(len(interventions), len(prompts), dtype=torch.float64)
    for i, iv in enumerate(interventions.values()):
        for j, s in enumerate(prompts):
            nll, count = 0.0, 0
            for members in rows[s].values():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    toks = torch.stack([t for t, _ in chunk]).to(device)
                    with torch.no_grad(), apply(model, iv):
                        logp = model(toks).float().log_softmax(-1)  # [batch, pos, vocab]
                    for b, (_, plen) in enumerate(chunk):
                        tgt = toks[b, plen:]
                        nll -= float(logp[b, plen - 1 : -1].gather(-1, tgt[:, None]).sum())
                        count += int(tgt.numel())
                    bar.update(1)
            values[i, j] = math.exp(nll / max(count, 1))
    bar.close()
    return RateTable(
        values=values,
        interventions=tuple(interventions),
        sets=tuple(prompts),
        n=tuple(len(p) for p in prompts.values()),
        metric="perplexity",
        provenance=_prov(model, "perplexity", interventions, append_eos=append_eos),
    )


# --- the MoTE switch measurement -------------------------------------------------------------
COLUMNS = ("target rate", "other rate", "accuracy", "perplexity")


@dataclass(frozen=True, kw_only=True, eq=False)
class SwitchTable(JsonResult):
    """Behaviour and capability under expert switches (MoTE's measurement).

    Rows: "baseline", "top-k off", "top-k on", "random-k off" (mean and std over draws).
    Columns (`COLUMNS`): behaviour rate on the target set (e.g. held-out harmful prompts), on the
    other set (e.g. held-out benign prompts), exact-match accuracy on the capability set and the
    perplexity of its answers.

    Attributes:
        mean / std: `[row, column]` (std is 0 for single rows).
        rows: row names.
        experts: the fTRI top-k `(layer, expert, score)` that were switched.
        random_draws: the random expert sets, one per draw.
        per_draw: `[draw, column]` values of the random rows.
        n: prompts per column.
        mode: the switch-off mode passed to `switch_experts`.
        provenance: model, prompts, versions, time.
    """

    mean: Tensor
    std: Tensor
    rows: tuple[str, ...]
    experts: list
    random_draws: list
    per_draw: Tensor
    n: tuple[int, ...]
    mode: str = "drop"
    columns: tuple[str, ...] = COLUMNS
    provenance: dict = field(default_factory=dict)
    KIND = "SwitchTable"

    def value(self, row: str, column: str) -> float:
        """Mean value of one cell."""

        if row not in self.rows:
            raise LenslabError(f"no row {row!r}{did_you_mean(row, self.rows)}; rows: {', '.join(self.rows)}")
        if column not in self.columns:
            raise LenslabError(
                f"no column {column!r}{did_you_mean(column, self.columns)}; columns: {', '.join(self.columns)}"
            )
        return float(self.mean[self.rows.index(row), self.columns.index(column)])

    def table(self):
        """One row per switch (baseline, top-k off/on, random-k off), a mean and a std column per column."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        rows = []
        for r, row in enumerate(self.rows):
            rec = {"switch": row}
            for c, col in enumerate(self.columns):
                rec[col] = float(self.mean[r, c])
                rec[f"{col} std"] = float(self.std[r, c])
            rows.append(rec)
        return pd.DataFrame(rows)

    def to_markdown(self, names: Sequence[str] | None = None) -> str:
        """Markdown table (rates in percent; random rows as mean ± std); `names` relabels the columns."""
        cols = list(names or self.columns)
        head = "| switch | " + " | ".join(f"{c} (n={n})" for c, n in zip(cols, self.n)) + " |"
        sep = "|---|" + "---:|" * len(cols)
        out = [head, sep]
        for r, row in enumerate(self.rows):
            cells = []
            for c, col in enumerate(self.columns):
                m, s = float(self.mean[r, c]), float(self.std[r, c])
                pct = col != "perplexity"
                # perplexities: 4 significant digits, never fewer than 0 decimals (58025, 1.309); the
                # 5th digit of a five-figure perplexity differs between CPUs (summation order)
                dec = max(0, 3 - math.floor(math.log10(abs(m)))) if m and math.isfinite(m) else 3
                cell = f"{100 * m:.1f}%" if pct else f"{m:.{dec}f}"
                if row.startswith("random"):
                    cell += f" ± {100 * s:.1f}" if pct else f" ± {s:.{dec}f}"
                cells.append(cell)
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "rows": list(self.rows),
            "columns": list(self.columns),
            "experts": [list(e) for e in self.experts],
            "random_draws": [[list(p) for p in d] for d in self.random_draws],
            "per_draw": self.per_draw.tolist(),
            "n": list(self.n),
            "mode": self.mode,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SwitchTable:
        t = lambda x: torch.tensor(x, dtype=torch.float64)
        return cls(
            mean=t(d["mean"]),
            std=t(d["std"]),
            rows=tuple(d["rows"]),
            columns=tuple(d["columns"]),
            experts=[tuple(e) for e in d["experts"]],
            random_draws=[[tuple(p) for p in dr] for dr in d["random_draws"]],
            per_draw=t(d["per_draw"]),
            n=tuple(d["n"]),
            mode=d.get("mode", "drop"),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Bars per column (rates in %), one per row; random rows with their std as error bars."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

        fig = make_subplots(
            rows=1, cols=len(self.columns), subplot_titles=[f"{c} (n={n})" for c, n in zip(self.columns, self.n)]
        )
        colours = ["#555555", "#c0392b", "#2e86c1", "#27ae60", "#8e44ad"]
        for c, col in enumerate(self.columns):
            scale = 1.0 if col == "perplexity" else 100.0
            fig.add_trace(
                go.Bar(
                    x=list(self.rows),
                    y=(self.mean[:, c] * scale).tolist(),
                    error_y=dict(type="data", array=(self.std[:, c] * scale).tolist(), visible=True),
                    marker_color=colours[: len(self.rows)],
                    showlegend=False,
                    hovertemplate="%{x}<br>%{y:.3g}<extra>" + col + "</extra>",
                ),
                row=1,
                col=c + 1,
            )
        experts = ", ".join(labels.expert(layer, e) for layer, e, *_ in self.experts)
        return figures.style(
            fig, f"Expert switches ({experts}; mode {self.mode}) · model {self.provenance.get('model', '?')}"
        )


def random_expert_sets(
    model, k: int, n_draws: int, *, exclude: Sequence[tuple[int, int]] = (), seed: int = 0
) -> list[list[tuple[int, int]]]:
    """`n_draws` sets of `k` distinct (layer, expert) pairs drawn uniformly from the model's MoE
    layers, never from `exclude`; deterministic in `seed`."""

    pool = [(m.layer, e) for m in moe_layers(model) for e in range(m.n_experts)]
    excl = {(int(a), int(b)) for a, b in exclude}
    pool = [p for p in pool if p not in excl]
    if k > len(pool):
        raise LenslabError(f"cannot draw {k} random experts: only {len(pool)} are left after excluding {len(excl)}")
    rng = random.Random(f"random-experts-{seed}")
    return [sorted(rng.sample(pool, k)) for _ in range(n_draws)]


def expert_switch_table(
    model,
    *,
    rank_target: Sequence[str],
    rank_other: Sequence[str],
    target: Sequence[str],
    other: Sequence[str],
    capability: Sequence[str],
    capability_answers: Sequence[str],
    score: Callable[[str], bool],
    k: int = 4,
    n_random: int = 5,
    seed: int = 0,
    mode: str = "drop",
    weights: bool = False,
    max_new_tokens: int = 12,
    batch_size: int = 64,
    progress: bool = True,
) -> SwitchTable:
    """MoTE's measurement: rank experts by fTRI, switch the top k off / on and k random ones off.

    Args:
        model: a lenslab MoE model.
        rank_target / rank_other: prompts for `routers.ftri_rank` (e.g. prompts the model refuses
            and prompts it answers).
        target / other: held-out prompt sets whose behaviour rate (`score` of the greedy
            continuation) is measured (e.g. harmful and benign prompts).
        capability / capability_answers: held-out prompts with exact answers (accuracy and the
            answers' perplexity).
        k: experts switched; n_random: random draws (excluding the top k), reported as mean and std.
        mode: how experts are switched off (`switch_experts(off=..., mode=mode)`).

    Returns:
        `SwitchTable` with rows baseline, top-k off, top-k on, random-k off.
    """

    if k < 1 or n_random < 1:
        raise LenslabError(f"k and n_random must be at least 1, got k={k}, n_random={n_random}")
    ranking = ftri_rank(model, list(rank_target), list(rank_other), weights=weights)
    top = ranking.top(k)
    top_pairs = [(layer, e) for layer, e, _ in top]
    draws = random_expert_sets(model, k, n_random, exclude=top_pairs, seed=seed)
    ivs: dict[str, Intervention | None] = {
        "baseline": None,
        f"top-{k} off": switch_experts(off=top_pairs, mode=mode),
        f"top-{k} on": switch_experts(on=top_pairs),
    }
    for d, pairs in enumerate(draws):
        ivs[f"random-{k} off #{d}"] = switch_experts(off=pairs, mode=mode)
    sets = {"target": list(target), "other": list(other)}
    if list(capability) != list(other):  # the capability set is often the other set itself: generate once
        sets["capability"] = list(capability)
    n_gen = max(max_new_tokens, max(_answer_lengths(model, capability_answers)) + 1)
    texts = continuations(model, ivs, sets, max_new_tokens=n_gen, batch_size=batch_size, progress=progress)
    for iv in texts:
        texts[iv].setdefault("capability", texts[iv]["other"])
    rates = behaviour_rates(model, ivs, {"target": sets["target"], "other": sets["other"]}, score, texts=texts)
    cap = {"capability": list(capability)}
    acc = answer_accuracy(model, ivs, cap, {"capability": list(capability_answers)}, texts=texts)
    ppl = perplexity(
        model, ivs, cap, {"capability": list(capability_answers)}, batch_size=batch_size, progress=progress
    )
    per = torch.stack([rates.values[:, 0], rates.values[:, 1], acc.values[:, 0], ppl.values[:, 0]], dim=1)  # [iv, col]
    fixed = per[:3]
    rand = per[3:]
    mean = torch.cat([fixed, rand.mean(0, keepdim=True)])
    std = torch.cat([torch.zeros_like(fixed), (rand.std(0, unbiased=True) if len(rand) > 1 else torch.zeros(4))[None]])
    prov = provenance(
        model,
        method="expert_switch_table",
        k=k,
        n_random=n_random,
        seed=seed,
        mode=mode,
        weights=weights,
        ranking_top=[list(t) for t in top],
        target_prompts=list(target),
        other_prompts=list(other),
        capability_prompts=list(capability),
        n_rank_target=len(rank_target),
        n_rank_other=len(rank_other),
    )
    return SwitchTable(
        mean=mean,
        std=std,
        rows=("baseline", f"top-{k} off", f"top-{k} on", f"random-{k} off"),
        experts=[tuple(t) for t in top],
        random_draws=draws,
        per_draw=rand,
        n=(len(target), len(other), len(capability), len(capability)),
        mode=mode,
        provenance=prov,
    )


def mote_table(
    model,
    *,
    n_rank: int = 64,
    n_eval: int = 100,
    k: int = 4,
    n_random: int = 5,
    seed: int = 0,
    mode: str = "drop",
    batch_size: int = 64,
    progress: bool = True,
) -> SwitchTable:
    """The MoTE switch table on a model of the refusal language (`lenslab.data.refusal`), e.g. `zoo/moe-refusal`.

    fTRI ranks experts on `n_rank` harmful plus `n_rank` benign train-split prompts, labelled by
    the model's own greedy behaviour (refused vs answered, as MoTE labels responses). The top
    `k` experts are switched off (`mode`) and forced on, and `n_random` random sets of `k`
    other experts are switched off. Measured on `n_eval` held-out ("test" split) harmful and
    `n_eval` benign prompts: refusal rate on both, exact-match accuracy and answer perplexity
    on the benign ones. Returns a `SwitchTable`.
    """
    harmful_r, _ = refusal.prompts(n_rank, "harmful", "train", seed=seed + 100)
    benign_r, _ = refusal.prompts(n_rank, "benign", "train", seed=seed + 100)
    texts = continuations(
        model,
        {"baseline": None},
        {"rank": harmful_r + benign_r},
        max_new_tokens=2,
        batch_size=batch_size,
        progress=progress,
    )["baseline"]["rank"]
    refused = [p for p, t in zip(harmful_r + benign_r, texts) if refusal.is_refusal(t)]
    answered = [p for p, t in zip(harmful_r + benign_r, texts) if not refusal.is_refusal(t)]
    if not refused or not answered:
        raise LenslabError(
            f"the model refused {len(refused)} and answered {len(answered)} of the ranking prompts; "
            "fTRI needs both behaviours (is this a model trained on lenslab.data.refusal?)"
        )
    harmful_t, _ = refusal.prompts(n_eval, "harmful", "test", seed=seed)
    benign_t, answers_t = refusal.prompts(n_eval, "benign", "test", seed=seed)
    return expert_switch_table(
        model,
        rank_target=refused,
        rank_other=answered,
        target=harmful_t,
        other=benign_t,
        capability=benign_t,
        capability_answers=answers_t,
        score=refusal.is_refusal,
        k=k,
        n_random=n_random,
        seed=seed,
        mode=mode,
        max_new_tokens=10,
        batch_size=batch_size,
        progress=progress,
    )
