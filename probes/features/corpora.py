"""Corpora for a feature store: a zoo model's built-in corpus, corpus files, and their tokenization.

- `corpus_for`: the built-in corpus of a zoo model (what `--corpus zoo` means).
- `read_corpus`: a `.txt`, `.json` or `.jsonl` corpus file.
- `tokenize_corpus` / `corpus_hash`: the token ids `index` stores per prompt, and their fingerprint
  (how a resumed run recognises its corpus).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from lenslab import tasks, zoo
from lenslab._errors import LenslabError
from lenslab.data import ioi, refusal, sentiment
from lenslab.toolbox import model_name

__all__ = ["corpus_for", "corpus_hash", "read_corpus", "tokenize_corpus"]


def corpus_for(model, n: int = 256, seed: int = 0) -> list[str] | Tensor:
    """The built-in corpus of a zoo model (what `--corpus zoo` means): documents like its training
    data. steer-sentiment: `sentiment.documents`; ioi-4l: IOI prompts (clean and ABC-corrupted);
    induction-2l: repeated random token blocks (`tasks.induction`, `[n, 2 * 16]` token ids);
    moe-refusal: harmful and benign `refusal` prompts."""
    name = model_name(model).removeprefix("zoo/")
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
        f"{', '.join(sorted({'zoo/steer-sentiment', 'zoo/ioi-4l', 'zoo/induction-2l', 'zoo/moe-refusal'} & set(zoo.zoo_names())))}); "
        "pass a corpus file: one document per line (.txt), a JSON list of strings or of token-id lists, "
        "or .jsonl with a 'text' field"
    )


def read_corpus(path: str | Path) -> list[str] | list[list[int]]:
    """A corpus file: `.txt` (one document per non-empty line), `.json` (a list of strings or of
    token-id lists) or `.jsonl` (one object per line with a `"text"` field)."""
    p = Path(path)
    if not p.is_file():
        raise LenslabError(f"corpus file {str(path)!r} does not exist; pass a .txt/.json/.jsonl file or 'zoo'")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not data:
            raise LenslabError(f"{p.name}: a JSON corpus is a non-empty list of strings or of token-id lists")
        return data
    if p.suffix.lower() == ".jsonl":
        out = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    else:
        out = [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise LenslabError(f"corpus file {p.name} has no documents")
    return out


def tokenize_corpus(model, corpus, context_size: int) -> list[np.ndarray]:
    """Each document as int32 token ids (BOS prepended to strings; trailing pad tokens of token-id
    rows dropped when the pad token is neither BOS nor EOS), truncated to `context_size`."""
    limit = min(int(context_size), int(getattr(model.cfg, "n_ctx", context_size) or context_size))
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    strip_pad = pad is not None and pad not in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None))
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2:
            raise LenslabError(f"a token corpus is [n_prompts, pos], got shape {tuple(corpus.shape)}")
        corpus = corpus.tolist()
    if isinstance(corpus, str) or not isinstance(corpus, Sequence) or len(corpus) == 0:
        raise LenslabError("corpus must be a non-empty list of strings, a list of token-id lists or a [n, pos] tensor")
    out = []
    for doc in corpus:
        if isinstance(doc, str):
            ids = model.to_tokens(doc, prepend_bos=True)[0].tolist()
        else:
            ids = [int(i) for i in doc]
            while strip_pad and ids and ids[-1] == pad:  # right padding of a token-id corpus
                ids.pop()
        if not ids:
            continue
        out.append(np.asarray(ids[:limit], dtype=np.int32))
    if not out:
        raise LenslabError("the corpus has no tokens")
    return out


def corpus_hash(seqs: list[np.ndarray]) -> str:
    """sha256 (16 hex) of the prompts' token ids (each an int32 array `[n_tokens]`, with its length)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(s.astype("<i4").tobytes())
    return h.hexdigest()[:16]
