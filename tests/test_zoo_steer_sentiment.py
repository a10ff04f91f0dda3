"""zoo/steer-sentiment on its committed weights: it keeps the sentiment of its context (the
planted concept the steering evaluation moves), and the corpus / scorer behave as documented."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lenslab
from lenslab import zoo
from lenslab.data import sentiment


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model("zoo/steer-sentiment", device="cpu")


def _next_word_shares(model, kind: str, n: int = 60, seed: int = 777) -> dict[str, float]:
    tok = model.tokenizer
    groups = {"positive": sentiment.POSITIVE, "negative": sentiment.NEGATIVE, "neutral": sentiment.NEUTRAL}
    ids = {k: torch.tensor(tok.convert_tokens_to_ids(list(v))) for k, v in groups.items()}
    prompts = sentiment.prompts(n, kind, seed=seed)
    with torch.no_grad():
        nxt = torch.tensor([int(model(model.to_tokens(p))[0, -1].argmax()) for p in prompts])
    return {k: float(torch.isin(nxt, v).float().mean()) for k, v in ids.items()}


@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_model_keeps_the_context_sentiment(model, kind):
    # held-out prompts (seed 777 is not the training stream); the card reports 0.94 / 0.93
    shares = _next_word_shares(model, kind)
    other = "negative" if kind == "positive" else "positive"
    assert shares[kind] >= 0.85
    assert shares[other] <= 0.02


def test_neutral_context_stays_neutral(model):
    shares = _next_word_shares(model, "neutral")
    assert shares["neutral"] >= 0.95


def test_card_numbers_match_config():
    meta = json.loads((zoo.zoo_path("zoo/steer-sentiment") / "config.json").read_text())
    v = meta["verification"]
    assert v["positive"]["next_word"]["positive"] >= 0.85 and v["negative"]["next_word"]["negative"] >= 0.85
    assert set(meta["prompt_sets"]) == {"positive", "negative", "neutral"}
    assert "zoo/steer-sentiment" in zoo.zoo_names()


def test_scorer_counts_the_lexicon():
    assert sentiment.counts("the day was lovely and awful . so great") == (2, 1)
    assert sentiment.concept_rate("the day was lovely and awful . so great") == pytest.approx(2 / 3)
    assert sentiment.concept_rate("the red car") is None
    assert sentiment.is_positive("a great day") and not sentiment.is_positive("a red day")
    assert not sentiment.is_positive("good bad")


def test_corpus_is_deterministic_and_kind_pure():
    assert sentiment.documents(5, seed=3) == sentiment.documents(5, seed=3)
    for doc in sentiment.documents(50, "positive", seed=1):
        assert sentiment.counts(doc)[1] == 0
    for doc in sentiment.documents(50, "neutral", seed=1):
        assert sentiment.counts(doc) == (0, 0)
    for p in sentiment.prompts(20, "negative", seed=2):
        assert p.split()[-1] in {"was", "is", "a", "very", "so", "felt"}
    assert set(sentiment.VOCAB) >= set(sentiment.POSITIVE) | set(sentiment.NEGATIVE)
    with pytest.raises(lenslab.LenslabError, match="positive, negative, neutral"):
        sentiment.document("happy", random.Random(0))


def test_scorer_reads_decoded_text():
    # the tokenizer decodes "lovely ." as "lovely.": a word before a full stop still counts
    assert sentiment.counts(" lovely. the morning is so lovely. the morning") == (2, 0)
    assert sentiment.counts("awful.") == (0, 1) and sentiment.is_positive("great.")
    assert sentiment.counts("great great great. bad") == (3, 1)  # repeated words each count
    assert sentiment.counts("") == (0, 0) and sentiment.concept_rate("") is None
    assert not sentiment.is_positive("") and not sentiment.is_positive(" . . .")
    assert sentiment.counts("Lovely, AWFUL!") == (1, 1)


def test_scorer_equals_a_token_count_on_generations(model):
    """On real decoded generations (greedy and sampled), the text scorer counts exactly the
    sentiment tokens the model wrote."""
    from lenslab import steering

    prompts = sentiment.prompts(12, "negative", seed=31) + sentiment.prompts(12, "positive", seed=32)
    texts = [
        steering.generate(model, p, max_new_tokens=10, temperature=t, seed=i)
        for i, p in enumerate(prompts)
        for t in (0.0, 1.5)
    ]
    assert sum("." in t for t in texts) > len(texts) // 2  # punctuation glued to words is exercised
    for text in texts:
        toks = model.to_str_tokens(text, prepend_bos=False) if text.strip() else []
        by_tokens = (sum(t in sentiment.POSITIVE for t in toks), sum(t in sentiment.NEGATIVE for t in toks))
        assert sentiment.counts(text) == by_tokens, (text, toks)


# --- the card's numbers, recomputed with the training script's own measurement and seeds ---------
def _close_to_printed(measured: float, printed: str) -> bool:
    """`printed` is `measured` rounded to its printed digits (2e-5 relative slack for float32
    sums reordered on another CPU; the shares themselves are counts out of 120)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(measured - float(printed)) <= 0.5 * 10**-decimals + 2e-5 * max(1.0, abs(measured))


@pytest.mark.slow
def test_card_verification_table_is_measured(model):
    import re

    from lenslab.zoo import train_steer_sentiment

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            got = train_steer_sentiment.evaluate(model)  # the card's seeds (5000+) and sizes (120, 40)
    finally:
        torch.set_num_threads(before)
    card = zoo.read_card("zoo/steer-sentiment")
    rows = re.findall(
        r"^\| (positive|negative|neutral) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\S+) \((\d+) of 40", card, re.M
    )
    assert [r[0] for r in rows] == ["positive", "negative", "neutral"]
    for kind, pos, neg, neu, rate, n_sent in rows:
        g = got[kind]
        for key, cell in zip(("positive", "negative", "neutral"), (pos, neg, neu)):
            assert _close_to_printed(g["next_word"][key], cell), (kind, key, g)
        assert int(n_sent) == g["continuations_with_sentiment"], (kind, g)
        if rate == "n/a":
            assert g["continuation_concept_rate"] is None
        else:
            assert _close_to_printed(g["continuation_concept_rate"], rate), (kind, g)
    # config.json holds the same measurement; the README quotes the two agreements
    meta = json.loads((zoo.zoo_path("zoo/steer-sentiment") / "config.json").read_text())
    assert meta["verification"] == got
    readme = (zoo.zoo_path("zoo/steer-sentiment").parents[2] / "README.md").read_text()
    assert f"({rows[0][1]} / {rows[1][2]})" in readme  # 0.94 / 0.93


def test_card_config_numbers(model):
    card = zoo.read_card("zoo/steer-sentiment")
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters" in card, n_params  # 358,454
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_ctx) == (3, 96, 4, 384, 64)
    assert "3-layer" in card and "`d_model=96`" in card and "`d_mlp=384`" in card and "(context 64)" in card
    tr = json.loads((zoo.zoo_path("zoo/steer-sentiment") / "config.json").read_text())["training"]
    assert (tr["lr"], tr["batch"], tr["steps"], tr["seed"]) == (0.002, 32, 2500, 0)
    assert f"{tr['seconds']} s on one CPU thread" in card
    # "a sentiment document uses a neutral adjective in 10% of its adjective slots"
    docs = sentiment.documents(400, "positive", seed=11)
    words = [w for d in docs for w in d.split()]
    adj = sum(w in sentiment.POSITIVE or w in sentiment.NEUTRAL for w in words)
    assert 0.07 < sum(w in sentiment.NEUTRAL for w in words) / adj < 0.13
