"""Corpora for a feature store: corpus files and their tokenization.

- `read_corpus`: a `.txt`, `.json` or `.jsonl` corpus file.
- `tokenize_corpus` / `corpus_hash`: the token ids `index` stores per prompt, and their fingerprint
  (how a resumed run recognises its corpus).
- `corpus_for`: the built-in corpus of a zoo model (what `--corpus zoo` means), re-exported from
  `lenslab.zoo.corpora`, where the zoo's knowledge lives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.zoo.corpora import corpus_for

__all__ = ["corpus_for", "corpus_hash", "read_corpus", "tokenize_corpus"]


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
        rows = corpus.detach().cpu().numpy().astype(np.int32)
        n = np.full(len(rows), rows.shape[1])
        if strip_pad:  # right padding: the length up to the last non-pad token
            nonpad = rows != pad
            n = np.where(nonpad.any(1), rows.shape[1] - np.argmax(nonpad[:, ::-1], axis=1), 0)
        out = [row[: min(int(k), limit)] for row, k in zip(rows, n) if k]
        if not out:
            raise LenslabError("the corpus has no tokens")
        return out
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
