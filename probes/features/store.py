"""The feature store: a folder of Parquet tables and a JSON manifest, its exact merge, and its reader.

`lenslab.probes.features.index` writes a store; `FeatureStore` reads it back through DuckDB
(statistics, contexts, logit effects, the per-token table that `search` ranks on). A store of the
first format (one SQLite file, schema version 1) still opens read-only, and `convert` (`lenslab sae
convert OLD.sqlite NEW`) rewrites it as a folder.

Store layout (schema version 2; Parquet through pyarrow, queried with DuckDB):

- ``manifest.json``: what the SQLite store's ``meta`` table held, as one JSON object. Identity:
  ``format`` (``"lenslab-feature-store"``), ``schema_version``, ``model`` (name),
  ``model_fingerprint`` (sha256 of `W_E` and `W_U`, 16 hex), ``d_model``, ``d_vocab``, ``hook``,
  ``d_in``, ``d_sae``, ``sae_source`` (path or id, when known), ``sae_hash`` (sha256 of the SAE's
  state dict, 16 hex), ``sae_architecture``. Settings: ``context_size``, ``batch_size``,
  ``part_size`` (prompts per part, a multiple of ``batch_size``), ``top_n``, ``window`` (tokens kept
  left and right of a context's token), ``skip_bos``, ``hist_edges``. Corpus and progress:
  ``n_prompts``, ``corpus_hash``, ``next_prompt`` (prompts done), ``total_tokens`` (tokens
  counted), ``complete``; ``created``, ``lenslab_version`` (and ``converted_from`` for a converted
  store). While a store is partial, ``next_prompt`` and ``total_tokens`` are read from its parts.
- ``corpus.parquet`` ``(prompt_id int64, n_tokens int32, tokens list<int32>)``: token ids of each
  prompt after truncation to ``context_size``.
- ``vocab.parquet`` ``(token_id int32, token string)``: the model's token strings.
- ``features.parquet`` ``(feature int32, n_fire int64, sum_act float64, max_act float64, hist
  list<int64>)``: per feature the number of counted tokens where it fires (activation > 0), the
  sum and maximum of its activation there, and a histogram of those activations (one count per
  bin of ``hist_edges``: fixed log-spaced edges, values below the first edge go to the first bin
  and above the last edge to the last). Density = ``n_fire / total_tokens``; mean activation
  (when firing) = ``sum_act / n_fire``.
- ``contexts.parquet`` ``(feature int32, prompt_id int64, pos int32, act float64, start int32,
  acts list<float32>)``: the ``top_n`` highest activations of each feature (ties: lower prompt id,
  then position, first), each with the feature's activation on every token of the window
  ``tokens[start:start + len(acts)]`` for highlighting.
- ``token_features.parquet`` ``(token_id int32, feature int32, n_fire int64, sum_act float64,
  max_act float64)``, sorted by token id then feature: per token id and feature, over the counted
  positions holding that token: firing count, sum and max (what `search` by token or substring
  ranks on).
- ``logits.parquet`` ``(feature int32, pos_ids list<int32>, pos_values list<float64>, neg_ids,
  neg_values, hist_heights list<int64>, hist_edges list<float64>)``: the direct logit effect
  ``W_dec[f] @ W_U`` of each feature, its top promoted and suppressed tokens and a 32-bin
  histogram over the vocabulary.
- ``parts/`` (while indexing; removed once the store is complete): the corpus is cut into parts
  of ``part_size`` prompts, and each part's partial tables are written there by whichever process
  indexed it: ``part-KKKKKK-DDDDDDDDD.{features,contexts,tokens}.parquet`` (the tables above, over
  the part's first ``DDDDDDDDD`` prompts) and the marker ``part-KKKKKK.json`` (``part``,
  ``first_prompt``, ``n_prompts``, ``done`` prompts, ``n_tokens``, ``files``), written last and
  atomically: a part counts once its marker names its files.

The exact merge (`merge_parts`; indexing uses the same folds inside a part). Counts and
histograms are integer sums and maxima are maxima: exact in any order. Sums are float64 and are
defined as **left folds in corpus order**: inside a part, every activation is added in turn, in
(prompt, position) order, to the running sum of its feature (`numpy.add.at`) and of its (token,
feature) pair (`fold_tokens`, a sequential `numpy.bincount`); the store's sum is the left fold of
the parts' sums in part order (``((0 + part 0) + part 1) + ...``). A fold continued from a saved
partial fold equals the uninterrupted fold, so a part that is checkpointed and resumed, or run on
a Ray worker, gives the same bits; the sums depend on ``part_size`` (like the activations depend on
``batch_size``), not on the number of workers or on interruptions. Top contexts are the first
``top_n`` of each feature under a total order (activation descending, then prompt id, then
position): the same set whatever the order the parts are merged in.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lenslab._errors import LenslabError
from lenslab.probes.features.plumbing import check_feature, model_identity, sae_identity

__all__ = [
    "FORMAT",
    "HIST_EDGES",
    "MANIFEST",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Context",
    "FeatureStats",
    "FeatureStore",
    "PartContexts",
    "check_identity",
    "convert",
    "features_table",
    "fold_tokens",
    "is_store",
    "merge_parts",
    "part_markers",
    "read_parquet_table",
    "remove_tree",
    "tokens_table",
    "top_contexts",
    "top_order",
    "write_json",
    "write_store",
    "write_table",
]

FORMAT = "lenslab-feature-store"
SCHEMA_VERSION = 2
"""2: a folder of Parquet tables (this module); 1: one SQLite file (read and converted, never written)."""
MANIFEST = "manifest.json"
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.logspace(-4, 4, 65))
"""Activation histogram bin edges: 64 log-spaced bins from 1e-4 to 1e4 (8 per decade)."""

_i32, _i64, _f32, _f64 = pa.int32(), pa.int64(), pa.float32(), pa.float64()
SCHEMA: dict[str, pa.Schema] = {
    "corpus": pa.schema([("prompt_id", _i64), ("n_tokens", _i32), ("tokens", pa.list_(_i32))]),
    "vocab": pa.schema([("token_id", _i32), ("token", pa.string())]),
    "features": pa.schema(
        [("feature", _i32), ("n_fire", _i64), ("sum_act", _f64), ("max_act", _f64), ("hist", pa.list_(_i64))]
    ),
    "contexts": pa.schema(
        [
            ("feature", _i32),
            ("prompt_id", _i64),
            ("pos", _i32),
            ("act", _f64),
            ("start", _i32),
            ("acts", pa.list_(_f32)),
        ]
    ),
    "token_features": pa.schema(
        [("token_id", _i32), ("feature", _i32), ("n_fire", _i64), ("sum_act", _f64), ("max_act", _f64)]
    ),
    "logits": pa.schema(
        [
            ("feature", _i32),
            ("pos_ids", pa.list_(_i32)),
            ("pos_values", pa.list_(_f64)),
            ("neg_ids", pa.list_(_i32)),
            ("neg_values", pa.list_(_f64)),
            ("hist_heights", pa.list_(_i64)),
            ("hist_edges", pa.list_(_f64)),
        ]
    ),
}
"""The tables of a store (pyarrow schemas); a part's ``tokens`` file has the ``token_features`` schema."""
MERGED = ("features", "contexts", "token_features")
"""The tables made by merging the parts."""
_TOKEN_FOLD_ROWS = 8_000_000  # merge_parts folds the parts' token tables this many rows at a time


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


# -- files ---------------------------------------------------------------------------------------
def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as JSON to `path` atomically (a temporary file in the same folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, table: pa.Table, *, compress: bool = True) -> None:
    """Write `table` as Parquet to `path` atomically (a temporary file, then a rename): zstd, or
    uncompressed for the transient part files (`compress=False`, faster); no dictionary encoding
    (the columns are mostly distinct numbers, where it costs time and saves nothing)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(
            table,
            tmp,
            compression="zstd" if compress else "none",
            compression_level=1 if compress else None,
            use_dictionary=False,
            row_group_size=1 << 17,
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet_table(path: Path, name: str) -> pa.Table:
    """A store table from its Parquet file, cast to the store's schema for `name`."""
    return pq.read_table(path).cast(SCHEMA["token_features" if name == "tokens" else name])


def is_store(path: Path) -> bool:
    """Whether `path` is a feature store: a folder with a lenslab manifest, or a SQLite file of the first format."""
    path = Path(path)
    if path.is_dir():
        try:
            return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, ValueError):
            return False
    if path.is_file():
        try:
            return _read_v1_meta(path).get("format") == FORMAT
        except (sqlite3.DatabaseError, ValueError):
            return False
    return False


def part_markers(folder: Path) -> list[dict]:
    """The markers of the parts written so far under `folder/parts`, by part number."""
    parts = Path(folder) / "parts"
    if not parts.is_dir():
        return []
    return sorted((json.loads(p.read_text()) for p in parts.glob("part-*.json")), key=lambda m: m["part"])


# -- the exact merge -----------------------------------------------------------------------------
def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in `sorted_keys`."""
    if not len(sorted_keys):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1])


def fold_tokens(
    keys: np.ndarray, n: np.ndarray, s: np.ndarray, m: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fold rows (key `[R]` int64, count, sum float64, max) that are in fold order into one row per
    key: (sorted unique keys, summed counts, sums, maxima). Each key's sum is the left fold
    ``((0 + s_first) + s_next) + ...`` of its rows in the order given (a sequential `np.bincount`),
    so folding a folded prefix together with the rest equals folding everything at once."""
    if not len(keys):
        return keys.astype(np.int64), n.astype(np.int64), s.astype(np.float64), m.astype(np.float64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = _group_starts(sk)
    seg = np.zeros(len(sk), dtype=np.int64)
    seg[starts[1:]] = 1
    inv = np.empty(len(sk), dtype=np.int64)
    inv[order] = np.cumsum(seg)
    u = len(starts)
    sums = np.bincount(inv, weights=s, minlength=u)  # sequential in input order: the left fold
    counts = np.add.reduceat(n[order].astype(np.int64), starts)
    maxima = np.maximum.reduceat(m[order].astype(np.float64), starts)
    return sk[starts], counts, sums, maxima


@dataclass
class PartContexts:
    """Contexts as arrays (one row each): feature, prompt_id, pos, act `[R]`, window start and
    length `[R]`, and the window's activations `win` `[R, width]` (left-aligned, zero-padded)."""

    feature: np.ndarray
    prompt_id: np.ndarray
    pos: np.ndarray
    act: np.ndarray
    start: np.ndarray
    length: np.ndarray
    win: np.ndarray

    @classmethod
    def empty(cls, width: int) -> PartContexts:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, np.zeros(0), z, z, np.zeros((0, width), dtype=np.float32))

    @classmethod
    def concat(cls, items: Sequence[PartContexts]) -> PartContexts:
        return cls(
            *(np.concatenate([getattr(c, k) for c in items]) for k in ("feature", "prompt_id", "pos", "act", "start")),
            np.concatenate([c.length for c in items]),
            np.concatenate([c.win for c in items]),
        )

    def take(self, idx: np.ndarray) -> PartContexts:
        return PartContexts(
            self.feature[idx], self.prompt_id[idx], self.pos[idx], self.act[idx], self.start[idx],
            self.length[idx], self.win[idx],
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.feature)

    @classmethod
    def from_table(cls, t: pa.Table, width: int) -> PartContexts:
        acts = t.column("acts").combine_chunks()
        lengths = acts.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = acts.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        width = max(width, int(lengths.max()) if len(lengths) else 0)
        win = np.zeros((len(lengths), width), dtype=np.float32)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        win[rows, cols] = values
        col = lambda k, dt: t.column(k).to_numpy().astype(dt)
        return cls(
            col("feature", np.int64), col("prompt_id", np.int64), col("pos", np.int64), col("act", np.float64),
            col("start", np.int64), lengths, win,
        )  # fmt: skip

    def to_table(self) -> pa.Table:
        mask = np.arange(self.win.shape[1])[None, :] < self.length[:, None]
        offsets = np.concatenate([[0], np.cumsum(self.length)]).astype(np.int32)
        acts = pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.win[mask], type=_f32))
        return pa.Table.from_arrays(
            [
                pa.array(self.feature, _i32),
                pa.array(self.prompt_id, _i64),
                pa.array(self.pos, _i32),
                pa.array(self.act, _f64),
                pa.array(self.start, _i32),
                acts,
            ],
            schema=SCHEMA["contexts"],
        )


def top_order(feature: np.ndarray, act: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first `top_n` rows of each feature under the order (activation descending,
    prompt id, position), sorted by feature then that order, and each one's rank in its feature:
    `(idx, rank)`. The rows must already come in (prompt id, position) order wherever feature and
    activation are equal (true of rows in corpus order, and of merged parts taken in part order),
    and the activations must be float32 values > 0 (all SAE activations are): then one stable sort
    of an int64 key (the feature, then the activation's float32 bits reversed) gives that order."""
    bits = np.asarray(act).astype(np.float32).view(np.uint32).astype(np.int64)  # monotonic in the value for v > 0
    order = np.argsort((np.asarray(feature).astype(np.int64) << 32) | (0xFFFFFFFF - bits), kind="stable")
    f = np.asarray(feature)[order]
    starts = _group_starts(f)
    rank = np.arange(len(f)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(f)]])))
    keep = rank < top_n
    return order[keep], rank[keep]


def top_contexts(ctx: PartContexts, top_n: int) -> PartContexts:
    """The first `top_n` contexts of each feature (`top_order`, whose condition on the row order
    `ctx` must meet), sorted by feature then that order."""
    if not len(ctx):
        return ctx
    return ctx.take(top_order(ctx.feature, ctx.act, top_n)[0])


def _features_arrays(t: pa.Table, d_sae: int, n_bins: int) -> dict[str, np.ndarray]:
    f = t.column("feature").to_numpy().astype(np.int64)
    out = {
        "n_fire": np.zeros(d_sae, dtype=np.int64),
        "sum_act": np.zeros(d_sae, dtype=np.float64),
        "max_act": np.zeros(d_sae, dtype=np.float64),
        "hist": np.zeros((d_sae, n_bins), dtype=np.int64),
    }
    for k in ("n_fire", "sum_act", "max_act"):
        out[k][f] = t.column(k).to_numpy()
    out["hist"][f] = t.column("hist").combine_chunks().flatten().to_numpy().reshape(len(f), n_bins)
    return out


def features_table(n_fire, sum_act, max_act, hist) -> pa.Table:
    """The ``features`` table of dense arrays `[d_sae]` and `hist` `[d_sae, n_bins]`."""
    d_sae, n_bins = hist.shape
    offsets = pa.array(np.arange(d_sae + 1, dtype=np.int32) * n_bins)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(d_sae, dtype=np.int32)),
            pa.array(np.asarray(n_fire, dtype=np.int64)),
            pa.array(np.asarray(sum_act, dtype=np.float64)),
            pa.array(np.asarray(max_act, dtype=np.float64)),
            pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(hist, dtype=np.int64).ravel())),
        ],
        schema=SCHEMA["features"],
    )


def tokens_table(keys, n, s, m, d_sae: int) -> pa.Table:
    """The ``token_features`` table of folded rows keyed ``token_id * d_sae + feature`` (sorted)."""
    keys = np.asarray(keys, dtype=np.int64)
    return pa.Table.from_arrays(
        [
            pa.array((keys // d_sae).astype(np.int32)),
            pa.array((keys % d_sae).astype(np.int32)),
            pa.array(np.asarray(n, dtype=np.int64)),
            pa.array(np.asarray(s, dtype=np.float64)),
            pa.array(np.asarray(m, dtype=np.float64)),
        ],
        schema=SCHEMA["token_features"],
    )


def merge_parts(folder: Path, markers: Sequence[dict], meta: dict) -> dict[str, pa.Table]:
    """The ``features``, ``contexts`` and ``token_features`` tables of the parts `markers` under
    `folder/parts`, merged exactly (module docstring): sums folded in part order."""
    d_sae, top_n = int(meta["d_sae"]), int(meta["top_n"])
    n_bins = len(meta["hist_edges"]) - 1
    width = int(meta["window"][0]) + int(meta["window"][1]) + 1
    parts = Path(folder) / "parts"
    n_fire = np.zeros(d_sae, dtype=np.int64)
    sum_act = np.zeros(d_sae, dtype=np.float64)
    max_act = np.zeros(d_sae, dtype=np.float64)
    hist = np.zeros((d_sae, n_bins), dtype=np.int64)
    ctx = PartContexts.empty(width)
    tok: tuple = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    pending: list[tuple] = []
    for mk in sorted(markers, key=lambda m: m["part"]):
        files = mk["files"]
        a = _features_arrays(read_parquet_table(parts / files["features"], "features"), d_sae, n_bins)
        n_fire += a["n_fire"]
        sum_act = sum_act + a["sum_act"]  # the left fold over parts, in part order
        np.maximum(max_act, a["max_act"], out=max_act)
        hist += a["hist"]
        c = PartContexts.from_table(read_parquet_table(parts / files["contexts"], "contexts"), width)
        ctx = top_contexts(PartContexts.concat([ctx, _pad(c, ctx.win.shape[1])]), top_n)
        t = read_parquet_table(parts / files["tokens"], "tokens")
        keys = t.column("token_id").to_numpy().astype(np.int64) * d_sae + t.column("feature").to_numpy()
        pending.append((keys, *(t.column(k).to_numpy() for k in ("n_fire", "sum_act", "max_act"))))
        if sum(len(p[0]) for p in pending) > _TOKEN_FOLD_ROWS:
            tok = fold_tokens(*(np.concatenate([x, *(p[i] for p in pending)]) for i, x in enumerate(tok)))
            pending = []
    if pending:
        tok = fold_tokens(*(np.concatenate([x, *(p[i] for p in pending)]) for i, x in enumerate(tok)))
    return {
        "features": features_table(n_fire, sum_act, max_act, hist),
        "contexts": ctx.to_table(),
        "token_features": tokens_table(*tok, d_sae),
    }


def _pad(c: PartContexts, width: int) -> PartContexts:
    if c.win.shape[1] >= width:
        return c
    win = np.zeros((len(c), width), dtype=np.float32)
    win[:, : c.win.shape[1]] = c.win
    return PartContexts(c.feature, c.prompt_id, c.pos, c.act, c.start, c.length, win)


# -- the first format (SQLite) -------------------------------------------------------------------
def _read_v1_meta(path: Path) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
    finally:
        con.close()


def _read_v1(path: Path) -> dict[str, pa.Table]:
    """Every table of a SQLite store (schema version 1) as the Arrow table of this format."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()
        blobs = lambda rows, dt: [np.frombuffer(b, dtype=dt).tolist() for b in rows]
        corpus = q("SELECT prompt_id, n_tokens, tokens FROM corpus ORDER BY prompt_id")
        vocab = q("SELECT token_id, token FROM vocab ORDER BY token_id")
        feats = q("SELECT feature, n_fire, sum_act, max_act, hist FROM features ORDER BY feature")
        ctx = q(
            "SELECT feature, prompt_id, pos, act, start, acts FROM contexts ORDER BY feature, act DESC, prompt_id, pos"
        )
        toks = q("SELECT token_id, feature, n_fire, sum_act, max_act FROM token_features ORDER BY token_id, feature")
        logits = q(
            "SELECT feature, pos_ids, pos_values, neg_ids, neg_values, hist_heights, hist_edges FROM logits "
            "ORDER BY feature"
        )
    finally:
        con.close()
    cols = lambda rows, i: [r[i] for r in rows]
    mk = lambda name, arrays: pa.Table.from_arrays(arrays, schema=SCHEMA[name])
    return {
        "corpus": mk("corpus", [cols(corpus, 0), cols(corpus, 1), blobs(cols(corpus, 2), "<i4")]),
        "vocab": mk("vocab", [cols(vocab, 0), cols(vocab, 1)]),
        "features": mk("features", [*(cols(feats, i) for i in range(4)), blobs(cols(feats, 4), "<i8")]),
        "contexts": mk("contexts", [*(cols(ctx, i) for i in range(5)), blobs(cols(ctx, 5), "<f4")]),
        "token_features": mk("token_features", [cols(toks, i) for i in range(5)]),
        "logits": mk("logits", [cols(logits, 0), *([json.loads(x) for x in cols(logits, i)] for i in range(1, 7))]),
    }


def check_identity(meta: dict, name: str, model=None, sae=None) -> None:
    """Raise `LenslabError` unless `model` / `sae` are the ones the store `name` with manifest `meta`
    was built with (SAE: hook, sizes and weights hash; model: sizes and the `W_E`/`W_U` fingerprint)."""
    m = meta
    if sae is not None:
        ident = sae_identity(sae)
        if (ident["hook"], ident["d_sae"], ident["d_in"], ident["sae_hash"]) != (
            m["hook"],
            m["d_sae"],
            m["d_in"],
            m["sae_hash"],
        ):
            raise LenslabError(
                f"feature store {name} was built with another SAE: {m.get('sae_source') or '(unnamed)'} "
                f"(hook {m['hook']}, d_sae {m['d_sae']}, weights {m['sae_hash']}); this SAE has hook {ident['hook']}, "
                f"d_sae {ident['d_sae']}, weights {ident['sae_hash']}. Open the store with the SAE it was built with, "
                "or index the corpus again with this one (`lenslab sae index ... --out NEW_STORE`)"
            )
    if model is not None:
        ident = model_identity(model)
        same_weights = ident["model_fingerprint"] is not None and ident["model_fingerprint"] == m["model_fingerprint"]
        same_shape = (ident["d_model"], ident["d_vocab"]) == (m["d_model"], m["d_vocab"])
        if not same_shape or (
            not same_weights and (ident["model_fingerprint"] is not None or ident["model"] != m["model"])
        ):
            raise LenslabError(
                f"feature store {name} was built with model {m['model']} (d_model {m['d_model']}, "
                f"d_vocab {m['d_vocab']}, weights {m['model_fingerprint']}), not with {ident['model']} "
                f"(d_model {ident['d_model']}, d_vocab {ident['d_vocab']}, weights {ident['model_fingerprint']}); "
                f"load {m['model']}, or index the corpus again with this model"
            )


# -- the reader ----------------------------------------------------------------------------------
class FeatureStore:
    """A feature store on disk (a folder of Parquet tables; the layout is in the module docstring),
    read through DuckDB. A SQLite store of the first format opens too (read into memory; `convert`
    rewrites it as a folder).

    >>> import lenslab
    >>> from lenslab.probes.features import corpus_for, index
    >>> from lenslab.probes.sae import load_sae
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> sae = load_sae("zoo/steer-sentiment/blocks.1.hook_resid_post", model=model)
    >>> index(model, sae, corpus_for(model, 64), "store", progress=False)   # writes the store folder
    FeatureStore(store: model zoo/steer-sentiment, hook blocks.1.hook_resid_post, SAE ... (d_sae 384),
    1854 tokens from 64 prompts (complete))
    >>> store = FeatureStore("store")
    >>> round(store.stats(149).density, 3)   # the share of tokens where feature 149 fires
    0.132
    >>> [c.tokens[c.index] for c in store.contexts(149)[:5]]   # its top contexts: negative adjectives
    ['grim', 'awful', 'rude', 'terrible', 'horrible']
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tables: dict[str, pa.Table] = {}  # in memory: a SQLite store, or the merged parts of a partial one
        self._files: dict[str, Path] = {}  # on disk: Parquet files
        if self.path.is_dir():
            self._open_folder()
        elif self.path.is_file():
            self._open_sqlite()
        else:
            raise LenslabError(
                f"feature store {str(path)!r} does not exist; build one with "
                "`lenslab sae index --model M --sae S --corpus zoo --out STORE`"
            )
        self._db: duckdb.DuckDBPyConnection | None = None
        self._vocab: dict[int, str] | None = None

    def _open_folder(self) -> None:
        try:
            self.meta = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise LenslabError(
                f"{self.path.name} is not a lenslab feature store (no readable {MANIFEST}: {exc}); build one with "
                "`lenslab sae index`"
            ) from exc
        self._check_marker()
        for name in ("corpus", "vocab", "logits"):
            self._files[name] = self.path / f"{name}.parquet"
        merged = self.meta.get("complete") or self.meta.get("converted_from")  # else the parts hold the numbers
        if merged and all((self.path / f"{name}.parquet").is_file() for name in MERGED):
            for name in MERGED:
                self._files[name] = self.path / f"{name}.parquet"
        else:  # partial: merge the parts written so far, in memory
            markers = part_markers(self.path)
            self._tables.update(merge_parts(self.path, markers, self.meta))
            self.meta["next_prompt"] = sum(int(m["done"]) for m in markers)
            self.meta["total_tokens"] = sum(int(m["n_tokens"]) for m in markers)
            self.meta["complete"] = False

    def _open_sqlite(self) -> None:
        try:
            self.meta = _read_v1_meta(self.path)
        except sqlite3.DatabaseError as exc:
            raise LenslabError(
                f"{self.path.name} is not a lenslab feature store ({exc}); build one with `lenslab sae index`"
            ) from exc
        self._check_marker(version=1)
        self._tables.update(_read_v1(self.path))

    def _check_marker(self, version: int = SCHEMA_VERSION) -> None:
        if self.meta.get("format") != FORMAT:
            raise LenslabError(
                f"{self.path.name} is not a lenslab feature store (no format marker); build one with `lenslab sae index`"
            )
        if self.meta.get("schema_version") != version:
            raise LenslabError(
                f"{self.path.name} has store schema {self.meta.get('schema_version')}, this lenslab reads "
                f"{version} here; index the corpus again"
            )

    @property
    def legacy(self) -> bool:
        """True for a SQLite store of the first format (read-only; `convert` rewrites it)."""
        return self.path.is_file()

    # -- queries -----------------------------------------------------------------------------
    @property
    def db(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection with one view per table (``corpus``, ``vocab``, ``features``,
        ``contexts``, ``token_features``, ``logits``): ask it anything in SQL."""
        if self._db is None:
            con = duckdb.connect(":memory:")
            for name, t in self._tables.items():
                con.register(f"_{name}_arrow", t)
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_arrow")
            for name, p in self._files.items():
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{_sql_str(p)}')")
            self._db = con
        return self._db

    def _sql(self, query: str, params: Sequence | None = None) -> list[tuple]:
        return self.db.execute(query, list(params or [])).fetchall()

    def table(self, name: str) -> pa.Table:
        """One table of the store as an Arrow table (``corpus``, ``vocab``, ``features``,
        ``contexts``, ``token_features``, ``logits``)."""
        if name in self._tables:
            return self._tables[name]
        if name not in self._files:
            raise LenslabError(f"the store has no table {name!r}; it has {', '.join(SCHEMA)}")
        return read_parquet_table(self._files[name], name)

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
        check_identity(self.meta, self.path.name, model, sae)

    # -- reading -----------------------------------------------------------------------------
    def vocab(self) -> dict[int, str]:
        """Token id -> token string (the model's tokenizer, saved at index time)."""
        if self._vocab is None:
            t = self.table("vocab")
            self._vocab = dict(zip(t.column("token_id").to_pylist(), t.column("token").to_pylist()))
        return self._vocab

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        v = self.vocab()
        return [v.get(int(i), f"<{int(i)}>") for i in ids]

    def prompt_tokens(self, prompt_id: int) -> list[int]:
        """Token ids of corpus prompt `prompt_id` (as indexed, after truncation)."""
        rows = self._sql("SELECT tokens FROM corpus WHERE prompt_id = ?", [int(prompt_id)])
        if not rows:
            raise LenslabError(f"prompt {prompt_id} is not in the store (it holds prompts 0 .. {self.n_prompts - 1})")
        return list(rows[0][0])

    def corpus(self) -> list[list[int]]:
        """Every prompt's token ids, in order."""
        t = self.table("corpus").sort_by("prompt_id")
        return t.column("tokens").to_pylist()

    def stats(self, feature: int) -> FeatureStats:
        """Statistics of one feature."""
        check_feature(feature, self.d_sae)
        n, s, mx, hist = self._sql(
            "SELECT n_fire, sum_act, max_act, hist FROM features WHERE feature = ?", [int(feature)]
        )[0]
        return FeatureStats(
            feature=int(feature),
            n_fire=int(n),
            total_tokens=self.total_tokens,
            max_act=float(mx),
            mean_act=float(s) / n if n else 0.0,
            hist_counts=[int(x) for x in hist],
            hist_edges=self.hist_edges,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """All features' statistics as arrays: `n_fire`, `sum_act`, `max_act` `[d_sae]`, `hist` `[d_sae, n_bins]`."""
        return _features_arrays(self.table("features"), self.d_sae, len(self.hist_edges) - 1)

    def density(self) -> np.ndarray:
        """Firing density of every feature `[d_sae]`."""
        return self.arrays()["n_fire"] / max(self.total_tokens, 1)

    def contexts(self, feature: int, n: int | None = None) -> list[Context]:
        """The top-activating contexts of `feature`, highest first (at most `top_n`)."""
        check_feature(feature, self.d_sae)
        rows = self._sql(
            "SELECT prompt_id, pos, act, start, acts FROM contexts WHERE feature = ? "
            "ORDER BY act DESC, prompt_id, pos LIMIT ?",
            [int(feature), int(n) if n is not None else 1 << 62],
        )
        if not rows:
            return []
        prompts = dict(
            self._sql(
                "SELECT prompt_id, tokens FROM corpus WHERE prompt_id IN (SELECT UNNEST(?::BIGINT[]))",
                [sorted({int(r[0]) for r in rows})],
            )
        )
        out = []
        for pid, pos, act, start, acts in rows:
            ids = list(prompts[pid][start : start + len(acts)])
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
        r = self._sql(
            "SELECT pos_ids, pos_values, neg_ids, neg_values, hist_heights, hist_edges FROM logits WHERE feature = ?",
            [int(feature)],
        )
        if not r:
            return {"pos": [], "neg": [], "hist_heights": [], "hist_edges": []}
        pi, pv, ni, nv, hh, he = (list(x) for x in r[0])
        return {"pos": list(zip(pi, pv)), "neg": list(zip(ni, nv)), "hist_heights": hh, "hist_edges": he}

    def token_table(self, token_ids: Iterable[int]) -> list[tuple[int, int, int, float, float]]:
        """Rows (token_id, feature, n_fire, sum_act, max_act) of `token_features` for `token_ids`,
        by token id then feature."""
        ids = sorted({int(i) for i in token_ids})
        if not ids:
            return []
        return self._sql(
            "SELECT token_id, feature, n_fire, sum_act, max_act FROM token_features "
            "WHERE token_id IN (SELECT UNNEST(?::INTEGER[])) ORDER BY token_id, feature",
            [ids],
        )

    def token_hits(self, token_ids: Iterable[int]) -> list[tuple[int, float, int, float, list[int]]]:
        """Per feature that fires on any of `token_ids`: (feature, max activation there, firing
        count there, sum of activations there (a left fold in token-id order), the token ids it
        fires on, most active first; ties by token id), by feature. What `search` ranks."""
        ids = sorted({int(i) for i in token_ids})
        if not ids:
            return []
        return self._sql(
            "SELECT feature, max(max_act), sum(n_fire)::BIGINT, sum(sum_act ORDER BY token_id), "
            "list(token_id ORDER BY max_act DESC, token_id) FROM token_features "
            "WHERE token_id IN (SELECT UNNEST(?::INTEGER[])) GROUP BY feature ORDER BY feature",
            [ids],
        )

    def top_tokens(self, feature: int, k: int = 10) -> list[tuple[str, float, int]]:
        """Tokens on which `feature` is most active: (token, max activation, firing count)."""
        rows = self._sql(
            "SELECT token_id, max_act, n_fire FROM token_features WHERE feature = ? "
            "ORDER BY max_act DESC, token_id LIMIT ?",
            [int(feature), int(k)],
        )
        return [(self.token_strs([t])[0], float(m), int(n)) for t, m, n in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({self.describe()})"


def _sql_str(p: Path) -> str:
    return str(p).replace("'", "''")


def write_store(folder: Path, meta: dict, tables: dict[str, pa.Table]) -> None:
    """Write `tables` and the manifest `meta` as a store folder (created; the manifest last)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        write_table(folder / f"{name}.parquet", t.cast(SCHEMA[name]))
    write_json(folder / MANIFEST, meta)


def convert(old: str | Path, new: str | Path) -> FeatureStore:
    """Rewrite the SQLite store `old` (schema version 1) as the store folder `new` (this format), with
    the same numbers: every table's rows and the meta carried over unchanged (bit for bit), plus
    ``schema_version`` 2 and ``converted_from``. A partial old store converts as it is, readable but
    not resumable. `lenslab sae convert OLD.sqlite NEW` runs this."""
    old, new = Path(old), Path(new)
    if old.is_dir():
        raise LenslabError(f"{old} is a store folder already (this format); there is nothing to convert")
    if new.exists():
        raise LenslabError(f"{new} exists: pick a new folder for the converted store, or delete it first")
    src = FeatureStore(old)
    try:
        meta = {**src.meta, "schema_version": SCHEMA_VERSION, "converted_from": old.name}
        meta.setdefault("part_size", None)  # not indexed in parts: it cannot be resumed
        tmp = new.with_name(new.name + ".converting")
        if tmp.exists():
            remove_tree(tmp)
        write_store(tmp, meta, dict(src._tables))
        tmp.rename(new)
    finally:
        src.close()
    return FeatureStore(new)


def remove_tree(folder: Path) -> None:
    """Delete the folder `folder` and everything in it."""
    for p in sorted(folder.rglob("*"), key=lambda q: -len(q.parts)):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()
