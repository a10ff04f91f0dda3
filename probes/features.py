"""SAE features: a feature store on SQLite, per-token lookup, feature dashboards and search.

`index(model, sae, corpus, path)` runs a model and a sae-lens SAE over a corpus once and writes
per-feature statistics and top-activating contexts to one SQLite file; `FeatureStore` reads it back.
`lookup` shows the top features of each token of a prompt, `FeatureDashboard` one feature (contexts
with per-token highlighting, activation histogram, density, logit effects; JSON and standalone HTML
exports) and `search` finds features by token, substring or id.

Store schema (SQLite, stdlib `sqlite3`; one file, schema version 1):

- ``meta(key TEXT PRIMARY KEY, value TEXT)``: JSON values. Identity: ``format``
  (``"lenslab-feature-store"``), ``schema_version``, ``model`` (name), ``model_fingerprint``
  (sha256 of `W_E` and `W_U`, 16 hex), ``d_model``, ``d_vocab``, ``hook``, ``d_in``, ``d_sae``,
  ``sae_source`` (path or id, when known), ``sae_hash`` (sha256 of the SAE's state dict, 16 hex),
  ``sae_architecture``. Settings: ``context_size``, ``batch_size``, ``top_n``, ``window`` (tokens
  kept left and right of a context's token), ``skip_bos``, ``hist_edges``. Corpus and progress:
  ``n_prompts``, ``corpus_hash``, ``next_prompt`` (prompts done), ``total_tokens`` (tokens counted
  so far), ``complete``; ``created``, ``lenslab_version``.
- ``corpus(prompt_id INTEGER PRIMARY KEY, n_tokens INTEGER, tokens BLOB)``: token ids of each
  prompt after truncation to ``context_size`` (int32 little-endian).
- ``vocab(token_id INTEGER PRIMARY KEY, token TEXT)``: the model's token strings.
- ``features(feature INTEGER PRIMARY KEY, n_fire INTEGER, sum_act REAL, max_act REAL, hist BLOB)``:
  per feature the number of counted tokens where it fires (activation > 0), the sum and maximum
  of its activation there, and a histogram of those activations (int64 little-endian, one count
  per bin of ``hist_edges``: fixed log-spaced edges, values below the first edge go to the first
  bin and above the last edge to the last). Density = ``n_fire / total_tokens``; mean activation
  (when firing) = ``sum_act / n_fire``.
- ``contexts(feature, prompt_id, pos, act REAL, start INTEGER, acts BLOB)``: the ``top_n``
  highest activations of each feature (ties: lower prompt id, then position, first), each with
  the feature's activation on every token of the window ``tokens[start:start + len(acts)]``
  (``acts``: float32 little-endian) for highlighting.
- ``token_features(token_id, feature, n_fire INTEGER, sum_act REAL, max_act REAL)``: per token id
  and feature, over the counted positions holding that token: firing count, sum and max (what
  `search` by token or substring ranks on).
- ``logits(feature INTEGER PRIMARY KEY, pos_ids, pos_values, neg_ids, neg_values, hist_heights,
  hist_edges)`` (JSON lists): the direct logit effect ``W_dec[f] @ W_U`` of each feature, its top
  promoted and suppressed tokens and a 32-bin histogram over the vocabulary.

Indexing commits once per batch (statistics, contexts, token table and ``next_prompt`` in one
transaction), so an interrupted run resumes at the first batch not committed, with nothing lost
or counted twice; a resumed run must use the same settings (the batch composition fixes the
order of floating-point sums). The position of the BOS token is skipped by default (it carries
outsized activations in most models), as are padding positions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import lenslab
from lenslab import _ioi, _refusal, _sentiment, figures, tasks, zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.figures import FORMATS, export
from lenslab.probes.sae import check_sae, load_sae
from lenslab.results import JsonResult, provenance

__all__ = [
    "HIST_EDGES",
    "Context",
    "FeatureDashboard",
    "FeatureHit",
    "FeatureStats",
    "FeatureStore",
    "LookupResult",
    "SearchResult",
    "corpus_for",
    "feature_acts",
    "index",
    "logit_effects",
    "lookup",
    "read_corpus",
    "search",
]

FORMAT = "lenslab-feature-store"
SCHEMA_VERSION = 1
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.logspace(-4, 4, 65))
"""Activation histogram bin edges: 64 log-spaced bins from 1e-4 to 1e4 (8 per decade)."""
LOGIT_K = 10
SEARCH_ORDERS = ("max", "mean", "share")
LOGIT_BINS = 32

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE corpus (prompt_id INTEGER PRIMARY KEY, n_tokens INTEGER NOT NULL, tokens BLOB NOT NULL);
CREATE TABLE vocab (token_id INTEGER PRIMARY KEY, token TEXT NOT NULL);
CREATE TABLE features (feature INTEGER PRIMARY KEY, n_fire INTEGER NOT NULL, sum_act REAL NOT NULL,
                       max_act REAL NOT NULL, hist BLOB NOT NULL);
CREATE TABLE contexts (feature INTEGER NOT NULL, prompt_id INTEGER NOT NULL, pos INTEGER NOT NULL,
                       act REAL NOT NULL, start INTEGER NOT NULL, acts BLOB NOT NULL,
                       PRIMARY KEY (feature, prompt_id, pos)) WITHOUT ROWID;
CREATE TABLE token_features (token_id INTEGER NOT NULL, feature INTEGER NOT NULL, n_fire INTEGER NOT NULL,
                             sum_act REAL NOT NULL, max_act REAL NOT NULL, PRIMARY KEY (token_id, feature)) WITHOUT ROWID;
CREATE INDEX token_features_by_feature ON token_features (feature, max_act DESC);
CREATE TABLE logits (feature INTEGER PRIMARY KEY, pos_ids TEXT, pos_values TEXT, neg_ids TEXT, neg_values TEXT,
                     hist_heights TEXT, hist_edges TEXT);
"""


# --------------------------------------------------------------------------------------------
# model + SAE plumbing
# --------------------------------------------------------------------------------------------


def _hook_name(sae) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise LenslabError(
            "the SAE does not say which hook it reads (sae.cfg.metadata.hook_name is empty): set it, e.g. "
            "sae.cfg.metadata.hook_name = 'blocks.1.hook_resid_post'"
        )
    return str(hook)


def _check_pair(model, sae) -> str:
    """The SAE's hook, after `probes.sae.check_sae` (the model has the hook, of the SAE's width)."""
    hook = _hook_name(sae)
    check_sae(model, sae)
    return hook


def _stop_layer(hook: str) -> int | None:
    parts = hook.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if hook in ("hook_embed", "hook_pos_embed"):
        return 0
    return None


@torch.inference_mode()
def feature_acts(model, sae, tokens: Tensor) -> Tensor:
    """SAE feature activations at the SAE's hook: `tokens` `[batch, pos]` -> `[batch, pos, d_sae]` (float32).

    Runs the model only up to the block that holds the hook; `hook_z` activations `[batch, pos,
    head, d_head]` are flattened unless the SAE reshapes them itself, and an SAE of one head
    (`metadata.hook_head_index`) reads that head.
    """
    hook = _check_pair(model, sae)
    stop = _stop_layer(hook)
    kw = {"names_filter": [hook]}
    if stop is not None:
        kw["stop_at_layer"] = stop
    try:
        _, cache = model.run_with_cache(tokens, **kw)
    except TypeError:  # a model without stop_at_layer
        kw.pop("stop_at_layer", None)
        _, cache = model.run_with_cache(tokens, **kw)
    x = cache[hook]
    head = getattr(sae.cfg.metadata, "hook_head_index", None)
    if head is not None and x.ndim == 4:
        x = x[:, :, int(head)]
    elif x.ndim == 4 and getattr(sae.cfg, "reshape_activations", "none") != "hook_z":
        x = x.flatten(-2)
    width = x.shape[-1] if x.ndim == 3 else x.shape[-2] * x.shape[-1]
    if width != sae.cfg.d_in:
        raise LenslabError(
            f"hook {hook!r} has width {width} in this model but the SAE expects d_in={sae.cfg.d_in}; "
            "load the SAE trained for this model"
        )
    x = x.to(device=sae.W_enc.device)
    return sae.encode(x).float()


def _sha(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sae_hash(sae) -> str:
    """sha256 (16 hex) of the SAE's state dict, keys in sorted order."""
    sd = sae.state_dict()
    return _sha([sd[k] for k in sorted(sd)])


def model_identity(model) -> dict:
    """Name, sizes and a fingerprint of the embedding and unembedding (sha256, 16 hex)."""
    name = getattr(model, "lenslab_name", None) or getattr(model.cfg, "model_name", "unknown")
    try:
        fp = _sha([model.W_E, model.W_U])
    except Exception:
        fp = None
    return {
        "model": str(name),
        "model_fingerprint": fp,
        "d_model": int(model.cfg.d_model),
        "d_vocab": int(model.cfg.d_vocab),
    }


def sae_identity(sae, source: str | None = None) -> dict:
    src = source or getattr(sae, "lenslab_source", None) or getattr(sae.cfg.metadata, "sae_path", None)
    return {
        "hook": _hook_name(sae),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "sae_source": str(src) if src else None,
        "sae_hash": sae_hash(sae),
        "sae_architecture": type(sae).__name__,
    }


def _open_sae(source: str, model=None):
    """An SAE by source (`lenslab.probes.sae.load_sae`); records the source on `sae.lenslab_source`."""
    sae = load_sae(source, model=model)
    if getattr(sae, "lenslab_source", None) is None:
        sae.lenslab_source = str(source)
    return sae


def _str_tokens(model, ids) -> list[str]:
    ids = [int(i) for i in ids]
    if not ids:
        return []
    return [str(s) for s in model.to_str_tokens(torch.tensor(ids))]


@torch.no_grad()
def logit_effects(
    model, sae, feature: int, k: int = LOGIT_K
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Direct logit effect of one feature, `W_dec[feature] @ W_U` `[d_vocab]`: the `k` most promoted
    and the `k` most suppressed tokens as (token id, value), strongest first. (No final LayerNorm:
    the direction's direct path to the logits, as in SAE dashboards.)"""
    _check_feature(feature, int(sae.cfg.d_sae))
    v = sae.W_dec[feature].float().to(model.W_U.device) @ model.W_U.float()
    k = min(k, v.shape[0])
    top, bot = v.topk(k), (-v).topk(k)
    return (
        [(int(i), float(x)) for x, i in zip(top.values, top.indices)],
        [(int(i), -float(x)) for x, i in zip(bot.values, bot.indices)],
    )


def _check_feature(feature: int, d_sae: int) -> None:
    if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < d_sae:
        raise LenslabError(f"feature {feature!r} is out of range: this SAE has features 0 .. {d_sae - 1}")


# --------------------------------------------------------------------------------------------
# corpora
# --------------------------------------------------------------------------------------------


def corpus_for(model, n: int = 256, seed: int = 0) -> list[str] | Tensor:
    """The built-in corpus of a zoo model (what `--corpus zoo` means): documents like its training
    data. steer-sentiment: `_sentiment.documents`; ioi-4l: IOI prompts (clean and ABC-corrupted);
    induction-2l: repeated random token blocks (`tasks.induction`, `[n, 2 * 16]` token ids);
    moe-refusal: harmful and benign `_refusal` prompts."""
    name = str(getattr(model, "lenslab_name", "") or "").removeprefix("zoo/")
    if name == "steer-sentiment":
        return _sentiment.documents(n, seed=seed)
    if name == "ioi-4l":
        clean, corrupt, _, _ = _ioi.make_ioi_prompts(model, n=max(1, (n + 1) // 2), seed=seed)
        return [p for pair in zip(clean, corrupt) for p in pair][:n]
    if name == "induction-2l":
        return tasks.induction(model, n=n, seq_len=16, seed=seed).clean_tokens
    if name == "moe-refusal":
        a, _ = _refusal.prompts((n + 1) // 2, "harmful", seed=seed)
        b, _ = _refusal.prompts(n // 2, "benign", seed=seed)
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


def _tokenize_corpus(model, corpus, context_size: int) -> list[np.ndarray]:
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


def _corpus_hash(seqs: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(s.astype("<i4").tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """One feature's statistics over the indexed tokens."""

    feature: int
    n_fire: int
    total_tokens: int
    max_act: float
    mean_act: float  # over the tokens where it fires
    hist_counts: list[int]
    hist_edges: list[float]

    @property
    def density(self) -> float:
        """Fraction of indexed tokens on which the feature fires."""
        return self.n_fire / self.total_tokens if self.total_tokens else 0.0


@dataclass(frozen=True)
class Context:
    """One top-activating context: the feature's activation `act` at `pos` of prompt `prompt_id`,
    and its activation on each token of the window `tokens` (`acts`, aligned; `start` = the
    window's first position, so the context's token is `tokens[pos - start]`)."""

    prompt_id: int
    pos: int
    act: float
    start: int
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]

    @property
    def index(self) -> int:
        """Index of the context's token in the window."""
        return self.pos - self.start

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "pos": self.pos,
            "act": self.act,
            "start": self.start,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "acts": self.acts,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Context:
        return cls(
            prompt_id=int(d["prompt_id"]),
            pos=int(d["pos"]),
            act=float(d["act"]),
            start=int(d["start"]),
            token_ids=[int(i) for i in d["token_ids"]],
            tokens=list(d["tokens"]),
            acts=[float(a) for a in d["acts"]],
        )


class FeatureStore:
    """A feature store on disk (SQLite; the schema is in the module docstring).

    >>> import lenslab
    >>> from lenslab.probes.sae import load_sae
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> sae = load_sae("zoo/steer-sentiment/blocks.1.hook_resid_post", model=model)
    >>> index(model, sae, corpus_for(model, 64), "store.sqlite", progress=False)   # writes the store
    FeatureStore(store.sqlite: model zoo/steer-sentiment, hook blocks.1.hook_resid_post, SAE ... (d_sae 384),
    1854 tokens from 64 prompts (complete))
    >>> store = FeatureStore("store.sqlite")
    >>> round(store.stats(149).density, 3)   # the share of tokens where feature 149 fires
    0.132
    >>> [c.tokens[c.index] for c in store.contexts(149)[:5]]   # its top contexts: negative adjectives
    ['grim', 'awful', 'rude', 'terrible', 'horrible']
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LenslabError(
                f"feature store {str(path)!r} does not exist; build one with "
                "`lenslab sae index --model M --sae S --corpus zoo --out store.sqlite`"
            )
        self._con = sqlite3.connect(str(self.path))
        try:
            rows = self._con.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise LenslabError(
                f"{self.path.name} is not a lenslab feature store ({exc}); build one with `lenslab sae index`"
            ) from exc
        self.meta = {k: json.loads(v) for k, v in rows}
        if self.meta.get("format") != FORMAT:
            self._con.close()
            raise LenslabError(
                f"{self.path.name} is not a lenslab feature store (no format marker); build one with `lenslab sae index`"
            )
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            self._con.close()
            raise LenslabError(
                f"{self.path.name} has store schema {self.meta.get('schema_version')}, this lenslab reads "
                f"{SCHEMA_VERSION}; index the corpus again"
            )
        self._vocab: dict[int, str] | None = None

    # -- identity ----------------------------------------------------------------------------
    @property
    def hook(self) -> str:
        return self.meta["hook"]

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def total_tokens(self) -> int:
        return int(self.meta["total_tokens"])

    @property
    def n_prompts(self) -> int:
        return int(self.meta["n_prompts"])

    @property
    def n_indexed(self) -> int:
        """Prompts indexed so far (all of them when `complete`)."""
        return int(self.meta["next_prompt"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def hist_edges(self) -> list[float]:
        return list(self.meta["hist_edges"])

    def describe(self) -> str:
        m = self.meta
        state = "complete" if self.complete else f"partial: {self.n_indexed} of {self.n_prompts} prompts"
        return (
            f"{self.path.name}: model {m['model']}, hook {m['hook']}, SAE {m.get('sae_source') or m['sae_hash']} "
            f"(d_sae {m['d_sae']}), {self.total_tokens} tokens from {self.n_prompts} prompts ({state})"
        )

    def check(self, model=None, sae=None) -> None:
        """Raise `LenslabError` unless `model` / `sae` are the ones this store was built with."""
        m = self.meta
        if sae is not None:
            ident = sae_identity(sae)
            if (ident["hook"], ident["d_sae"], ident["d_in"], ident["sae_hash"]) != (
                m["hook"],
                m["d_sae"],
                m["d_in"],
                m["sae_hash"],
            ):
                raise LenslabError(
                    f"feature store {self.path.name} was built with another SAE: {m.get('sae_source') or '(unnamed)'} "
                    f"(hook {m['hook']}, d_sae {m['d_sae']}, weights {m['sae_hash']}); this SAE has hook {ident['hook']}, "
                    f"d_sae {ident['d_sae']}, weights {ident['sae_hash']}. Open the store with the SAE it was built with, "
                    "or index the corpus again with this one (`lenslab sae index ... --out NEW.sqlite`)"
                )
        if model is not None:
            ident = model_identity(model)
            same_weights = (
                ident["model_fingerprint"] is not None and ident["model_fingerprint"] == m["model_fingerprint"]
            )
            same_shape = (ident["d_model"], ident["d_vocab"]) == (m["d_model"], m["d_vocab"])
            if not same_shape or (
                not same_weights and (ident["model_fingerprint"] is not None or ident["model"] != m["model"])
            ):
                raise LenslabError(
                    f"feature store {self.path.name} was built with model {m['model']} (d_model {m['d_model']}, "
                    f"d_vocab {m['d_vocab']}, weights {m['model_fingerprint']}), not with {ident['model']} "
                    f"(d_model {ident['d_model']}, d_vocab {ident['d_vocab']}, weights {ident['model_fingerprint']}); "
                    f"load {m['model']}, or index the corpus again with this model"
                )

    # -- reading -----------------------------------------------------------------------------
    def vocab(self) -> dict[int, str]:
        """Token id -> token string (the model's tokenizer, saved at index time)."""
        if self._vocab is None:
            self._vocab = dict(self._con.execute("SELECT token_id, token FROM vocab").fetchall())
        return self._vocab

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        v = self.vocab()
        return [v.get(int(i), f"<{int(i)}>") for i in ids]

    def prompt_tokens(self, prompt_id: int) -> list[int]:
        """Token ids of corpus prompt `prompt_id` (as indexed, after truncation)."""
        row = self._con.execute("SELECT tokens FROM corpus WHERE prompt_id = ?", (int(prompt_id),)).fetchone()
        if row is None:
            raise LenslabError(f"prompt {prompt_id} is not in the store (it holds prompts 0 .. {self.n_prompts - 1})")
        return np.frombuffer(row[0], dtype="<i4").tolist()

    def corpus(self) -> list[list[int]]:
        """Every prompt's token ids, in order."""
        return [
            np.frombuffer(b, dtype="<i4").tolist()
            for (b,) in self._con.execute("SELECT tokens FROM corpus ORDER BY prompt_id")
        ]

    def stats(self, feature: int) -> FeatureStats:
        """Statistics of one feature."""
        _check_feature(feature, self.d_sae)
        n, s, mx, hist = self._con.execute(
            "SELECT n_fire, sum_act, max_act, hist FROM features WHERE feature = ?", (int(feature),)
        ).fetchone()
        return FeatureStats(
            feature=int(feature),
            n_fire=int(n),
            total_tokens=self.total_tokens,
            max_act=float(mx),
            mean_act=float(s) / n if n else 0.0,
            hist_counts=np.frombuffer(hist, dtype="<i8").tolist(),
            hist_edges=self.hist_edges,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """All features' statistics as arrays: `n_fire`, `sum_act`, `max_act` `[d_sae]`, `hist` `[d_sae, n_bins]`."""
        rows = self._con.execute("SELECT n_fire, sum_act, max_act, hist FROM features ORDER BY feature").fetchall()
        return {
            "n_fire": np.array([r[0] for r in rows], dtype=np.int64),
            "sum_act": np.array([r[1] for r in rows], dtype=np.float64),
            "max_act": np.array([r[2] for r in rows], dtype=np.float64),
            "hist": np.stack([np.frombuffer(r[3], dtype="<i8") for r in rows]),
        }

    def density(self) -> np.ndarray:
        """Firing density of every feature `[d_sae]`."""
        return self.arrays()["n_fire"] / max(self.total_tokens, 1)

    def contexts(self, feature: int, n: int | None = None) -> list[Context]:
        """The top-activating contexts of `feature`, highest first (at most `top_n`)."""
        _check_feature(feature, self.d_sae)
        rows = self._con.execute(
            "SELECT prompt_id, pos, act, start, acts FROM contexts WHERE feature = ? ORDER BY act DESC, prompt_id, pos LIMIT ?",
            (int(feature), int(n) if n is not None else -1),
        ).fetchall()
        out = []
        for pid, pos, act, start, acts in rows:
            acts = np.frombuffer(acts, dtype="<f4").tolist()
            ids = self.prompt_tokens(pid)[start : start + len(acts)]
            out.append(
                Context(
                    prompt_id=int(pid),
                    pos=int(pos),
                    act=float(act),
                    start=int(start),
                    token_ids=ids,
                    tokens=self.token_strs(ids),
                    acts=[float(a) for a in acts],
                )
            )
        return out

    def logits(self, feature: int) -> dict:
        """The stored logit effect of `feature`: `pos` / `neg` (token id, value) lists and the histogram."""
        _check_feature(feature, self.d_sae)
        r = self._con.execute(
            "SELECT pos_ids, pos_values, neg_ids, neg_values, hist_heights, hist_edges FROM logits WHERE feature = ?",
            (int(feature),),
        ).fetchone()
        if r is None:
            return {"pos": [], "neg": [], "hist_heights": [], "hist_edges": []}
        pi, pv, ni, nv, hh, he = (json.loads(x) for x in r)
        return {"pos": list(zip(pi, pv)), "neg": list(zip(ni, nv)), "hist_heights": hh, "hist_edges": he}

    def token_table(self, token_ids: Sequence[int]) -> list[tuple[int, int, int, float, float]]:
        """Rows (token_id, feature, n_fire, sum_act, max_act) of `token_features` for `token_ids`."""
        ids = [int(i) for i in token_ids]
        if not ids:
            return []
        q = ",".join("?" * len(ids))
        return self._con.execute(
            f"SELECT token_id, feature, n_fire, sum_act, max_act FROM token_features WHERE token_id IN ({q})", ids
        ).fetchall()

    def top_tokens(self, feature: int, k: int = 10) -> list[tuple[str, float, int]]:
        """Tokens on which `feature` is most active: (token, max activation, firing count)."""
        rows = self._con.execute(
            "SELECT token_id, max_act, n_fire FROM token_features WHERE feature = ? "
            "ORDER BY max_act DESC, token_id LIMIT ?",
            (int(feature), int(k)),
        ).fetchall()
        return [(self.token_strs([t])[0], float(m), int(n)) for t, m, n in rows]

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({self.describe()})"


# --------------------------------------------------------------------------------------------
# indexing
# --------------------------------------------------------------------------------------------


def _set_meta(con: sqlite3.Connection, **kv) -> None:
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in kv.items()]
    )


def _create(path: Path, model, sae, seqs: list[np.ndarray], meta: dict, logit_k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(str(tmp))
    try:
        with con:
            con.executescript(_SCHEMA)
            _set_meta(con, **meta)
            con.executemany(
                "INSERT INTO corpus VALUES (?, ?, ?)",
                [(i, len(s), s.astype("<i4").tobytes()) for i, s in enumerate(seqs)],
            )
            d_vocab = int(model.cfg.d_vocab)
            con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(_str_tokens(model, range(d_vocab))))
            n_bins = len(meta["hist_edges"]) - 1
            zero = np.zeros(n_bins, dtype="<i8").tobytes()
            con.executemany(
                "INSERT INTO features VALUES (?, 0, 0.0, 0.0, ?)", ((f, zero) for f in range(meta["d_sae"]))
            )
            con.executemany("INSERT INTO logits VALUES (?, ?, ?, ?, ?, ?, ?)", _logit_rows(model, sae, logit_k))
        con.close()
        tmp.replace(path)
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def _logit_summary(
    v: Tensor, k: int
) -> list[tuple[list[int], list[float], list[int], list[float], list[int], list[float]]]:
    """Per row of logit effects `v` `[n, d_vocab]`: top-k promoted ids and values, top-k suppressed
    ids and values (most negative first), and a LOGIT_BINS-bin histogram (heights, edges)."""
    v = v.float().cpu()
    k = min(k, v.shape[1])
    top, bot = v.topk(k, dim=1), (-v).topk(k, dim=1)
    vmin, vmax = v.min(1).values, v.max(1).values
    width = (vmax - vmin).clamp(min=1e-6)
    idx = ((v - vmin[:, None]) / width[:, None] * LOGIT_BINS).long().clamp(0, LOGIT_BINS - 1)
    heights = torch.zeros(v.shape[0], LOGIT_BINS, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
    edges = vmin[:, None].double() + width[:, None].double() * torch.linspace(0, 1, LOGIT_BINS + 1, dtype=torch.float64)
    return [
        (
            top.indices[j].tolist(),
            top.values[j].tolist(),
            bot.indices[j].tolist(),
            (-bot.values[j]).tolist(),
            heights[j].tolist(),
            edges[j].tolist(),
        )
        for j in range(v.shape[0])
    ]


@torch.no_grad()
def _logit_rows(model, sae, k: int, chunk: int = 256):
    try:
        W_U = model.W_U.float()
    except Exception:
        return
    W_dec = sae.W_dec.float().to(W_U.device)
    for lo in range(0, W_dec.shape[0], chunk):
        for j, row in enumerate(_logit_summary(W_dec[lo : lo + chunk] @ W_U, k)):
            yield (lo + j, *(json.dumps(x) for x in row))


def index(
    model,
    sae,
    corpus,
    path: str | Path,
    *,
    batch_size: int = 16,
    context_size: int = 64,
    top_n: int = 20,
    resume: bool = True,
    window: tuple[int, int] = (10, 3),
    skip_bos: bool = True,
    sae_source: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Run `model` + `sae` over `corpus` once and store feature statistics and contexts at `path`.

    Args:
        model: a TransformerLens model with the SAE's hook.
        sae: a sae-lens SAE (`sae.cfg.metadata.hook_name` names the hook).
        corpus: a list of strings (tokenized with BOS), a list of token-id lists, a `[n, pos]`
            token tensor, or None to resume with the corpus already in the store.
        path: the SQLite file.
        batch_size: prompts per forward pass (and per commit).
        context_size: prompts are truncated to this many tokens.
        top_n: contexts kept per feature.
        resume: continue an existing store at `path` where it stopped (identity, corpus and
            settings must match); False deletes it and starts over.
        window: tokens kept (left, right) of each context's token.
        skip_bos: leave the BOS position out of the statistics.
        sae_source: the SAE's path or id, recorded in the store.
        progress: show a tqdm bar.
        on_batch: called as `on_batch(batch_index)` after each committed batch (an exception
            raised there stops the run with that batch committed; tests use it to interrupt).

    Returns:
        The `FeatureStore`.
    """
    path = Path(path)
    if batch_size < 1 or context_size < 1 or top_n < 1:
        raise LenslabError(
            f"batch_size, context_size and top_n must be >= 1 (got {batch_size}, {context_size}, {top_n})"
        )
    hook = _check_pair(model, sae)
    settings = {
        "context_size": int(context_size),
        "batch_size": int(batch_size),
        "top_n": int(top_n),
        "window": [int(window[0]), int(window[1])],
        "skip_bos": bool(skip_bos),
        "hist_edges": list(HIST_EDGES),
    }
    ident = {**model_identity(model), **sae_identity(sae, sae_source)}
    if path.exists() and resume:
        store = FeatureStore(path)
        store.check(model, sae)
        for k, v in settings.items():
            if store.meta[k] != v:
                store.close()
                raise LenslabError(
                    f"{path.name} was indexed with {k}={store.meta[k]!r}, not {v!r}: pass the same settings "
                    "to resume, or resume=False to start over"
                )
        if (
            corpus is not None
            and _corpus_hash(_tokenize_corpus(model, corpus, context_size)) != store.meta["corpus_hash"]
        ):
            store.close()
            raise LenslabError(
                f"{path.name} holds another corpus: pass the same corpus (or corpus=None) to resume, "
                "or resume=False to start over"
            )
        seqs = [np.asarray(s, dtype=np.int32) for s in store.corpus()]
        store.close()
    else:
        if corpus is None:
            raise LenslabError(f"there is no store at {str(path)!r} to resume: pass a corpus")
        for p in (path, path.with_name(path.name + "-journal")):
            p.unlink(missing_ok=True)
        seqs = _tokenize_corpus(model, corpus, context_size)

        meta = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            **ident,
            **settings,
            "n_prompts": len(seqs),
            "corpus_hash": _corpus_hash(seqs),
            "next_prompt": 0,
            "total_tokens": 0,
            "complete": False,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lenslab_version": lenslab.__version__,
        }
        _create(path, model, sae, seqs, meta, LOGIT_K)
    _run(model, sae, hook, seqs, path, settings, progress=progress, on_batch=on_batch)
    return FeatureStore(path)


class _Index:
    """In-memory mirror of the running statistics and of each feature's top contexts, loaded from the
    store when a run starts and written back once per batch."""

    def __init__(self, con: sqlite3.Connection, d_sae: int, top_n: int):
        rows = con.execute("SELECT n_fire, sum_act, max_act, hist FROM features ORDER BY feature").fetchall()
        self.n_fire = np.array([r[0] for r in rows], dtype=np.int64)
        self.sum_act = np.array([r[1] for r in rows], dtype=np.float64)
        self.max_act = np.array([r[2] for r in rows], dtype=np.float64)
        self.hist = np.stack([np.frombuffer(r[3], dtype="<i8").copy() for r in rows])
        self.top_n = top_n
        # top contexts per feature, best first; empty slots: act 0, prompt -1
        self.top_act = np.zeros((d_sae, top_n), dtype=np.float64)
        self.top_pid = np.full((d_sae, top_n), -1, dtype=np.int64)
        self.top_pos = np.zeros((d_sae, top_n), dtype=np.int64)
        fill = np.zeros(d_sae, dtype=np.int64)
        for f, pid, pos, act in con.execute(
            "SELECT feature, prompt_id, pos, act FROM contexts ORDER BY feature, act DESC, prompt_id, pos"
        ):
            j = fill[f]
            self.top_act[f, j], self.top_pid[f, j], self.top_pos[f, j] = act, pid, pos
            fill[f] += 1

    @property
    def threshold(self) -> np.ndarray:
        """`[d_sae]`: a new context must beat this activation (0 while fewer than top_n are kept)."""
        return self.top_act[:, -1]


def _run(model, sae, hook, seqs, path, settings, *, progress, on_batch) -> None:
    from tqdm.auto import tqdm

    con = sqlite3.connect(str(path))
    con.execute("PRAGMA synchronous = NORMAL")
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    d_sae, top_n, bs = int(meta["d_sae"]), int(meta["top_n"]), int(meta["batch_size"])
    left, right = meta["window"]
    edges = np.asarray(meta["hist_edges"], dtype=np.float64)
    start = int(meta["next_prompt"])
    total = int(meta["total_tokens"])
    state = _Index(con, d_sae, top_n)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    device = getattr(model.cfg, "device", None) or "cpu"
    n = len(seqs)
    bar = tqdm(
        total=math.ceil(n / bs),
        initial=start // bs,
        unit="batch",
        desc=f"indexing {hook}",
        disable=not progress,
        leave=False,
    )
    t0, tok0 = time.perf_counter(), 0
    try:
        for b0 in range(start, n, bs):
            batch = seqs[b0 : b0 + bs]
            lens = np.array([len(s) for s in batch])
            T = int(lens.max())
            toks = torch.full((len(batch), T), pad, dtype=torch.long)
            for i, s in enumerate(batch):
                toks[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
            acts = feature_acts(model, sae, toks.to(device)).cpu()  # [B, T, d_sae]
            valid = torch.arange(T)[None, :] < torch.from_numpy(lens)[:, None]
            if settings["skip_bos"] and bos is not None:
                valid[:, 0] &= toks[:, 0] != int(bos)
            rows = _batch_rows(acts, toks, valid, lens, b0, state, edges, left, right)
            with con:
                _write_batch(con, rows, b0 + len(batch), total + rows["n_tokens"])
            total += rows["n_tokens"]
            tok0 += rows["n_tokens"]
            bar.update(1)
            bar.set_postfix(tok_s=f"{tok0 / max(time.perf_counter() - t0, 1e-9):.0f}")
            if on_batch is not None:
                on_batch(b0 // bs)
        with con:
            _set_meta(con, complete=True)
    except KeyboardInterrupt:
        done = json.loads(con.execute("SELECT value FROM meta WHERE key = 'next_prompt'").fetchone()[0])
        print(
            f"\nlenslab: indexing interrupted after {done} of {n} prompts (all committed); run the same command again "
            "to resume",
            file=sys.stderr,
        )
        raise
    finally:
        bar.close()
        con.close()


def _batch_rows(
    acts: Tensor,
    toks: Tensor,
    valid: Tensor,
    lens: np.ndarray,
    b0: int,
    state: _Index,
    edges: np.ndarray,
    left: int,
    right: int,
) -> dict:
    """Update `state` with one batch (`acts` `[B, T, d_sae]`, counted positions `valid` `[B, T]`) and
    return the rows to write: changed features, token-table increments, contexts in and out."""
    bi, pi = valid.nonzero(as_tuple=True)
    a = acts[bi, pi]  # [N, d_sae]
    tok = toks[bi, pi]
    N, d_sae = a.shape
    n_bins = len(edges) - 1
    fire = a > 0
    n_fire_b = fire.sum(0).numpy().astype(np.int64)
    touched = np.nonzero(n_fire_b)[0]
    sum_b = a.double().sum(0).numpy()
    max_b = a.max(0).values.double().numpy() if N else np.zeros(d_sae)
    # histogram of the firing activations
    r, f = fire.nonzero(as_tuple=True)
    vals = a[r, f].double().numpy()
    bins = np.clip(np.searchsorted(edges, vals, side="right") - 1, 0, n_bins - 1)
    hist_b = np.bincount(f.numpy() * n_bins + bins, minlength=d_sae * n_bins).reshape(d_sae, n_bins)
    state.n_fire += n_fire_b
    state.sum_act += sum_b
    state.max_act = np.maximum(state.max_act, max_b)
    state.hist += hist_b
    feat_rows = [
        (
            int(state.n_fire[j]),
            float(state.sum_act[j]),
            float(state.max_act[j]),
            state.hist[j].astype("<i8").tobytes(),
            int(j),
        )
        for j in touched
    ]
    # per (token, feature)
    uniq, inv = tok.unique(return_inverse=True)
    U = len(uniq)
    tmax = torch.zeros(U, d_sae).scatter_reduce_(0, inv[:, None].expand(-1, d_sae), a, "amax")
    tcnt = torch.zeros(U, d_sae, dtype=torch.long).index_add_(0, inv, fire.long())
    tsum = torch.zeros(U, d_sae, dtype=torch.float64).index_add_(0, inv, a.double())
    ui, uf = tcnt.nonzero(as_tuple=True)
    tok_rows = list(
        zip(uniq[ui].tolist(), uf.tolist(), tcnt[ui, uf].tolist(), tsum[ui, uf].tolist(), tmax[ui, uf].tolist())
    )
    ctx_in, ctx_out = _merge_contexts(a, bi, pi, acts, lens, b0, state, max_b, left, right)
    return {"features": feat_rows, "tokens": tok_rows, "ctx_in": ctx_in, "ctx_out": ctx_out, "n_tokens": int(N)}


def _merge_contexts(a, bi, pi, acts, lens, b0, state: _Index, max_b, left, right):
    """Merge this batch's best activations into each feature's top contexts (order: activation
    descending, then prompt id, then position). Returns the rows that enter and those that leave."""
    top_n = state.top_n
    cand = np.nonzero(max_b > state.threshold)[0]
    if not len(cand) or not a.shape[0]:
        return [], []
    k = min(top_n, a.shape[0])
    v, idx = a[:, torch.from_numpy(cand)].topk(k, dim=0)  # [k, F]
    v, idx = v.T.double().numpy(), idx.T.numpy()  # [F, k]
    keep = v > state.threshold[cand][:, None]
    rows_b, rows_p = bi.numpy()[idx], pi.numpy()[idx]
    c_act = np.where(keep, v, 0.0)
    c_pid = np.where(keep, b0 + rows_b, -1)
    c_pos = np.where(keep, rows_p, 0)
    all_act = np.concatenate([state.top_act[cand], c_act], axis=1)  # [F, top_n + k]
    all_pid = np.concatenate([state.top_pid[cand], c_pid], axis=1)
    all_pos = np.concatenate([state.top_pos[cand], c_pos], axis=1)
    empty = all_pid < 0
    order = np.lexsort((all_pos, np.where(empty, np.iinfo(np.int64).max, all_pid), -all_act), axis=-1)[:, :top_n]
    new_act = np.take_along_axis(all_act, order, 1)
    new_pid = np.take_along_axis(all_pid, order, 1)
    new_pos = np.take_along_axis(all_pos, order, 1)
    chosen = np.zeros(all_act.shape, dtype=bool)
    np.put_along_axis(chosen, order, True, 1)
    # leaving: stored contexts that were pushed out
    fo, jo = np.nonzero(~chosen[:, :top_n] & ~empty[:, :top_n])
    ctx_out = [(int(cand[f]), int(all_pid[f, j]), int(all_pos[f, j])) for f, j in zip(fo, jo)]
    # entering: candidates that made it, with their windows
    fi, ji = np.nonzero(chosen[:, top_n:] & keep)
    ctx_in = []
    if len(fi):
        feats = cand[fi]
        b = rows_b[fi, ji]
        p = rows_p[fi, ji]
        offs = np.arange(-left, right + 1)
        P = p[:, None] + offs[None, :]  # [C, W]
        ok = (P >= 0) & (P < lens[b][:, None])
        win = (
            acts[
                torch.from_numpy(b)[:, None],
                torch.from_numpy(np.clip(P, 0, acts.shape[1] - 1)),
                torch.from_numpy(feats)[:, None],
            ]
            .numpy()
            .astype("<f4")
        )  # [C, W]
        for c in range(len(fi)):
            s0 = max(0, int(p[c]) - left)
            ctx_in.append(
                (int(feats[c]), int(b0 + b[c]), int(p[c]), float(v[fi[c], ji[c]]), s0, win[c][ok[c]].tobytes())
            )
    state.top_act[cand], state.top_pid[cand], state.top_pos[cand] = new_act, new_pid, new_pos
    return ctx_in, ctx_out


def _write_batch(con: sqlite3.Connection, rows: dict, next_prompt: int, total: int) -> None:
    con.executemany(
        "UPDATE features SET n_fire = ?, sum_act = ?, max_act = ?, hist = ? WHERE feature = ?", rows["features"]
    )
    con.executemany(
        "INSERT INTO token_features VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_id, feature) DO UPDATE SET "
        "n_fire = n_fire + excluded.n_fire, sum_act = sum_act + excluded.sum_act, max_act = max(max_act, excluded.max_act)",
        rows["tokens"],
    )
    con.executemany("DELETE FROM contexts WHERE feature = ? AND prompt_id = ? AND pos = ?", rows["ctx_out"])
    con.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?)", rows["ctx_in"])
    _set_meta(con, next_prompt=int(next_prompt), total_tokens=int(total))


# --------------------------------------------------------------------------------------------
# lookup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class LookupResult(JsonResult):
    """The top-k features of each token of one prompt.

    Attributes:
        prompt: the text.
        tokens / token_ids: the prompt's tokens (BOS included when prepended).
        features / values: `[pos, k]` feature ids and activations, strongest first (an
            activation of 0 means fewer than k features fire there).
        union: the features that are in some token's top k and fire, strongest first (at most 40).
        matrix: `[pos, len(union)]` activation of each of those features on each token.
        hook, k, provenance: where and how.
    """

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    features: list[list[int]]
    values: list[list[float]]
    union: list[int]
    matrix: list[list[float]]
    hook: str
    k: int
    provenance: dict = field(default_factory=dict)
    KIND = "LookupResult"

    def rows(self) -> list[dict]:
        """One dict per token: pos, token and its firing (feature, activation) pairs."""
        return [
            {"pos": i, "token": t, "features": [(f, v) for f, v in zip(fs, vs) if v > 0]}
            for i, (t, fs, vs) in enumerate(zip(self.tokens, self.features, self.values))
        ]

    def top(self, pos: int) -> list[tuple[int, float]]:
        """The firing (feature, activation) pairs of the token at `pos`."""
        return self.rows()[pos]["features"]

    def table(self) -> str:
        """A plain-text table, one line per token."""
        w = max((len(repr(t)) for t in self.tokens), default=4)
        lines = [f"{'pos':>3}  {'token':<{w}}  top features (activation)"]
        for r in self.rows():
            feats = ", ".join(f"f{f} ({v:.3g})" for f, v in r["features"]) or "-"
            lines.append(f"{r['pos']:>3}  {repr(r['token']):<{w}}  {feats}")
        return "\n".join(lines)

    def to_dataframe(self):
        """Long format: pos, token, rank, feature, activation (firing features only)."""
        import pandas as pd

        recs = [
            {"pos": r["pos"], "token": r["token"], "rank": j, "feature": f, "activation": v}
            for r in self.rows()
            for j, (f, v) in enumerate(r["features"])
        ]
        return pd.DataFrame(recs, columns=["pos", "token", "rank", "feature", "activation"])

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "features": self.features,
            "values": self.values,
            "union": self.union,
            "matrix": self.matrix,
            "hook": self.hook,
            "k": self.k,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LookupResult:
        return cls(
            prompt=d["prompt"],
            tokens=list(d["tokens"]),
            token_ids=[int(i) for i in d["token_ids"]],
            features=[[int(f) for f in r] for r in d["features"]],
            values=[[float(v) for v in r] for r in d["values"]],
            union=[int(f) for f in d["union"]],
            matrix=[[float(v) for v in r] for r in d["matrix"]],
            hook=d["hook"],
            k=int(d["k"]),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Token x feature heatmap of the union features' activations (hover: token, feature, value)."""
        import plotly.graph_objects as go

        toks = figures._uniq([f"{i} {t!r}" for i, t in enumerate(self.tokens)])
        cols = [f"f{f}" for f in self.union]
        z = self.matrix if self.union else [[0.0] for _ in self.tokens]
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=cols or ["(none)"],
                y=toks,
                colorscale=[[0, "#ffffff"], [1, "#e6550d"]],
                zmin=0,
                colorbar=dict(title="activation"),
                hovertemplate="token %{y}<br>feature %{x}<br>activation %{z:.4g}<extra></extra>",
            )
        )
        fig.update_layout(
            xaxis_title="feature",
            yaxis_title="token",
            yaxis_autorange="reversed",
            height=max(360, 22 * len(self.tokens) + 160),
            width=max(600, 28 * len(cols) + 260),
        )
        fig.update_xaxes(type="category")
        p = self.provenance
        return figures.style(fig, f"SAE features per token · {self.hook} · model {p.get('model', '?')} · top {self.k}")


@torch.no_grad()
def lookup(model, sae, prompt: str, k: int = 5, *, prepend_bos: bool = True, max_union: int = 40) -> LookupResult:
    """The `k` most active SAE features at each token of `prompt` (activations `[pos, k]`)."""
    if not isinstance(prompt, str) or not prompt:
        raise LenslabError("lookup needs a non-empty prompt string")
    if k < 1:
        raise LenslabError(f"k must be >= 1, got {k}")
    hook = _check_pair(model, sae)
    toks = model.to_tokens(prompt, prepend_bos=prepend_bos)
    acts = feature_acts(model, sae, toks)[0].cpu()  # [pos, d_sae]
    kk = min(k, acts.shape[1])
    top = acts.topk(kk, dim=1)
    firing = top.indices[top.values > 0].unique()
    order = (
        acts[:, firing].max(0).values.argsort(descending=True) if len(firing) else torch.tensor([], dtype=torch.long)
    )
    union = firing[order][:max_union].tolist()
    ids = toks[0].tolist()
    return LookupResult(
        prompt=prompt,
        tokens=_str_tokens(model, ids),
        token_ids=ids,
        features=top.indices.tolist(),
        values=top.values.tolist(),
        union=union,
        matrix=acts[:, union].tolist() if union else [[] for _ in ids],
        hook=hook,
        k=kk,
        provenance=provenance(model, method="sae-lookup", hook=hook, sae=sae_identity(sae)),
    )


# --------------------------------------------------------------------------------------------
# dashboards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureDashboard(JsonResult):
    """One feature from a store: statistics, top contexts, activation histogram, logit effects.

    `to_dict()` / `to_json()` use Neuronpedia's feature field names (`modelId`, `layer`, `index`,
    `maxActApprox`, `frac_nonzero`, `pos_str` / `pos_values`, `neg_str` / `neg_values`,
    `freq_hist_data_bar_heights` / `freq_hist_data_bar_values` (bar centres, parallel to the
    heights), `logits_hist_data_bar_heights` / `..._values`, and `activations`: one entry per
    context with `tokens`, `values`, `maxValue`, `maxValueTokenIndex`, `minValue`), plus lenslab's
    own (`kind`, `hookName`, `n_fire`, `total_tokens`, `mean_act`, `hist_edges`, contexts'
    `prompt_id` / `pos` / `start` / `token_ids`, `provenance`). Unlike Neuronpedia's, the
    frequency histogram is over activation values on log-spaced bins (`hist_edges`).
    """

    feature: int
    model: str
    hook: str
    sae: str
    n_fire: int
    total_tokens: int
    max_act: float
    mean_act: float
    hist_edges: list[float]
    hist_counts: list[int]
    contexts: list[Context]
    pos_logits: list[tuple[str, float]]
    neg_logits: list[tuple[str, float]]
    logit_hist_heights: list[int] = field(default_factory=list)
    logit_hist_edges: list[float] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    KIND = "FeatureDashboard"

    @property
    def density(self) -> float:
        return self.n_fire / self.total_tokens if self.total_tokens else 0.0

    @classmethod
    def from_store(
        cls,
        store: FeatureStore | str | Path,
        feature: int,
        model=None,
        sae=None,
        *,
        n_contexts: int | None = None,
        k_logits: int = LOGIT_K,
    ) -> FeatureDashboard:
        """The dashboard of `feature`. With `model` and `sae` (checked against the store) the logit
        effects are computed now (`k_logits` each way); without, they come from the store."""
        own = not isinstance(store, FeatureStore)
        st = FeatureStore(store) if own else store
        try:
            st.check(model, sae)
            s = st.stats(feature)
            ctx = st.contexts(feature, n_contexts)
            if model is not None and sae is not None:
                _check_feature(feature, int(sae.cfg.d_sae))
                v = sae.W_dec[feature].float()[None] @ model.W_U.float().to(sae.W_dec.device)
                pi, pv, ni, nv, lh, le = _logit_summary(v, k_logits)[0]
                pos, neg = list(zip(pi, pv)), list(zip(ni, nv))
            else:
                lg = st.logits(feature)
                pos, neg = lg["pos"][:k_logits], lg["neg"][:k_logits]
                lh, le = lg["hist_heights"], lg["hist_edges"]
            m = st.meta
            return cls(
                feature=int(feature),
                model=m["model"],
                hook=m["hook"],
                sae=m.get("sae_source") or m["sae_hash"],
                n_fire=s.n_fire,
                total_tokens=s.total_tokens,
                max_act=s.max_act,
                mean_act=s.mean_act,
                hist_edges=s.hist_edges,
                hist_counts=s.hist_counts,
                contexts=ctx,
                pos_logits=[(st.token_strs([i])[0], float(x)) for i, x in pos],
                neg_logits=[(st.token_strs([i])[0], float(x)) for i, x in neg],
                logit_hist_heights=lh,
                logit_hist_edges=le,
                provenance={
                    "store": str(st.path),
                    "model": m["model"],
                    "hook": m["hook"],
                    "sae_hash": m["sae_hash"],
                    "sae_source": m.get("sae_source"),
                    "store_complete": st.complete,
                    "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            )
        finally:
            if own:
                st.close()

    # -- exports -----------------------------------------------------------------------------
    def _hist_centres(self) -> list[float]:
        e = self.hist_edges
        return [math.sqrt(e[i] * e[i + 1]) for i in range(len(e) - 1)]

    def to_dict(self) -> dict:
        le = self.logit_hist_edges
        return {
            "kind": self.KIND,
            "modelId": self.model,
            "layer": self.hook,
            "hookName": self.hook,
            "index": str(self.feature),
            "sae": self.sae,
            "maxActApprox": self.max_act,
            "frac_nonzero": self.density,
            "n_fire": self.n_fire,
            "total_tokens": self.total_tokens,
            "mean_act": self.mean_act,
            "pos_str": [t for t, _ in self.pos_logits],
            "pos_values": [v for _, v in self.pos_logits],
            "neg_str": [t for t, _ in self.neg_logits],
            "neg_values": [v for _, v in self.neg_logits],
            "freq_hist_data_bar_heights": self.hist_counts,
            "freq_hist_data_bar_values": self._hist_centres(),
            "hist_edges": self.hist_edges,
            "logits_hist_data_bar_heights": self.logit_hist_heights,
            "logits_hist_data_bar_values": [(le[i] + le[i + 1]) / 2 for i in range(len(le) - 1)],
            "logits_hist_edges": le,
            "activations": [
                {
                    "tokens": c.tokens,
                    "values": c.acts,
                    "maxValue": c.act,
                    "maxValueTokenIndex": c.index,
                    "minValue": min(c.acts) if c.acts else 0.0,
                    "prompt_id": c.prompt_id,
                    "pos": c.pos,
                    "start": c.start,
                    "token_ids": c.token_ids,
                }
                for c in self.contexts
            ],
            "explanations": [],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureDashboard:
        return cls(
            feature=int(d["index"]),
            model=d["modelId"],
            hook=d["hookName"],
            sae=d["sae"],
            n_fire=int(d["n_fire"]),
            total_tokens=int(d["total_tokens"]),
            max_act=float(d["maxActApprox"]),
            mean_act=float(d["mean_act"]),
            hist_edges=[float(x) for x in d["hist_edges"]],
            hist_counts=[int(x) for x in d["freq_hist_data_bar_heights"]],
            contexts=[
                Context(
                    prompt_id=int(a["prompt_id"]),
                    pos=int(a["pos"]),
                    act=float(a["maxValue"]),
                    start=int(a["start"]),
                    token_ids=[int(i) for i in a["token_ids"]],
                    tokens=list(a["tokens"]),
                    acts=[float(v) for v in a["values"]],
                )
                for a in d["activations"]
            ],
            pos_logits=list(zip(d["pos_str"], d["pos_values"])),
            neg_logits=list(zip(d["neg_str"], d["neg_values"])),
            logit_hist_heights=[int(x) for x in d.get("logits_hist_data_bar_heights", [])],
            logit_hist_edges=[float(x) for x in d.get("logits_hist_edges", [])],
            provenance=d.get("provenance") or {},
        )

    def title(self) -> str:
        return f"Feature {self.feature} · {self.hook} · model {self.model}"

    def figure(self):
        """Activation histogram (log-spaced bins) and the top promoted / suppressed logits."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.55, 0.45],
            horizontal_spacing=0.14,
            subplot_titles=[f"activation histogram (density {self.density:.3%})", "logit effect W_dec·W_U"],
        )
        counts, cen = self.hist_counts, self._hist_centres()
        nz = [i for i, c in enumerate(counts) if c]
        lo, hi = (nz[0], nz[-1] + 1) if nz else (0, len(counts))
        e = self.hist_edges
        fig.add_trace(
            go.Bar(
                x=cen[lo:hi],
                y=counts[lo:hi],
                width=[e[i + 1] - e[i] for i in range(lo, hi)],
                marker_color="#e6550d",
                name="tokens",
                showlegend=False,
                hovertemplate="activation ≈ %{x:.3g}<br>tokens %{y}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        fig.update_xaxes(type="log", title_text="activation (log scale)", row=1, col=1)
        fig.update_yaxes(title_text="tokens", row=1, col=1)
        logit_rows = list(reversed(self.neg_logits)) + list(self.pos_logits)[::-1]
        labels = figures._uniq([repr(t) for t, _ in logit_rows])
        fig.add_trace(
            go.Bar(
                x=[v for _, v in logit_rows],
                y=labels,
                orientation="h",
                showlegend=False,
                marker_color=["#1f5fb4" if v > 0 else "#c0392b" for _, v in logit_rows],
                hovertemplate="%{y}: %{x:.4g}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=2)
        fig.update_layout(height=max(420, 18 * len(logit_rows) + 160), width=1000)
        return figures.style(fig, self.title())

    def to_html(self, path: str | Path | None = None) -> str:
        """A standalone HTML page (plain HTML, inline plotly JS): statistics, contexts with every token
        shaded by the feature's activation (hover shows the value), logit tables and the figure."""
        esc = html.escape
        top = max([self.max_act] + [max(c.acts, default=0.0) for c in self.contexts]) or 1.0

        def tok_span(t: str, a: float, here: bool) -> str:
            alpha = max(0.0, min(1.0, a / top))
            cls = ' class="here"' if here else ""
            return (
                f'<span{cls} style="background: rgba(230, 85, 13, {alpha:.3f})" title="{a:.4g}">'
                f"{esc(t).replace(' ', '&nbsp;') or '&nbsp;'}</span>"
            )

        ctx_html = (
            "\n".join(
                f'<div class="ctx"><span class="val">{c.act:.4g}</span> <span class="where">prompt {c.prompt_id}, pos {c.pos}</span> '
                + " ".join(tok_span(t, a, i == c.index) for i, (t, a) in enumerate(zip(c.tokens, c.acts)))
                + "</div>"
                for c in self.contexts
            )
            or "<p>(the feature never fired on the indexed corpus)</p>"
        )

        def logit_table(rows, head):
            body = "".join(f"<tr><td><code>{esc(repr(t))}</code></td><td>{v:+.4g}</td></tr>" for t, v in rows)
            return f'<table class="logits"><tr><th>{head}</th><th>value</th></tr>{body}</table>'

        fig_html = self.figure().to_html(include_plotlyjs=True, full_html=False)
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title())}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 2em 1em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }}
.ctx {{ font-family: Menlo, Consolas, monospace; margin: 4px 0; line-height: 1.7; }}
.ctx span {{ padding: 1px 0; }}
.ctx .here {{ outline: 1px solid #333; }}
.val {{ display: inline-block; min-width: 5em; font-weight: bold; }}
.where {{ color: #888; font-size: 0.8em; display: inline-block; min-width: 10em; }}
.logits-wrap {{ display: flex; }}
</style></head><body>
<h1>Feature {self.feature}</h1>
<p>model <b>{esc(self.model)}</b> · hook <code>{esc(self.hook)}</code> · SAE <code>{esc(str(self.sae))}</code></p>
<table class="stats">
<tr><th>density</th><td>{self.density:.4%} ({self.n_fire} of {self.total_tokens} tokens)</td></tr>
<tr><th>max activation</th><td>{self.max_act:.4g}</td></tr>
<tr><th>mean activation when firing</th><td>{self.mean_act:.4g}</td></tr>
</table>
<h2>Top activating contexts</h2>
{ctx_html}
<h2>Logit effects (W_dec[{self.feature}] @ W_U)</h2>
<div class="logits-wrap">{logit_table(self.pos_logits, "promoted")}{logit_table(self.neg_logits, "suppressed")}</div>
<h2>Activation histogram and logits</h2>
{fig_html}
</body></html>
"""
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(page)
        return page

    def save(self, path: str | Path) -> Path:
        """Write `.json` (the Neuronpedia-like dict) or `.html` (the standalone page); other
        extensions go to `figures.export` (the figure)."""

        path = Path(path)
        ext = path.suffix.lower()
        if ext == ".html":
            self.to_html(path)
            return path
        if ext not in FORMATS:
            raise LenslabError(
                f"cannot export a dashboard to {path.name!r}: use .html, .json or one of {', '.join(FORMATS)}"
            )
        return export(self, path)


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureHit:
    """One feature found by `search`: its activation on the matched tokens (or overall for a
    feature query) and its global density; `tokens`: the matched tokens on which it fires (or,
    for a feature query, the tokens it is most active on); `share`: the fraction of all the
    feature's firing tokens that are matched tokens (1.0 for a feature query)."""

    feature: int
    max_act: float
    mean_act: float
    n_fire: int
    density: float
    tokens: list[str]
    share: float = 1.0

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "max_act": self.max_act,
            "mean_act": self.mean_act,
            "n_fire": self.n_fire,
            "density": self.density,
            "tokens": self.tokens,
            "share": self.share,
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchResult(JsonResult):
    """What `search` found: the query and the hits, strongest first."""

    query: dict
    hits: list[FeatureHit]
    matched_tokens: list[str]
    store: str
    KIND = "SearchResult"

    @property
    def features(self) -> list[int]:
        return [h.feature for h in self.hits]

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "query": self.query,
            "hits": [h.to_dict() for h in self.hits],
            "matched_tokens": self.matched_tokens,
            "store": self.store,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchResult:
        return cls(
            query=d["query"],
            hits=[FeatureHit(**h) for h in d["hits"]],
            matched_tokens=list(d["matched_tokens"]),
            store=d["store"],
        )

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [h.to_dict() for h in self.hits],
            columns=["feature", "max_act", "mean_act", "n_fire", "share", "density", "tokens"],
        )

    def table(self) -> str:
        lines = [f"{'feature':>7}  {'max':>8}  {'mean':>8}  {'fires':>6}  {'share':>6}  {'density':>8}  tokens"]
        for h in self.hits:
            toks = " ".join(repr(t) for t in h.tokens[:6])
            lines.append(
                f"{h.feature:>7}  {h.max_act:>8.4g}  {h.mean_act:>8.4g}  {h.n_fire:>6}  {h.share:>6.1%}  "
                f"{h.density:>8.3%}  {toks}"
            )
        return "\n".join(lines)

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Bar(
                x=[f"f{h.feature}" for h in self.hits],
                y=[h.max_act for h in self.hits],
                marker_color="#e6550d",
                hovertemplate="%{x}: max %{y:.4g}<extra></extra>",
            )
        )
        fig.update_layout(xaxis_title="feature", yaxis_title="max activation", xaxis_type="category")
        q = ", ".join(f"{k}={v!r}" for k, v in self.query.items())
        return figures.style(fig, f"Feature search: {q}")


def _normal(s: str) -> str:
    return s.replace("Ġ", " ").replace("▁", " ").strip().lower()


def search(
    store: FeatureStore | str | Path,
    *,
    token: str | int | None = None,
    substring: str | None = None,
    feature: int | None = None,
    k: int = 10,
    by: str = "max",
) -> SearchResult:
    """Features most active on a token, on tokens containing a substring, or one feature's summary.

    Give exactly one of: `token` (a token string, matched exactly or, failing that, ignoring
    case, surrounding spaces and BPE space markers; or a token id), `substring` (every token whose
    string contains it, ignoring case), `feature` (an id: its statistics and top tokens).

    `by` ranks the features that fire on the matched tokens: "max" (their maximum activation
    there, the default), "mean" (their mean activation there) or "share" (the fraction of the
    feature's firing tokens that are matched tokens: features specific to the token first, not
    dense features that also fire on it), over the indexed corpus; ties by feature id.
    """
    if by not in SEARCH_ORDERS:
        raise LenslabError(f"by={by!r} is not one of {', '.join(SEARCH_ORDERS)}{did_you_mean(by, SEARCH_ORDERS)}")
    given = [x for x in (token, substring, feature) if x is not None]
    if len(given) != 1:
        raise LenslabError("search takes exactly one of token=, substring= or feature=")
    own = not isinstance(store, FeatureStore)
    st = FeatureStore(store) if own else store
    try:
        n_all = st.arrays()["n_fire"]
        dens = n_all / max(st.total_tokens, 1)
        if feature is not None:
            s = st.stats(int(feature))
            hit = FeatureHit(
                feature=int(feature),
                max_act=s.max_act,
                mean_act=s.mean_act,
                n_fire=s.n_fire,
                density=s.density,
                tokens=[t for t, _, _ in st.top_tokens(int(feature), 10)],
            )
            return SearchResult(query={"feature": int(feature)}, hits=[hit], matched_tokens=[], store=str(st.path))
        vocab = st.vocab()
        if token is not None:
            if isinstance(token, (int, np.integer)):
                if int(token) not in vocab:
                    raise LenslabError(f"token id {token} is not in the model's vocabulary (0 .. {len(vocab) - 1})")
                ids = [int(token)]
            else:
                ids = [i for i, t in vocab.items() if t == token] or [
                    i for i, t in vocab.items() if _normal(t) == _normal(token)
                ]
                if not ids:
                    raise LenslabError(
                        f"no token {token!r} in the model's vocabulary{did_you_mean(token, list(vocab.values()))}; "
                        "try substring= for partial matches"
                    )
            query = {"token": token}
        else:
            if not substring:
                raise LenslabError("substring must be a non-empty string")
            sub = substring.lower()
            ids = [i for i, t in vocab.items() if sub in t.lower()]
            if not ids:
                raise LenslabError(f"no token of the model's vocabulary contains {substring!r}")
            query = {"substring": substring}
        agg: dict[int, list] = {}
        for tid, f, n, s, m in st.token_table(ids):
            a = agg.setdefault(int(f), [0.0, 0, 0.0, []])
            a[0] = max(a[0], float(m))
            a[1] += int(n)
            a[2] += float(s)
            a[3].append((float(m), vocab.get(int(tid), str(tid))))
        hits = [
            FeatureHit(
                feature=f,
                max_act=a[0],
                mean_act=a[2] / a[1] if a[1] else 0.0,
                n_fire=a[1],
                density=float(dens[f]),
                tokens=[t for _, t in sorted(a[3], key=lambda x: -x[0])],
                share=a[1] / int(n_all[f]) if n_all[f] else 0.0,
            )
            for f, a in agg.items()
        ]
        key = {"max": lambda h: h.max_act, "mean": lambda h: h.mean_act, "share": lambda h: h.share}[by]
        hits = sorted(hits, key=lambda h: (-key(h), h.feature))[:k]
        query["by"] = by
        return SearchResult(query=query, hits=hits, matched_tokens=[vocab[i] for i in ids], store=str(st.path))
    finally:
        if own:
            st.close()
