"""Procedural Indirect-Object-Identification (IOI) data, after Wang et al. 2022
("Interpretability in the Wild", arXiv:2211.00593).

A prompt names two people, then repeats one of them (the subject S) as the actor of a
clause that ends where the other one (the indirect object IO) is the natural next word:
"When Mary and John went to the store, John gave a drink to" -> " Mary" (not " John").
The first clause lists the names as IO, S ("ABBA") or S, IO ("BABA").

Templates are a prefix (first clause, names X and Y) joined to a suffix (second clause,
actor S). Train templates combine `TRAIN_PREFIXES` x `TRAIN_SUFFIXES`; the held-out split
combines `HELDOUT_PREFIXES` x `HELDOUT_SUFFIXES` (frames never used in IOI training) and
draws `HELDOUT_NAMES` (names never used in IOI training). `filler_sentence` makes
name-free sentences used as variable-length prefixes during training; together with the
template words they contain every word of the held-out templates, so the word-level
`vocabulary()` is fully trained.

`make_ioi_prompts` is the generator behind `lenslab.tasks.ioi`.
"""

from __future__ import annotations

import random
import re

from lenslab._errors import LenslabError

# --- names -----------------------------------------------------------------------------------
# Common first names; most are one GPT-2 token with a leading space, so the generator also
# works for BPE models (it filters per model).
TRAIN_NAMES = """
Mary John Tom James Dan Sid Martin Amy Lisa Michael Anne Kate Paul Mark David Sarah Emma
Peter Jack Alex Ben Chris Rose Laura Jane Steve Tim Sam Joe Bob Bill Jim Ryan Adam Eric Kevin
Brian Jason Scott Andrew Daniel Matt Nick Luke Sean Kyle Carl Greg Paula Julia Maria Anna Helen
Ruth Jean Joan Grace Alice Claire Diana Emily Eva Ella Hannah Jessica Jennifer Karen Linda
Nancy Susan Rachel Rebecca Victoria Sophie Lucy Max Leo Oscar Harry George Frank Fred Henry
Jacob Joshua Nathan Simon Victor Walter Arthur Edward Richard Robert Thomas William Charles
Patrick Roger Henry Louis Tony Vincent Philip Ray Roy Ian Kim Lee Ross Dean Neil Glen Kurt
Bruce Wayne Dave Gary Larry Terry Jerry Barry Harold Howard Oliver Ethan Noah Liam Mia Zoe
Chloe Lily Ruby Holly Molly Amber Jade Alan Keith Todd Troy Derek
""".split()
HELDOUT_NAMES = """
Aaron Adrian Albert Allen Andy Angela Beth Betty Carol Carmen Cindy Colin Craig Dennis Donna
Doug Elena Ellen Gloria Hugo Irene Ivan Jeff Jill Jordan Justin Lauren Leon Marcus Megan Monica
Nora Owen Pam Phil Rita Sandra Tina Tracy Wendy
""".split()
TRAIN_NAMES = list(dict.fromkeys(TRAIN_NAMES))  # drop accidental repeats, keep order

PLACES = """
store park school office garden station beach market library kitchen house cafe restaurant
hospital museum church bank hotel farm lake river zoo bakery theater gym
""".split()
OBJECTS = """
drink book ball bone ring key apple bag gift flower pen cake hat map coin box cup phone card
toy shirt lamp basket necklace
""".split()

# --- templates -------------------------------------------------------------------------------
# Prefix slots: {X} first-mentioned name, {Y} second, {PLACE}, {OBJECT}. Suffix slot {S}.
TRAIN_PREFIXES = [
    "When {X} and {Y} went to the {PLACE},",
    "Then, {X} and {Y} went to the {PLACE}.",
    "After {X} and {Y} arrived at the {PLACE},",
    "While {X} and {Y} were working at the {PLACE},",
    "Friends {X} and {Y} found a {OBJECT} at the {PLACE}.",
    "Once {X} and {Y} had a long day at the {PLACE},",
    "The {PLACE} was busy when {X} and {Y} came in.",
    "Yesterday {X} and {Y} visited the {PLACE}.",
    "Today {X} and {Y} were at the {PLACE}.",
    "In the morning, {X} and {Y} walked to the {PLACE}.",
    "After lunch, {X} and {Y} went to the {PLACE}.",
    "Later, {X} met {Y} at the {PLACE}.",
    "When {X} saw {Y} at the {PLACE},",
    "Since {X} and {Y} were hungry at the {PLACE},",
    "At the {PLACE}, {X} talked with {Y}.",
    "Before {X} and {Y} left the {PLACE},",
    "So {X} and {Y} decided to go to the {PLACE}.",
    "Then {X} and {Y} had a lot of fun at the {PLACE}.",
]
TRAIN_SUFFIXES = [
    "{S} gave a {OBJECT} to",
    "{S} handed the {OBJECT} to",
    "{S} passed the {OBJECT} to",
    "{S} threw the {OBJECT} to",
    "{S} said goodbye to",
    "{S} sent a letter to",
    "{S} brought a {OBJECT} to",
    "{S} showed the {OBJECT} to",
    "{S} wrote a note to",
    "{S} offered the {OBJECT} to",
    "{S} decided to give a {OBJECT} to",
    "{S} bought a {OBJECT} for",
]
HELDOUT_PREFIXES = [
    "On the way to the {PLACE}, {X} and {Y} had a long talk.",
    "When {X} met {Y} at the {PLACE},",
    "Later that day, {X} and {Y} were hungry.",
    "Then, at the {PLACE}, {X} and {Y} found a {OBJECT}.",
    "As {X} and {Y} walked to the {PLACE},",
]
HELDOUT_SUFFIXES = [
    "{S} gave the {OBJECT} back to",
    "{S} said hello to",
    "{S} made a {OBJECT} for",
    "{S} wanted to give a {OBJECT} to",
]

# Name-free filler sentences (training prefixes); slots {PLACE}, {OBJECT}, {ADJ}.
ADJECTIVES = "nice cold warm busy quiet big small old new long happy sunny".split()
FILLER_FRAMES = [
    "The {PLACE} was {ADJ}.",
    "It was a {ADJ} day.",
    "The {OBJECT} was on the table.",
    "The {OBJECT} was {ADJ} and {ADJ}.",
    "Everyone wanted to go to the {PLACE}.",
    "On the way back, the {PLACE} was {ADJ}.",
    "That day the {PLACE} made a lot of noise.",
    "As always, the {OBJECT} was {ADJ}.",
    "Someone said hello at the {PLACE}.",
    "People walked to the {PLACE} and back.",
    "Later that day, it was {ADJ}.",
    "A long talk at the {PLACE} made everyone happy.",
    "Nobody had a {OBJECT}.",
    "The weather was {ADJ} in the morning.",
    "Someone left a {OBJECT} at the {PLACE}.",
]

ORDERS = ("ABBA", "BABA")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def train_templates() -> list[str]:
    """All train templates with slots {IO}, {S}, {S2} (= S), {PLACE}, {OBJECT}; ABBA then BABA."""
    return _templates(TRAIN_PREFIXES, TRAIN_SUFFIXES)


def heldout_templates() -> list[str]:
    """Held-out templates (frames never used in IOI training), same slots as `train_templates`."""
    return _templates(HELDOUT_PREFIXES, HELDOUT_SUFFIXES)


def _templates(prefixes: list[str], suffixes: list[str]) -> list[str]:
    out = []
    for order in ORDERS:
        x, y = ("{IO}", "{S}") if order == "ABBA" else ("{S}", "{IO}")
        for p in prefixes:
            for s in suffixes:
                first = p.replace("{X}", x).replace("{Y}", y)
                out.append(first + " " + s.replace("{S}", "{S2}"))
    return out


def template_label(heldout: bool, index: int) -> str:
    """Stable template id, e.g. 'train-017-ABBA' (index into `train_templates()`)."""
    n = len(heldout_templates() if heldout else train_templates()) // 2
    return f"{'heldout' if heldout else 'train'}-{index:03d}-{ORDERS[index // n]}"


def fill(template: str, io: str, s: str, place: str, obj: str, s2: str | None = None) -> str:
    """Fill a template's slots (S2 defaults to S; a different S2 gives the ABC corruption)."""
    return (
        template.replace("{IO}", io)
        .replace("{S2}", s if s2 is None else s2)
        .replace("{S}", s)
        .replace("{PLACE}", place)
        .replace("{OBJECT}", obj)
    )


def filler_sentence(rng: random.Random) -> str:
    """One name-free filler sentence."""
    frame = rng.choice(FILLER_FRAMES)
    out = frame.replace("{PLACE}", rng.choice(PLACES)).replace("{OBJECT}", rng.choice(OBJECTS))
    while "{ADJ}" in out:
        out = out.replace("{ADJ}", rng.choice(ADJECTIVES), 1)
    return out


def words(text: str) -> list[str]:
    """Split like the zoo word tokenizer (whitespace, then each punctuation mark on its own)."""
    return _WORD_RE.findall(text)


def vocabulary() -> list[str]:
    """Every word of the IOI world, for `lenslab.zoo.word_tokenizer`: names first, then the rest."""
    texts = [*TRAIN_PREFIXES, *TRAIN_SUFFIXES, *HELDOUT_PREFIXES, *HELDOUT_SUFFIXES, *FILLER_FRAMES]
    rest = {w for t in texts for w in words(re.sub(r"\{\w+\}", " ", t))}
    rest |= set(PLACES) | set(OBJECTS) | set(ADJECTIVES)
    names = [*TRAIN_NAMES, *HELDOUT_NAMES]
    return names + sorted(rest - set(names))


# --- the generator behind lenslab.tasks.ioi --------------------------------------------------


def single_token_names(model, names: list[str]) -> list[str]:
    """The names that are one token (with a leading space, as they appear mid-sentence)."""
    return [n for n in names if _single(model, " " + n)]


def _single(model, text: str) -> bool:
    toks = model.to_tokens(text, prepend_bos=False)[0].tolist()
    unk = getattr(model.tokenizer, "unk_token_id", None)
    return len(toks) == 1 and toks[0] != unk


def make_ioi_prompts(
    model, n: int = 32, seed: int = 0, heldout: bool = False
) -> tuple[list[str], list[str], list[tuple[str, str]], list[str]]:
    """`n` IOI prompts of one token length for `model`, with ABC corruptions.

    Templates are grouped by token length; the bucket is that of the first template drawn
    (so it depends on `seed`), and every prompt is drawn from it. Names (and places/objects)
    are restricted to those that are single tokens for `model` with a leading space.

    Returns:
        clean: prompts ending where the indirect object comes next.
        corrupt: the same template and place/object with three other distinct names (ABC).
        answers: (" IO", " S") per prompt: single tokens of `model`.
        labels: template ids ("train-017-ABBA", see `template_label`).
    """
    if not isinstance(n, int) or n < 1:
        raise LenslabError(f"n must be a positive int, got {n!r}")
    if model.tokenizer is None:
        raise LenslabError("make_ioi_prompts needs a model with a tokenizer (model.tokenizer is None)")
    pool = HELDOUT_NAMES if heldout else TRAIN_NAMES
    names = single_token_names(model, pool)
    if len(names) < 5:
        split = "held-out" if heldout else "train"
        raise LenslabError(
            f"only {len(names)} of the {len(pool)} {split} IOI names are single tokens for this model's "
            f"tokenizer (e.g. {pool[0]!r} -> {model.to_str_tokens(' ' + pool[0], prepend_bos=False)}); "
            "IOI needs at least 5 (two per prompt plus three for the ABC corruption). Use a model whose "
            "tokenizer has whole-word names (e.g. zoo/ioi-4l or gpt2), or build the task with "
            "lenslab.tasks.from_prompts"
        )
    places = [p for p in PLACES if _single(model, " " + p)] or PLACES
    objects = [o for o in OBJECTS if _single(model, " " + o)] or OBJECTS
    templates = heldout_templates() if heldout else train_templates()
    # Token length of each template, measured with a fixed filling.
    ref = (names[0], names[1], places[0], objects[0])
    lengths = [_n_tokens(model, fill(t, *ref)) for t in templates]

    rng = random.Random(f"ioi-{seed}-{int(heldout)}")
    first = rng.randrange(len(templates))
    target = lengths[first]
    bucket = [i for i, length in enumerate(lengths) if length == target]

    clean, corrupt, answers, labels = [], [], [], []
    tries = 0
    while len(clean) < n:
        tries += 1
        if tries > 50 * n + 100:
            raise LenslabError(
                f"could not build {n} IOI prompts of equal token length ({target}) for this tokenizer; "
                "try a smaller n or another seed"
            )
        t = first if not clean else rng.choice(bucket)
        io, s, c1, c2, c3 = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        text = fill(templates[t], io, s, place, obj)
        bad = fill(templates[t], c1, c2, place, obj, s2=c3)
        if _n_tokens(model, text) != target or _n_tokens(model, bad) != target:
            continue
        clean.append(text)
        corrupt.append(bad)
        answers.append((" " + io, " " + s))
        labels.append(template_label(heldout, t))
    return clean, corrupt, answers, labels


def _n_tokens(model, text: str) -> int:
    return int(model.to_tokens(text, prepend_bos=True).shape[-1])
