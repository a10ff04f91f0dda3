"""Steering zoo/english-4l towards positive sentiment, scored with `lenslab.data.english`: seed 0 of
`python benchmarks/steering_tradeoff.py english` (the table docs/steering.md includes), rerun and
compared with the committed rows; and `lenslab steer eval` picks the English scorer and prompt sets
for this model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lenslab
from lenslab.cli import main
from lenslab.data import english as E
from lenslab.steering.tradeoff import TradeoffResult, tradeoff

MODEL = "zoo/english-4l"
ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0, 1, 2)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return lenslab.load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    """benchmarks/steering_tradeoff.py: the test fits exactly the benchmark's methods."""
    return load_benchmark("steering_tradeoff")


@pytest.fixture(scope="module")
def measured(bench):
    return TradeoffResult.from_json(bench.RESULTS / "steering_english.json")


@pytest.fixture(scope="module")
def result(model, bench):
    held = E.seeded_sets(0, n_fit=0, n_eval=bench.N_EVAL)[2]
    return tradeoff(
        model,
        bench.english_methods(model, 0),
        held,
        E.is_positive,
        strengths=STRENGTHS,
        max_new_tokens=bench.MAX_NEW,
        progress=False,
    )


def test_seed0_reproduces_the_committed_benchmark(result, measured, bench):
    """Every (method, strength) of seed 0 equals the committed seed-0 row (one prompt of slack for
    the concept rate, 5% for the perplexity: other CPUs round differently)."""
    assert measured.n_seeds() >= 5
    one = 1 / bench.N_EVAL
    for m in result.methods():
        for s in STRENGTHS:
            got = result.row(m, s)
            seed0 = measured.seed_row(m, s, 0)
            assert abs(got["concept_rate"] - seed0["concept_rate"]) <= one + 1e-9, (m, s, got, seed0)
            assert got["perplexity"] == pytest.approx(seed0["perplexity"], rel=0.05), (m, s)
    for m in result.methods():  # strength 0 is the unsteered model for every method
        assert result.row(m, 0)["concept_rate"] == result.row("DiffMean", 0)["concept_rate"]


def test_steering_moves_the_english_concept(measured):
    """The claims of docs/steering.md ("On zoo/english-4l"), read from the committed 5-seed benchmark."""

    def rate(m, s, seed=None):
        if seed is None:
            return measured.row(m, s)["concept_rate"]
        return measured.seed_row(m, s, seed)["concept_rate"]

    def ppl(m, s):
        return measured.row(m, s)["perplexity"]

    seeds = sorted({r["seed"] for r in measured.per_seed})
    unsteered = rate("DiffMean", 0)
    assert 0.15 < unsteered < 0.4  # stock continuations ("a good man") count as positive
    # DiffMean and its prompt-only variant do not move the concept at any strength (within the seeds' spread)
    for m in ("DiffMean", "DiffMean (prompt only)"):
        assert all(abs(rate(m, s) - unsteered) <= 0.05 for s in (1, 2, 4, 8)), m
    # ActAdd lowers it, on every seed, and the text gets more repetitive (lower perplexity), not kinder
    assert all(rate("ActAdd", 8, s) < rate("ActAdd", 0, s) for s in seeds)
    assert rate("ActAdd", 8) < unsteered - 0.15 and ppl("ActAdd", 2) < ppl("ActAdd", 0)
    # AUSteer on neurons breaks the text before it moves the concept
    assert ppl("AUSteer (neurons)", 1) > 2 * ppl("AUSteer (neurons)", 0)
    assert rate("AUSteer (neurons)", 1) <= unsteered


def test_cli_eval_uses_the_english_scorer_and_sets(tmp_path, result, capsys, bench):
    out = tmp_path / "english.json"
    argv = [
        "steer",
        "eval",
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--method",
        "diffmean",
        "--layer",
        str(bench.EN_LAYER),
    ]
    argv += ["--n-fit", "32", "--n-eval", str(bench.N_EVAL), "--strengths", "0", "1"]
    argv += ["--max-new-tokens", str(bench.MAX_NEW), "--seeds", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    cli = TradeoffResult.from_json(out)
    for s in (0, 1):
        assert cli.row("diffmean", s)["concept_rate"] == result.row("DiffMean", s)["concept_rate"]
        assert cli.row("diffmean", s)["perplexity"] == pytest.approx(result.row("DiffMean", s)["perplexity"], rel=1e-5)
    assert cli.provenance["prompts"] == E.seeded_sets(0, 0, bench.N_EVAL)[2]
