"""What makes a previous-token head and an induction head form in zoo/english-4l's architecture on
2 CPU cores: short training probes from scratch, scored every `--every` steps.

    python benchmarks/english_induction.py VARIANT [--steps 1000] [--every 100] [--threads 1]

Variants (zoo/english-4l's config and tokenizer, AdamW betas 0.9/0.95, weight decay 0.1, peak lr
2e-3, cosine to 10%, gradient clipping 1.0, seed 0; needs the Debian corpus packages, like the
recipe):

- `learned-text`: learned absolute positions (GPT-2's), packed text with copied spans in half the
  windows and a repeated random block in a quarter (batch 16 x 256, 200 warm-up steps);
- `sinusoidal-text`: the same with the position embedding initialised sinusoidally (Vaswani et al.);
- `rotary-text`: rotary positions, packed text with copied spans (and `--random-blocks`);
- `learned-doubled` / `rotary-doubled`: `<bos> X X`, X a random passage of 24-64 tokens of the
  training text (batch 32, 100 warm-up steps, cosine over 1,500 steps): stage 1 of the recipe;
- `rotary-random`: `<bos> A A`, A 16-48 uniformly random tokens of the vocabulary (batch 32).

Every `--every` steps it prints one JSON line: training loss, held-out loss (16 rows of 256), the
highest induction and previous-token scores on `<bos> A A` with 50 random tokens (as the card
measures them; `train_english_4l.head_scores`), each layer's highest, and the loss on the first and
the repeated copy. The card of zoo/english-4l ("What it took") quotes these runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings

import torch
import torch.nn.functional as F

from lenslab.zoo import train_english_4l as E

VARIANTS = ("learned-text", "sinusoidal-text", "rotary-text", "learned-doubled", "rotary-doubled", "rotary-random")


def build(variant: str, tok):
    from transformer_lens import HookedTransformer

    rotary = variant.startswith("rotary")
    cfg = dataclasses.replace(  # the recipe's config, with the variant's positions
        E._config(len(tok), 0),
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=32 if rotary else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    if variant == "sinusoidal-text":
        P, D = model.W_pos.shape
        angle = torch.arange(P)[:, None].float() / 10000 ** (torch.arange(0, D, 2).float() / D)
        with torch.no_grad():
            model.W_pos[:, 0::2] = torch.sin(angle)
            model.W_pos[:, 1::2] = torch.cos(angle)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--random-blocks", type=float, default=None, help="share of windows with a repeated random block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = E.load()
    tok = base.tokenizer
    stream, held = E.token_stream(base, "train"), E.token_stream(base, "heldout")
    model = build(args.variant, tok)
    doubled = args.variant.endswith(("doubled", "random"))
    batch, n_ctx, warmup, horizon = (32, 256, 100, 1500) if doubled else (16, 256, 200, args.steps)
    blocks = args.random_blocks if args.random_blocks is not None else (0.0 if args.variant == "rotary-text" else 0.25)
    decay = [q for q in model.parameters() if q.ndim >= 2]
    rest = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest}], lr=2e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / horizon)))
    )
    gen, data_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    special = set(tok.all_special_ids)
    pool = torch.tensor([i for i in range(len(tok)) if i not in special])
    bos = int(tok.bos_token_id)

    def batch_tokens() -> torch.Tensor:
        if args.variant == "rotary-random":
            n = int(torch.randint(16, 49, (), generator=gen))
            a = pool[torch.randint(len(pool), (batch, n), generator=gen)]
            return torch.cat([torch.full((batch, 1), bos), a, a], 1)
        if doubled:
            return E.doubled_passages(stream, gen, batch, bos)
        starts = torch.randint(0, len(stream) - n_ctx - 1, (batch,), generator=gen)
        toks = E.copy_spans(torch.stack([stream[s : s + n_ctx + 1] for s in starts.tolist()]).long(), data_gen)
        for row in range(batch):  # a repeated random block of 16-48 tokens in a share `blocks` of the windows
            if torch.rand((), generator=data_gen).item() < blocks:
                n = int(torch.randint(16, 49, (), generator=data_gen))
                s = int(torch.randint(0, n_ctx + 2 - 2 * n, (), generator=data_gen))
                a = pool[torch.randint(len(pool), (n,), generator=data_gen)]
                toks[row, s : s + n], toks[row, s + n : s + 2 * n] = a, a
        return toks

    t0, loss = time.time(), float("nan")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            model.eval()
            hs = E.head_scores(model)
            line = {
                "variant": args.variant,
                "step": step,
                "loss": round(loss, 3),
                "heldout": round(E.heldout_loss(model, held, 16), 3),
                "induction": round(float(hs["induction"].max()), 3),
                "prev_token": round(float(hs["prev_token"].max()), 3),
                "induction_by_layer": [round(float(x), 2) for x in hs["induction"].amax(1)],
                "prev_token_by_layer": [round(float(x), 2) for x in hs["prev_token"].amax(1)],
                "repeat_loss": [round(hs["loss_first_half"], 2), round(hs["loss_repeated_half"], 2)],
                "s": round(time.time() - t0),
            }
            print(json.dumps(line), flush=True)
            model.train()
        if step == args.steps:
            break
        toks = batch_tokens()
        logits = model(toks[:, :-1])
        out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.item()


if __name__ == "__main__":
    main()
