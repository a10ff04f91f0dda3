"""Train `zoo/induction-2l`: a 2-layer attention-only transformer with an induction circuit.

Induction (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits";
Olsson et al. 2022, "In-context Learning and Induction Heads", arXiv:2209.11895): in
`... A B ... A` predict `B`. A layer-0 *previous-token head* writes "the token before me
was A" into each position; a layer-1 *induction head* uses it (K-composition) to attend
from the second `A` to the token after the first `A` and copies it (OV circuit).

The data are built so that induction is the only way to lower the loss:
- each row is `<bos>`, a random prefix of random length, a random block `A` of random
  length `L`, `A` again, then random filler up to `n_ctx`; the tokens of `A` are distinct;
- the loss is cross-entropy on the repeated block only (the rest is unpredictable);
- because `L` and the prefix length vary, a head attending a fixed offset back (the
  positional shortcut that a single repeat length teaches) does not work;
- positions are "shortformer" embeddings (Press et al. 2021, arXiv:2012.15832): added to
  queries and keys only, never to the residual stream, so the copied content is pure token
  identity. Some repeat lengths are never used in training, and the card reports the
  mechanism on them.

Run with `lenslab zoo train induction-2l` (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lenslab import tasks
from lenslab.zoo import save_hooked, word_tokenizer
from lenslab.zoo.checkpoints import DEFAULT_N, CheckpointSaver

N_WORDS = 300  # ordinary tokens "t0" .. "t299"
IND_BAR = 0.5  # a layer-1 head with mean induction attention above this counts as an induction head
PREV_BAR = 0.3  # a layer-0 head with mean attention to position - 1 above this counts as previous-token


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Model size and training recipe (defaults are what the committed model used)."""

    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_ctx: int = 64
    steps: int = 1600
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_len: int = 4  # repeat length L of the random block
    max_len: int = 24
    heldout_lens: tuple[int, ...] = (13, 27)  # never used as L in training (27 > max_len)
    eval_lens: tuple[int, ...] = field(default=(10, 13, 27))
    threads: int = 1  # the model is tiny: one thread is fastest (and 2+ crawl on a shared CPU)


def _model_config(d_vocab: int, tc: TrainConfig, seed: int):
    from transformer_lens import HookedTransformerConfig  # deferred: transformer_lens loads only when a model is built

    return HookedTransformerConfig(
        n_layers=2,
        d_model=tc.d_model,
        n_heads=tc.n_heads,
        d_head=tc.d_head,
        n_ctx=tc.n_ctx,
        d_vocab=d_vocab,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="shortformer",
        act_fn="gelu",
        model_name="induction-2l",
        seed=seed,
        default_prepend_bos=True,
    )


def make_batch(gen: torch.Generator, tc: TrainConfig, pool: torch.Tensor, bos: int, n: int):
    """`n` training rows: tokens `[n, n_ctx]` and a loss mask `[n, n_ctx - 1]` (True where the
    next token is a repeat of the block and so predictable by induction)."""
    lens = [l for l in range(tc.min_len, tc.max_len + 1) if l not in tc.heldout_lens]
    tokens = pool[torch.randint(len(pool), (n, tc.n_ctx), generator=gen)]
    tokens[:, 0] = bos
    mask = torch.zeros(n, tc.n_ctx - 1, dtype=torch.bool)
    for i in range(n):
        L = lens[int(torch.randint(len(lens), (1,), generator=gen))]
        L = min(L, (tc.n_ctx - 1) // 2)
        p = int(torch.randint(tc.n_ctx - 1 - 2 * L + 1, (1,), generator=gen))
        block = pool[torch.randperm(len(pool), generator=gen)[:L]]
        s = 1 + p
        tokens[i, s : s + L] = block
        tokens[i, s + L : s + 2 * L] = block
        mask[i, s + L : s + 2 * L - 1] = True  # query at the second copy of block[j] predicts block[j+1]
    return tokens, mask


def repeated_tokens(pool: torch.Tensor, bos: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[n, 1 + 2 * seq_len]`: `<bos> A A` with `A` of `seq_len` distinct random tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a = pool[torch.randperm(len(pool), generator=gen)[:seq_len]]
        rows.append(torch.cat([torch.tensor([bos]), a, a]))
    return torch.stack(rows)


@torch.no_grad()
def measure(model, seq_len: int, n: int = 64, seed: int = 1234) -> dict:
    """Mechanism numbers on `<bos> A A` rows (`[n, 1 + 2 * seq_len]`).

    Returns per-head scores `[n_heads]` for each layer:
    - `induction`: mean attention from each token of the second `A` to the token after that
      token's first occurrence (offset `seq_len - 1` back);
    - `prev_token`: mean attention to position - 1 (positions 1 ..);
    and the mean next-token loss on the first and on the repeated half.
    """
    pool = token_pool(model)
    bos = int(model.tokenizer.bos_token_id)
    toks = repeated_tokens(pool, bos, n, seq_len, seed)
    logits, cache = model.run_with_cache(toks, names_filter=lambda name: name.endswith("hook_pattern"))
    logp = logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]  # [n, pos-1]; nll[:, q] predicts toks[:, q+1]
    first = nll[:, 1:seq_len].mean()  # predicting A[1..] inside the first copy
    second = nll[:, seq_len + 1 : 2 * seq_len].mean()  # predicting A[1..] inside the second copy
    q = torch.arange(seq_len + 1, 2 * seq_len + 1)  # second copy
    qp = torch.arange(1, 2 * seq_len + 1)
    out = {"seq_len": seq_len, "loss_first_half": float(first), "loss_repeated_half": float(second)}
    for layer in range(model.cfg.n_layers):
        pat = cache["pattern", layer]  # [n, head, q, k]
        ind = pat[:, :, q, q - seq_len + 1].mean((0, 2))
        prev = pat[:, :, qp, qp - 1].mean((0, 2))
        out[f"L{layer}"] = {
            "induction": [round(float(x), 4) for x in ind],
            "prev_token": [round(float(x), 4) for x in prev],
        }
    return out


def verify(model, tc: TrainConfig, seed: int = 1234) -> dict:
    """Find the heads and measure everything the card and the tests report."""
    per_len = {L: measure(model, L, seed=seed + L) for L in tc.eval_lens}
    ref = per_len[tc.eval_lens[0]]
    by_ind = sorted(range(model.cfg.n_heads), key=lambda h: -ref["L1"]["induction"][h])
    by_prev = sorted(range(model.cfg.n_heads), key=lambda h: -ref["L0"]["prev_token"][h])
    ind_head, prev_head = by_ind[0], by_prev[0]
    # every head past the bar, strongest first (heads share the work in this model)
    ind_heads = [h for h in by_ind if ref["L1"]["induction"][h] > IND_BAR] or [ind_head]
    prev_heads = [h for h in by_prev if ref["L0"]["prev_token"][h] > PREV_BAR] or [prev_head]
    task_out = {}
    for L in (10, 20):
        task = tasks.induction(model, n=64, seq_len=L, seed=seed)
        m = tasks.get_metric("logit_diff", model, task)
        task_out[L] = {"clean": round(m.clean_value, 3), "corrupt": round(m.corrupt_value, 3)}
    return {
        "induction_head": ind_head,
        "prev_token_head": prev_head,
        "induction_heads": ind_heads,
        "prev_token_heads": prev_heads,
        "per_len": per_len,
        "task_logit_diff": task_out,
    }


def train(
    out_dir: str | Path,
    seed: int = 0,
    config: TrainConfig | None = None,
    checkpoints: str | Path | None = None,
    n_checkpoints: int = DEFAULT_N,
) -> None:
    """Train the model with `seed` and write the zoo folder (weights, tokenizer, card) to `out_dir`;
    with `checkpoints`, also `n_checkpoints` log-spaced checkpoints to `checkpoints/step{N}/`
    (`lenslab.zoo.checkpoints`; they change nothing about the run)."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    tc = config or TrainConfig()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(min(tc.threads, old_threads))
    try:
        t0 = time.time()
        tokenizer = word_tokenizer([f"t{i}" for i in range(N_WORDS)])
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice
            model = HookedTransformer(
                _model_config(len(tokenizer), tc, seed), tokenizer=tokenizer, move_to_device=False
            )
        model.to("cpu", print_details=False)
        pool = token_pool(model)
        bos = int(tokenizer.bos_token_id)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / tc.warmup) * max(0.1, 1 - s / tc.steps)
        )
        model.train()
        save = CheckpointSaver.for_run(checkpoints, tc.steps, tokenizer, "induction-2l", n_checkpoints)
        bar = tqdm(range(tc.steps), desc="induction-2l", unit="step")
        for step in bar:
            save(model, step)
            tokens, mask = make_batch(gen, tc, pool, bos, tc.batch)
            logits = model(tokens)[:, :-1]
            loss = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        save(model, tc.steps)
        model.eval()
        final_loss = loss.item()
        minutes = (time.time() - t0) / 60
        v = verify(model, tc)
        extra = {
            "default_prompt": _default_prompt(seed),
            "mechanism": {
                "induction_heads": [f"L1H{h}" for h in v["induction_heads"]],
                "previous_token_heads": [f"L0H{h}" for h in v["prev_token_heads"]],
            },
            "training": {**_jsonable_cfg(tc), "seed": seed, "final_train_loss": round(final_loss, 4)},
            "verification": _strip(v),
        }
        summary = (
            "2-layer attention-only transformer with an induction circuit "
            f"(previous-token head L0H{v['prev_token_head']}, induction head L1H{v['induction_head']}) "
            "on repeated random tokens t0..t299"
        )
        save_hooked(
            model, tokenizer, out_dir, summary=summary, card=_card(model, tc, seed, v, final_loss, minutes), extra=extra
        )
    finally:
        torch.set_num_threads(old_threads)


# --- helpers -------------------------------------------------------------------------------


def token_pool(model) -> torch.Tensor:
    special = set(model.tokenizer.all_special_ids)
    return torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])


def _default_prompt(seed: int) -> str:
    gen = torch.Generator().manual_seed(seed + 7)
    words = [f"t{int(i)}" for i in torch.randperm(N_WORDS, generator=gen)[:8]]
    return " ".join(words + words)


def _jsonable_cfg(tc: TrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tc).items()}


def _strip(v: dict) -> dict:
    return json.loads(json.dumps(v))  # int keys -> strings


def _card(model, tc: TrainConfig, seed: int, v: dict, final_loss: float, minutes: float) -> str:
    ih, ph = v["induction_head"], v["prev_token_head"]
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for L, m in v["per_len"].items():
        where = "held out of training" if L in tc.heldout_lens else "used in training"
        ratio = m["loss_repeated_half"] / m["loss_first_half"]
        rows.append(
            f"| {L} ({where}) | {m['L1']['induction'][ih]:.3f} | {max(m['L1']['induction'][h] for h in range(model.cfg.n_heads) if h != ih):.3f} "
            f"| {m['L0']['prev_token'][ph]:.3f} | {m['loss_first_half']:.3f} | {m['loss_repeated_half']:.3f} | {ratio:.3f} |"
        )
    task_rows = [f"| {L} | {t['clean']:.2f} | {t['corrupt']:.2f} |" for L, t in v["task_logit_diff"].items()]
    ref = v["per_len"][tc.eval_lens[0]]
    heads_l1 = ", ".join(f"H{h}: {x:.2f}" for h, x in enumerate(ref["L1"]["induction"]))
    heads_l0 = ", ".join(f"H{h}: {x:.2f}" for h, x in enumerate(ref["L0"]["prev_token"]))
    held = ", ".join(str(x) for x in tc.heldout_lens)
    ind_all = ", ".join(f"L1H{h}" for h in v["induction_heads"])
    prev_all = ", ".join(f"L0H{h}" for h in v["prev_token_heads"])
    return f"""# zoo/induction-2l

A 2-layer **attention-only** transformer that has learned **induction**: in `... A B ... A`
it predicts `B`, through a layer-0 previous-token head (**L0H{ph}**) and a layer-1 induction
head (**L1H{ih}**) that K-composes with it.

## Config
- TransformerLens `HookedTransformer`, `attn_only=True`, 2 layers, `d_model={tc.d_model}`,
  {tc.n_heads} heads of `d_head={tc.d_head}`, LayerNorm, `n_ctx={tc.n_ctx}`, {n_params:,} parameters (float32).
- Positions: `positional_embedding_type="shortformer"` (added to queries and keys, never to
  the residual stream).
- Tokenizer: word level, `<bos> <eos> <pad> <unk>` then `t0` .. `t{N_WORDS - 1}` (one token each,
  split on whitespace; `<bos>` is prepended).

## Training data
Each row (length {tc.n_ctx}) is `<bos>`, a random prefix of random length, a block `A` of
`L` distinct random tokens, `A` again, then random filler. `L` is drawn uniformly from
{tc.min_len}..{tc.max_len} except {held} (held out), and the prefix length uniformly from what fits, so
the repeat sits at a different offset and position in every row. Cross-entropy only on the
repeated block (predicting `A[j+1]` at the second `A[j]`). AdamW, lr {tc.lr}, weight decay
{tc.weight_decay}, batch {tc.batch}, {tc.steps} steps (warm-up {tc.warmup}, linear decay), seed {seed}.
Final training loss {final_loss:.3f}; training took {minutes:.1f} min on CPU.
Rebuild with `lenslab zoo train induction-2l`.

## Mechanism
- **L0H{ph}, previous-token head**: attends from each position to the one before it.
- **L1H{ih}, induction head**: from the second occurrence of a token, attends to the token
  that followed its first occurrence and copies it to the output.
- The work is shared: induction heads (layer-1 attention to the induction target above
  {IND_BAR}): {ind_all}; previous-token heads (layer-0 attention to position - 1 above {PREV_BAR}):
  {prev_all}. `config.json` lists them, strongest first, under `"mechanism"`.

## Verification (measured by the training script on the saved weights)
On 64 rows `<bos> A A` per repeat length (fresh random tokens, no prefix):

| repeat length L | L1H{ih} induction attention | best other L1 head | L0H{ph} attention to pos-1 | loss, first half | loss, repeated half | ratio |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Induction attention = mean attention from each token of the second `A` to the token after
its first occurrence (offset `L - 1` back). All heads at L = {tc.eval_lens[0]}: layer 1 induction
{heads_l1}; layer 0 previous-token {heads_l0}. Chance loss is ln {N_WORDS} = {torch.log(torch.tensor(float(N_WORDS))):.2f}.
The mechanism holds at repeat lengths never seen in training, so it is not a fixed-offset
shortcut.

`lenslab.tasks.induction(model, n=64, seq_len=L)` with metric `logit_diff` (correct next
token minus a random absent token, last position; corrupt replaces the first occurrence of
the current token):

| seq_len | clean | corrupt |
|---|---|---|
{chr(10).join(task_rows)}

`tests/test_zoo_induction.py` checks these numbers on the committed weights.
"""
