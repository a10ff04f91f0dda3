"""Probe directions against DiffMean on zoo/steer-sentiment (docs/probes.md), across seeds.

    python benchmarks/probe_steering.py [--seeds 0 1 2 3 4]   # about 1 minute a seed on one CPU thread

Seed `s` uses the steering evaluation's sets (`lenslab.data.sentiment.seeded_sets(s)`: 32 positive and
32 negative fitting contexts, 40 held-out negative contexts) and, for projecting out, 40 held-out
positive contexts (`sentiment.prompts(40, "positive", seed=98 + 100 s)`). At layer 1 `hook_resid_post`,
read at the last token:

- DiffMean (`steering.mean_difference`), the baseline;
- Probe (C = c) for c in 1 (scikit-learn's default), 0.1, 0.01: a logistic probe trained on the same
  64 contexts (`steering.probe_steering`), its unit direction added with length = the class means'
  separation along it (`scale="means"`).

Three measurements: (1) steering negative contexts towards positive across strengths (concept rate
against perplexity; `tradeoff_seeds`) and the best concept rate within 2x the unsteered perplexity;
(2) the directions themselves: cosine with DiffMean's vector and held-out probe accuracy (a probe
trained with the same C on 3/4 of the fitting prompts, tested on the rest); (3) each direction
projected out (strength 1) on positive contexts: how much of their positive continuation is left.

Writes benchmarks/results/probe_steering.{md,json} (docs/probes.md includes the Markdown verbatim)
and docs/img/probe_steering.png. One CPU thread, deterministic.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import lenslab
from lenslab import steering
from lenslab.data import sentiment as S
from lenslab.figures import export
from lenslab.probes.linear import train_probes
from lenslab.steering import Edit, Intervention
from lenslab.steering.tradeoff import tradeoff_seeds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
CS = (1.0, 0.1, 0.01)
STRENGTHS = (0, 0.5, 0.75, 1, 1.5, 2, 3)
N_EVAL = 40
MAX_NEW = 10
PPL_BUDGET = 2.0


def fit_set(seed: int) -> tuple[list[str], list[str]]:
    return S.seeded_sets(seed, n_eval=0)[:2]


def eval_set(seed: int) -> list[str]:
    return S.seeded_sets(seed, n_fit=0, n_eval=N_EVAL)[2]


def positive_set(seed: int) -> list[str]:
    return S.prompts(N_EVAL, "positive", seed=98 + 100 * seed)


def probe_name(c: float) -> str:
    return f"Probe (C = {c:g})"


def methods(model, seed: int) -> dict[str, Intervention]:
    pos, neg = fit_set(seed)
    out = {"DiffMean": steering.mean_difference(model, pos, neg, layers=LAYER)}
    for c in CS:
        out[probe_name(c)] = steering.probe_steering(model, pos, neg, layers=LAYER, C=c)
    return out


def projections(model, seed: int) -> dict[str, Intervention]:
    """Each method's direction projected out at its hook (DiffMean's: the direction of its vector)."""
    out = {}
    for name, iv in methods(model, seed).items():
        (e,) = iv.edits
        out[name] = Intervention(edits=(Edit(hook=e.hook, op="project", vector=e.vector),), name=f"{name} out")
    return out


def directions(model, seed: int) -> dict[str, dict]:
    """Per method: cosine with DiffMean's vector, and (probes) held-out accuracy of a probe trained with its C."""
    ivs = methods(model, seed)
    dm = ivs["DiffMean"].edits[0].vector
    pos, neg = fit_set(seed)
    out = {}
    for name, iv in ivs.items():
        v = iv.edits[0].vector
        row = {"cosine": float(v @ dm / (v.norm() * dm.norm())), "norm": float(v.norm())}
        if name != "DiffMean":
            c = float(iv.provenance["C"])
            res = train_probes(
                model, pos + neg, ["positive"] * len(pos) + ["negative"] * len(neg), site=HOOK, C=c, seed=seed
            )
            row.update(test_accuracy=res.rows[0]["test"], control_test=res.rows[0]["control_test"])
        out[name] = row
    return out


def best_within(res, budget: float = PPL_BUDGET) -> dict[str, dict]:
    """Per method: per seed the best concept rate with perplexity <= budget x the unsteered one; mean ± std
    (`TradeoffResult.best_within`)."""
    return res.best_within(budget)


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def run(model, seeds: list[int]) -> None:
    kw = dict(seeds=seeds, max_new_tokens=MAX_NEW, progress=True)
    add = tradeoff_seeds(model, lambda s: methods(model, s), eval_set, S.is_positive, strengths=STRENGTHS, **kw)
    out = tradeoff_seeds(model, lambda s: projections(model, s), positive_set, S.is_positive, strengths=(0, 1), **kw)
    dirs = {s: directions(model, s) for s in seeds}
    add.to_json(RESULTS / "probe_steering.json")
    out.to_json(RESULTS / "probe_projection.json")
    (RESULTS / "probe_directions.json").write_text(json.dumps({str(s): d for s, d in dirs.items()}, indent=1) + "\n")
    export(add, IMG / "probe_steering.png")
    best = best_within(add)
    base = add.row("DiffMean", 0)
    seed_list = ", ".join(map(str, seeds))
    lines = [
        f"Seeds {seed_list}; layer {LAYER} `hook_resid_post`, fitted on each seed's 32 + 32 contexts, steering its "
        f"{N_EVAL} held-out negative contexts towards positive (greedy, {MAX_NEW} new tokens); mean ± std across "
        "seeds. Generated by `python benchmarks/probe_steering.py`.",
        "",
        "| direction | cosine with DiffMean | held-out probe accuracy | control task (test) | length at strength 1 |",
        "|---|---|---|---|---|",
    ]
    for m in add.methods():
        d = [dirs[s][m] for s in seeds]
        acc = mean_std([x["test_accuracy"] for x in d]) if m != "DiffMean" else "n/a"
        ctl = mean_std([x["control_test"] for x in d]) if m != "DiffMean" else "n/a"
        lines.append(
            f"| {m} | {mean_std([x['cosine'] for x in d])} | {acc} | {ctl} | {mean_std([x['norm'] for x in d])} |"
        )
    lines += [
        "",
        f"Best concept rate with the perplexity at most {PPL_BUDGET:g}x the unsteered ({base['perplexity']:.1f} ± "
        f"{base['perplexity_std']:.1f}), chosen per seed, then mean ± std across seeds:",
        "",
        "| method | concept rate | per seed | strengths chosen | perplexity / unsteered |",
        "|---|---|---|---|---|",
    ]
    for m in add.methods():
        b = best[m]
        lines.append(
            f"| {m} | {b['rate']:.2f} ± {b['std']:.2f} | {', '.join(f'{r:.2f}' for r in b['rates'])} | "
            f"{', '.join(f'{s:g}' for s in b['strengths'])} | {b['ppl_ratio']:.2f} |"
        )
    lines += ["", "Every strength:", "", add.to_markdown(), ""]
    lines += [
        f"Projected out (strength 1) on {N_EVAL} held-out *positive* contexts per seed: the share of continuations "
        "that stay positive (strength 0 is the unsteered model):",
        "",
        "| direction removed | positive, unsteered | positive, projected out | perplexity, unsteered | perplexity, projected out |",
        "|---|---|---|---|---|",
    ]
    for m in out.methods():
        r0, r1 = out.row(m, 0), out.row(m, 1)
        lines.append(
            f"| {m} | {r0['concept_rate']:.2f} ± {r0['concept_rate_std']:.2f} | {r1['concept_rate']:.2f} ± "
            f"{r1['concept_rate_std']:.2f} | {r0['perplexity']:.3g} | {r1['perplexity']:.3g} |"
        )
    (RESULTS / "probe_steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run(lenslab.load_model("zoo/steer-sentiment", device="cpu"), args.seeds)


if __name__ == "__main__":
    main()
