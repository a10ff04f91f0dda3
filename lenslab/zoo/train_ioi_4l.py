"""Train `zoo/ioi-4l`: a 4-layer transformer that does Indirect Object Identification.

IOI (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593): after
"When Mary and John went to the store, John gave a drink to" predict " Mary", the name
that was mentioned once, not the repeated subject. Data come from `lenslab._ioi`
(prefix x suffix templates, ABBA and BABA orders, optional name-free filler sentences in
front so that absolute positions vary).

Names are interchangeable symbols. Each name token's embedding is a random Gaussian
direction tied to its unembedding (`W_E[name] = e * v`, `W_U[:, name] = u * v`, with one
learned scale `e`, `u` shared by all names), and during training the directions `v` are
drawn afresh for every batch. The model therefore cannot learn anything about a particular
name and has to solve the task by copying: find the name that occurs once and move its
vector to the last position. The saved model holds one fixed draw for every name (train and
held-out alike). Held-out names never appear in training text, and held-out templates are
prefix/suffix frames never used in training. Loss is cross-entropy on the answer token only.

Run with `lenslab zoo train ioi-4l` (about 15-25 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lenslab import _ioi
from lenslab.zoo import load_hooked, save_hooked, word_tokenizer

STEPS = 6000
BATCH = 32
LR = 1e-3
WARMUP = 300


def _config(d_vocab: int, seed: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=256, n_ctx=64, d_vocab=d_vocab,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        model_name="ioi-4l", seed=seed, default_prepend_bos=True,
    )


class _Batcher:
    """Random IOI training rows as padded token ids, `[batch, pos]`, with answer positions."""

    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.templates = _ioi.train_templates()
        self.names = _ioi.TRAIN_NAMES

    def text(self) -> tuple[str, str, str]:
        r = self.rng
        io, s = r.sample(self.names, 2)
        prompt = _ioi.fill(r.choice(self.templates), io, s, r.choice(_ioi.PLACES), r.choice(_ioi.OBJECTS))
        n_fill = r.choices([0, 1, 2], weights=[0.5, 0.35, 0.15])[0]
        pre = " ".join(_ioi.filler_sentence(r) for _ in range(n_fill))
        return (pre + " " + prompt).strip(), io, s

    def __call__(self, n: int):
        rows, io_ids = [], []
        for _ in range(n):
            text, io, _s = self.text()
            rows.append(self.tok(text)["input_ids"])
            io_ids.append(self.tok.convert_tokens_to_ids(io))
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        last = torch.tensor([len(r) - 1 for r in rows])
        return tokens, last, torch.tensor(io_ids)


class _NameSymbols(torch.nn.Module):
    """Random name directions tied between embedding and unembedding, two learned scales."""

    def __init__(self, name_ids: torch.Tensor, d_model: int):
        super().__init__()
        self.register_buffer("name_ids", name_ids)
        self.d_model = d_model
        self.log_e = torch.nn.Parameter(torch.tensor(0.0))
        self.log_u = torch.nn.Parameter(torch.tensor(0.0))

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        """`[n_names, d_model]` unit-variance-per-row directions (norm about 1)."""
        return torch.randn(len(self.name_ids), self.d_model, generator=gen) / self.d_model**0.5

    def matrices(self, model, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_E `[vocab, d_model]`, W_U `[d_model, vocab]`, b_U `[vocab]` with name rows set from `v`."""
        w_e = model.embed.W_E.index_copy(0, self.name_ids, v * self.log_e.exp())
        w_u = model.unembed.W_U.index_copy(1, self.name_ids, (v * self.log_u.exp()).T)
        b_u = model.unembed.b_U.index_fill(0, self.name_ids, 0.0)
        return w_e, w_u, b_u


def _answer_logits(model, symbols, v, tokens, last):
    """Forward with this batch's name directions: logits `[batch, vocab]` at the answer positions."""
    w_e, w_u, b_u = symbols.matrices(model, v)
    resid = F.embedding(tokens, w_e) + model.pos_embed(tokens)
    for block in model.blocks:
        resid = block(resid)
    x = model.ln_final(resid[torch.arange(len(last)), last])
    return x @ w_u + b_u


def _materialize(model, symbols, v) -> None:
    """Write a fixed draw of name directions into the model's own W_E / W_U / b_U."""
    with torch.no_grad():
        w_e, w_u, b_u = symbols.matrices(model, v)
        model.embed.W_E.copy_(w_e)
        model.unembed.W_U.copy_(w_u)
        model.unembed.b_U.copy_(b_u)


def evaluate(model, heldout: bool, n_seeds: int = 24, per_seed: int = 40, seed0: int = 10_000) -> dict:
    """IO-vs-S accuracy and mean logit diff (clean and ABC corrupt) over several length buckets."""
    from lenslab import tasks

    correct, diffs, diffs_bad, total = 0, [], [], 0
    for k in range(n_seeds):
        task = tasks.ioi(model, n=per_seed, seed=seed0 + k, heldout=heldout)
        with torch.no_grad():
            ld = tasks.logit_diff_per_prompt(model(task.clean_tokens)[:, -1], task.answer_tokens)
            ld_bad = tasks.logit_diff_per_prompt(model(task.corrupt_tokens)[:, -1], task.answer_tokens)
        correct += int((ld > 0).sum())
        total += len(ld)
        diffs.append(ld)
        diffs_bad.append(ld_bad)
    d, db = torch.cat(diffs), torch.cat(diffs_bad)
    return {
        "accuracy": round(correct / total, 4),
        "mean_logit_diff": round(float(d.mean()), 3),
        "mean_logit_diff_corrupt": round(float(db.mean()), 3),
        "n_prompts": total,
    }


def analyse(model, seed: int = 20_000, n: int = 200) -> dict:
    """Per-head evidence for the IOI mechanism on train-distribution prompts.

    Direct logit attribution (DLA) of each head's output at the last position onto
    `W_U[IO] - W_U[S]`; attention from the last position to IO, S1 and S2; attention from S2
    to S1 (duplicate-token heads); the logit diff after mean-ablating the top DLA heads.
    """
    from lenslab import tasks

    task = tasks.ioi(model, n=n, seed=seed)
    toks, ans = task.clean_tokens, task.answer_tokens
    rows = torch.arange(len(toks))
    io_pos = (toks == ans[:, :1]).float().argmax(1)
    s_mask = toks == ans[:, 1:]
    s1_pos = s_mask.float().argmax(1)
    s2_pos = toks.shape[1] - 1 - s_mask.flip(1).float().argmax(1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    base = float(tasks.logit_diff_per_prompt(logits[:, -1], ans).mean())
    heads = {}
    direction = (model.W_U[:, ans[:, 0]] - model.W_U[:, ans[:, 1]]).detach()  # [d_model, batch]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
        out = torch.einsum("bhd,hdm->bhm", z, model.W_O[layer].detach()) / cache["ln_final.hook_scale"][:, -1, None]
        dla = torch.einsum("bhm,mb->bh", out, direction).mean(0)
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        for h in range(model.cfg.n_heads):
            p = pat[:, h]
            heads[f"L{layer}H{h}"] = {
                "dla": round(float(dla[h]), 3),
                "end_to_io": round(float(p[rows, -1, io_pos].mean()), 3),
                "end_to_s1": round(float(p[rows, -1, s1_pos].mean()), 3),
                "end_to_s2": round(float(p[rows, -1, s2_pos].mean()), 3),
                "s2_to_s1": round(float(p[rows, s2_pos, s1_pos].mean()), 3),
            }
    top = sorted(heads, key=lambda k: -heads[k]["dla"])[:3]

    def ablate(names):
        def hook(z, hook):
            layer = int(hook.name.split(".")[1])
            for name in names:
                lay, h = map(int, name[1:].split("H"))
                if lay == layer:
                    z[:, -1, h] = z[:, :, h].mean((0, 1))
            return z

        hooks = [(f"blocks.{lay}.attn.hook_z", hook) for lay in range(model.cfg.n_layers)]
        with torch.no_grad():
            out = model.run_with_hooks(toks, fwd_hooks=hooks)
        return round(float(tasks.logit_diff_per_prompt(out[:, -1], ans).mean()), 3)

    return {
        "heads": heads,
        "top_dla_heads": top,
        "logit_diff": round(base, 3),
        "logit_diff_top_heads_ablated": ablate(top),
        "duplicate_token_heads": sorted(heads, key=lambda k: -heads[k]["s2_to_s1"])[:2],
    }


def train(out_dir, seed: int = 0, steps: int = STEPS, threads: int = 1) -> None:
    """Train zoo/ioi-4l and write it (weights, tokenizer, config.json, card.md) to `out_dir`.

    One torch thread by default: on a shared 2-core machine a second thread made each step
    7x slower (0.24 s -> 1.7 s), and one thread keeps the float arithmetic reproducible.
    """
    from tqdm.auto import tqdm
    from transformer_lens import HookedTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = word_tokenizer(_ioi.vocabulary())
    name_ids = torch.tensor(tok.convert_tokens_to_ids([*_ioi.TRAIN_NAMES, *_ioi.HELDOUT_NAMES]))
    cfg = _config(len(tok), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    symbols = _NameSymbols(name_ids, cfg.d_model)
    params = [*model.parameters(), *symbols.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
    )
    batcher = _Batcher(tok, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="ioi-4l", mininterval=5)
    ema = None
    for step in bar:
        tokens, last, io = batcher(BATCH)
        logits = _answer_logits(model, symbols, symbols.draw(gen), tokens, last)
        loss = F.cross_entropy(logits, io)
        acc = float((logits.argmax(-1) == io).float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = acc if ema is None else 0.98 * ema + 0.02 * acc
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{ema:.3f}")
        if step % 500 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "acc_ema": round(ema, 4), "s": round(time.time() - t0)})
            print(json.dumps(log[-1]), flush=True)
    train_s = time.time() - t0

    # One fixed draw of name directions for every name (train and held-out alike).
    _materialize(model, symbols, symbols.draw(torch.Generator().manual_seed(seed + 12345)))
    model.eval()
    summary = "4-layer transformer trained on procedural IOI sentences (word-level names)"
    save_hooked(model, tok, out_dir, summary=summary, card="(pending evaluation)\n")
    loaded = load_hooked(out_dir, torch.device("cpu"), torch.float32)  # evaluate what was saved
    ev_train = evaluate(loaded, heldout=False)
    ev_held = evaluate(loaded, heldout=True)
    mech = analyse(loaded)
    print(json.dumps({"train": ev_train, "heldout": ev_held, "top": mech["top_dla_heads"]}), flush=True)
    extra = {
        "default_prompt": "When Mary and John went to the store, John gave a drink to",
        "evaluation": {"train_distribution": ev_train, "heldout": ev_held},
        "mechanism": {k: v for k, v in mech.items() if k != "heads"},
        "training": {"steps": steps, "batch": BATCH, "lr": LR, "seed": seed, "seconds": round(train_s), "log": log},
    }
    card = _card(cfg, ev_train, ev_held, mech, steps, train_s, seed)
    save_hooked(model, tok, out_dir, summary=summary, card=card, extra=extra)


def _card(cfg, ev_train: dict, ev_held: dict, mech: dict, steps: int, train_s: float, seed: int) -> str:
    heads = mech["heads"]
    rows = "\n".join(
        f"| {h} | {heads[h]['dla']:+.2f} | {heads[h]['end_to_io']:.2f} | {heads[h]['end_to_s1']:.2f} | "
        f"{heads[h]['end_to_s2']:.2f} | {heads[h]['s2_to_s1']:.2f} |"
        for h in sorted(heads, key=lambda k: -abs(heads[k]["dla"]))[:8]
    )
    dup = ", ".join(f"{h} ({heads[h]['s2_to_s1']:.2f})" for h in mech["duplicate_token_heads"])
    n_tr, n_ho = len(_ioi.train_templates()), len(_ioi.heldout_templates())
    return f"""# zoo/ioi-4l

A small transformer trained to do Indirect Object Identification (IOI; Wang et al. 2022,
[arXiv:2211.00593](https://arxiv.org/abs/2211.00593)): after
"When Mary and John went to the store, John gave a drink to" it predicts " Mary".
Built by `lenslab zoo train ioi-4l` (`lenslab/zoo/train_ioi_4l.py`, seed {seed}).

## Config
HookedTransformer: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads of d_head {cfg.d_head},
d_mlp {cfg.d_mlp} (GELU), LayerNorm, learned absolute positions (n_ctx {cfg.n_ctx}),
word-level tokenizer of {cfg.d_vocab} tokens (every name is one token; `<bos>` is prepended).

## Training data
`lenslab._ioi`: each prompt is a first clause naming two people (IO and S, in ABBA or BABA
order) and a second clause in which S acts, ending where IO is the next word. Train templates:
{len(_ioi.TRAIN_PREFIXES)} prefixes x {len(_ioi.TRAIN_SUFFIXES)} suffixes x 2 orders = {n_tr};
{len(_ioi.PLACES)} places, {len(_ioi.OBJECTS)} objects; {len(_ioi.TRAIN_NAMES)} train names. Before half of the
prompts come one or two name-free filler sentences, so absolute positions vary. Loss:
cross-entropy on the answer token only. {steps} steps of batch {BATCH}, AdamW lr {LR}
(warmup, cosine), {train_s / 60:.0f} minutes on one CPU thread.

Names are interchangeable symbols: each name's embedding is a random Gaussian direction tied
to its unembedding (one learned scale each), drawn afresh for every training batch, so the
model cannot memorise names and must copy them. The saved weights hold one fixed draw for
all {len(_ioi.TRAIN_NAMES) + len(_ioi.HELDOUT_NAMES)} names.

Held-out split (`lenslab.tasks.ioi(model, heldout=True)`): {len(_ioi.HELDOUT_NAMES)} names never used in
training and {n_ho} templates ({len(_ioi.HELDOUT_PREFIXES)} prefixes x {len(_ioi.HELDOUT_SUFFIXES)} suffixes x 2 orders) whose frames
never occur in IOI training (their words do occur in training text).

## Accuracy (IO logit > S logit at the last position)
Measured on the saved weights with `lenslab.tasks.ioi` (fresh seeds, several length buckets;
corrupt = the ABC version of each prompt, three other names):

| split | prompts | accuracy | mean logit diff (clean) | mean logit diff (ABC corrupt) |
|---|---|---|---|---|
| train distribution (train names and templates, new combinations) | {ev_train['n_prompts']} | {ev_train['accuracy']:.1%} | {ev_train['mean_logit_diff']:.2f} | {ev_train['mean_logit_diff_corrupt']:.2f} |
| held-out names and templates | {ev_held['n_prompts']} | {ev_held['accuracy']:.1%} | {ev_held['mean_logit_diff']:.2f} | {ev_held['mean_logit_diff_corrupt']:.2f} |

## Mechanism
Per head, on {200} train-distribution prompts: direct logit attribution (DLA) of the head's output
at the last position onto `W_U[IO] - W_U[S]`, and mean attention from the last position to
IO, S1, S2 and from S2 to S1. Top heads by |DLA|:

| head | DLA | END->IO | END->S1 | END->S2 | S2->S1 |
|---|---|---|---|---|---|
{rows}

Name-mover-like heads (largest positive DLA): {', '.join(mech['top_dla_heads'])}. Mean-ablating
these three heads at the last position moves the mean logit diff from {mech['logit_diff']:.2f} to
{mech['logit_diff_top_heads_ablated']:.2f}. Heads attending most from S2 back to S1 (duplicate-token
candidates): {dup}.

## How it was verified
`tests/test_zoo_ioi.py` loads the committed weights and checks train-distribution and
held-out accuracy and the clean vs ABC-corrupt logit difference; the numbers above are
written by the training script from its own evaluation of the saved weights.
"""
