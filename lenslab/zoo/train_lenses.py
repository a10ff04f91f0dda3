"""Recipe of the zoo's shipped tuned lenses (`lenslab/zoo/<model>/lenses/tuned/`).

Each text zoo model gets a tuned lens (`lenslab.probes.lenses.train_tuned_lens`, tuned-lens's
recipe scaled down) trained on its built-in corpus (`lenslab.zoo.corpora.corpus_for`: documents
like its training data), and a card giving, per layer, the KL from the model's output to the logit
lens and to the tuned lens on held-out rows of the same corpus.

`build_zoo_lens(name)` trains and writes one (`lenslab lens train --model NAME --out DIR` runs it);
`rebuild_zoo_lenses()` retrains every shipped lens. Run `python -m lenslab.zoo.train_lenses` to
rebuild them all in place (under a minute per model on one CPU thread). Deterministic: one thread,
seeded corpora, seeded row order, translators initialised at zero.

A training recipe of the zoo: it trains with the probes area's lens tools, so no core module
imports it (pyproject's core contract lists it as an exception).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import lenslab
from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.lenses import LENSES_DIR, LensKL, TunedLens, lens_kl, train_tuned_lens
from lenslab.probes.sae_measure import corpus_tokens, excluded_tokens, keep_mask
from lenslab.zoo.corpora import corpus_for, training_corpus_for

TRAIN_SEED, EVAL_SEED = 1000, 2000  # corpus seeds (the zoo models were trained on seed 0 data)
N_EVAL = 256  # held-out rows for the card
MODELS = ("zoo/english-4l", "zoo/induction-2l", "zoo/ioi-4l", "zoo/moe-refusal", "zoo/steer-sentiment")
DEFAULTS = dict(steps=250, tokens_per_step=2048, lr=1.0, momentum=0.9, weight_decay=1e-3, warmup_steps=0, seed=0)
SETTINGS = tuple(DEFAULTS)
ABOUT = {
    "zoo/english-4l": "128-token windows of its training split (fortunes and WordNet glosses, `train_english_4l.windows`)",
    "zoo/induction-2l": "rows of `<bos>` + random tokens repeated once (`tasks.induction`, seq_len 16)",
    "zoo/ioi-4l": "IOI prompts, clean and ABC-corrupted (`data.ioi.make_ioi_prompts`)",
    "zoo/moe-refusal": "harmful and benign chat prompts (`data.refusal.prompts`)",
    "zoo/steer-sentiment": "review documents, positive, negative or neutral (`data.sentiment.documents`)",
}


def lens_folder(name: str) -> Path:
    """Where zoo model `name`'s tuned lens lives: `lenslab/zoo/<model>/lenses/tuned/`."""
    return zoo.ZOO_DIR / name.removeprefix(zoo.PREFIX) / LENSES_DIR / "tuned"


def _check_name(name: str) -> str:
    name = name.strip()
    if name not in MODELS and zoo.PREFIX + name in MODELS:
        name = zoo.PREFIX + name
    if name not in MODELS:
        raise LenslabError(
            f"there is no tuned-lens recipe for {name!r}{did_you_mean(name, MODELS)} (the zoo's text models have "
            f"one: {', '.join(MODELS)}); pass your own documents (`lenslab lens train --corpus FILE`)"
        )
    return name


def training_rows(model, steps: int, tokens_per_step: int, seed: int) -> torch.Tensor:
    """Enough rows of the model's corpus that training reads each once (as tuned-lens does)."""
    probe = corpus_tokens(model, training_corpus_for(model, 64, seed))
    per_row = float(keep_mask(probe, excluded_tokens(model, None)).sum()) / probe.shape[0]
    n = int(1.05 * steps * tokens_per_step / per_row) + 64
    return corpus_tokens(model, training_corpus_for(model, n, seed))


def held_out(model) -> torch.Tensor:
    """The card's held-out rows: `N_EVAL` fresh draws of the model's corpus (seed `EVAL_SEED`)."""
    return corpus_tokens(model, corpus_for(model, N_EVAL, EVAL_SEED))


def build_zoo_lens(
    name: str, out_dir: str | Path | None = None, *, device: str = "cpu", progress: bool = True, **overrides
) -> tuple[TunedLens, LensKL]:
    """Train zoo model `name`'s tuned lens from its recipe and write it with its card to `out_dir`
    (default: the zoo's own folder, `lenslab/zoo/<model>/lenses/tuned/`). `overrides` replace
    settings of `DEFAULTS` (`steps`, `tokens_per_step`, `lr`, `momentum`, `weight_decay`,
    `warmup_steps`, `seed`). Returns the lens and its `LensKL` on the held-out rows."""
    name = _check_name(name)
    bad = set(overrides) - set(SETTINGS)
    if bad:
        raise LenslabError(f"unknown tuned-lens setting(s) {sorted(bad)}; settings: {', '.join(SETTINGS)}")
    settings = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out_dir) if out_dir is not None else lens_folder(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible on one machine
    try:
        model = lenslab.load_model(name, device=device)
        rows = training_rows(model, settings["steps"], settings["tokens_per_step"], TRAIN_SEED + settings["seed"])
        t0 = time.time()
        lens = train_tuned_lens(model, rows, progress=progress, **settings)
        minutes = (time.time() - t0) / 60
        lens.save(out)
        kl = lens_kl(model, lens, held_out(model))
    finally:
        torch.set_num_threads(threads)
    (out / "card.md").write_text(card(name, lens, kl, minutes=minutes))
    return lens, kl


def card(name: str, lens: TunedLens, kl: LensKL, *, minutes: float) -> str:
    """The Markdown card of zoo model `name`'s tuned lens: what it is, its training, and the KL per
    layer of the logit lens and the tuned lens on the held-out rows (`kl`)."""
    info = lens.info
    rows = "\n".join(
        f"| `{label}` | {float(kl.of('logit')[i]):.4f} | {float(kl.of('tuned')[i]):.4f} "
        f"| {100 * float(kl.top1[0, i]):.1f}% | {100 * float(kl.top1[1, i]):.1f}% |"
        for i, label in enumerate(kl.layer_labels)
    )
    return f"""# Tuned lens of {name}

One affine translator per layer (the tuned lens of Belrose et al. 2023): translator `l` maps
`blocks.{{l}}.hook_resid_pre` of `{name}` to `h + W_l h + b_l`, which the model's final norm and
unembedding then read. `d_model={lens.d_model}`, {lens.n_layers} translators. Use it with
`lenslab.probes.lenses.tuned_lens(model, text)` or `lenslab lens tuned --model {name}`; tuned-lens's
own layout is one call away (`TunedLens.save_tuned_lens`).

## Training
- Corpus: {info["corpus_rows"]:,} rows of `training_corpus_for(model, n, seed={TRAIN_SEED + info["seed"]})`, {ABOUT[name]}:
  {info["tokens"]:,} tokens, each read once, padding excluded.
- Loss: KL(model output ‖ lens) at every position, summed over layers (tuned-lens's `--loss kl`).
- {info["steps"]} steps of {info["rows_per_step"]} rows (about {info["tokens_per_step"]:,} tokens) with SGD, Nesterov
  momentum {info["momentum"]}, lr {info["lr"]} (torch lr {info["lr"] * (1 - info["momentum"]):.3g}), weight decay
  {info["weight_decay"]}, {info["warmup_steps"]} warm-up steps, linear decay to 0, gradient norm clipped to
  {info["clip"]}; the translators start at zero (the logit lens). {minutes:.1f} min on one CPU thread.
- Rebuild: `lenslab lens train --model {name} --out DIR` (deterministic; `lenslab/zoo/train_lenses.py`).

## KL per layer on held-out text
{kl.n_tokens:,} tokens of {N_EVAL} fresh rows of the same corpus (seed {EVAL_SEED}), padding excluded.
KL(model output ‖ lens) in nats, the mean over tokens; top-1: how often the lens's most probable token
is the model's. `tests/probes/test_lenses.py` recomputes these numbers from the committed weights.

| layer | logit lens KL | tuned lens KL | logit lens top-1 | tuned lens top-1 |
|---|---|---|---|---|
{rows}
"""


def rebuild_zoo_lenses(root: str | Path | None = None) -> list[Path]:
    """Retrain every shipped tuned lens from its recipe (into `root/<model>/` when given, else over
    the committed ones); returns the folders written."""
    done = []
    for name in MODELS:
        out = None if root is None else Path(root) / name.removeprefix(zoo.PREFIX)
        _, kl = build_zoo_lens(name, out)
        done.append(out or lens_folder(name))
        worst = float((kl.of("tuned") - kl.of("logit")).max())
        print(f"{name}: {done[-1]} (tuned - logit KL, worst layer: {worst:+.4f} nats)")
    return done


if __name__ == "__main__":
    import sys

    rebuild_zoo_lenses(sys.argv[1] if len(sys.argv) > 1 else None)
