"""Train `zoo/english-4l`: a small GPT-2-style language model on real English text.

The corpus is built from two freely licensed Debian packages, installed with
``apt-get install fortunes wordnet-base`` (the script says so when they are missing):

- `fortunes` (BSD fortune's data files: quotations, literature, jokes, proverbs; 2.6 MB of text;
  BSD licence, see /usr/share/doc/fortunes/copyright); every fortune is one document; the
  ASCII-art and non-English files are left out;
- `wordnet-base` (Princeton WordNet 3.0: every synset's words, definition and example
  sentences; about 9 MB of text; WordNet 3.0 licence, a BSD-style licence that asks for its
  notice to travel with copies — it is in the model folder's LICENSES.md); every synset is one
  document, ``"good, well: that which is pleasing or valuable. "there is good in every man""``.

A byte-level BPE of 4,096 tokens is trained on the training split (Hugging Face `tokenizers`),
not GPT-2's 50,257: GPT-2's embedding and unembedding alone would be 2 x 50,257 x 192 floats
(77 MB in float32, most of its rows never seen in 12 MB of text), while 4,096 tokens cover this
corpus at about the same bytes per token (the card gives both). Documents are packed GPT-2-style
into rows of `N_CTX` tokens, each document starting with `<bos>`. 2% of documents (every 50th)
are held out; `heldout.txt` in the model folder keeps the first `N_HELDOUT` of them, so a fresh
clone can measure the model without the Debian packages.

Positions are rotary, and training has two stages: `STAGE1_STEPS` steps on doubled passages
(`<bos> X X`, `doubled_passages`), where the previous-token and induction heads form, then the
packed text with copied and doubled spans; the card says why and what the alternatives measured.

Run with `lenslab zoo train english-4l` (about an hour on 2 CPU threads); the weights are committed
in float16 (`--threads` sets torch's threads; the result is deterministic for a given thread count).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lenslab._errors import LenslabError
from lenslab.zoo import SPECIAL_TOKENS, load_hooked, save_hooked
from lenslab.zoo.checkpoints import DEFAULT_N, CheckpointSaver

NAME = "english-4l"
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
SKIP_FORTUNES = ("art", "ascii-art", "translate-me", "perl", "linuxcookie", "knghtbrd")
VOCAB = 4096
N_CTX = 256
BATCH = 16
STEPS = 2400
LR = 2e-3
WARMUP = 200
HELDOUT_EVERY = 50
COPY_P = 0.5  # share of training windows in which a span of the window's own text is copied further on
COPY_SPAN = (8, 48)  # span lengths (tokens), uniform
# stage 1 (induction): `<bos> X X`, X a passage of the training text, before the packed-text training
STAGE1_STEPS, STAGE1_BATCH, STAGE1_LEN = 1000, 32, (24, 64)
STAGE1_WARMUP, STAGE1_HORIZON = 100, 1500  # its cosine decays over 1,500 steps and is cut at 1,000
DOUBLE_P = 0.25  # stage 2: share of windows in which a passage is read twice in a row (keeps the heads useful)
REPEAT_ROWS, REPEAT_LEN = 64, 40  # held-out passages read twice for the card (`repeat_losses`)
N_HELDOUT = 2000
DEFAULT_PROMPT = "The weather was terrible and the food was awful, so I felt"
SUMMARY = (
    "4-layer GPT-2-style model trained on real English text (fortunes and WordNet glosses), byte-level BPE of 4,096"
)


# --- corpus ---------------------------------------------------------------------------------


def _fortune_docs() -> list[str]:
    docs = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file() or path.name in SKIP_FORTUNES:
            continue
        text = path.read_text(encoding="latin-1")
        for chunk in re.split(r"\n%\n", text):
            chunk = " ".join(chunk.split())
            if len(chunk) >= 20 and chunk.isascii():
                docs.append(chunk)
    return docs


def _wordnet_docs() -> list[str]:
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # the licence header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
            parts = [p.strip() for p in gloss.strip().split(";") if p.strip()]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            examples = " ".join(p for p in parts if p.startswith('"'))
            doc = f"{', '.join(words)}: {definition}." + (f" {examples}" if examples else "")
            docs.append(" ".join(doc.split()))
    return docs


def documents() -> tuple[list[str], list[str]]:
    """(train, held-out) documents of the corpus, in a fixed order (every `HELDOUT_EVERY`-th held out).

    Needs the Debian packages `fortunes` and `wordnet-base`; a clear error says how to install them.
    """
    missing = [p for p in (FORTUNES / "fortunes", WORDNET / "data.noun") if not p.exists()]
    if missing:
        raise LenslabError(
            f"the english-4l corpus needs {', '.join(map(str, missing))}: "
            "run `apt-get update && apt-get install -y fortunes wordnet-base`"
        )
    docs = _fortune_docs() + _wordnet_docs()
    random.Random(0).shuffle(docs)
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == 0]
    return train, held


def bpe_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    """A byte-level BPE (GPT-2's pre-tokenisation and byte alphabet) trained on `texts`, as a
    Hugging Face fast tokenizer that prepends `<bos>` like the other zoo tokenizers."""
    from tokenizers import (  # deferred: tokenizers loads only when a tokenizer is built
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads only for Hugging Face checkpoints

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, add_bos_token=True, name_or_path="lenslab-english-bpe", **SPECIAL_TOKENS
    )


def pack(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one stream of token ids, `<bos>` before each: `[n_tokens]` (int32)."""
    ids = tok(docs, add_special_tokens=True)["input_ids"]
    return torch.tensor([t for row in ids for t in row], dtype=torch.int32)


LICENSES_HEAD = """# Licences of the english-4l training text

The model was trained on text from the Debian packages `fortunes` and `wordnet-base`; `heldout.txt`
holds 2,000 documents of that text. Their copyright files follow, verbatim.
"""


def write_licences(out_dir) -> None:
    """Copy the Debian copyright files of the corpus packages into `out_dir/LICENSES.md`."""
    texts = [Path(f"/usr/share/doc/{pkg}/copyright").read_text().strip() for pkg in ("fortunes", "wordnet-base")]
    body = "".join(f"\n## {pkg}\n\n```\n{t}\n```\n" for pkg, t in zip(("fortunes", "wordnet-base"), texts))
    (Path(out_dir) / "LICENSES.md").write_text(LICENSES_HEAD + body)


# --- model and training ---------------------------------------------------------------------


def _config(d_vocab: int, seed: int):
    from transformer_lens import HookedTransformerConfig  # deferred: transformer_lens loads only when a model is built

    return HookedTransformerConfig(
        n_layers=4,
        d_model=192,
        n_heads=6,
        d_head=32,
        d_mlp=768,
        n_ctx=N_CTX,
        d_vocab=d_vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=32,
        model_name=NAME,
        seed=seed,
        default_prepend_bos=True,
    )


def copy_spans(tokens: torch.Tensor, gen: torch.Generator, p: float = COPY_P) -> torch.Tensor:
    """Copy a span of each chosen row's own text further on in the row, in place: `[batch, pos]`.

    Duplicated text is what pays for an induction head; web corpora have plenty, 10 MB of fortunes and
    glosses have almost none. A row is chosen with probability `p`; the span length is uniform in
    `COPY_SPAN`. (The card says what this did and did not grow.)
    """
    n_pos = tokens.shape[1]
    for row in range(tokens.shape[0]):
        if torch.rand((), generator=gen).item() >= p:
            continue
        length = int(torch.randint(COPY_SPAN[0], COPY_SPAN[1] + 1, (), generator=gen))
        src = int(torch.randint(0, n_pos - 2 * length, (), generator=gen))
        dst = int(torch.randint(src + length, n_pos - length + 1, (), generator=gen))
        tokens[row, dst : dst + length] = tokens[row, src : src + length].clone()
    return tokens


def doubled_passages(stream: torch.Tensor, gen: torch.Generator, batch: int, bos: int) -> torch.Tensor:
    """Stage 1's batch `[batch, 1 + 2 L]`: `<bos> X X`, X a random passage of `stream` (one length L
    per batch, uniform in `STAGE1_LEN`). Every token of the second copy is predictable from the first:
    the strongest signal there is for a previous-token head and an induction head."""
    length = int(torch.randint(STAGE1_LEN[0], STAGE1_LEN[1] + 1, (), generator=gen))
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen)
    x = torch.stack([stream[s : s + length] for s in starts.tolist()]).long()
    return torch.cat([torch.full((batch, 1), bos), x, x], dim=1)


def double_spans(tokens: torch.Tensor, gen: torch.Generator, p: float = DOUBLE_P) -> torch.Tensor:
    """In place: in a share `p` of the rows of `[batch, pos]`, a passage (length in `STAGE1_LEN`) is
    followed at once by itself, as stage 1 taught."""
    n_pos = tokens.shape[1]
    for row in range(tokens.shape[0]):
        if torch.rand((), generator=gen).item() >= p:
            continue
        length = int(torch.randint(STAGE1_LEN[0], STAGE1_LEN[1] + 1, (), generator=gen))
        src = int(torch.randint(0, n_pos - 2 * length + 1, (), generator=gen))
        tokens[row, src + length : src + 2 * length] = tokens[row, src : src + length].clone()
    return tokens


def _lr_factor(step: int, stage1: int, steps: int) -> float:
    """The learning-rate multiplier: stage 1's `stage1` steps (warm-up, cosine over
    `STAGE1_HORIZON`), then stage 2 from a fresh warm-up (cosine over its `steps` to 10%)."""
    if step < stage1:
        s, warm, horizon = step, STAGE1_WARMUP, STAGE1_HORIZON
    else:
        s, warm, horizon = step - stage1, WARMUP, steps
    return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / horizon)))


@torch.no_grad()
def repeat_losses(model, rows: int = REPEAT_ROWS, length: int = REPEAT_LEN) -> tuple[float, float]:
    """Mean next-token loss (nats) on the first and on the second copy of `<bos> x x`, where x is
    `length` tokens of held-out text (`rows` consecutive passages of the packed `heldout.txt`).
    In-context copying on ordinary text: the second number is lower when the model reads the first copy."""
    x = token_stream(model)[: rows * length].view(rows, length)
    bos = torch.full((rows, 1), model.tokenizer.bos_token_id)
    toks = torch.cat([bos, x, x], 1)
    nll = -torch.log_softmax(model(toks), -1)[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]
    return nll[:, 1:length].mean().item(), nll[:, length + 1 :].mean().item()


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, n_rows: int = 64) -> float:
    """Mean next-token loss (nats) over the first `n_rows` rows of `N_CTX` tokens of `stream`."""
    n = min(n_rows, len(stream) // N_CTX)
    rows = stream[: n * N_CTX].view(n, N_CTX).long()
    losses = [model(rows[i : i + 16], return_type="loss").item() for i in range(0, n, 16)]
    return sum(losses) / len(losses)


def train(
    out_dir, seed: int = 0, steps: int = STEPS, threads: int = 2, checkpoints=None, n_checkpoints: int = DEFAULT_N
) -> None:
    """Train zoo/english-4l and write it (float16 weights, tokenizer, held-out text, card) to `out_dir`;
    with `checkpoints`, also `n_checkpoints` log-spaced float16 checkpoints to `checkpoints/step{N}/`
    (`lenslab.zoo.checkpoints`; they change nothing about the run)."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    t0 = time.time()
    train_docs, held_docs = documents()
    tok = bpe_tokenizer(train_docs)
    stream = pack(tok, train_docs)
    held = pack(tok, held_docs)
    print(json.dumps({"train_tokens": len(stream), "heldout_tokens": len(held), "s": round(time.time() - t0)}))
    cfg = _config(len(tok), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )
    stage1 = STAGE1_STEPS if steps == STEPS else min(STAGE1_STEPS, steps)  # `--steps N`: a smoke run, both stages short
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, stage1, steps))
    gen = torch.Generator().manual_seed(seed)
    copy_gen = torch.Generator().manual_seed(seed + 1)
    stage1_gen = torch.Generator().manual_seed(seed + 2)
    double_gen = torch.Generator().manual_seed(seed + 3)
    total = stage1 + steps
    n_windows = len(stream) - N_CTX - 1
    log = []
    save = CheckpointSaver.for_run(
        checkpoints,
        total,
        tok,
        NAME,
        n_checkpoints,
        weights_dtype=torch.float16,
        extra={"default_prompt": DEFAULT_PROMPT},
    )
    bar = tqdm(range(total), desc=NAME, mininterval=10)
    for step in bar:
        save(model, step)
        if step < stage1:
            tokens = doubled_passages(stream, stage1_gen, STAGE1_BATCH, tok.bos_token_id)
        else:
            starts = torch.randint(0, n_windows, (BATCH,), generator=gen)
            tokens = torch.stack([stream[s : s + N_CTX + 1] for s in starts.tolist()]).long()
            tokens = double_spans(copy_spans(tokens, copy_gen), double_gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 200 == 0 or step == total - 1:
            model.eval()
            entry = {"step": step, "loss": round(loss.item(), 4), "heldout": round(heldout_loss(model, held, 16), 4)}
            heads = head_scores(model)
            entry["induction"] = round(float(heads["induction"].max()), 3)
            entry["prev_token"] = round(float(heads["prev_token"].max()), 3)
            model.train()
            entry["s"] = round(time.time() - t0)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    save(model, total)
    model.eval()
    training = {
        "steps": steps,
        "stage1_steps": stage1,
        "stage1_batch": STAGE1_BATCH,
        "stage1_len": list(STAGE1_LEN),
        "double_p": DOUBLE_P,
        "batch": BATCH,
        "n_ctx": N_CTX,
        "lr": LR,
        "copy_p": COPY_P,
        "copy_span": list(COPY_SPAN),
        "seed": seed,
        "threads": threads,
        "seconds": round(time.time() - t0),
        "train_tokens": len(stream),
        "heldout_tokens": len(held),
        "train_documents": len(train_docs),
        "log": log,
    }
    save_hooked(model, tok, out_dir, summary=SUMMARY, card="(pending evaluation)\n", weights_dtype=torch.float16)
    (out_dir / "heldout.txt").write_text("\n".join(held_docs[:N_HELDOUT]) + "\n")
    write_licences(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    meta["training"] = training
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_card(out_dir)


def load(out_dir=None):
    """The model in `out_dir` (default: the committed zoo folder), float32 on CPU."""
    folder = Path(out_dir) if out_dir else Path(__file__).resolve().parent / NAME
    return load_hooked(folder, torch.device("cpu"), torch.float32)


# --- measurements for the card (and tests/test_zoo_english.py) -------------------------------

SAMPLE_PROMPTS = ("The meaning of life is", "A good friend is someone who", "Once upon a time, there was a")
SEQ_LEN = 50  # repeated random tokens: `<bos> A A` with |A| = 50, as in the TransformerLens induction demo
SINK_LEN = 64  # Gu et al. measure attention sinks on 64-token samples
IND_BAR, PREV_BAR = 0.4, 0.4  # a head counts as an induction / previous-token head above these scores


def heldout_docs(folder=None) -> list[str]:
    """The committed held-out documents (`heldout.txt`, one per line; never trained on)."""
    folder = Path(folder) if folder else Path(__file__).resolve().parent / NAME
    return [line for line in (folder / "heldout.txt").read_text().splitlines() if line.strip()]


# tokenizer -> {split: packed stream}: a split is tokenised once per tokenizer (weak keys: a model's
# tokenizer, dropped with it), so a retrained tokenizer never reads another's stream
_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_stream(model, split: str = "heldout") -> torch.Tensor:
    """The packed token stream `[n_tokens]` (int64, `<bos>` before each document) of a split, in
    `model`'s tokenizer: `"heldout"` is the committed `heldout.txt`, `"train"` the training split
    (needs the Debian packages). Cached per tokenizer; do not modify it in place."""
    if split not in ("heldout", "train"):
        raise LenslabError(f"split must be 'heldout' or 'train', got {split!r}")
    per_tokenizer = _STREAMS.setdefault(model.tokenizer, {})
    if split not in per_tokenizer:
        docs = heldout_docs() if split == "heldout" else documents()[0]
        per_tokenizer[split] = pack(model.tokenizer, docs).long()
    return per_tokenizer[split]


def heldout_rows(model, n_rows: int | None = None, n_ctx: int = N_CTX, at_bos: bool = False) -> torch.Tensor:
    """Held-out token rows `[n, n_ctx]`, packed like training (`<bos>` before each document).

    `at_bos=True`: every row starts at a document's `<bos>` (one row per document start that has
    `n_ctx` tokens after it); else consecutive windows of the packed stream.
    """
    stream = token_stream(model)
    if at_bos:
        bos = int(model.tokenizer.bos_token_id)
        starts = [int(i) for i in (stream == bos).nonzero()[:, 0] if i + n_ctx <= len(stream)]
        rows = torch.stack([stream[s : s + n_ctx] for s in starts])
    else:
        rows = stream[: len(stream) // n_ctx * n_ctx].view(-1, n_ctx).clone()
    return rows if n_rows is None else rows[:n_rows]


CORPUS_CTX = 128  # rows of the built-in corpus (SAEs, transcoders, lenses, the Features page)


def windows(model, n: int, seed: int, split: str = "heldout", n_ctx: int = CORPUS_CTX) -> torch.Tensor:
    """`n` seeded random windows `[n, n_ctx]` of the packed token stream of a split.

    `split="heldout"`: the committed `heldout.txt` (what `--corpus zoo` means: works on any
    clone); `split="train"`: the training split (needs the Debian packages; what the zoo's SAEs,
    transcoders and tuned lens of this model are trained on).
    """
    stream = token_stream(model, split)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - n_ctx, (n,), generator=gen)
    return torch.stack([stream[s : s + n_ctx] for s in starts.tolist()])


def random_repeats(model, n: int = 32, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """`[n, 1 + 2 * seq_len]`: `<bos> A A`, `A` uniformly random non-special tokens."""
    special = set(model.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    a = pool[torch.randint(len(pool), (n, seq_len), generator=gen)]
    return torch.cat([torch.full((n, 1), int(model.tokenizer.bos_token_id)), a, a], dim=1)


@torch.no_grad()
def head_scores(model, n: int = 32, seq_len: int = SEQ_LEN, seed: int = 0) -> dict:
    """Induction and previous-token scores of every head on repeated random tokens.

    Returns `induction` and `prev_token` `[layer, head]` (mean attention from each token of the
    second copy to the token after its first occurrence; mean attention to position - 1), and
    the mean next-token loss on the first and on the repeated copy (nats).
    """
    toks = random_repeats(model, n, seq_len, seed)
    logits, cache = model.run_with_cache(toks, names_filter=lambda name: name.endswith("hook_pattern"))
    nll = -logits.log_softmax(-1)[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]  # nll[:, q] predicts toks[:, q+1]
    q = torch.arange(seq_len + 1, 2 * seq_len + 1)
    qp = torch.arange(1, 2 * seq_len + 1)
    pats = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])  # [layer, n, head, q, k]
    return {
        "induction": pats[:, :, :, q, q - seq_len + 1].mean((1, 3)),
        "prev_token": pats[:, :, :, qp, qp - 1].mean((1, 3)),
        "loss_first_half": float(nll[:, 1:seq_len].mean()),
        "loss_repeated_half": float(nll[:, seq_len + 1 : 2 * seq_len].mean()),
    }


def _heads(scores: torch.Tensor, bar: float) -> list[list]:
    order = scores.flatten().argsort(descending=True).tolist()
    n_heads = scores.shape[1]
    return [
        [i // n_heads, i % n_heads, round(float(scores.flatten()[i]), 3)] for i in order if scores.flatten()[i] > bar
    ]


@torch.no_grad()
def samples(model, max_new_tokens: int = 24, seed: int = 0) -> list[dict]:
    """Greedy and sampled (temperature 0.8, top-k 40, seeded) continuations of `SAMPLE_PROMPTS`."""
    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        greedy = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, verbose=False)
        torch.manual_seed(seed + i)
        sampled = model.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40, verbose=False
        )
        out.append({"prompt": prompt, "greedy": greedy[len(prompt) :], "sampled": sampled[len(prompt) :]})
    return out


def verify(model) -> dict:
    """Everything the card reports, measured on `model` (the saved weights)."""
    from lenslab.probes.sinks import attention_sinks, massive_activations  # deferred: only the card needs it

    rows = heldout_rows(model)
    losses = [
        model(rows[i : i + 32], return_type="loss").item() * len(rows[i : i + 32]) for i in range(0, len(rows), 32)
    ]
    loss = sum(losses) / len(rows)
    hs = head_scores(model)
    first, repeat = repeat_losses(model)
    sink_rows = heldout_rows(model, 256, SINK_LEN, at_bos=True)
    mid_rows = heldout_rows(model, 256, SINK_LEN)  # windows starting mid-document, as most training rows did
    sinks = {}
    for key, toks in (("bos_first", sink_rows), ("window_first", mid_rows)):
        res = attention_sinks(model, toks)
        sinks[key] = {
            "sink_rate": round(res.sink_rate, 3),
            "attn_to_first": [[round(float(x), 3) for x in row] for row in res.attn_to_first],
            "sink_heads": [list(h) for h in res.sink_heads()],
        }
    massive = massive_activations(model, heldout_rows(model, 64, N_CTX, at_bos=True))
    top = massive.top_values[:, 0].abs()
    ratio = top / massive.medians
    return {
        "heldout_loss": round(loss, 4),
        "heldout_perplexity": round(math.exp(loss), 2),
        "heldout_tokens": int(rows.numel()),
        "bytes_per_token": round(sum(len(d) for d in heldout_docs()) / (rows.numel() or 1), 3),
        "induction": {
            "seq_len": SEQ_LEN,
            "loss_first_half": round(hs["loss_first_half"], 3),
            "loss_repeated_half": round(hs["loss_repeated_half"], 3),
            "scores": [[round(float(x), 3) for x in row] for row in hs["induction"]],
            "heads": _heads(hs["induction"], IND_BAR),
        },
        "prev_token": {
            "scores": [[round(float(x), 3) for x in row] for row in hs["prev_token"]],
            "heads": _heads(hs["prev_token"], PREV_BAR),
        },
        "repeat": {
            "rows": REPEAT_ROWS,
            "length": REPEAT_LEN,
            "loss_first": round(first, 3),
            "loss_repeat": round(repeat, 3),
        },
        "sinks": sinks,
        "massive": {
            "n_massive": len(massive.massive),
            "rule": "Sun et al.: |a| > 100 and >= 1000 x the median |a| of the hidden state",
            "top_per_layer": [round(float(v), 2) for v in top],
            "ratio_to_median": [round(float(r), 1) for r in ratio],
            "top_dims": [int(d) for d in massive.top_dims[:, 0]],
            "top_tokens": [t[0] for t in massive.top_tokens],
        },
        "samples": samples(model),
    }


def _head_list(heads: list[list]) -> str:
    return ", ".join(f"L{layer}H{h} ({s:.2f})" for layer, h, s in heads) or "none above the bar"


def write_card(out_dir=None) -> None:
    """Measure the saved model in `out_dir` (default: the committed folder) and (re)write card.md
    and the config.json extras (default prompt, prompt sets, verification)."""
    from lenslab.data import english  # deferred: only the card writer needs the English prompt sets

    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / NAME
    meta = json.loads((out_dir / "config.json").read_text())
    training = meta.get("training", {})
    model = load(out_dir)
    v = verify(model)
    meta.update(
        {
            "default_prompt": DEFAULT_PROMPT,
            "prompt_sets": english.prompt_sets(),
            "verification": {k: x for k, x in v.items() if k != "samples"},
            "mechanism": {"induction_heads": v["induction"]["heads"], "prev_token_heads": v["prev_token"]["heads"]},
        }
    )
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    ind, prev, sinks, mass, rep = v["induction"], v["prev_token"], v["sinks"], v["massive"], v["repeat"]
    log = "\n".join(
        f"| {e['step']} | {e['loss']:.3f} | {e['heldout']:.3f} | {e.get('induction', float('nan')):.2f} | "
        f"{e.get('prev_token', float('nan')):.2f} | {e['s']} |"
        for e in training.get("log", [])
    )
    sample_rows = "\n".join(
        f"- **{s['prompt']}** greedy: `{s['greedy'].strip()}` · sampled: `{s['sampled'].strip()}`" for s in v["samples"]
    )

    def grid(scores) -> str:
        head = "| layer | " + " | ".join(f"H{h}" for h in range(cfg.n_heads)) + " |\n|---|" + "---|" * cfg.n_heads
        return (
            head
            + "\n"
            + "\n".join(f"| {i} | " + " | ".join(f"{x:.2f}" for x in row) + " |" for i, row in enumerate(scores))
        )

    (out_dir / "card.md").write_text(f"""# zoo/english-4l

A small GPT-2-style language model that reads **real English**: quotations, literature, jokes and
dictionary glosses. The app opens on it; the planted-mechanism models stay the ground truth of the
tests.

## Config
- TransformerLens `HookedTransformer`, {cfg.n_layers} layers, `d_model={cfg.d_model}`, {cfg.n_heads} heads of
  `d_head={cfg.d_head}`, `d_mlp={cfg.d_mlp}` (`gelu_new`), pre-LN LayerNorm, rotary positions
  (`rotary_dim={cfg.rotary_dim}`, as in GPT-J, GPT-NeoX and Pythia; no position embedding), `n_ctx={cfg.n_ctx}`, untied
  embedding and unembedding; {n_params:,} parameters. Rotary rather than GPT-2's learned absolute
  positions because with those no head of this model learned to attend to the previous token within
  the CPU budget (Training, "What it took").
- Stored in float16 (`model.safetensors`, {size_mb:.1f} MB); it loads in float32 (or the dtype asked for).
- Tokenizer: byte-level BPE of {cfg.d_vocab:,} tokens (GPT-2's byte alphabet and pre-tokenisation, leading
  spaces as in GPT-2: `" John"`), trained on the training split with Hugging Face `tokenizers`; `<bos>` is
  prepended, specials `<bos> <eos> <pad> <unk>`. Why not GPT-2's own 50,257: its embedding and unembedding
  alone would be 2 x 50,257 x {cfg.d_model} floats (77 MB in float32, larger than everything else in the
  zoo together), and most of those rows would never be trained on 13 MB of text; this BPE reads the
  held-out text at {v["bytes_per_token"]:.2f} bytes per token.

## Corpus (source and licence)
{training.get("train_documents", 0):,} training documents, {training.get("train_tokens", 0):,} tokens (about 13 MB
of text), from two Debian packages (`apt-get install fortunes wordnet-base`):
- **fortunes** (BSD `fortune`'s data files: quotations, literature, proverbs, jokes; every fortune one
  document; ASCII art and non-English files left out). Licence: BSD (University of California), with
  per-file notices; the package's copyright file is copied to `LICENSES.md`.
- **WordNet 3.0** (`wordnet-base`: every synset as `words: definition. "examples"`). Licence: the WordNet
  3.0 licence (permissive; its notice must travel with copies: `LICENSES.md`).

Every 50th document (after a seeded shuffle) is held out; `heldout.txt` keeps 2,000 of them, so a fresh
clone measures the model without the Debian packages.

## Training
Two stages, one AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {training.get("lr")}, gradient
clipping 1.0, seed {training.get("seed")}, {training.get("seconds", 0) / 60:.0f} min on {training.get("threads")} CPU threads in all.

1. **Doubled passages** ({training.get("stage1_steps")} steps): every step {training.get("stage1_batch")} rows of `<bos> X X`, `X` a random
   passage of the training text of {STAGE1_LEN[0]}-{STAGE1_LEN[1]} tokens (one length per step); {STAGE1_WARMUP} warm-up steps, a cosine
   over {STAGE1_HORIZON:,} steps cut at {training.get("stage1_steps"):,}. Every token of the second copy can be read off the first:
   the strongest signal there is for a previous-token head and an induction head. The phase change
   comes late in this stage (the table: the highest induction score jumps between steps 600 and 1,000).
2. **Packed text** ({training.get("steps"):,} steps): documents packed GPT-2-style (`<bos>` before each) into a stream, each
   step {training.get("batch")} random windows of {training.get("n_ctx")} tokens ({training.get("steps", 0) * training.get("batch", 0) * training.get("n_ctx", 0):,} tokens, about
   {training.get("steps", 0) * training.get("batch", 0) * training.get("n_ctx", 0) / max(1, training.get("train_tokens", 1)):.1f} epochs); {WARMUP} warm-up steps, cosine decay to 10%. In {training.get("copy_p", 0):.0%} of the windows
   a span of {COPY_SPAN[0]}-{COPY_SPAN[1]} tokens of the window's own text is copied further on (`copy_spans`), and in
   {training.get("double_p", 0):.0%} a passage of {STAGE1_LEN[0]}-{STAGE1_LEN[1]} tokens is followed at once by itself (`double_spans`): web text
   repeats itself (quotes, boilerplate, names) and pays for the heads; fortunes and glosses hardly do.

Rebuild with `lenslab zoo train english-4l` (deterministic for a thread count).

**What it took** (runs of this architecture on 2 CPU threads, 2026-12-07; highest score over all
heads on `<bos> A A` with 50 random tokens, as below). The first english-4l (learned absolute
positions, packed text with copied spans, 2,400 steps) had neither head: previous-token 0.21,
induction 0.02, and its layer-0 heads attended uniformly (entropy 4.5 nats on held-out text);
earlier runs with up to 30% repeated tokens gave repeat gains of 0.006-0.09 nats. Then, from scratch:
- learned positions initialised sinusoidally (Vaswani et al.), packed text plus a repeated random
  block in a quarter of the windows: previous-token 0.06 at step 200;
- learned positions on doubled passages (stage 1's data): previous-token 0.13, induction 0.03 at
  step 500;
- rotary positions on the packed text (with or without repeated random blocks): previous-token
  0.35 by step 100 and 0.47 at step 500, induction 0.02-0.03;
- rotary positions on doubled passages (stage 1): previous-token 0.60 at step 300, induction 0.05
  at 300, 0.14 at 700, 0.43 at 800, 0.67 at 900 (repeat loss 10.9 -> 7.4 nats), a previous-token
  head in layer 1 feeding induction heads in layers 2 and 3;
- rotary positions on doubled *random* tokens of the 4,096-token vocabulary: the uniform loss for
  500 steps (zoo/induction-2l needs 1,600 steps of batch 64 over 300 tokens).
So the positions decide whether a previous-token head forms at all at this budget, and doubled
real text (frequent tokens, learnt while the heads form) brings the induction phase change within
1,000 steps. The probes' script: `benchmarks/english_induction.py`.

The log counts both stages (stage 2 starts at step {training.get("stage1_steps", 0):,}); head scores as below.

| step | training loss (batch) | held-out loss (16 rows) | induction (max) | previous-token (max) | seconds |
|---|---|---|---|---|---|
{log}

## Held-out loss
**{v["heldout_loss"]:.3f} nats per token, perplexity {v["heldout_perplexity"]:.1f}** on {v["heldout_tokens"]:,} tokens of
`heldout.txt` packed like training (rows of {N_CTX}).

## Samples
{sample_rows}

## What it shows (measured on the committed weights; `tests/test_zoo_english.py`)
**Copying ordinary text.** {rep["rows"]} held-out passages of {rep["length"]} tokens, each read twice after `<bos>`:
{rep["loss_first"]:.2f} nats per token on the first copy, {rep["loss_repeat"]:.2f} on the second
({"it reads the first copy" if rep["loss_first"] - rep["loss_repeat"] > 1 else "almost no use of the first copy"}).

**Induction.** On `<bos> A A` with `A` {ind["seq_len"]} uniformly random tokens (32 rows): loss
{ind["loss_first_half"]:.2f} nats on the first copy (chance: ln {cfg.d_vocab} = {math.log(cfg.d_vocab):.2f}), {ind["loss_repeated_half"]:.2f}
on the repeat. Induction score (mean attention from each repeated token to the token after its first
occurrence) per head:

{grid(ind["scores"])}

Induction heads (score > {IND_BAR}): {_head_list(ind["heads"])}.

**Previous-token heads.** Mean attention to position - 1 on the same rows:

{grid(prev["scores"])}

Previous-token heads (score > {PREV_BAR}): {_head_list(prev["heads"])}.

**Attention sinks** (Gu et al.'s 64-token samples, threshold 0.3; `lenslab.probes.sinks.attention_sinks`):
rows starting at a document's `<bos>`: sink rate {sinks["bos_first"]["sink_rate"]:.2f}, sink heads
{", ".join(f"L{a}H{b}" for a, b in sinks["bos_first"]["sink_heads"]) or "none"}; rows starting mid-document (as most
training windows did, so the first token is an ordinary word): sink rate {sinks["window_first"]["sink_rate"]:.2f}, sink heads
{", ".join(f"L{a}H{b}" for a, b in sinks["window_first"]["sink_heads"]) or "none"}. Mean attention to the first token:

{grid(sinks["bos_first"]["attn_to_first"])}

**Massive activations** (Sun et al.'s rule: |a| > 100 and at least 1000 x the median |a| of its hidden
state; 64 held-out rows of {N_CTX}): {mass["n_massive"]} entries. The largest |a| per layer output is
{", ".join(f"{x:.1f}" for x in mass["top_per_layer"])} (dims {", ".join(map(str, mass["top_dims"]))}), {", ".join(f"{x:.0f}" for x in mass["ratio_to_median"])} x
the median: {"no massive activations at this scale" if mass["n_massive"] == 0 else "massive activations are present"}.
""")
