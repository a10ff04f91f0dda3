"""Recipes and corpora of the zoo's shipped SAEs (`lenslab/zoo/<model>/saes/<hook>/`).

Each text zoo model gets a corpus drawn from the distribution it was trained on, and a loss mask
for the predictions it was trained to make (its *objective*):

- `zoo/induction-2l`: rows of random tokens with a repeated block (`train_induction_2l.make_batch`);
  objective: the predictions inside the repeat.
- `zoo/ioi-4l`: IOI sentences with name-free filler, as in its training, completed with the
  indirect object; objective: the prediction of the indirect object.
- `zoo/english-4l`: 128-token windows of its training split (needs the Debian packages `fortunes` and
  `wordnet-base`); held-out rows from its committed `heldout.txt`; objective: every next token.
- `zoo/steer-sentiment`: review documents (`lenslab.data.sentiment.documents`); objective: every
  next token (it was trained on all of them).

`build_zoo_sae` trains one SAE with `lenslab.probes.sae.train_sae` and writes its card with the
metrics on held-out rows for all next-token predictions and for the objective (`lenslab sae train
--model M --hook H` runs it); `rebuild_zoo_saes` retrains every shipped SAE. Run
`python -m lenslab.zoo.train_saes` to rebuild them all in place.

A training recipe of the zoo: it trains with the probes area's SAE tools, so no core module
imports it (pyproject's core contract lists it as an exception).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import lenslab
from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.data import ioi, sentiment
from lenslab.probes.sae_load import SAES_DIR, hook_width
from lenslab.probes.sae_measure import corpus_tokens, excluded_tokens, keep_mask, sae_metrics, write_metrics
from lenslab.probes.sae_train import sae_card, train_sae
from lenslab.zoo import train_english_4l
from lenslab.zoo.train_induction_2l import TrainConfig, make_batch

TRAIN_SEED, EVAL_SEED = 1000, 2000  # corpus seeds (the zoo models were trained on seed 0 data)
N_EVAL = 256  # held-out rows for the card's metrics


@dataclass(frozen=True)
class Corpus:
    """Token rows `[n, pos]` (right-padded), the objective's loss mask `[n, pos - 1]` (None: all
    non-pad targets), and words for the card."""

    tokens: Tensor
    loss_mask: Tensor | None
    about: str
    objective: str


def _induction(model, n: int, seed: int) -> Corpus:

    tc = TrainConfig()
    special = set(model.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    tokens, mask = make_batch(gen, tc, pool, int(model.tokenizer.bos_token_id), n)
    return Corpus(
        tokens,
        mask,
        about=f"rows of `<bos>` + random tokens with one repeated block of {tc.min_len}-{tc.max_len} distinct tokens "
        "(`lenslab.zoo.train_induction_2l.make_batch`, the model's training distribution)",
        objective="inside the repeated block (induction)",
    )


def _ioi_corpus(model, n: int, seed: int) -> Corpus:
    rng = random.Random(seed)
    templates = ioi.train_templates()
    tok = model.tokenizer
    pad = tok.pad_token_id
    rows, answer_pos = [], []
    for _ in range(n):
        io, s = rng.sample(ioi.TRAIN_NAMES, 2)
        prompt = ioi.fill(rng.choice(templates), io, s, rng.choice(ioi.PLACES), rng.choice(ioi.OBJECTS))
        n_fill = rng.choices([0, 1, 2], weights=[0.5, 0.35, 0.15])[0]
        text = " ".join([*(ioi.filler_sentence(rng) for _ in range(n_fill)), prompt, io])
        ids = tok(text)["input_ids"][: model.cfg.n_ctx]
        rows.append(ids)
        answer_pos.append(len(ids) - 1)
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.zeros(n, width - 1, dtype=torch.bool)
    mask[torch.arange(n), torch.tensor(answer_pos) - 1] = True  # the prediction of the indirect object
    return Corpus(
        tokens,
        mask,
        about="IOI sentences (train names and templates, half with one or two name-free filler sentences before "
        "them, as in the model's training) completed with the indirect object",
        objective="of the indirect object (IOI)",
    )


def _english_corpus(model, n: int, seed: int) -> Corpus:
    split = "heldout" if seed == EVAL_SEED else "train"
    return Corpus(
        train_english_4l.windows(model, n, seed, split=split),
        None,
        about="windows of 128 tokens of its training text (fortunes and WordNet glosses; the card's held-out rows come "
        "from `heldout.txt`, never trained on)",
        objective="every next token (the model's training loss)",
    )


def _sentiment_corpus(model, n: int, seed: int) -> Corpus:
    docs = sentiment.documents(n, seed=seed)
    return Corpus(
        corpus_tokens(model, docs, model.cfg.n_ctx),
        None,
        about="review documents, positive, negative or neutral (`lenslab.data.sentiment.documents`, the model's training "
        "distribution), one per row",
        objective="every next token (the model's training loss)",
    )


CORPORA: dict[str, Callable[[object, int, int], Corpus]] = {
    "zoo/english-4l": _english_corpus,
    "zoo/induction-2l": _induction,
    "zoo/ioi-4l": _ioi_corpus,
    "zoo/steer-sentiment": _sentiment_corpus,
}

# (model, hook) -> train_sae settings of the shipped SAEs.
RECIPES: dict[tuple[str, str], dict] = {
    ("zoo/english-4l", "blocks.2.hook_resid_post"): dict(d_sae=1536, k=16, lr=4e-3, training_tokens=1_000_000),
    ("zoo/induction-2l", "blocks.0.hook_resid_post"): dict(d_sae=1024, k=16, lr=4e-3, training_tokens=300_000),
    ("zoo/ioi-4l", "blocks.2.hook_resid_post"): dict(d_sae=512, k=16, lr=4e-3, training_tokens=300_000),
    ("zoo/steer-sentiment", "blocks.1.hook_resid_post"): dict(d_sae=384, k=16, lr=4e-3, training_tokens=300_000),
}
# what a reader of the card needs to know about a model's numbers
NOTES = {
    "zoo/induction-2l": (
        "The model was trained only on the repeated block, so outside it (random tokens, unpredictable: at best "
        "ln 300 = 5.70 nats) its predictions are confidently wrong and cost more than chance; a reconstruction "
        "that blurs them slightly *lowers* that loss, so loss recovered over all predictions can exceed 1. The "
        "objective row is the one to read."
    ),
    "zoo/ioi-4l": (
        "The model was trained only on the indirect object's prediction, so its other next-token losses are high "
        "(it never learned them); the objective row is the one to read."
    ),
}
DEFAULTS = dict(k=16, lr=4e-3, training_tokens=300_000, batch_size_tokens=512, seed=0)  # d_sae: 4 x the hook width
SETTINGS = ("d_sae", "k", "l1", "lr", "training_tokens", "batch_size_tokens", "seed")


def recipe(model_name: str, hook: str, width: int | None = None, **overrides) -> dict:
    """train_sae settings for `hook` of zoo model `model_name` (its shipped recipe, else the defaults)."""
    bad = set(overrides) - set(SETTINGS)
    if bad:
        raise LenslabError(f"unknown SAE setting(s) {sorted(bad)}; settings: {', '.join(SETTINGS)}")
    out = {**DEFAULTS, **RECIPES.get((model_name, hook), {})}
    if "d_sae" not in out:
        if width is None:
            raise LenslabError("recipe() needs the hook width for the default d_sae")
        out["d_sae"] = 4 * width
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "l1" in overrides:
        out.pop("k", None)
    if "k" in overrides:
        out.pop("l1", None)
    out.update(overrides)
    return out


def corpus(model_name: str, model, n: int, seed: int) -> Corpus:
    """`n` rows of zoo model `model_name`'s SAE corpus."""
    if model_name not in CORPORA:
        raise LenslabError(
            f"there is no built-in SAE corpus for {model_name!r}{did_you_mean(model_name, CORPORA)} (the zoo's text "
            f"models have one: {', '.join(CORPORA)}); pass your own documents (`lenslab sae train --corpus FILE`)"
        )
    return CORPORA[model_name](model, n, seed)


def _rows_for(model_name: str, model, training_tokens: int, seed: int) -> Corpus:
    """Enough rows that the SAE sees each training activation about once."""

    probe = corpus(model_name, model, 64, seed)
    per_row = float(keep_mask(probe.tokens, excluded_tokens(model, None)).sum()) / 64
    return corpus(model_name, model, int(1.1 * training_tokens / per_row) + 16, seed)


def build_zoo_sae(model_name: str, hook: str, out_dir: str | Path | None = None, *, device: str = "cpu", **overrides):
    """Train the zoo SAE of `model_name` at `hook` from its recipe (corpus, size, schedule) and
    write it with its card to `out_dir` (default: the zoo's own folder,
    `lenslab/zoo/<model>/saes/<hook>/`). Deterministic: the same call writes the same weights.

    `overrides` replace recipe settings (`d_sae`, `k`, `l1`, `lr`, `training_tokens`,
    `batch_size_tokens`, `seed`). Returns `(sae, {name: SaeMetrics})`.
    """
    model_name = model_name.strip()
    if model_name not in CORPORA and zoo.PREFIX + model_name in CORPORA:
        model_name = zoo.PREFIX + model_name
    if model_name not in CORPORA:
        corpus(model_name, None, 0, 0)  # raises the error naming the models that have a corpus
    model = lenslab.load_model(model_name, device=device)
    if hook not in model.hook_dict:
        raise LenslabError(f"{model_name} has no hook {hook!r}{did_you_mean(hook, list(model.hook_dict))}")
    settings = recipe(model_name, hook, hook_width(model, hook, None), **overrides)
    out = Path(out_dir) if out_dir is not None else zoo.ZOO_DIR / model_name.removeprefix(zoo.PREFIX) / SAES_DIR / hook
    train = _rows_for(model_name, model, settings["training_tokens"], TRAIN_SEED + settings["seed"])
    held = corpus(model_name, model, N_EVAL, EVAL_SEED)

    t0 = time.time()
    sae = train_sae(model, hook, corpus=train.tokens, eval_corpus=held.tokens, out_dir=out, **settings)
    minutes = (time.time() - t0) / 60
    metrics = measure(model, sae, held)
    write_metrics(out / "metrics.json", metrics)
    name = f"{model_name}/{hook}"
    rebuild = (
        f"`lenslab sae train --model {model_name} --hook {hook} --out DIR` (deterministic; `lenslab/zoo/train_saes.py`)"
    )
    note = f"\n{NOTES[model_name]}\n" if model_name in NOTES else ""
    extra = (
        f"{note}\nThe held-out rows are {N_EVAL} fresh draws from the same corpus (seed {EVAL_SEED}); training used "
        f"seed {TRAIN_SEED + settings['seed']}. `tests/probes/test_sae.py` recomputes these numbers on the committed "
        "weights.\n"
    )
    (out / "card.md").write_text(
        sae_card(
            model_name,
            hook,
            sae,
            {**settings, "context_size": int(train.tokens.shape[1])},
            metrics,
            corpus=f"{train.tokens.shape[0]:,} {train.about}",
            minutes=minutes,
            extra=extra,
            title=name,
            rebuild=rebuild,
        )
    )
    return sae, metrics


def measure(model, sae, held: Corpus) -> dict:
    """The card's metrics: all next-token predictions, and the model's objective."""

    out = {"all next-token predictions": sae_metrics(model, sae, held.tokens)}
    if held.loss_mask is not None:
        out[f"objective: predictions {held.objective}"] = sae_metrics(model, sae, held.tokens, loss_mask=held.loss_mask)
    else:
        out[f"objective: {held.objective}"] = out["all next-token predictions"]
    return out


def held_out(model_name: str, model) -> Corpus:
    """The card's held-out rows for zoo model `model_name`."""
    return corpus(model_name, model, N_EVAL, EVAL_SEED)


def rebuild_zoo_saes(root: str | Path | None = None) -> list[Path]:
    """Retrain every shipped zoo SAE from its recipe (into `root/<model>/<hook>/` when given,
    else over the committed ones); returns the folders written."""
    done = []
    for model_name, hook in RECIPES:
        out = None if root is None else Path(root) / model_name.removeprefix(zoo.PREFIX) / hook
        build_zoo_sae(model_name, hook, out)
        done.append(out or zoo.ZOO_DIR / model_name.removeprefix(zoo.PREFIX) / "saes" / hook)
        print(f"{model_name}/{hook}: {json.dumps(str(done[-1]))}")
    return done


if __name__ == "__main__":
    import sys

    rebuild_zoo_saes(sys.argv[1] if len(sys.argv) > 1 else None)
