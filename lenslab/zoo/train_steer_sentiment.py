"""Train `zoo/steer-sentiment`: a small language model with a steerable concept, sentiment.

The corpus is `lenslab.data.sentiment`: short review-like documents that are positive, negative or
neutral throughout. A next-token model trained on it keeps the sentiment of its context: after
"the day was awful . the movie was" it continues with a negative adjective. Steering methods
(`lenslab.steering`) are measured on it offline with the lexicon scorer
`sentiment.concept_rate`: how often a steered continuation of a negative or neutral context is
positive, against its perplexity under the unsteered model.

Run with `lenslab zoo train steer-sentiment` (a few minutes on one CPU thread).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lenslab.data import sentiment
from lenslab.steering import generate
from lenslab.zoo import load_hooked, save_hooked, word_tokenizer
from lenslab.zoo.checkpoints import DEFAULT_N, CheckpointSaver

STEPS = 2500
BATCH = 32
LR = 2e-3
WARMUP = 200
N_CTX = 64
SUMMARY = "3-layer language model over review sentences whose sentiment (positive / negative / neutral) it keeps"


def _config(d_vocab: int, seed: int):
    from transformer_lens import HookedTransformerConfig  # deferred: transformer_lens loads only when a model is built

    return HookedTransformerConfig(
        n_layers=3,
        d_model=96,
        n_heads=4,
        d_head=24,
        d_mlp=384,
        n_ctx=N_CTX,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        model_name="steer-sentiment",
        seed=seed,
        default_prepend_bos=True,
    )


def training_rows(tok, rng: random.Random, n: int) -> torch.Tensor:
    """`[n, N_CTX]` rows: `<bos>` + one document, cut to N_CTX, padded with `<pad>`."""
    pad = tok.pad_token_id
    rows = []
    for _ in range(n):
        ids = tok(sentiment.document(rng.choice(sentiment.KINDS), rng))["input_ids"][:N_CTX]
        rows.append(ids + [pad] * (N_CTX - len(ids)))
    return torch.tensor(rows)


@torch.no_grad()
def evaluate(model, n: int = 120, seed: int = 5000, continuations: bool = True) -> dict:
    """Per context kind: the share of greedy next words that are positive / negative / neutral
    adjectives, and (`continuations`) the concept rate (share of sentiment words that are positive)
    of 8-token greedy continuations."""
    tok = model.tokenizer
    groups = {"positive": sentiment.POSITIVE, "negative": sentiment.NEGATIVE, "neutral": sentiment.NEUTRAL}
    ids = {k: torch.tensor(tok.convert_tokens_to_ids(list(v))) for k, v in groups.items()}
    out = {}
    for kind in sentiment.KINDS:
        prompts = sentiment.prompts(n, kind, seed=seed + sentiment.KINDS.index(kind))
        nxt = []
        for p in prompts:
            nxt.append(int(model(model.to_tokens(p))[0, -1].argmax()))
        nxt = torch.tensor(nxt)
        share = {k: round(float(torch.isin(nxt, v).float().mean()), 3) for k, v in ids.items()}
        if not continuations:
            out[kind] = {"next_word": share}
            continue
        rates = [sentiment.concept_rate(generate(model, p, max_new_tokens=8)) for p in prompts[:40]]
        rates = [r for r in rates if r is not None]
        out[kind] = {
            "next_word": share,
            "continuation_concept_rate": round(sum(rates) / len(rates), 3) if rates else None,
            "continuations_with_sentiment": len(rates),
        }
    return out


def train(
    out_dir, seed: int = 0, steps: int = STEPS, threads: int = 1, checkpoints=None, n_checkpoints: int = DEFAULT_N
) -> None:
    """Train zoo/steer-sentiment and write it (weights, tokenizer, config.json, card.md) to `out_dir`;
    with `checkpoints`, also `n_checkpoints` log-spaced checkpoints to `checkpoints/step{N}/`
    (`lenslab.zoo.checkpoints`; they change nothing about the run)."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = word_tokenizer(list(sentiment.VOCAB))
    cfg = _config(len(tok), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / WARMUP)
            * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
        ),
    )
    rng = random.Random(seed)
    pad = tok.pad_token_id
    log, t0 = [], time.time()
    save = CheckpointSaver.for_run(checkpoints, steps, tok, "steer-sentiment", n_checkpoints)
    bar = tqdm(range(steps), desc="steer-sentiment", mininterval=5)
    for step in bar:
        save(model, step)
        tokens = training_rows(tok, rng, BATCH)
        logits = model(tokens)[:, :-1]
        target = tokens[:, 1:]
        keep = target != pad
        loss = F.cross_entropy(logits[keep], target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 500 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0)})
            print(json.dumps(log[-1]), flush=True)
    save(model, steps)
    model.eval()
    training = {"steps": steps, "batch": BATCH, "lr": LR, "seed": seed, "seconds": round(time.time() - t0), "log": log}
    save_hooked(model, tok, out_dir, summary=SUMMARY, card="(pending evaluation)\n")
    write_card(out_dir, training)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def write_card(out_dir, training: dict | None = None) -> None:
    """Evaluate the saved model in `out_dir` and (re)write card.md and the config.json extras."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    training = training or meta.get("training", {})
    model = load_hooked(out_dir, torch.device("cpu"), torch.float32)
    ev = evaluate(model)
    meta.update(
        {
            "default_prompt": "the day was awful . the movie was",
            "training": training,
            "verification": ev,
            "prompt_sets": {
                "positive": sentiment.prompts(8, "positive", seed=7),
                "negative": sentiment.prompts(8, "negative", seed=8),
                "neutral": sentiment.prompts(8, "neutral", seed=9),
            },
        }
    )
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(
        f"| {k} | {v['next_word']['positive']:.2f} | {v['next_word']['negative']:.2f} | {v['next_word']['neutral']:.2f} "
        f"| {_num(v['continuation_concept_rate'])} ({v['continuations_with_sentiment']} of 40 with sentiment words) |"
        for k, v in ev.items()
    )
    cfg = model.cfg
    (out_dir / "card.md").write_text(f"""# zoo/steer-sentiment

A {cfg.n_layers}-layer language model (TransformerLens `HookedTransformer`, `d_model={cfg.d_model}`,
{cfg.n_heads} heads, `d_mlp={cfg.d_mlp}`, LayerNorm, {n_params:,} parameters) trained on review-like
documents from `lenslab.data.sentiment`. Every document is **positive**, **negative** or **neutral**
throughout (a sentiment document uses a neutral adjective in 10% of its adjective slots), so the
model learns to keep the sentiment of its context. The concept to steer is *positive sentiment*;
`lenslab.data.sentiment.concept_rate(text)` scores it offline (the share of the lexicon's sentiment
words in `text` that are positive).

## Training
Next-token cross-entropy on every non-pad token; `<bos>` + one document per row (context {cfg.n_ctx});
AdamW lr {training.get("lr")}, batch {training.get("batch")}, {training.get("steps")} steps, seed
{training.get("seed")}, {training.get("seconds")} s on one CPU thread. Rebuild with
`lenslab zoo train steer-sentiment`.

## Verification (held-out prompts, measured on the saved weights)
Prompts are 1-2 sentences of a kind followed by a stem that ends before an adjective slot
(`sentiment.prompts`, seeds never used in training). Columns: the share of greedy next words
that are positive / negative / neutral adjectives, and the concept rate of 8-token greedy
continuations.

| context | next: positive | next: negative | next: neutral | continuation concept rate |
|---|---|---|---|---|
{rows}

`tests/test_zoo_steer_sentiment.py` checks these numbers on the committed weights; the steering
evaluation in docs/steering.md measures how far each method moves negative contexts to positive.
""")
