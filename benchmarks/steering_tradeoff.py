"""The steering evaluation table of docs/steering.md: concept rate against fluency on zoo/steer-sentiment.

    python benchmarks/steering_tradeoff.py [--out docs/img/steering_tradeoff.png] [--json FILE]

Fits every method on 32 positive and 32 negative contexts (`lenslab._sentiment.prompts`, seeds 11
and 12), then steers 40 held-out negative contexts (seed 99) towards positive at several strengths
(greedy, 10 new tokens) and prints the markdown table (`steering.tradeoff`). About 2 minutes on
one CPU thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lenslab
from lenslab import _sentiment as S
from lenslab import steering
from lenslab.figures import export
from lenslab.steering.tradeoff import tradeoff

STRENGTHS = (0, 0.5, 0.75, 1, 1.5, 2)


def methods(model) -> dict:
    pos, neg = S.prompts(32, "positive", seed=11), S.prompts(32, "negative", seed=12)
    return {
        "DiffMean": steering.mean_difference(model, pos, neg, layers=1),
        "DiffMean (prompt only)": steering.mean_difference(model, pos, neg, layers=1, positions="prompt"),
        "ActAdd": steering.actadd(model, "the day was lovely .", "the day was awful .", layer=1),
        "AUSteer": steering.austeer(model, pos, neg, k=16, alpha=10.0),
        "AUSteer (neurons)": steering.austeer(model, pos, neg, k=16, alpha=20.0, site="neurons"),
        "LinEAS": steering.fit_lineas(model, neg, pos, config=steering.LineasConfig(steps=300, lr=1e-2, progress=False)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/img/steering_tradeoff.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    res = tradeoff(model, methods(model), S.prompts(40, "negative", seed=99), S.is_positive, strengths=STRENGTHS,
                   max_new_tokens=10, progress=False)
    print(res.to_markdown())
    base = res.rows[0]["perplexity"]
    print(f"\nbest concept rate with perplexity <= 2x the unsteered {base:.1f}:")
    for m, r in res.best(2 * base).items():
        print(f"- {m}: {r['concept_rate']:.2f} at strength {r['strength']:g} (perplexity {r['perplexity']:.1f})")
    print(f"wrote {export(res, Path(args.out))}")
    if args.json:
        res.to_json(args.json)


if __name__ == "__main__":
    main()
