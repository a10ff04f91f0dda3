"""A procedural review language with a steerable concept: sentiment.

Each document is 3-6 short sentences about everyday things ("the movie was lovely .",
"what a gloomy trip ."). A document is positive, negative or neutral: its adjectives come from
the positive lexicon, the negative lexicon or a neutral one (colours, sizes), with a 10% chance
per slot of a neutral adjective in a sentiment document. A model trained on it learns to keep
the sentiment of the context, so the concept ("positive sentiment") is present or absent in its
continuations, and a lexicon scores that offline:

- `concept_rate(text)`: the share of sentiment words in `text` that are positive (None when it
  has none); `is_positive(text)`: at least one sentiment word, and more positive than negative.
- `documents(n, kind, seed)`: training / evaluation text; `prompts(n, kind, seed)`: a context of
  1-2 sentences plus the start of the next sentence, ending right before an adjective slot.

Held-out evaluation uses `seed`s other than the training seed; the training script draws its
documents from `random.Random(seed)`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lenslab._errors import LenslabError, did_you_mean

POSITIVE = (
    "good",
    "great",
    "lovely",
    "happy",
    "wonderful",
    "bright",
    "pleasant",
    "nice",
    "warm",
    "joyful",
    "sweet",
    "fresh",
    "kind",
    "cheerful",
    "perfect",
    "delightful",
)
NEGATIVE = (
    "bad",
    "awful",
    "sad",
    "terrible",
    "dark",
    "boring",
    "cold",
    "ugly",
    "dull",
    "bitter",
    "rude",
    "grim",
    "nasty",
    "gloomy",
    "horrible",
    "miserable",
)
NEUTRAL = ("red", "blue", "green", "big", "small", "old", "new", "long", "short", "round", "tall", "wooden")
NOUNS = (
    "movie",
    "day",
    "trip",
    "meal",
    "book",
    "song",
    "room",
    "party",
    "game",
    "walk",
    "garden",
    "city",
    "house",
    "morning",
    "evening",
    "lesson",
    "show",
    "dinner",
    "coffee",
    "street",
    "class",
    "story",
    "car",
    "weekend",
)
FUNCTION = ("the", "was", "is", "i", "felt", "about", "my", "and", "what", "a", "it", "so", "very", ".")
VOCAB = tuple(dict.fromkeys(FUNCTION + NOUNS + POSITIVE + NEGATIVE + NEUTRAL))
KINDS = ("positive", "negative", "neutral")
_WORD = re.compile(r"[a-z]+")

# templates: {n} a noun, {a} an adjective slot
TEMPLATES = (
    "the {n} was {a} .",
    "my {n} is {a} and {a} .",
    "i felt {a} about the {n} .",
    "what a {a} {n} .",
    "it was a very {a} {n} .",
    "the {n} is so {a} .",
)
# prompt stems end right before an adjective slot
STEMS = ("the {n} was", "my {n} is", "what a", "it was a very", "the {n} is so", "i felt")


def _adjective(kind: str, rng: random.Random) -> str:
    if kind == "neutral" or rng.random() < 0.1:
        return rng.choice(NEUTRAL)
    return rng.choice(POSITIVE if kind == "positive" else NEGATIVE)


def _sentence(kind: str, rng: random.Random) -> str:
    t = rng.choice(TEMPLATES)
    out = []
    for w in t.split():
        out.append(rng.choice(NOUNS) if w == "{n}" else _adjective(kind, rng) if w == "{a}" else w)
    return " ".join(out)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LenslabError(f"kind {kind!r} is not one of {', '.join(KINDS)}{did_you_mean(kind, KINDS)}")


def document(kind: str, rng: random.Random, n_sentences: tuple[int, int] = (3, 6)) -> str:
    """One document of `kind` ("positive", "negative" or "neutral")."""
    _check_kind(kind)
    return " ".join(_sentence(kind, rng) for _ in range(rng.randint(*n_sentences)))


def documents(n: int, kind: str | None = None, seed: int = 0) -> list[str]:
    """`n` documents, of `kind` or (None) of a uniformly random kind each."""
    rng = random.Random(seed)
    return [document(kind or rng.choice(KINDS), rng) for _ in range(n)]


def prompts(n: int, kind: str = "negative", seed: int = 1000) -> list[str]:
    """`n` prompts: 1-2 sentences of `kind`, then a stem that ends before an adjective slot,
    e.g. "the day was awful . the movie was"."""
    _check_kind(kind)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        context = document(kind, rng, (1, 2))
        stem = rng.choice(STEMS).replace("{n}", rng.choice(NOUNS))
        out.append(f"{context} {stem}")
    return out


def words(text: str) -> list[str]:
    """The lower-case words of `text`, read the way the zoo tokenizer decodes them.

    The tokenizer's decoder glues punctuation to the word before it ("lovely ." decodes as
    "lovely."), so splitting on spaces would miss every sentiment word before a full stop: words
    are the maximal runs of letters, which is exactly the word-level tokens of this language.
    """
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Lexicon:
    """A sentiment lexicon and the one scoring rule of lenslab's steering evaluations: the `words` of a
    text (maximal runs of letters), counted against the positive and the negative word sets.
    `lenslab.data.sentiment` and `lenslab.data.english` each bind theirs (`LEXICON`)."""

    positive: frozenset[str]
    negative: frozenset[str]

    def counts(self, text: str) -> tuple[int, int]:
        """(positive words, negative words) in `text` (decoded model output or raw text alike)."""
        ws = words(text)
        return sum(w in self.positive for w in ws), sum(w in self.negative for w in ws)

    def concept_rate(self, text: str) -> float | None:
        """Share of the sentiment words in `text` that are positive; None when there are none."""
        pos, neg = self.counts(text)
        return None if pos + neg == 0 else pos / (pos + neg)

    def is_positive(self, text: str) -> bool:
        """True when `text` has a sentiment word and more positive than negative ones."""
        pos, neg = self.counts(text)
        return pos > neg


LEXICON = Lexicon(frozenset(POSITIVE), frozenset(NEGATIVE))


def counts(text: str) -> tuple[int, int]:
    """(positive words, negative words) in `text` (decoded model output or raw text alike)."""
    return LEXICON.counts(text)


def concept_rate(text: str) -> float | None:
    """Share of the sentiment words in `text` that are positive; None when there are none."""
    return LEXICON.concept_rate(text)


def is_positive(text: str) -> bool:
    """True when `text` has a sentiment word and more positive than negative ones."""
    return LEXICON.is_positive(text)


def seeded_sets(seed: int, n_fit: int = 32, n_eval: int = 40) -> tuple[list[str], list[str], list[str]]:
    """One seed of the steering evaluation: (positive fitting prompts, negative fitting prompts,
    negative held-out evaluation prompts), drawn with `prompts` seeds 11 + 100 s, 12 + 100 s and
    99 + 100 s (seed 0 is the set docs/steering.md used before it reported spreads). Every seed
    is disjoint from the training stream and the prompt sets in the model's config."""
    s = 100 * int(seed)
    return (
        prompts(n_fit, "positive", seed=11 + s),
        prompts(n_fit, "negative", seed=12 + s),
        prompts(n_eval, "negative", seed=99 + s),
    )
