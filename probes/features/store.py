"""The feature store: one SQLite file of per-feature statistics and top-activating contexts, and its reader.

`lenslab.probes.features.index` writes a store; `FeatureStore` reads it back (statistics, contexts,
logit effects, the per-token table that `search` ranks on).

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
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenslab._errors import LenslabError
from lenslab.probes.features.plumbing import check_feature, model_identity, sae_identity

__all__ = ["FORMAT", "HIST_EDGES", "SCHEMA", "SCHEMA_VERSION", "Context", "FeatureStats", "FeatureStore"]

FORMAT = "lenslab-feature-store"
SCHEMA_VERSION = 1
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.logspace(-4, 4, 65))
"""Activation histogram bin edges: 64 log-spaced bins from 1e-4 to 1e4 (8 per decade)."""

SCHEMA = """
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
"""The tables of a store, as `index` creates them (SQL)."""


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
    >>> from lenslab.probes.features import corpus_for, index
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
        check_feature(feature, self.d_sae)
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
        check_feature(feature, self.d_sae)
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
        check_feature(feature, self.d_sae)
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
