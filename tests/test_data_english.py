"""lenslab.data.english: the English sentiment lexicon, its scorer (same semantics as
lenslab.data.sentiment's corrected one), the prompt sets and the per-model choice of scorer."""

from __future__ import annotations

import pytest

from lenslab._errors import LenslabError
from lenslab.data import english, sentiment, sentiment_data


def test_lexicon_is_small_disjoint_and_covers_the_prompt_adjectives():
    assert 40 <= len(english.POSITIVE) <= 80 and 40 <= len(english.NEGATIVE) <= 80
    assert len(set(english.POSITIVE)) == len(english.POSITIVE) and len(set(english.NEGATIVE)) == len(english.NEGATIVE)
    assert not set(english.POSITIVE) & set(english.NEGATIVE)
    assert all(w.isalpha() and w.islower() for w in english.POSITIVE + english.NEGATIVE)
    assert set(english.ADJECTIVES["positive"]) <= set(english.POSITIVE)
    assert set(english.ADJECTIVES["negative"]) <= set(english.NEGATIVE)
    assert not set(english.ADJECTIVES["neutral"]) & set(english.POSITIVE + english.NEGATIVE)
    assert {"love", "loved", "loves", "loving"} <= set(english.POSITIVE)  # inflections are counted


def test_words_are_letter_runs_so_decoded_punctuation_never_hides_a_word():
    assert english.words("Awful, awful... AWFUL!") == ["awful", "awful", "awful"]
    assert english.words("I felt happy.The end") == ["i", "felt", "happy", "the", "end"]
    assert english.words("don't") == ["don", "t"]
    # the decoder glues punctuation to the word before it: a space split would miss these
    assert english.counts("so happy!") == (1, 0) and "happy!" not in english.POSITIVE
    assert english.counts("it was awful.") == (0, 1)
    assert english.counts('"lovely," she said; "terrible"') == (1, 1)
    assert english.counts("I loved it, but the ending was awful... awful!") == (1, 2)


def test_concept_rate_and_is_positive_on_crafted_strings():
    assert english.concept_rate("a wonderful, happy day.") == 1.0
    assert english.concept_rate("a wonderful day, a terrible night, a sad end.") == pytest.approx(1 / 3)
    assert english.concept_rate("the old wooden house was red.") is None
    assert english.concept_rate("") is None
    assert english.is_positive("What a wonderful, happy day.")
    assert not english.is_positive("good and bad")  # a tie is not positive
    assert not english.is_positive("the old house.")  # no sentiment word
    assert not english.is_positive("Miserable, cold, lonely. But kind.")  # "kind" is left out (kind of)
    # words only: substrings of longer words do not count
    assert english.counts("goodbye, badger, hopeless") == (0, 0)


def test_prompts_are_deterministic_by_seed_and_of_their_kind():
    a = english.prompts(12, "negative", seed=5)
    assert a == english.prompts(12, "negative", seed=5)
    assert a != english.prompts(12, "negative", seed=6)
    assert english.prompts(4, "negative", seed=5) == a[:4]  # a longer list starts with the shorter one
    assert len(set(a)) == 12
    for kind, want in (("positive", (True, False)), ("negative", (False, True)), ("neutral", (False, False))):
        for p in english.prompts(16, kind, seed=3):
            pos, neg = english.counts(p)
            assert (pos > 0, neg > 0) == want, (kind, p)
    # one seed gives parallel prompts of every kind: same template and nouns, other adjectives
    assert english.prompts(3, "positive", seed=7)[0].split()[:2] == english.prompts(3, "neutral", seed=7)[0].split()[:2]
    assert english.prompts(2, "negative", seed=0) == [
        "The story was terrible, the garden was sad, and I was",
        "The story was disgusting. I think the morning will be",
    ]
    assert all(" a a" not in p and " a e" not in p and " a o" not in p for p in english.prompts(64, "neutral"))
    with pytest.raises(LenslabError, match="kind 'negativ' is not one of"):
        english.prompts(2, "negativ")


def test_prompt_sets_and_seeded_sets_are_disjoint():
    sets = english.prompt_sets()
    assert list(sets) == ["positive", "negative", "neutral"] and all(len(v) == 8 for v in sets.values())
    assert sets == english.prompt_sets()
    assert sets["negative"][0] == "It was an awful book, and I felt so"
    for seed in (0, 1, 2):
        pos, neg, held = english.seeded_sets(seed, 32, 40)
        assert (len(pos), len(neg), len(held)) == (32, 32, 40)
        assert not set(neg) & set(held) and not set(held) & set(sets["negative"])
        assert not set(pos) & set(sets["positive"]) and not set(neg) & set(sets["negative"])
        assert english.seeded_sets(seed, 0, 40)[2] == held  # the held-out set alone is the same list
        assert english.seeded_sets(seed, 8, 0)[1] == neg[:8]
    assert english.seeded_sets(0)[2] != english.seeded_sets(1)[2]


def test_fitting_sets_are_paired_and_differ_only_in_their_adjectives():
    pos, neg, _ = english.seeded_sets(1, 64, 0)
    assert (
        pos[0] == "After such a nice garden, the whole world seemed"
        and neg[0] == "After such an ugly garden, the whole world seemed"
    )

    def rest(text, kind):
        return [w for w in english.words(text) if w not in english.ADJECTIVES[kind] and w not in ("a", "an")]

    assert all(rest(p, "positive") == rest(n, "negative") for p, n in zip(pos, neg))
    assert all(english.counts(p)[0] >= 1 and english.counts(n)[1] >= 1 for p, n in zip(pos, neg))


def test_each_model_gets_its_own_scorer():
    assert sentiment_data("zoo/english-4l") is english
    assert sentiment_data("zoo/steer-sentiment") is sentiment and sentiment_data("gpt2") is sentiment
    # the two lexicons disagree on real English: the review language knows neither "loved" nor "tears"
    text = "She loved it and laughed, then tears."
    assert english.counts(text) == (2, 1) and sentiment.counts(text) == (0, 0)
