"""Build `zoo/ioi-4l-noln`: zoo/ioi-4l with every LayerNorm removed by fine-tuning.

`lenslab.probes.ln_removal.remove_norms` on the committed zoo/ioi-4l: each norm's scale is fixed at
its mean over IOI training prompts (ln2 of blocks 0-3, then ln1 of blocks 0-3, then ln_final), with
`STEPS` fine-tuning steps on the model's own loss (cross-entropy on the answer token) after each,
embeddings and unembedding frozen during fine-tuning (the names are interchangeable random symbols,
and only train names occur in the data). The fixed scales are then folded into the weights: the
saved model has `normalization_type = None`. Deterministic (seeded batches, one torch thread);
a few minutes on one CPU thread. Run with `lenslab zoo train ioi-4l-noln`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lenslab import models, tasks
from lenslab.probes import ln_removal
from lenslab.zoo import load_hooked, save_hooked
from lenslab.zoo import train_ioi_4l as parent

STEPS = 30  # per stage
BATCH = 32
LR = 1e-4
TRAIN_SEEDS = range(160)  # tasks.ioi seeds of the fine-tuning prompts (32 each): 5,120 prompts
# 2,048 held-out prompts: the answer loss is heavy-tailed (a few prompts carry most of it), so 256
# prompts gave a loss that swung 4x from one draw of seeds to another
HELDOUT_SEEDS = range(30_000, 30_064)  # seeds of the held-out loss prompts (32 each)
SUMMARY = "zoo/ioi-4l with every LayerNorm removed by fine-tuning (no normalisation)"
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"


def data(model):
    """`(train, heldout)` `LMData`: IOI prompts with their answer, only the answer scored."""
    train = ln_removal.task_data(model, [tasks.ioi(model, n=32, seed=s) for s in TRAIN_SEEDS])
    held = ln_removal.task_data(model, [tasks.ioi(model, n=32, seed=s) for s in HELDOUT_SEEDS])
    return train, held


def train(out_dir, seed: int = 0, steps: int = STEPS, threads: int = 1) -> None:
    """Remove ioi-4l's norms and write the norm-free model and its card to `out_dir`."""
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    model = models.load_model("zoo/ioi-4l", device="cpu")
    train_data, held = data(model)
    t0 = time.time()
    free, result = ln_removal.remove_norms(
        model, train_data, held, steps=steps, batch_size=BATCH, lr=LR, seed=seed, freeze=("embed.", "unembed.")
    )
    seconds = time.time() - t0
    free.cfg.model_name = "ioi-4l-noln"
    removal = result.to_dict()
    removal.pop("provenance")
    removal["loss_no_finetuning"] = no_finetuning_loss(model, train_data, held)
    removal.update(steps_per_stage=steps, batch=BATCH, lr=LR, seed=seed, seconds=round(seconds))
    save_hooked(free, model.tokenizer, out_dir, summary=SUMMARY, card="(pending evaluation)\n")
    write_card(out_dir, removal)


def no_finetuning_loss(model, train_data, held) -> float:
    """Held-out loss of the same removal with no fine-tuning (`steps=0`: the measured scales folded)."""
    _, base = ln_removal.remove_norms(model, train_data, held, steps=0, batch_size=BATCH, progress=False)
    return base.loss_final


def write_card(out_dir, removal: dict | None = None) -> None:
    """Evaluate the saved norm-free model and its parent; (re)write card.md and config.json extras."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    removal = removal or meta["ln_removal"]
    free = load_hooked(out_dir, torch.device("cpu"), torch.float32)
    orig = models.load_model("zoo/ioi-4l", device="cpu")
    ev = {
        "ioi-4l": {
            "train_distribution": parent.evaluate(orig, heldout=False),
            "heldout": parent.evaluate(orig, heldout=True),
        },
        "ioi-4l-noln": {
            "train_distribution": parent.evaluate(free, heldout=False),
            "heldout": parent.evaluate(free, heldout=True),
        },
    }
    print(json.dumps(ev), flush=True)
    extra = {"default_prompt": DEFAULT_PROMPT, "evaluation": ev, "ln_removal": removal}
    save_hooked(free, orig.tokenizer, out_dir, summary=SUMMARY, card=_card(removal, ev), extra=extra)


def _card(removal: dict, ev: dict) -> str:
    rows = "\n".join(
        f"| {s['stage']} | {next(iter(s['scales'].values())):.4f} | {s['loss_before']:.5f} | {s['loss_fixed']:.5f} | "
        f"{s['loss_after']:.5f} | {s['tokens']} |"
        for s in removal["stages"]
    )
    acc = "\n".join(
        f"| {m} | {split} | {e['n_prompts']} | {e['accuracy']:.1%} | {e['mean_logit_diff']:.2f} |"
        for m, by in ev.items()
        for split, e in by.items()
    )
    return f"""# zoo/ioi-4l-noln

zoo/ioi-4l with every LayerNorm removed, by the fine-tuning procedure of Heimersheim (2024, "You
can remove GPT2's LayerNorm by fine-tuning") and Baroni et al. (2025, "Transformers Don't Need
LayerNorm at Inference Time"). Built by `lenslab zoo train ioi-4l-noln`
(`lenslab/zoo/train_ioi_4l_noln.py`, seed {removal["seed"]}) with `lenslab.probes.ln_removal`.

## Config
zoo/ioi-4l's architecture and tokenizer with `normalization_type = None`: no norm module. Each
norm's scale was fixed, then folded with the norm's weight, bias and centring into the weights that
read it (`W_Q/W_K/W_V`, `W_in`, `W_U` and their biases), so the model is exactly what the
fine-tuned model computed with fixed scales. DLA with `norm="none"` is its exact decomposition.

## Removal
Stages in the authors' order (ln2 block by block, ln1 block by block, ln_final); per stage the
scale (mean over the fine-tuning prompts' real tokens, earlier norms fixed), then {removal["steps_per_stage"]}
AdamW steps (lr {removal["lr"]}, batch {removal["batch"]}, embeddings and unembedding frozen) on the
answer-token cross-entropy of IOI training prompts. Held-out loss (cross-entropy of the answer,
{removal["heldout_tokens"]} held-out prompts of the train distribution): before the stage, with the norm
fixed, and after fine-tuning.

| stage | fixed scale | loss before | loss fixed | loss after | fine-tuning tokens |
|---|---|---|---|---|---|
{rows}

Held-out loss: {removal["loss_original"]:.5f} with LayerNorm, {removal["loss_final"]:.5f} without
(gap {removal["loss_final"] - removal["loss_original"]:+.5f}), after {removal["tokens_used"]} fine-tuning tokens
({removal["seconds"]} s on one CPU thread). The same removal without fine-tuning (the measured scales
folded, `steps=0`): {removal["loss_no_finetuning"]:.5f} (gap {removal["loss_no_finetuning"] - removal["loss_original"]:+.5f}).
The answer loss is heavy-tailed (a few prompts carry most of it), hence 2,048 held-out prompts:
zoo/ioi-4l scored 0.0007 on the 256 of an earlier recipe, 0.0031 and 0.0128 on two draws of 2,048.

## Accuracy (IO logit > S logit), as on zoo/ioi-4l's card

| model | split | prompts | accuracy | mean logit diff |
|---|---|---|---|---|
{acc}

## How it was verified
`tests/probes/test_ln_removal.py` re-measures the held-out losses and the accuracies of this card
from the committed weights, and checks that the DLA (norm="none") of every head equals its exact
direct effect (path patching into the logits) to 1e-4; `tests/test_norms_claims.py` measures the
papers' interpretability claims on this model and on zoo/ioi-4l (docs/norms.md, "LN-free vs original").
"""
