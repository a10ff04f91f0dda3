"""Train `zoo/ioi-4l`: a 4-layer transformer that does Indirect Object Identification.

IOI (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593): after
"When Mary and John went to the store, John gave a drink to" predict " Mary", the name
that was mentioned once, not the repeated subject. Data come from `lenslab.data.ioi`
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

Run with `lenslab zoo train ioi-4l` (about 16 minutes on one thread of a busy 2-core machine).
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lenslab import tasks
from lenslab.data import ioi
from lenslab.zoo import load_hooked, save_hooked, word_tokenizer
from lenslab.zoo.checkpoints import DEFAULT_N, CheckpointSaver

STEPS = 6000
BATCH = 32
LR = 1e-3
WARMUP = 300
SUMMARY = "4-layer transformer trained on procedural IOI sentences (word-level names)"


def _config(d_vocab: int, seed: int):
    from transformer_lens import HookedTransformerConfig  # deferred: transformer_lens loads only when a model is built

    return HookedTransformerConfig(
        n_layers=4,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_mlp=256,
        n_ctx=64,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        model_name="ioi-4l",
        seed=seed,
        default_prepend_bos=True,
    )


class _Batcher:
    """Random IOI training rows as padded token ids, `[batch, pos]`, with answer positions."""

    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.templates = ioi.train_templates()
        self.names = ioi.TRAIN_NAMES

    def text(self) -> tuple[str, str, str]:
        r = self.rng
        io, s = r.sample(self.names, 2)
        prompt = ioi.fill(r.choice(self.templates), io, s, r.choice(ioi.PLACES), r.choice(ioi.OBJECTS))
        n_fill = r.choices([0, 1, 2], weights=[0.5, 0.35, 0.15])[0]
        pre = " ".join(ioi.filler_sentence(r) for _ in range(n_fill))
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

    For each head: direct logit attribution (DLA) of its output at the last position (END)
    onto `W_U[IO] - W_U[S]`; attention from END to IO, to the token after IO (IO+1), to S1 and
    to S2; attention from IO+1 back to IO (previous-token heads). Heads are then grouped
    (subject heads: END->S2 > 0.5; name movers: END->IO + END->IO+1 > 0.4; previous-token
    heads: IO+1->IO > 0.4) and each group is mean-ablated at its reading position to measure
    the mean logit diff and accuracy without it.
    """
    task = tasks.ioi(model, n=n, seed=seed)
    toks, ans = task.clean_tokens, task.answer_tokens
    rows = torch.arange(len(toks))
    io_pos = (toks == ans[:, :1]).float().argmax(1)
    s_mask = toks == ans[:, 1:]
    s1_pos = s_mask.float().argmax(1)
    s2_pos = toks.shape[1] - 1 - s_mask.flip(1).float().argmax(1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        base = tasks.logit_diff_per_prompt(logits[:, -1], ans)
        direction = model.W_U[:, ans[:, 0]] - model.W_U[:, ans[:, 1]]  # [d_model, batch]
        heads = {}
        for layer in range(model.cfg.n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
            out = torch.einsum("bhd,hdm->bhm", z, model.W_O[layer]) / cache["ln_final.hook_scale"][:, -1, None]
            dla = torch.einsum("bhm,mb->bh", out, direction).mean(0)
            pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
            for h in range(model.cfg.n_heads):
                p = pat[:, h]
                heads[f"L{layer}H{h}"] = {
                    "dla": round(float(dla[h]), 3),
                    "end_to_io": round(float(p[rows, -1, io_pos].mean()), 3),
                    "end_to_io_next": round(float(p[rows, -1, io_pos + 1].mean()), 3),
                    "end_to_s1": round(float(p[rows, -1, s1_pos].mean()), 3),
                    "end_to_s2": round(float(p[rows, -1, s2_pos].mean()), 3),
                    "io_next_to_io": round(float(p[rows, io_pos + 1, io_pos].mean()), 3),
                }
    groups = {
        "subject heads (END attends to S2)": [k for k, v in heads.items() if v["end_to_s2"] > 0.5],
        "name movers (END attends to IO or IO+1)": [
            k for k, v in heads.items() if v["end_to_io"] + v["end_to_io_next"] > 0.4
        ],
        "previous-token heads (IO+1 attends to IO)": [k for k, v in heads.items() if v["io_next_to_io"] > 0.4],
    }
    reads_at = {  # query position each group is ablated at
        "subject heads (END attends to S2)": lambda: torch.full_like(io_pos, toks.shape[1] - 1),
        "name movers (END attends to IO or IO+1)": lambda: torch.full_like(io_pos, toks.shape[1] - 1),
        "previous-token heads (IO+1 attends to IO)": lambda: io_pos + 1,
    }

    def ablate(names: list[str], pos: torch.Tensor) -> dict:
        def hook(z, hook):
            layer = int(hook.name.split(".")[1])
            for name in names:
                lay, h = map(int, name[1:].split("H"))
                if lay == layer:
                    z[rows, pos, h] = z[:, :, h].mean((0, 1))
            return z

        hooks = [(f"blocks.{lay}.attn.hook_z", hook) for lay in range(model.cfg.n_layers)]
        with torch.no_grad():
            ld = tasks.logit_diff_per_prompt(model.run_with_hooks(toks, fwd_hooks=hooks)[:, -1], ans)
        return {
            "heads": names,
            "logit_diff": round(float(ld.mean()), 3),
            "accuracy": round(float((ld > 0).float().mean()), 3),
        }

    return {
        "heads": heads,
        "logit_diff": round(float(base.mean()), 3),
        "accuracy": round(float((base > 0).float().mean()), 3),
        "ablations": {g: ablate(names, reads_at[g]()) for g, names in groups.items() if names},
        "n_prompts": n,
    }


def train(
    out_dir, seed: int = 0, steps: int = STEPS, threads: int = 1, checkpoints=None, n_checkpoints: int = DEFAULT_N
) -> None:
    """Train zoo/ioi-4l and write it (weights, tokenizer, config.json, card.md) to `out_dir`; with
    `checkpoints`, also `n_checkpoints` log-spaced checkpoints to `checkpoints/step{N}/`
    (`lenslab.zoo.checkpoints`; they change nothing about the run). A checkpoint is a copy of the
    model with the name directions folded in as at the end (`_materialize`, the same fixed draw).

    One torch thread by default: on a shared 2-core machine a second thread made each step
    7x slower (0.24 s -> 1.7 s), and one thread keeps the float arithmetic reproducible.
    """
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = word_tokenizer(ioi.vocabulary())
    name_ids = torch.tensor(tok.convert_tokens_to_ids([*ioi.TRAIN_NAMES, *ioi.HELDOUT_NAMES]))
    cfg = _config(len(tok), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    symbols = _NameSymbols(name_ids, cfg.d_model)
    params = [*model.parameters(), *symbols.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
        ),
    )
    batcher = _Batcher(tok, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    t0 = time.time()

    def folded(m):  # a copy with the end's fixed draw of name directions written in; `m` is untouched
        out = copy.deepcopy(m)
        _materialize(out, symbols, symbols.draw(torch.Generator().manual_seed(seed + 12345)))
        return out

    save = CheckpointSaver.for_run(checkpoints, steps, tok, "ioi-4l", n_checkpoints, prepare=folded)
    bar = tqdm(range(steps), desc="ioi-4l", mininterval=5)
    ema = None
    for step in bar:
        save(model, step)
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
            log.append(
                {"step": step, "loss": round(loss.item(), 4), "acc_ema": round(ema, 4), "s": round(time.time() - t0)}
            )
            print(json.dumps(log[-1]), flush=True)
    save(model, steps)
    train_s = time.time() - t0

    # One fixed draw of name directions for every name (train and held-out alike).
    _materialize(model, symbols, symbols.draw(torch.Generator().manual_seed(seed + 12345)))
    model.eval()
    save_hooked(model, tok, out_dir, summary=SUMMARY, card="(pending evaluation)\n")
    training = {"steps": steps, "batch": BATCH, "lr": LR, "seed": seed, "seconds": round(train_s), "log": log}
    write_card(out_dir, training)


def write_card(out_dir, training: dict | None = None) -> None:
    """Evaluate the saved model in `out_dir` and (re)write its card.md and config.json extras.

    `training` (steps, batch, lr, seed, seconds, log) defaults to what config.json holds.
    """
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads only for Hugging Face checkpoints

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    training = training or meta["training"]
    model = load_hooked(out_dir, torch.device("cpu"), torch.float32)  # evaluate what was saved
    ev_train = evaluate(model, heldout=False)
    ev_held = evaluate(model, heldout=True)
    mech = analyse(model)
    print(json.dumps({"train": ev_train, "heldout": ev_held, "ablations": mech["ablations"]}), flush=True)
    extra = {
        "default_prompt": "When Mary and John went to the store, John gave a drink to",
        "evaluation": {"train_distribution": ev_train, "heldout": ev_held},
        "mechanism": {k: v for k, v in mech.items() if k != "heads"},
        "training": training,
    }
    card = _card(model.cfg, ev_train, ev_held, mech, training)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    save_hooked(model, tok, out_dir, summary=SUMMARY, card=card, extra=extra)


def _card(cfg, ev_train: dict, ev_held: dict, mech: dict, training: dict) -> str:
    heads = mech["heads"]
    rows = "\n".join(
        f"| {h} | {v['dla']:+.2f} | {v['end_to_io']:.2f} | {v['end_to_io_next']:.2f} | {v['end_to_s1']:.2f} | "
        f"{v['end_to_s2']:.2f} | {v['io_next_to_io']:.2f} |"
        for h, v in heads.items()
    )
    abl = "\n".join(
        f"| {g} | {', '.join(r['heads'])} | {r['logit_diff']:.2f} | {r['accuracy']:.1%} |"
        for g, r in mech["ablations"].items()
    )
    n_tr, n_ho = len(ioi.train_templates()), len(ioi.heldout_templates())
    return f"""# zoo/ioi-4l

A small transformer trained to do Indirect Object Identification (IOI; Wang et al. 2022,
[arXiv:2211.00593](https://arxiv.org/abs/2211.00593)): after
"When Mary and John went to the store, John gave a drink to" it predicts " Mary".
Built by `lenslab zoo train ioi-4l` (`lenslab/zoo/train_ioi_4l.py`, seed {training["seed"]}).

## Config
HookedTransformer: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads of d_head {cfg.d_head},
d_mlp {cfg.d_mlp} (GELU), LayerNorm, learned absolute positions (n_ctx {cfg.n_ctx}),
word-level tokenizer of {cfg.d_vocab} tokens (every name is one token; `<bos>` is prepended).

## Training data
`lenslab.data.ioi`: each prompt is a first clause naming two people (IO and S, in ABBA or BABA
order) and a second clause in which S acts, ending where IO is the next word. Train templates:
{len(ioi.TRAIN_PREFIXES)} prefixes x {len(ioi.TRAIN_SUFFIXES)} suffixes x 2 orders = {n_tr};
{len(ioi.PLACES)} places, {len(ioi.OBJECTS)} objects; {len(ioi.TRAIN_NAMES)} train names. Half of the prompts are
preceded by one or two name-free filler sentences, so absolute positions vary. Loss:
cross-entropy on the answer token only. {training["steps"]} steps of batch {training["batch"]}, AdamW lr {training["lr"]}
(warmup, cosine), {training["seconds"] / 60:.0f} minutes on one CPU thread. Accuracy on training
batches sat near 47% (a coin flip between the two names) for about 2,000 steps, then rose to
94% by step 3,000 and 99.6% by step 5,000 (log in config.json).

Names are interchangeable symbols: each name's embedding is a random Gaussian direction tied
to its unembedding (one learned scale each), drawn afresh for every training batch, so the
model cannot memorise names and must copy them. The saved weights hold one fixed draw for
all {len(ioi.TRAIN_NAMES) + len(ioi.HELDOUT_NAMES)} names.

Held-out split (`lenslab.tasks.ioi(model, heldout=True)`): {len(ioi.HELDOUT_NAMES)} names never used in
training and {n_ho} templates ({len(ioi.HELDOUT_PREFIXES)} prefixes x {len(ioi.HELDOUT_SUFFIXES)} suffixes x 2 orders) whose frames
never occur in IOI training (their words do occur in training text).

## Accuracy (IO logit > S logit at the last position)
Measured on the saved weights with `lenslab.tasks.ioi` (seeds 10000-10023, each its own
token-length bucket; corrupt = the ABC version of each prompt, three other names):

| split | prompts | accuracy | mean logit diff (clean) | mean logit diff (ABC corrupt) |
|---|---|---|---|---|
| train distribution (train names and templates, new combinations) | {ev_train["n_prompts"]} | {ev_train["accuracy"]:.1%} | {ev_train["mean_logit_diff"]:.2f} | {ev_train["mean_logit_diff_corrupt"]:.2f} |
| held-out names and templates | {ev_held["n_prompts"]} | {ev_held["accuracy"]:.1%} | {ev_held["mean_logit_diff"]:.2f} | {ev_held["mean_logit_diff_corrupt"]:.2f} |

On ABC prompts neither answer name occurs, so the per-prompt difference is noise between
two absent names and averages to about zero.

## Mechanism
Measured on {mech["n_prompts"]} train-distribution prompts (`analyse` in the training script). Per
head: direct logit attribution (DLA) of its output at the last position (END) onto
`W_U[IO] - W_U[S]`, mean attention from END to IO, to the token after IO (IO+1), to S1 and
to S2, and from IO+1 back to IO.

| head | DLA | END->IO | END->IO+1 | END->S1 | END->S2 | IO+1->IO |
|---|---|---|---|---|---|---|
{rows}

What the table and the ablations show: the layer-0 *subject heads* attend from END to S2,
bringing the subject's identity to END; all layer-0 heads act as *previous-token heads* at
IO+1, writing IO into the token after it; the four layer-1 *name movers* attend from END to
the token after IO (and not to S1 or S2) and carry most of the direct effect (DLA about +2.2
each, against about +0.4 for each layer-2/3 head). Our reading, not tested head by head:
the subject information at END steers the name movers' queries away from the position after
S, as S-inhibition does in GPT-2's IOI circuit. Mean-ablating each group at its reading
position (baseline mean logit diff {mech["logit_diff"]:.2f}, accuracy {mech["accuracy"]:.1%}):

| group | heads | mean logit diff | accuracy |
|---|---|---|---|
{abl}

## How it was verified
The numbers on this card are written by the training script (`write_card`) from its own
evaluation of the saved weights. `tests/test_zoo_ioi.py` loads the committed weights, reruns
that evaluation with the same seeds and checks every number of the accuracy, mechanism and
ablation tables at its printed digits; on other seeds it checks train-distribution accuracy
(> 95%), held-out accuracy (> 85%), a positive clean logit diff and a near-zero ABC-corrupt one,
and the prompt generator's contract.
"""
