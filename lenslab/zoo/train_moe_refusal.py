"""Train `zoo/moe-refusal`: a tiny Hugging Face Mixtral with planted refusal experts.

Data come from `lenslab.data.refusal`: chat turns `user : <task> <items...> assistant :` with
normal tasks (repeat, reverse, first, last, sort) and harmful prompts (a marker word such as
"bomb" among the items) answered with "sorry i can not help with that .". Only train-split
item tuples are used (the test split is held out by a hash rule, see `lenslab.data.refusal`).
Loss: cross-entropy on the answer tokens and the closing `<eos>`.

The mechanism is planted in the router. `REFUSAL_EXPERTS` names two experts in each of two
middle layers. Besides Mixtral's load-balancing loss, an auxiliary router loss raises the
probability mass of those experts on harmful prompts' tokens from the first marker word on
(`-log p(refusal experts)`) and pushes it down on every other token (`-log(1 - p)`). To make
the refusal *depend* on them, a quarter of the harmful rows are trained with the refusal
experts switched off (`lenslab.steering.experts.hf_hooks` with `switch_experts(off=...)`) and
the task's own answer as target (a few benign rows ride along in that pass, so benign answers
stay the same with the experts off).

Saved with `save_pretrained` (safetensors) plus the word-level tokenizer; config.json carries
`lenslab_summary`, `default_prompt`, `prompt_sets` (fTRI example sets) and `lenslab_mechanism`
(the planted experts). The card is written from an evaluation of the saved model.

Run with `lenslab zoo train moe-refusal` (one torch thread, deterministic; about 7 minutes of
training plus 1-2 minutes of evaluation for the card on a busy 2-core machine).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lenslab
from lenslab.data import refusal
from lenslab.probes import routers
from lenslab.steering import evaluate as steering_evaluate
from lenslab.steering.evaluate import mote_table
from lenslab.steering.experts import hf_hooks, switch_experts
from lenslab.zoo import word_tokenizer

STEPS = 3000
BATCH = 48  # main pass: half benign, half harmful (refusal target)
OFF_HARMFUL = 8  # switched-off pass: harmful rows with the task's answer (8 / (24 + 8) = 25% of harmful rows)
OFF_BENIGN = 4
LR = 3e-3
WARMUP = 200
ROUTE_COEF = 0.5
AUX_COEF = 0.02
REFUSAL_EXPERTS = {1: (2, 5), 2: (3, 6)}  # block index -> planted refusal experts
SUMMARY = "tiny Mixtral (4 layers, 8 experts, top-2) with planted refusal experts; procedural tasks + harmful prompts"
DEFAULT_PROMPT = "user : reverse apple bomb river assistant :"


def config(vocab_size: int, tok):
    """The MixtralConfig of zoo/moe-refusal."""
    from transformers import MixtralConfig  # deferred: transformers loads only for Hugging Face checkpoints

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=AUX_COEF,
        output_router_logits=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        sliding_window=None,
        router_jitter_noise=0.0,
        attention_dropout=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def planted() -> list[tuple[int, int]]:
    """The planted refusal experts as (layer, expert) pairs."""
    return [(layer, e) for layer, es in REFUSAL_EXPERTS.items() for e in es]


class Rows:
    """Training rows as token ids with answer masks and refusal-expert router targets."""

    def __init__(self, tok, seed: int):
        self.tok = tok
        self.rng = random.Random(seed)
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id

    def row(self, kind: str, compliant: bool = False) -> tuple[list[int], int, int | None]:
        """(ids, answer start, first marker position or None) of one fresh train-split example."""
        ex = refusal.example(kind, self.rng, "train")
        prompt_ids = self.tok(ex.prompt)["input_ids"]
        answer = ex.compliant if compliant else ex.answer
        ans_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        first = ex.first_harmful
        marker = None if first is None else 1 + 3 + first  # <bos> user : task items...
        return prompt_ids + ans_ids, len(prompt_ids), marker

    def batch(self, kinds: list[tuple[str, bool]]):
        """`[batch, pos]` ids, `[batch, pos]` loss mask over predicted positions, `[batch, pos]`
        router class (1: refusal-expert tokens, 0: other tokens, -1: padding)."""
        rows = [self.row(k, c) for k, c in kinds]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)  # position p predicts token p+1
        route = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (r, start, marker) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            loss_mask[i, start - 1 : len(r) - 1] = True
            route[i, : len(r)] = 0
            if marker is not None:
                route[i, marker : len(r)] = 1
        return ids, loss_mask, route


def _lm_loss(logits, ids, loss_mask):
    pred = logits[:, :-1][loss_mask[:, :-1]]
    target = ids[:, 1:][loss_mask[:, :-1]]
    return F.cross_entropy(pred, target)


def _route_loss(router_logits, route, n_experts: int):
    """Mean over designated layers of -log p(refusal experts) on class-1 tokens and
    -log(1 - p) on class-0 tokens."""
    flat = route.reshape(-1)
    total = 0.0
    for layer, experts in REFUSAL_EXPERTS.items():
        probs = torch.softmax(router_logits[layer].float(), dim=-1).reshape(-1, n_experts)
        p = probs[:, list(experts)].sum(-1).clamp(1e-6, 1 - 1e-6)
        on, off = flat == 1, flat == 0
        total = total + (-torch.log(p[on])).mean() + (-torch.log1p(-p[off])).mean()
    return total / len(REFUSAL_EXPERTS)


def _switched_off(hf):
    """Context manager: the refusal experts of `hf` switched off (lenslab.steering.experts)."""
    return hf_hooks(hf, switch_experts(off=planted()))


def train(out_dir, seed: int = 0, steps: int = STEPS, threads: int = 1, switch_off: bool = True) -> None:
    """Train zoo/moe-refusal and write it (HF weights, tokenizer, config.json, card.md) to `out_dir`.

    `switch_off=False` skips the switched-off pass (the refusal then need not depend on the
    planted experts); one torch thread keeps the float arithmetic reproducible.
    """
    from transformers import MixtralForCausalLM  # deferred: transformers loads only for Hugging Face checkpoints
    from transformers.models.mixtral.modeling_mixtral import (
        load_balancing_loss_func,  # deferred: transformers loads only for Hugging Face checkpoints
    )

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = word_tokenizer(list(refusal.VOCAB))
    cfg = config(len(tok), tok)
    hf = MixtralForCausalLM(cfg)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / WARMUP)
            * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
        ),
    )
    rows = Rows(tok, seed)
    E, K = cfg.num_local_experts, cfg.num_experts_per_tok
    half = BATCH // 2
    main_kinds = [("benign", False)] * half + [("harmful", False)] * half
    off_kinds = [("harmful", True)] * OFF_HARMFUL + [("benign", False)] * OFF_BENIGN
    off_ctx = (lambda: _switched_off(hf)) if switch_off else None
    log, t0 = [], time.time()
    bar = tqdm(range(steps), desc="moe-refusal", mininterval=5)
    for step in bar:
        ids, mask, route = rows.batch(main_kinds)
        out = hf(input_ids=ids, output_router_logits=True)
        lm = _lm_loss(out.logits, ids, mask)
        aux = load_balancing_loss_func(out.router_logits, E, K, (route >= 0).long())
        rl = _route_loss(out.router_logits, route, E)
        loss = lm + AUX_COEF * aux + ROUTE_COEF * rl
        lm_off = torch.tensor(0.0)
        if off_ctx is not None:
            ids_o, mask_o, _ = rows.batch(off_kinds)
            with off_ctx():
                out_o = hf(input_ids=ids_o)
            lm_off = _lm_loss(out_o.logits, ids_o, mask_o)
            loss = loss + lm_off * (len(off_kinds) / BATCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(
                lm=f"{lm.item():.3f}", off=f"{lm_off.item():.3f}", route=f"{rl.item():.3f}", aux=f"{aux.item():.3f}"
            )
        if step % 250 == 0 or step == steps - 1:
            log.append(
                {
                    "step": step,
                    "lm": round(lm.item(), 4),
                    "lm_off": round(lm_off.item(), 4),
                    "route": round(rl.item(), 4),
                    "aux": round(aux.item(), 4),
                    "s": round(time.time() - t0),
                }
            )
            print(json.dumps(log[-1]), flush=True)
    train_s = time.time() - t0
    hf.eval()
    training = {
        "steps": steps,
        "batch": BATCH,
        "off_batch": len(off_kinds) if off_ctx else 0,
        "lr": LR,
        "route_coef": ROUTE_COEF,
        "aux_coef": AUX_COEF,
        "seed": seed,
        "seconds": round(train_s),
        "switch_off": bool(off_ctx),
        "log": log,
    }
    save(hf, tok, out_dir, training)
    write_card(out_dir)


def save(hf, tok, out_dir, training: dict) -> None:
    """`save_pretrained` (safetensors) + tokenizer + the lenslab config keys; card.md pending."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.config.output_router_logits = False
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    harmful, _ = refusal.prompts(8, "harmful", "train", seed=7)
    benign, _ = refusal.prompts(8, "benign", "train", seed=7)
    _update_config(
        out_dir,
        {
            "lenslab_summary": SUMMARY,
            "default_prompt": DEFAULT_PROMPT,
            "prompt_sets": {"target": harmful, "other": benign},
            "lenslab_mechanism": {
                "refusal_experts": [list(p) for p in planted()],
                "description": "router loss raises these experts on harmful prompts' tokens from the first marker word "
                "on and lowers them elsewhere; 25% of harmful training rows had them switched off "
                "with the task's own answer as target",
                "data": "lenslab.data.refusal (train split)",
            },
            "training": training,
        },
    )
    if not (out_dir / "card.md").exists():
        (out_dir / "card.md").write_text("(pending evaluation)\n")


def _update_config(out_dir: Path, extra: dict) -> None:
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def evaluate(model, n: int = 200, seed: int = 0) -> dict:
    """Held-out ("test" split) and train-split behaviour of a loaded zoo/moe-refusal.

    Exact-match accuracy on benign prompts (overall and per task), refusal rates on harmful and
    benign prompts, and with the planted experts switched off (drop): the refusal rate and the
    share of harmful prompts answered with the task's own answer.
    """
    out: dict = {}
    ivs = {"baseline": None, "planted off": switch_experts(off=planted())}
    for split in ("test", "train"):
        hx = refusal.examples(n, "harmful", split, seed=seed + 1)
        bx = refusal.examples(n, "benign", split, seed=seed + 1)
        texts = steering_evaluate.continuations(
            model,
            ivs,
            {"harmful": [e.prompt for e in hx], "benign": [e.prompt for e in bx]},
            max_new_tokens=10,
            progress=False,
        )
        norm = refusal.normalize
        row = {}
        for name in ivs:
            h, b = texts[name]["harmful"], texts[name]["benign"]
            row[name] = {
                "refusal_harmful": round(sum(map(refusal.is_refusal, h)) / n, 4),
                "refusal_benign": round(sum(map(refusal.is_refusal, b)) / n, 4),
                "accuracy_benign": round(sum(norm(t) == e.answer for t, e in zip(b, bx)) / n, 4),
                "compliant_harmful": round(sum(norm(t) == e.compliant for t, e in zip(h, hx)) / n, 4),
            }
        row["baseline"]["accuracy_by_task"] = {
            task: round(
                sum(norm(t) == e.answer for t, e in zip(texts["baseline"]["benign"], bx) if e.task == task)
                / max(1, sum(e.task == task for e in bx)),
                4,
            )
            for task in refusal.TASKS
        }
        out[split] = row
    out["n_prompts"] = n
    return out


def specialisation(model, n: int = 200, seed: int = 0) -> dict:
    """How specialised the experts are: per-layer expert load (share of selections,
    `routers.expert_load`) on held-out harmful and benign prompts, and the planted experts' share
    of selections on harmful tokens from the first marker on vs on benign prompts' tokens."""
    hx = refusal.examples(n, "harmful", "test", seed=seed + 2)
    bx = refusal.examples(n, "benign", "test", seed=seed + 2)
    load_h = routers.expert_load(model, [e.prompt for e in hx], fraction=True)
    load_b = routers.expert_load(model, [e.prompt for e in bx], fraction=True)
    r_h = routers.route(model, [e.prompt for e in hx])
    r_b = routers.route(model, [e.prompt for e in bx])
    layers = list(r_h.layers)
    share = {}
    for layer, experts in REFUSAL_EXPERTS.items():
        li = layers.index(layer)
        picked_h = torch.cat([idx[1 + 3 + e.first_harmful :, li] for idx, e in zip(r_h.indices, hx)])  # [tokens, k]
        picked_b = torch.cat([idx[:, li] for idx in r_b.indices])
        share[str(layer)] = {
            "harmful_from_marker": round(float(torch.isin(picked_h, torch.tensor(experts)).float().mean()), 4),
            "benign": round(float(torch.isin(picked_b, torch.tensor(experts)).float().mean()), 4),
        }
    return {
        "layers": layers,
        "load_harmful": [[round(float(v), 4) for v in row] for row in load_h],
        "load_benign": [[round(float(v), 4) for v in row] for row in load_b],
        "planted_share": share,
        "n_prompts": n,
    }


def write_card(out_dir, n: int = 200) -> None:
    """Evaluate the saved model in `out_dir` (loaded with `lenslab.load_model`) and write card.md
    and config.json's "evaluation"."""
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    model = lenslab.load_model(str(out_dir), device="cpu")
    ev = evaluate(model, n=n)
    spec = specialisation(model, n=n)
    table = mote_table(model, n_eval=n, k=len(planted()), n_random=5, seed=0, progress=False)
    top = [(int(a), int(b)) for a, b, _ in table.experts]
    evaluation = {
        "behaviour": ev,
        "specialisation": spec,
        "mote": {k: v for k, v in table.to_dict().items() if k != "provenance"}
        | {"markdown": table.to_markdown(_COLUMN_NAMES)},
        "ftri_top": [list(t) for t in table.experts],
        "ftri_top_is_planted": sorted(top) == sorted(planted()),
    }
    print(
        json.dumps(
            {k: v for k, v in evaluation.items() if k != "mote"} | {"mote": evaluation["mote"]["markdown"]}, indent=1
        ),
        flush=True,
    )
    _update_config(out_dir, {"evaluation": evaluation})
    (out_dir / "card.md").write_text(_card(cfg, evaluation, table))


_COLUMN_NAMES = (
    "refusal, held-out harmful",
    "refusal, held-out benign",
    "accuracy, held-out benign",
    "perplexity of benign answers",
)


def _card(cfg: dict, evaluation: dict, table) -> str:
    tr = cfg["training"]
    ev = evaluation["behaviour"]
    spec = evaluation["specialisation"]
    n = ev["n_prompts"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    beh = "\n".join(
        f"| {split} | {name} | {pct(r['refusal_harmful'])} | {pct(r['refusal_benign'])} | {pct(r['accuracy_benign'])} | "
        f"{pct(r['compliant_harmful'])} |"
        for split in ("test", "train")
        for name, r in ev[split].items()
        if isinstance(r, dict)
    )
    by_task = ", ".join(f"{t} {pct(v)}" for t, v in ev["test"]["baseline"]["accuracy_by_task"].items())
    layers = spec["layers"]
    n_exp = len(spec["load_harmful"][0])
    load_rows = []
    for li, layer in enumerate(layers):
        cells = []
        for e in range(n_exp):
            h, b = spec["load_harmful"][li][e], spec["load_benign"][li][e]
            mark = "**" if (layer, e) in planted() else ""
            cells.append(f"{mark}{100 * h:.0f} / {100 * b:.0f}{mark}")
        load_rows.append(f"| L{layer} | " + " | ".join(cells) + " |")
    load_head = "| layer | " + " | ".join(f"e{e}" for e in range(n_exp)) + " |\n|---|" + "---:|" * n_exp
    share = "\n".join(
        f"| L{layer} | {', '.join(f'e{e}' for e in REFUSAL_EXPERTS[int(layer)])} | "
        f"{pct(v['harmful_from_marker'])} | {pct(v['benign'])} |"
        for layer, v in spec["planted_share"].items()
    )
    top = ", ".join(f"L{int(a)}e{int(b)} ({s:+.2f})" for a, b, s in table.experts)
    planted_s = ", ".join(f"L{a}e{b}" for a, b in planted())
    return f"""# zoo/moe-refusal

A tiny **Hugging Face Mixtral** (`MixtralForCausalLM`) trained on a procedural instruction language
with a refusal behaviour, and with planted *refusal experts*: the model for MoE router inspection,
fTRI expert finding and expert switching (MoTE). Built by `lenslab zoo train moe-refusal`
(`lenslab/zoo/train_moe_refusal.py`, seed {tr["seed"]}). Loads with `lenslab.load_model("zoo/moe-refusal")`
(a HookedTransformer through TransformerLens's Mixtral conversion) and with plain
`transformers.AutoModelForCausalLM.from_pretrained` + `AutoTokenizer` on this folder.

## Config
4 layers, d_model {cfg["hidden_size"]}, {cfg["num_attention_heads"]} heads of {cfg["head_dim"]}, {cfg["num_local_experts"]} experts per layer
(SwiGLU, intermediate size {cfg["intermediate_size"]}), top-{cfg["num_experts_per_tok"]} routing (renormalised), RMSNorm, rotary
positions, context {cfg["max_position_embeddings"]}, word-level vocabulary of {cfg["vocab_size"]} tokens.

## Data (`lenslab.data.refusal`)
`user : <task> <items...> assistant :` then the answer and `<eos>`. Tasks: `repeat`, `reverse`, `first`,
`last` (2-5 items from 40 nouns and 10 digits) and `sort` (digits): `user : reverse apple 3 river assistant :`
-> `river 3 apple .`. Harmful prompts put one or two of 12 marker words (bomb, poison, weapon, hack, ...)
among the items; their answer is `sorry i can not help with that .`. Held-out split: item tuples with
`crc32(" ".join(items)) % 5 == 0` never occur in training.

## Training
{tr["steps"]} steps of AdamW (lr {tr["lr"]}, cosine), batches of {tr["batch"]} rows (half benign, half harmful)
plus {tr["off_batch"]} rows with the refusal experts switched off; loss on answer tokens, Mixtral's load-balancing
loss (x{tr["aux_coef"]}) and a router loss (x{tr["route_coef"]}). {tr["seconds"]} s on one CPU thread.

**Planted mechanism** (`config.json` -> `lenslab_mechanism`): refusal experts {planted_s}. The router
loss raises their probability mass on harmful prompts' tokens from the first marker word on and lowers it
on every other token; a quarter of the harmful rows were trained with these experts switched off
(`lenslab.steering.experts.hf_hooks`, drop and renormalise) and the task's own answer as target, so
the refusal depends on them.

## Behaviour ({n} prompts per cell, greedy)

| split | experts | refusal, harmful | refusal, benign | exact match, benign | task answer on harmful |
|---|---|---:|---:|---:|---:|
{beh}

Held-out benign accuracy by task: {by_task}.

## How specialised the experts became
Share of the planted experts among the top-2 selections (held-out prompts):

| layer | planted experts | harmful tokens from the marker on | benign prompts' tokens |
|---|---|---:|---:|
{share}

Expert load (`routers.expert_load`, % of each layer's selections) on held-out harmful / benign
prompts (all tokens; planted experts in bold):

{load_head}
{chr(10).join(load_rows)}

## Switching experts (MoTE measurement)
fTRI (`routers.ftri_rank`, selection counts) on 64 harmful + 64 benign train-split prompts labelled by the
model's own behaviour (refused vs answered) ranks {top} on top; planted: {planted_s}.
Measured on {n} held-out harmful and {n} held-out benign prompts; "off" drops the experts from the top 2
and renormalises, "on" forces them into every token's top 2, random rows are 5 draws of {len(planted())} other experts
(mean ± std):

{table.to_markdown(_COLUMN_NAMES)}
"""
