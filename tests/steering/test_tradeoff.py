"""`steering.tradeoff` on zoo/steer-sentiment: the strength-0 rows are the unsteered model
(checked against `generate` and TransformerLens's own loss), and the methods move the concept
as benchmarks/steering_tradeoff.py measured across seeds (the file docs/steering.md includes), with
margins taken from that spread."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import steering
from lenslab._errors import LenslabError
from lenslab.data import sentiment as S
from lenslab.steering.tradeoff import TradeoffResult, standalone_perplexity, tradeoff

N_NEW = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return lenslab.load_model("zoo/steer-sentiment", device="cpu")


@pytest.fixture(scope="module")
def contrast():
    return S.prompts(32, "positive", seed=11), S.prompts(32, "negative", seed=12)


@pytest.fixture(scope="module")
def evalset():
    return S.prompts(24, "negative", seed=99)  # held out: neither the training stream nor the fit prompts


def test_standalone_perplexity_equals_transformer_lens_loss(model):
    text = " lovely . the morning is so lovely ."
    toks = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), model.to_tokens(text, prepend_bos=False)], 1)
    with torch.no_grad():
        ref = math.exp(float(model(toks, return_type="loss")))
    assert standalone_perplexity(model, [text]) == pytest.approx(ref, rel=1e-5)
    assert math.isnan(standalone_perplexity(model, ["", "  "]))


def test_strength_zero_is_the_unsteered_model(model, contrast, evalset):
    iv = steering.mean_difference(model, *contrast, layers=1)
    res = tradeoff(
        model, {"DiffMean": iv}, evalset[:8], S.is_positive, strengths=(0.0, 1.0), max_new_tokens=N_NEW, progress=False
    )
    base = [steering.generate(model, p, max_new_tokens=N_NEW) for p in evalset[:8]]
    row = res.row("DiffMean", 0)
    assert res.examples["DiffMean"]["0"] == base[:3]
    assert row["concept_rate"] == sum(map(S.is_positive, base)) / 8 == 0.0
    assert row["perplexity"] == pytest.approx(standalone_perplexity(model, base), rel=1e-6)
    assert row["units"] == model.cfg.d_model
    assert res.row("DiffMean", 1)["concept_rate"] >= 0.75  # the full vector flips negative contexts


@pytest.mark.slow
def test_methods_move_the_concept_as_the_benchmark_measured(model, load_benchmark):
    """Seed 0 of the benchmark, rerun: every (method, strength) lies within the committed spread across
    5 seeds (mean ± (2 std + one prompt)), reproduces the committed seed-0 row, and the claims of
    docs/steering.md hold with margins taken from that spread (mean - 2 std), not from one run."""
    bench = load_benchmark("steering_tradeoff")  # the test fits exactly the benchmark's methods
    measured = TradeoffResult.from_json(bench.RESULTS / "steering_tradeoff.json")
    assert measured.n_seeds() >= 5
    strengths = (0, 0.75, 1, 1.5)
    res = tradeoff(
        model,
        bench.methods(model, 0),
        bench.eval_set(0),
        S.is_positive,
        strengths=strengths,
        max_new_tokens=bench.MAX_NEW,
        progress=False,
    )
    one = 1 / bench.N_EVAL
    for m in res.methods():
        for s in strengths:
            got, band = res.row(m, s), measured.row(m, s)
            seed0 = measured.seed_row(m, s, 0)
            assert abs(got["concept_rate"] - band["concept_rate"]) <= 2 * band["concept_rate_std"] + one + 1e-9, (m, s)
            assert abs(got["concept_rate"] - seed0["concept_rate"]) <= one + 1e-9, (m, s, got, seed0)
            assert got["perplexity"] == pytest.approx(seed0["perplexity"], rel=0.05), (m, s)

    def low(m, s):  # the claim's margin: committed mean - 2 std
        r = measured.row(m, s)
        return r["concept_rate"] - 2 * r["concept_rate_std"]

    def high(m, s):
        r = measured.row(m, s)
        return r["concept_rate"] + 2 * r["concept_rate_std"]

    base = measured.row("LinEAS", 0)["perplexity"]
    # LinEAS at 1.5 reaches the concept on every seed
    assert low("LinEAS", 1.5) >= 0.9 and res.row("LinEAS", 1.5)["concept_rate"] >= low("LinEAS", 1.5)
    # DiffMean over all positions saturates the concept while fluency collapses
    assert low("DiffMean", 1.5) >= 0.99 and measured.row("DiffMean", 1.5)["perplexity"] > 1e4 * base
    assert res.row("DiffMean", 1.5)["perplexity"] > 1e4 * base
    # ActAdd moves a little and stays fluent
    assert low("ActAdd", 0.75) > 0 and measured.row("ActAdd", 0.75)["perplexity"] < 1.2 * base
    # prompt-only DiffMean and AUSteer at the residual stream barely move it
    assert high("DiffMean (prompt only)", 1.5) < 0.25 and high("AUSteer", 1) < 0.1
    # AUSteer on neurons: bimodal across seeds (the spread is the claim); seed 0 is a working one
    assert measured.row("AUSteer (neurons)", 1)["concept_rate_std"] > 0.3
    assert res.row("AUSteer (neurons)", 0.75)["concept_rate"] >= 0.9
    assert res.row("AUSteer (neurons)", 0.75)["perplexity"] < 1.2 * base


def test_result_round_trip_table_and_figure(model, contrast, evalset, tmp_path):
    from lenslab.figures import export

    iv = steering.mean_difference(model, *contrast, layers=1)
    res = tradeoff(
        model, {"DiffMean": iv}, evalset[:4], S.is_positive, strengths=(0, 1), max_new_tokens=4, progress=False
    )
    back = TradeoffResult.from_json(res.to_json())
    assert back.rows == res.rows
    md = res.to_markdown().splitlines()
    assert md[0].startswith("| method | strength") and len(md) == 2 + 2
    fig = res.figure()
    assert [round(y, 6) for y in fig.data[0].y] == [round(r["concept_rate"], 6) for r in res.rows]
    import xml.etree.ElementTree as ET

    ET.parse(export(res, tmp_path / "t.svg"))


def test_bad_input(model, contrast):
    iv = steering.mean_difference(model, *contrast, layers=1)
    with pytest.raises(LenslabError, match="interventions is empty"):
        tradeoff(model, {}, ["a"], S.is_positive)
    with pytest.raises(LenslabError, match="non-empty list"):
        tradeoff(model, {"x": iv}, "the day was", S.is_positive)
    with pytest.raises(LenslabError, match="not an Intervention"):
        tradeoff(model, {"x": "vector"}, ["the day was"], S.is_positive)
    one = tradeoff(model, {"x": iv}, ["the day was"], S.is_positive, strengths=(0,), max_new_tokens=2, progress=False)
    with pytest.raises(LenslabError, match="no row for method"):
        one.row("y", 0)
    with pytest.raises(LenslabError, match=r"no per-seed row for method 'x' at strength 0, seed 0"):
        one.seed_row("x", 0, 0)  # a single-run result has no per-seed rows
