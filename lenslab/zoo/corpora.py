"""The zoo models' built-in corpora: documents like each model's training data.

`corpus_for(model, n, seed)` is what `--corpus zoo` means to `lenslab sae index` and the Features
page: the text (or token rows) a zoo model was trained on, to index an SAE over. The corpora the
zoo's own SAEs are trained on, with their loss masks, are in `lenslab.zoo.train_saes`.
"""

from __future__ import annotations

from torch import Tensor

from lenslab import tasks, zoo
from lenslab._errors import LenslabError
from lenslab.data import ioi, refusal, sentiment
from lenslab.toolbox import model_name
from lenslab.zoo import train_english_4l

__all__ = ["BUILT_IN", "corpus_for", "training_corpus_for"]

# the models with one
BUILT_IN = ("zoo/english-4l", "zoo/induction-2l", "zoo/ioi-4l", "zoo/moe-refusal", "zoo/steer-sentiment")


def training_corpus_for(model, n: int = 256, seed: int = 0) -> list[str] | Tensor:
    """What the zoo's SAEs, transcoders and tuned lenses of `model` train on: `corpus_for`, except
    for english-4l, whose built-in corpus is its held-out text: it trains on `[n, 128]` windows of
    its training split (`train_english_4l.windows(..., split="train")`, needs the Debian packages)."""
    if model_name(model).removeprefix(zoo.PREFIX) == "english-4l":
        return train_english_4l.windows(model, n, seed, split="train")
    return corpus_for(model, n, seed)


def corpus_for(model, n: int = 256, seed: int = 0) -> list[str] | Tensor:
    """The built-in corpus of a zoo model (what `--corpus zoo` means): documents like its training
    data. english-4l: `[n, 128]` windows of its committed held-out text (never trained on);
    steer-sentiment: `sentiment.documents`; ioi-4l: IOI prompts (clean and ABC-corrupted);
    induction-2l: repeated random token blocks (`tasks.induction`, `[n, 2 * 16]` token ids);
    moe-refusal: harmful and benign `refusal` prompts."""
    name = model_name(model).removeprefix(zoo.PREFIX)
    if name == "english-4l":
        return train_english_4l.windows(model, n, seed)
    if name == "steer-sentiment":
        return sentiment.documents(n, seed=seed)
    if name == "ioi-4l":
        clean, corrupt, _, _ = ioi.make_ioi_prompts(model, n=max(1, (n + 1) // 2), seed=seed)
        return [p for pair in zip(clean, corrupt) for p in pair][:n]
    if name == "induction-2l":
        return tasks.induction(model, n=n, seq_len=16, seed=seed).clean_tokens
    if name == "moe-refusal":
        a, _ = refusal.prompts((n + 1) // 2, "harmful", seed=seed)
        b, _ = refusal.prompts(n // 2, "benign", seed=seed)
        return [p for pair in zip(a, b) for p in pair] + a[len(b) :]

    raise LenslabError(
        f"no built-in corpus for model {name or '?'!r} (built-in: "
        f"{', '.join(sorted(set(BUILT_IN) & set(zoo.zoo_names())))}); "
        "pass a corpus file: one document per line (.txt), a JSON list of strings or of token-id lists, "
        "or .jsonl with a 'text' field"
    )
