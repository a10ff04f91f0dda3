"""`steering.tradeoff` on zoo/steer-sentiment: the strength-0 rows are the unsteered model
(checked against `generate` and TransformerLens's own loss), and the methods move the concept
by the margins docs/steering.md reports, within stated fluency bounds."""
from __future__ import annotations

import math

import pytest
import torch

import lenslab
from lenslab import _sentiment as S
from lenslab import steering
from lenslab._errors import LenslabError
from lenslab.steering.tradeoff import TradeoffResult, standalone_perplexity, tradeoff

N_NEW = 8


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
    res = tradeoff(model, {"DiffMean": iv}, evalset[:8], S.is_positive, strengths=(0.0, 1.0), max_new_tokens=N_NEW,
                   progress=False)
    base = [steering.generate(model, p, max_new_tokens=N_NEW) for p in evalset[:8]]
    row = res.row("DiffMean", 0)
    assert res.examples["DiffMean"]["0"] == base[:3]
    assert row["concept_rate"] == sum(map(S.is_positive, base)) / 8 == 0.0
    assert row["perplexity"] == pytest.approx(standalone_perplexity(model, base), rel=1e-6)
    assert row["units"] == model.cfg.d_model
    assert res.row("DiffMean", 1)["concept_rate"] >= 0.75  # the full vector flips negative contexts


def test_methods_move_the_concept_within_fluency_bounds(model, contrast, evalset):
    pos, neg = contrast
    ivs = {
        "DiffMean": steering.mean_difference(model, pos, neg, layers=1),
        "DiffMean (prompt)": steering.mean_difference(model, pos, neg, layers=1, positions="prompt"),
        "ActAdd": steering.actadd(model, "the day was lovely .", "the day was awful .", layer=1),
        "AUSteer (neurons)": steering.austeer(model, pos, neg, k=16, alpha=20.0, site="neurons"),
        "LinEAS": steering.fit_lineas(model, neg, pos, config=steering.LineasConfig(steps=300, lr=1e-2, progress=False)),
    }
    res = tradeoff(model, ivs, evalset, S.is_positive, strengths=(0, 0.75, 1, 1.5), max_new_tokens=N_NEW,
                   progress=False)
    base_ppl = res.row("LinEAS", 0)["perplexity"]
    # (method, strength): concept rate at least this, perplexity at most this x the unsteered one
    # (measured on 40 prompts and 10 tokens for docs/steering.md: 0.33 / 1.6x, 0.53 / 2.2x, 0.15 / 1.1x,
    # 0.62 / 1.1x, 0.68 / 1.7x)
    for method, s, rate, ppl in [("DiffMean", 0.75, 0.15, 2.5), ("DiffMean (prompt)", 1, 0.15, 3.0),
                                 ("ActAdd", 0.75, 0.04, 1.5), ("AUSteer (neurons)", 1, 0.3, 1.5), ("LinEAS", 1.5, 0.4, 2.5)]:
        row = res.row(method, s)
        assert row["concept_rate"] >= rate, (method, row)
        assert row["perplexity"] <= ppl * base_ppl, (method, row)
    # past that, DiffMean over all positions degenerates: concept saturates, fluency collapses
    assert res.row("DiffMean", 1.5)["concept_rate"] >= 0.9 and res.row("DiffMean", 1.5)["perplexity"] > 100 * base_ppl
    best = res.best(2.5 * base_ppl)
    assert best["LinEAS"]["concept_rate"] >= best["DiffMean"]["concept_rate"]


def test_result_round_trip_table_and_figure(model, contrast, evalset, tmp_path):
    from lenslab.figures import export

    iv = steering.mean_difference(model, *contrast, layers=1)
    res = tradeoff(model, {"DiffMean": iv}, evalset[:4], S.is_positive, strengths=(0, 1), max_new_tokens=4, progress=False)
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
    with pytest.raises(LenslabError, match="no row for method"):
        tradeoff(model, {"x": iv}, ["the day was"], S.is_positive, strengths=(0,), max_new_tokens=2,
                 progress=False).row("y", 0)
