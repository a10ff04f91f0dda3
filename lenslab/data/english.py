"""English sentiment for `zoo/english-4l`: a small lexicon, its scorer and English prompt sets.

zoo/english-4l reads real English (Debian `fortunes` and WordNet glosses), so its steering concept
("positive sentiment") is scored with a small **hand-written English lexicon**: `POSITIVE` and
`NEGATIVE` below, common evaluative words with the inflections worth counting (love, loved,
loves, loving; happy, happier, happiness, ...). The words were picked by hand and kept only when
they occur in the model's training text (each appears at least about ten times in fortunes +
WordNet 3.0), leaving out the ambiguous ones ("kind" as in "kind of", "fine" as a penalty, "free",
"rich", "poor", "dark", "dead"), which mark a topic more than a sentiment. Nothing here reads the
corpus at run time: the lexicon is these tuples.

The scorer is `lenslab.data.sentiment`'s (the corrected one; `Lexicon`) on this lexicon:

- `words(text)`: the maximal runs of letters, lower-cased, so punctuation the decoder glues to a
  word ("awful," "happy!") never hides it;
- `counts(text)`: (positive words, negative words); `concept_rate(text)`: the share of sentiment
  words that are positive, None when there are none; `is_positive(text)`: at least one sentiment
  word and more positive than negative ones.

Prompts are short English contexts that end right before a likely evaluative continuation
("The dinner was awful and the weather was grim, so I felt"), generated deterministically from
`TEMPLATES` x `NOUNS` x the adjectives of a kind (`ADJECTIVES`): `prompts(n, kind, seed)`,
`prompt_sets()` (the sets in english-4l's config.json) and `seeded_sets(seed, n_fit, n_eval)`
(fitting and held-out evaluation sets for one seed of a steering evaluation, disjoint from each
other and from `prompt_sets()`).

>>> from lenslab.data import english
>>> english.counts("I loved it, but the ending was awful... awful!")
(1, 2)
>>> english.is_positive("What a wonderful, happy day.")
True
"""

from __future__ import annotations

import random
import re

from lenslab._errors import LenslabError, did_you_mean
from lenslab.data.sentiment import Lexicon, words  # noqa: F401 (words: part of this module's API, the same rule)

POSITIVE = (
    "good",
    "better",
    "best",
    "great",
    "happy",
    "happier",
    "happiest",
    "happiness",
    "happily",
    "glad",
    "love",
    "loved",
    "loves",
    "loving",
    "lovely",
    "beautiful",
    "beauty",
    "wonderful",
    "nice",
    "pleasant",
    "pleasure",
    "pleased",
    "joy",
    "joyful",
    "delight",
    "delighted",
    "delightful",
    "sweet",
    "excellent",
    "perfect",
    "enjoy",
    "enjoyed",
    "fun",
    "laugh",
    "laughed",
    "laughter",
    "smile",
    "smiled",
    "hope",
    "hopeful",
    "friendly",
    "peace",
    "peaceful",
    "warm",
    "bright",
    "brave",
    "cheerful",
    "success",
    "successful",
    "wise",
    "charming",
    "lucky",
    "fortunate",
    "grateful",
    "delicious",
    "proud",
    "honest",
    "calm",
    "glorious",
    "splendid",
    "kindness",
    "gentle",
    "comfort",
    "comfortable",
    "blessed",
    "praise",
)
NEGATIVE = (
    "bad",
    "worse",
    "worst",
    "terrible",
    "awful",
    "horrible",
    "sad",
    "sadness",
    "unhappy",
    "miserable",
    "misery",
    "hate",
    "hated",
    "hates",
    "hatred",
    "angry",
    "anger",
    "fear",
    "afraid",
    "evil",
    "pain",
    "painful",
    "ugly",
    "cruel",
    "wrong",
    "sick",
    "cry",
    "cried",
    "tears",
    "sorrow",
    "grief",
    "lonely",
    "fail",
    "failed",
    "failure",
    "hurt",
    "harm",
    "dull",
    "boring",
    "stupid",
    "fool",
    "foolish",
    "nasty",
    "wicked",
    "bitter",
    "disgusting",
    "shame",
    "guilty",
    "trouble",
    "worry",
    "worried",
    "anxious",
    "dreadful",
    "disaster",
    "despair",
    "gloomy",
    "grim",
    "enemy",
    "rude",
    "cold",
)
KINDS = ("positive", "negative", "neutral")

# adjectives that fill the prompts' slots (all of a sentiment kind are in its lexicon; none of the
# neutral ones are in either)
ADJECTIVES = {
    "positive": (
        "good",
        "great",
        "lovely",
        "wonderful",
        "beautiful",
        "pleasant",
        "nice",
        "happy",
        "sweet",
        "perfect",
        "delightful",
        "excellent",
        "cheerful",
        "charming",
        "splendid",
        "glorious",
    ),
    "negative": (
        "bad",
        "terrible",
        "awful",
        "horrible",
        "sad",
        "miserable",
        "ugly",
        "painful",
        "boring",
        "dull",
        "nasty",
        "bitter",
        "dreadful",
        "gloomy",
        "grim",
        "disgusting",
    ),
    "neutral": (
        "long",
        "short",
        "old",
        "new",
        "small",
        "large",
        "red",
        "green",
        "wooden",
        "round",
        "quiet",
        "early",
        "late",
        "square",
        "narrow",
        "white",
    ),
}
NOUNS = (
    "day",
    "night",
    "dinner",
    "trip",
    "book",
    "play",
    "song",
    "house",
    "city",
    "morning",
    "evening",
    "party",
    "story",
    "garden",
    "journey",
    "meal",
    "letter",
    "film",
    "weather",
    "food",
)
# {n}, {m}: nouns; {a}, {b}: adjectives of the prompt's kind. Each ends before a likely evaluative word.
TEMPLATES = (
    "The {n} was {a} and the {m} was {b}, so I felt",
    "It was a {a} {n}, and I felt so",
    "What a {a} {n}! Everything about it was",
    "The {n} was {a}. I think the {m} will be",
    "She said the {n} was {a}, and it really was",
    "My {n} was {a} and {b}. It made me feel",
    "After such a {a} {n}, the whole world seemed",
    "The {n} was {a}, the {m} was {b}, and I was",
)
_AN = re.compile(r"\b([Aa]) (?=[aeiou])")
_SETS_SEED = 1  # prompt_sets() = prompts(8, kind, seed=_SETS_SEED)


LEXICON = Lexicon(frozenset(POSITIVE), frozenset(NEGATIVE))  # the scoring rule of lenslab.data.sentiment


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LenslabError(f"kind {kind!r} is not one of {', '.join(KINDS)}{did_you_mean(kind, KINDS)}")


def _prompt(kind: str, rng: random.Random) -> str:
    n, m = rng.sample(NOUNS, 2)
    a, b = rng.sample(ADJECTIVES[kind], 2)
    text = rng.choice(TEMPLATES).format(n=n, m=m, a=a, b=b)
    return _AN.sub(r"\1n ", text)  # "a awful" -> "an awful"


def prompts(n: int, kind: str = "negative", seed: int = 1000, *, exclude=()) -> list[str]:
    """`n` distinct English prompts of `kind` ("positive", "negative" or "neutral"), drawn from
    `random.Random(seed)` (the same `n`, `kind` and `seed` always give the same list), none of them
    in `exclude`; e.g. "It was a dreadful evening, and I felt so"."""
    _check_kind(kind)
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(50 * int(n) + 100):
        if len(out) >= n:
            break
        p = _prompt(kind, rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) < n:
        raise LenslabError(f"could draw only {len(out)} distinct {kind} prompts of {n} asked for")
    return out


def prompt_sets() -> dict[str, list[str]]:
    """The prompt sets of zoo/english-4l's config.json: 8 positive, 8 negative, 8 neutral prompts."""
    return {kind: prompts(8, kind, seed=_SETS_SEED) for kind in KINDS}


# the scoring functions: the same rule as lenslab.data.sentiment's, on this module's lexicon
counts, concept_rate, is_positive = LEXICON.counts, LEXICON.concept_rate, LEXICON.is_positive


def seeded_sets(seed: int, n_fit: int = 32, n_eval: int = 40) -> tuple[list[str], list[str], list[str]]:
    """One seed of the steering evaluation: (positive fitting prompts, negative fitting prompts,
    negative held-out evaluation prompts).

    The fitting sets are **paired**: both are drawn with `prompts` seed 11 + 100 s, and the kinds'
    adjective lists have the same length, so the i-th positive and i-th negative prompt share their
    template and nouns and differ only in their adjectives ("It was a lovely book, ..." / "It was an
    awful book, ..."); a mean difference then reads sentiment, not which templates each side drew.
    The held-out prompts (seed 99 + 100 s) exclude the first `max(n_fit, 256)` negative fitting
    prompts of the same seed (a longer list starts with the shorter one, so the held-out set does
    not depend on `n_fit` up to 256, and asking for it alone with `n_fit=0` gives the same list),
    and every set excludes `prompt_sets()`."""
    s = 100 * int(seed)
    sets = prompt_sets()
    pos = prompts(n_fit, "positive", seed=11 + s, exclude=sets["positive"])
    neg = prompts(max(n_fit, 256), "negative", seed=11 + s, exclude=sets["negative"])
    held = prompts(n_eval, "negative", seed=99 + s, exclude=sets["negative"] + neg)
    return pos, neg[:n_fit], held
