"""Recipe of the zoo's shipped transcoders (`lenslab/zoo/<model>/transcoders/<name>/`).

Each MLP-bearing text zoo model gets per-layer TopK transcoders with a skip connection, trained
with `lenslab.probes.transcoders.train_transcoders` on its built-in corpus
(`lenslab.zoo.corpora.corpus_for`, seed `TRAIN_SEED`), and measured on `N_EVAL` held-out rows
(seed `EVAL_SEED`) by `transcoder_metrics`; the card (`card.md`) and `metrics.json` hold the
numbers. zoo/induction-2l is attention-only: it has no MLPs and so no transcoders.

Run `python -m lenslab.zoo.train_transcoders [ROOT]` to rebuild them (deterministic: one torch
thread, fixed seeds). A training recipe of the zoo: it trains with the probes area's tools, so no
core module imports it (pyproject's core contract lists it as an exception).
"""

from __future__ import annotations

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
    train_transcoders,
    transcoder_metrics,
)
from lenslab.zoo.corpora import corpus_for, training_corpus_for

TRAIN_SEED, EVAL_SEED = 1000, 2000
N_TRAIN, N_EVAL = 2048, 256

# (model, name) -> train_transcoders settings; d_transcoder keeps each model's files under ~1.5 MB
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
}


def card(
    model_name: str, name: str, settings: dict, m: TranscoderMetrics, *, n_train_tokens: int, minutes: float
) -> str:
    """The Markdown card of shipped transcoders `model_name/name` with their metrics `m`."""
    rows = "\n".join(
        f"| MLP{layer} | {m.mse[j]:.4g} | {m.explained_variance[j]:.4f} | {m.l0[j]:.2f} | {m.dead_fraction[j]:.1%} |"
        for j, layer in enumerate(m.layers)
    )
    return f"""# {model_name}/{name}

Per-layer transcoders ({m.architecture}, skip connection: {settings["skip"]}) for `{model_name}`: one per MLP,
each reading the MLP's input `blocks.{{l}}.ln2.hook_normalized` and predicting its output
`blocks.{{l}}.hook_mlp_out` through `d_transcoder={m.d_transcoder}` features. Files in circuit-tracer's
per-layer layout (`layer_<l>.safetensors`) plus `transcoder.json`. Load them with
`lenslab.probes.transcoders.load_transcoders("{model_name}/{name}")`.

## Training
- Corpus: {N_TRAIN} rows of `lenslab.zoo.corpora.training_corpus_for` (seed {TRAIN_SEED}; `corpus_for` except for english-4l, whose windows come from its training split), {n_train_tokens:,} MLP input/output pairs per layer (padding left out).
- `train_transcoders`: {settings["steps"]} Adam steps of {settings["batch_size"]} activations, lr {settings["lr"]}
  (warm-up 5%, linear decay over the last 20%), loss: MSE normalised by the output's variance; seed {settings["seed"]}.
- {minutes:.1f} min on CPU (one thread). Rebuild: `python -m lenslab.zoo.train_transcoders` (deterministic).

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
    tcs = train_transcoders(model, train, progress=False, threads=1, **settings)
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


if __name__ == "__main__":
    import sys

    for model_name, name in RECIPES:
        root = sys.argv[1] if len(sys.argv) > 1 else None
        out = None if root is None else Path(root) / model_name.removeprefix(zoo.PREFIX) / name
        m = build(model_name, name, out)
        print(model_name, name, m.explained_variance, m.l0, m.ce_loss_clean, m.ce_loss_replaced, m.kl)
