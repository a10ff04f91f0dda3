"""Recipe of the zoo's shipped transcoders (`lenslab/zoo/<model>/transcoders/<name>/`).

Each MLP-bearing text zoo model gets per-layer TopK transcoders with a skip connection
(`per-layer`, trained with `lenslab.probes.transcoders.train_transcoders`) and a TopK cross-layer
transcoder with a skip connection (`clt`, trained with `train_clt`), both on its built-in corpus
(`lenslab.zoo.corpora.training_corpus_for`, seed `TRAIN_SEED`), and measured on `N_EVAL`
held-out rows (seed `EVAL_SEED`) by `transcoder_metrics`; the card (`card.md`) and
`metrics.json` hold the numbers. zoo/induction-2l is attention-only: it has no MLPs and so no
transcoders.

Run `python -m lenslab.zoo.train_transcoders [ROOT] [--recipe zoo/<model>/<name> ...]` to rebuild
them, all or the named ones (deterministic: one torch thread, fixed seeds). A training recipe of
the zoo: it trains with the probes area's tools, so no core module imports it (pyproject's core
contract lists it as an exception).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lenslab
from lenslab import zoo
from lenslab.probes.sae_measure import corpus_tokens, excluded_tokens, keep_mask
from lenslab.probes.transcoders import (
    TRANSCODERS_DIR,
    TranscoderMetrics,
    load_transcoders,
    save_transcoders,
    train_clt,
    train_transcoders,
    transcoder_metrics,
)
from lenslab.zoo.corpora import corpus_for, training_corpus_for

TRAIN_SEED, EVAL_SEED = 1000, 2000
N_TRAIN, N_EVAL = 2048, 256

# (model, name) -> settings of `TRAINERS[name]`; d_transcoder keeps each folder small: per-layer
# under ~1.5 MB (english-4l: 5.2 MB), clt under 2 MB (encoders n·d_transcoder·d_model, decoders
# n(n+1)/2·d_transcoder·d_model and skips n·d_model² float32 numbers)
TRAINERS = {"per-layer": train_transcoders, "clt": train_clt}
RECIPES: dict[tuple[str, str], dict] = {
    ("zoo/ioi-4l", "per-layer"): dict(
        d_transcoder=256, activation="topk", k=16, skip=True, steps=2000, batch_size=512, lr=2e-3, seed=0
    ),
    ("zoo/english-4l", "per-layer"): dict(
        d_transcoder=768, activation="topk", k=24, skip=True, steps=3000, batch_size=512, lr=2e-3, seed=0
    ),
    ("zoo/steer-sentiment", "per-layer"): dict(
        d_transcoder=256, activation="topk", k=16, skip=True, steps=2000, batch_size=512, lr=2e-3, seed=0
    ),
    ("zoo/ioi-4l", "clt"): dict(
        d_transcoder=192, activation="topk", k=16, skip=True, steps=4000, batch_size=512, lr=2e-3, seed=0
    ),
    ("zoo/english-4l", "clt"): dict(
        d_transcoder=128, activation="topk", k=16, skip=True, steps=4000, batch_size=512, lr=2e-3, seed=0
    ),
    ("zoo/steer-sentiment", "clt"): dict(
        d_transcoder=256, activation="topk", k=16, skip=True, steps=4000, batch_size=512, lr=2e-3, seed=0
    ),
}


def card(
    model_name: str, name: str, settings: dict, m: TranscoderMetrics, *, n_train_tokens: int, minutes: float
) -> str:
    """The Markdown card of shipped transcoders `model_name/name` with their metrics `m`."""
    rows = "\n".join(
        f"| MLP{layer} | {m.mse[j]:.4g} | {m.explained_variance[j]:.4f} | {m.l0[j]:.2f} | {m.dead_fraction[j]:.1%} |"
        for j, layer in enumerate(m.layers)
    )
    if m.kind_of == "cross-layer":
        intro = f"""A cross-layer transcoder ({m.architecture}, skip connection: {settings["skip"]}) for `{model_name}`: an
encoder per layer reads the MLP's input `blocks.{{l}}.ln2.hook_normalized` through `d_transcoder={m.d_transcoder}`
features, and their decoders write to that layer's MLP output `blocks.{{l}}.hook_mlp_out` and to every later
layer's (the output at layer l is the sum over i ≤ l of layer i's features decoded for l, plus the skip
term). {len(m.layers)} layers × {m.d_transcoder} features. Files in circuit-tracer's cross-layer layout
(`W_enc_<l>.safetensors`, `W_dec_<l>.safetensors`; lenslab adds the skip `W_skip_<l>` to the encoder file)
plus `transcoder.json`. Load it with `lenslab.probes.transcoders.load_transcoders("{model_name}/{name}")`."""
        trainer = "`train_clt`"
        loss = "the sum over layers of each MLP output's MSE normalised by its variance"
        pairs = "MLP input/output pairs per layer, every layer's read at the same tokens"
    else:
        intro = f"""Per-layer transcoders ({m.architecture}, skip connection: {settings["skip"]}) for `{model_name}`: one per MLP,
each reading the MLP's input `blocks.{{l}}.ln2.hook_normalized` and predicting its output
`blocks.{{l}}.hook_mlp_out` through `d_transcoder={m.d_transcoder}` features. Files in circuit-tracer's
per-layer layout (`layer_<l>.safetensors`) plus `transcoder.json`. Load them with
`lenslab.probes.transcoders.load_transcoders("{model_name}/{name}")`."""
        trainer, loss, pairs = (
            "`train_transcoders`",
            "MSE normalised by the output's variance",
            "MLP input/output pairs per layer",
        )
    return f"""# {model_name}/{name}

{intro}

## Training
- Corpus: {N_TRAIN} rows of `lenslab.zoo.corpora.training_corpus_for` (seed {TRAIN_SEED}; `corpus_for` except for english-4l, whose windows come from its training split), {n_train_tokens:,} {pairs} (padding left out).
- {trainer}: {settings["steps"]} Adam steps of {settings["batch_size"]} activations, lr {settings["lr"]}
  (warm-up 5%, linear decay over the last 20%), loss: {loss}; seed {settings["seed"]}.
- {minutes:.1f} min on CPU (one thread; activations collected and trained). Rebuild: `python -m lenslab.zoo.train_transcoders --recipe {model_name}/{name}` (deterministic).

## Metrics
Measured by `lenslab.probes.transcoders.transcoder_metrics` on the saved weights over {N_EVAL} held-out rows
(`corpus_for`, seed {EVAL_SEED}): {m.n_tokens:,} tokens, {m.n_predictions:,} next-token predictions.
`metrics.json` holds the same numbers; `tests/probes/test_transcoders.py` recomputes them.

| layer | MSE, mean over tokens of ‖y − ŷ‖² | explained variance | L0 | dead features |
|---|---|---|---|---|
{rows}

Replacement model (every MLP replaced by its transcoder, no error term), next-token loss in nats:

| metric | value |
|---|---|
| loss, original model | {m.ce_loss_clean:.4f} |
| loss, replacement model | {m.ce_loss_replaced:.4f} |
| loss, every MLP zero-ablated | {m.ce_loss_zero:.4f} |
| loss recovered | {m.loss_recovered:.4f} |
| KL(original ‖ replacement), mean per prediction | {m.kl:.4f} |
"""


def build(model_name: str, name: str, out_dir: str | Path | None = None) -> TranscoderMetrics:
    """Train, save, measure and card the transcoders `model_name/name` from `RECIPES`."""
    settings = RECIPES[(model_name, name)]
    model = lenslab.load_model(model_name, device="cpu")
    out = Path(out_dir) if out_dir else zoo.ZOO_DIR / model_name.removeprefix(zoo.PREFIX) / TRANSCODERS_DIR / name
    train = training_corpus_for(model, N_TRAIN, seed=TRAIN_SEED)
    t0 = time.time()
    tcs = TRAINERS[name](model, train, progress=False, threads=1, **settings)
    minutes = (time.time() - t0) / 60
    save_transcoders(tcs, out)
    m = held_out_metrics(model, out)
    d = m.to_dict()
    d["provenance"] = {k: v for k, v in d["provenance"].items() if k != "time"}
    (out / "metrics.json").write_text(json.dumps(d, indent=1) + "\n")
    n_train = int(keep_mask(corpus_tokens(model, train), excluded_tokens(model, None)).sum())
    (out / "card.md").write_text(card(model_name, name, settings, m, n_train_tokens=n_train, minutes=minutes))
    return m


def held_out_metrics(model, folder: str | Path) -> TranscoderMetrics:
    """The card's metrics of the transcoders in `folder` on `model` (one torch thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tcs = load_transcoders(folder, model=model)
        return transcoder_metrics(model, tcs, corpus_for(model, N_EVAL, seed=EVAL_SEED))
    finally:
        torch.set_num_threads(old)


def main(argv: list[str] | None = None) -> None:
    """`python -m lenslab.zoo.train_transcoders [ROOT] [--recipe zoo/<model>/<name> ...]`: build every
    recipe, or the named ones, into the zoo (or under ROOT as `ROOT/<model>/<name>/`)."""
    known = [f"{m}/{n}" for m, n in RECIPES]
    p = argparse.ArgumentParser(prog="python -m lenslab.zoo.train_transcoders", description=main.__doc__)
    p.add_argument("root", nargs="?", default=None, help="write under this folder instead of the zoo")
    p.add_argument("--recipe", action="append", choices=known, help="build only this recipe (repeatable)")
    args = p.parse_args(argv)
    for model_name, name in RECIPES:
        if args.recipe and f"{model_name}/{name}" not in args.recipe:
            continue
        out = None if args.root is None else Path(args.root) / model_name.removeprefix(zoo.PREFIX) / name
        m = build(model_name, name, out)
        print(model_name, name, m.explained_variance, m.l0, m.ce_loss_clean, m.ce_loss_replaced, m.kl, flush=True)


if __name__ == "__main__":
    main()
