"""Indexing: run a model and an SAE over a corpus once and write a feature store (resumable, shardable).

`index(model, sae, corpus, path)` writes per-feature statistics, top-activating contexts, the
per-token table and the logit effects to a store folder (the layout is in
`lenslab.probes.features.store`) and returns the `FeatureStore`.

The corpus is cut into **parts** of ``part_size`` prompts. Each part is indexed on its own (in this
process one after another, or by Ray workers with `cluster=`; `lenslab.jobs`) into partial tables
under ``parts/``; when every part is done they are merged exactly (the merge and what is
bit-identical are in the store's module docstring) into the store's tables. Per batch, everything
is computed from the activations that fire: the (token, feature, value) triples of the batch,
aggregated with `np.bincount` / `np.add.at` and a sort-based group-by, never row by row.

Resuming: a finished part is never run again. A run stopped by an exception or Ctrl+C (or the
`on_batch` callback) in this process first saves the part in flight as it stands after its last
whole batch, and the next run continues that part from there; a process killed outright loses at
most the batches since the part's last checkpoint (one every `CHECKPOINT_S` seconds). Either way
the result is bit-identical to an uninterrupted run, which is why a resumed run must use the same
settings (`batch_size` fixes the batches the forward pass sees; `part_size` the order of the
floating-point sums). The BOS position is skipped by default (it carries outsized activations in
most models), as are padding positions.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

import lenslab
from lenslab import jobs
from lenslab._errors import LenslabError
from lenslab.probes.features.corpora import corpus_hash, tokenize_corpus
from lenslab.probes.features.plumbing import (
    LOGIT_K,
    check_pair,
    feature_acts,
    logit_summary_arrays,
    model_identity,
    sae_identity,
    str_tokens,
)
from lenslab.probes.features.store import (
    FORMAT,
    HIST_EDGES,
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    FeatureStore,
    PartContexts,
    check_identity,
    features_table,
    fold_tokens,
    is_store,
    merge_parts,
    part_markers,
    read_parquet_table,
    remove_tree,
    tokens_table,
    top_order,
    write_json,
    write_store,
    write_table,
)

__all__ = ["CHECKPOINT_S", "DENSE_TOKEN_TABLE", "PART_BATCHES", "PartJob", "index", "index_part_job"]

PART_BATCHES = 64
"""Default ``part_size``: this many batches of prompts per part."""
CHECKPOINT_S = 300.0
"""A part in flight is saved at least this often (seconds), so a killed process loses little."""
DENSE_TOKEN_TABLE = 1 << 21
"""A part keeps its token table as dense `[d_vocab * d_sae]` arrays up to this many entries (a
sparse sort-based fold above it): the same sums either way, the dense one faster."""
TOKEN_BUFFER_ROWS = 4_000_000  # a sparse token table is folded when this many rows are pending


def index(
    model,
    sae,
    corpus,
    path: str | Path,
    *,
    batch_size: int = 16,
    context_size: int = 64,
    top_n: int = 20,
    part_size: int | None = None,
    resume: bool = True,
    window: tuple[int, int] = (10, 3),
    skip_bos: bool = True,
    sae_source: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    cluster: str | None = None,
    num_cpus: int | None = None,
) -> FeatureStore:
    """Run `model` + `sae` over `corpus` once and store feature statistics and contexts at `path`.

    Args:
        model: a TransformerLens model with the SAE's hook.
        sae: a sae-lens SAE (`sae.cfg.metadata.hook_name` names the hook).
        corpus: a list of strings (tokenized with BOS), a list of token-id lists, a `[n, pos]`
            token tensor, or None to resume with the corpus already in the store.
        path: the store folder (created; any name).
        batch_size: prompts per forward pass.
        context_size: prompts are truncated to this many tokens.
        top_n: contexts kept per feature.
        part_size: prompts per part (the unit of resumption and of work for a cluster; a multiple
            of `batch_size`; default `PART_BATCHES` batches).
        resume: continue an existing store at `path` where it stopped (identity, corpus and
            settings must match); False deletes it and starts over.
        window: tokens kept (left, right) of each context's token.
        skip_bos: leave the BOS position out of the statistics.
        sae_source: the SAE's path or id, recorded in the store.
        progress: show a tqdm bar (batches in this process; parts on a cluster).
        on_batch: called as `on_batch(batch_index)` after each batch (an exception raised there
            stops the run with that batch saved; tests use it to interrupt). In this process only.
        cluster: None (this process); "local", "auto" or a Ray address: one shard per part, each
            Ray worker with its own copy of the model and the SAE writing its part's files (the
            folder must be on a disk every worker sees); the same store bit for bit.
        num_cpus: CPUs of a Ray started for `cluster="local"` (None: all).

    Returns:
        The `FeatureStore`.
    """
    path = Path(path)
    if batch_size < 1 or context_size < 1 or top_n < 1:
        raise LenslabError(
            f"batch_size, context_size and top_n must be >= 1 (got {batch_size}, {context_size}, {top_n})"
        )
    part_size = int(part_size) if part_size is not None else PART_BATCHES * int(batch_size)
    if part_size < 1 or part_size % batch_size:
        raise LenslabError(f"part_size must be a positive multiple of batch_size={batch_size}, got {part_size}")
    kind = jobs.parse_cluster(cluster)
    if on_batch is not None and kind is not None:
        raise LenslabError("on_batch is called in this process only: pass cluster=None with it")
    hook = check_pair(model, sae)
    settings = {
        "context_size": int(context_size),
        "batch_size": int(batch_size),
        "part_size": part_size,
        "top_n": int(top_n),
        "window": [int(window[0]), int(window[1])],
        "skip_bos": bool(skip_bos),
        "hist_edges": list(HIST_EDGES),
    }
    if path.exists() and resume and not (path.is_dir() and not any(path.iterdir())):  # an empty folder: a new store
        meta = _resumable_meta(path, model, sae, settings)
        if corpus is not None and corpus_hash(tokenize_corpus(model, corpus, context_size)) != meta["corpus_hash"]:
            raise LenslabError(
                f"{path.name} holds another corpus: pass the same corpus (or corpus=None) to resume, "
                "or resume=False to start over"
            )
        if meta["complete"]:
            if (path / "parts").exists():  # left by a run stopped between its last two steps
                remove_tree(path / "parts")
            return FeatureStore(path)
        seqs = [
            np.asarray(s, dtype=np.int32)
            for s in read_parquet_table(path / "corpus.parquet", "corpus")["tokens"].to_pylist()
        ]
    else:
        if corpus is None:
            raise LenslabError(f"there is no store at {str(path)!r} to resume: pass a corpus")
        _clear(path)
        seqs = tokenize_corpus(model, corpus, context_size)
        meta = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            **model_identity(model),
            **sae_identity(sae, sae_source),
            **settings,
            "n_prompts": len(seqs),
            "corpus_hash": corpus_hash(seqs),
            "next_prompt": 0,
            "total_tokens": 0,
            "complete": False,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lenslab_version": lenslab.__version__,
        }
        _create(path, model, sae, seqs, meta, LOGIT_K)
    _run(model, sae, hook, seqs, path, meta, kind, progress=progress, on_batch=on_batch, num_cpus=num_cpus)
    return FeatureStore(path)


def _resumable_meta(path: Path, model, sae, settings: dict) -> dict:
    if path.is_file():
        if is_store(path):
            raise LenslabError(
                f"{path.name} is a SQLite feature store of the first format: it cannot be resumed. Read it as it is "
                f"(FeatureStore), convert it (`lenslab sae convert {path} NEW`), or pass resume=False "
                "(--no-resume) to index again into a folder at this path (the file is replaced)"
            )
        raise LenslabError(f"{path} is a file, not a feature store: pick another path for the store")
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LenslabError(f"{path} exists and is not a feature store: pick another path, or delete it")
    if meta.get("schema_version") != SCHEMA_VERSION or meta.get("part_size") is None:
        raise LenslabError(
            f"{path.name} was not indexed in parts by this lenslab (converted or older): it cannot be resumed; "
            "pass resume=False to index again"
        )
    check_identity(meta, path.name, model, sae)
    for k, v in settings.items():
        if meta[k] != v:
            raise LenslabError(
                f"{path.name} was indexed with {k}={meta[k]!r}, not {v!r}: pass the same settings "
                "to resume, or resume=False to start over"
            )
    return meta


def _clear(path: Path) -> None:
    """Delete the store at `path` (either format); refuse anything else that is there."""
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    elif is_store(path):
        remove_tree(path) if path.is_dir() else path.unlink()
        path.with_name(path.name + "-journal").unlink(missing_ok=True)
    else:
        raise LenslabError(f"{path} exists and is not a feature store: pick another path for the store, or delete it")


def _create(path: Path, model, sae, seqs: list[np.ndarray], meta: dict, logit_k: int) -> None:
    """Write the store's fixed tables (corpus, vocabulary, logit effects) and its manifest to a
    temporary folder, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():
        remove_tree(tmp)
    try:
        lens = np.array([len(s) for s in seqs], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32)
        corpus = pa.Table.from_arrays(
            [
                pa.array(np.arange(len(seqs), dtype=np.int64)),
                pa.array(lens),
                pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)).cast(pa.list_(pa.int32())),
            ],
            schema=SCHEMA["corpus"],
        )
        d_vocab = int(model.cfg.d_vocab)
        vocab = pa.Table.from_arrays(
            [pa.array(np.arange(d_vocab, dtype=np.int32)), pa.array(str_tokens(model, range(d_vocab)))],
            schema=SCHEMA["vocab"],
        )
        write_store(tmp, meta, {"corpus": corpus, "vocab": vocab, "logits": _logits_table(model, sae, logit_k)})
        tmp.rename(path)
    except BaseException:
        if tmp.exists():
            remove_tree(tmp)
        raise


@torch.no_grad()
def _logits_table(model, sae, k: int, chunk: int = 256) -> pa.Table:
    schema = SCHEMA["logits"]
    try:
        W_U = model.W_U.float()
    except Exception:
        return schema.empty_table()
    W_dec = sae.W_dec.float().to(W_U.device)
    parts = [logit_summary_arrays(W_dec[lo : lo + chunk] @ W_U, k) for lo in range(0, W_dec.shape[0], chunk)]
    cols = [np.concatenate([p[i] for p in parts]) for i in range(6)]

    def lists(a: np.ndarray, field: pa.Field) -> pa.Array:  # [n, m] -> n lists of m
        offsets = pa.array(np.arange(a.shape[0] + 1, dtype=np.int32) * a.shape[1])
        return pa.ListArray.from_arrays(offsets, pa.array(a.ravel()).cast(field.type.value_type))

    feature = pa.array(np.arange(W_dec.shape[0], dtype=np.int32))
    return pa.Table.from_arrays([feature, *(lists(c, f) for c, f in zip(cols, list(schema)[1:]))], schema=schema)


# -- one part --------------------------------------------------------------------------------------
class _Part:
    """The running tables of one part: statistics `[d_sae]`, histograms `[d_sae, n_bins]`, each
    feature's top contexts in slots `[d_sae, top_n]` (empty: act 0, prompt -1), and the token table
    (dense `[d_vocab * d_sae]` arrays, or rows folded now and then; see `DENSE_TOKEN_TABLE`)."""

    def __init__(self, meta: dict, d_vocab: int):
        self.d_sae, self.top_n = int(meta["d_sae"]), int(meta["top_n"])
        self.left, self.right = (int(x) for x in meta["window"])
        self.width = self.left + self.right + 1
        self.edges = np.asarray(meta["hist_edges"], dtype=np.float64)
        self.n_bins = len(self.edges) - 1
        F, N = self.d_sae, self.top_n
        self.n_fire = np.zeros(F, dtype=np.int64)
        self.sum_act = np.zeros(F, dtype=np.float64)
        self.max_act = np.zeros(F, dtype=np.float64)
        self.hist = np.zeros((F, self.n_bins), dtype=np.int64)
        self.top_act = np.zeros((F, N), dtype=np.float64)
        self.top_pid = np.full((F, N), -1, dtype=np.int64)
        self.top_pos = np.zeros((F, N), dtype=np.int64)
        self.top_start = np.zeros((F, N), dtype=np.int64)
        self.top_len = np.zeros((F, N), dtype=np.int64)
        self.top_win = np.zeros((F, N, self.width), dtype=np.float32)
        self.dense = d_vocab * F <= DENSE_TOKEN_TABLE
        if self.dense:
            self.tok_n = np.zeros(d_vocab * F, dtype=np.int64)
            self.tok_sum = np.zeros(d_vocab * F, dtype=np.float64)
            self.tok_max = np.zeros(d_vocab * F, dtype=np.float64)
        else:
            z = np.zeros(0)
            self.tok = (z.astype(np.int64), z.astype(np.int64), z, z)  # folded rows
            self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (keys, values) in corpus order
        self.n_tokens = 0
        self.done = 0  # prompts of the part indexed
        self.intact = True  # False while a batch is half added

    # -- one batch ------------------------------------------------------------------------------
    def add_batch(self, acts: np.ndarray, toks: np.ndarray, valid: np.ndarray, lens: np.ndarray, pid0: int) -> None:
        """Add one batch: feature activations `acts` `[B, T, d_sae]` (float32) of tokens `toks`
        `[B, T]`, counted positions `valid` `[B, T]`, prompt lengths `lens` `[B]`, the batch's
        first prompt id `pid0`."""
        self.intact = False
        B, T, F = acts.shape
        flat = acts.reshape(B * T, F)
        r, f = np.divmod(np.flatnonzero(flat > 0), F)  # firing entries, in corpus order (prompt, position, feature)
        keep = valid.reshape(-1)[r]
        r, f = r[keep], f[keep]
        v = flat[r, f].astype(np.float64)
        self.n_tokens += int(valid.sum())
        self.n_fire += np.bincount(f, minlength=F)
        np.add.at(self.sum_act, f, v)  # sequential: the left fold in corpus order
        np.maximum.at(self.max_act, f, v)
        bins = self._bins(v)
        np.add.at(self.hist.reshape(-1), f * self.n_bins + bins, 1)
        keys = toks.reshape(-1)[r].astype(np.int64) * F + f
        if self.dense:
            np.add.at(self.tok_n, keys, 1)
            np.add.at(self.tok_sum, keys, v)
            np.maximum.at(self.tok_max, keys, v)
        else:
            self.pending.append((keys, v))
            if sum(len(k) for k, _ in self.pending) > TOKEN_BUFFER_ROWS:
                self.fold()
        self._contexts(acts, r, f, v, lens, pid0, T)
        self.done += B
        self.intact = True

    def _bins(self, v: np.ndarray) -> np.ndarray:
        """Histogram bin of each value `v` `[n]` (> 0): `searchsorted(edges, v, "right") - 1` clipped to
        the bins, found from its logarithm and corrected by one where rounding put it next door."""
        e = self.edges
        lo, step = math.log10(e[0]), (math.log10(e[-1]) - math.log10(e[0])) / self.n_bins
        b = np.clip(np.floor((np.log10(v) - lo) / step).astype(np.int64), 0, self.n_bins - 1)
        b -= (v < e[b]) & (b > 0)
        b += (v >= e[b + 1]) & (b < self.n_bins - 1)
        return b

    def _contexts(self, acts, r, f, v, lens, pid0: int, T: int) -> None:
        """Merge the batch's firing entries into each feature's top contexts (later prompts lose ties)."""
        cand = v > self.top_act[f, -1]
        if not cand.any():
            return
        cf, cv, cr = f[cand], v[cand], r[cand]
        touched = np.zeros(self.d_sae, dtype=bool)
        touched[cf] = True
        feats = np.flatnonzero(touched)
        held = self.top_pid[feats] >= 0  # [n, top_n]: the contexts kept so far
        hf = np.broadcast_to(feats[:, None], held.shape)[held]
        hs = np.broadcast_to(np.arange(self.top_n)[None, :], held.shape)[held]
        all_f = np.concatenate([hf, cf])
        all_act = np.concatenate([self.top_act[hf, hs], cv])
        idx, rank = top_order(all_f, all_act, self.top_n)  # the kept ones first: they win ties
        old = idx < len(hf)
        # the kept contexts that stay, copied out before their slots are rewritten
        keep_f, keep_s = all_f[idx[old]], rank[old]
        src_s = hs[idx[old]]
        o_act, o_pid, o_pos = self.top_act[keep_f, src_s], self.top_pid[keep_f, src_s], self.top_pos[keep_f, src_s]
        o_start, o_len, o_win = self.top_start[keep_f, src_s], self.top_len[keep_f, src_s], self.top_win[keep_f, src_s]
        # the new contexts, with their windows
        j = idx[~old] - len(hf)
        nf, ns, nb, npos = cf[j], rank[~old], cr[j] // T, cr[j] % T
        start = np.maximum(npos - self.left, 0)
        stop = np.minimum(npos + self.right + 1, lens[nb])
        P = start[:, None] + np.arange(self.width)[None, :]
        ok = P < stop[:, None]
        F = acts.shape[2]
        flat = ((nb[:, None] * T + np.minimum(P, T - 1)) * F + nf[:, None]).ravel()
        win = np.where(ok, acts.reshape(-1)[flat].reshape(P.shape), 0).astype(np.float32)
        # rewrite the slots of the touched features
        self.top_act[feats], self.top_pid[feats] = 0.0, -1
        self.top_pos[feats], self.top_start[feats], self.top_len[feats] = 0, 0, 0
        self.top_win[feats] = 0.0
        for a, vals in ((self.top_act, o_act), (self.top_pid, o_pid), (self.top_pos, o_pos)):
            a[keep_f, keep_s] = vals
        self.top_start[keep_f, keep_s], self.top_len[keep_f, keep_s], self.top_win[keep_f, keep_s] = (
            o_start,
            o_len,
            o_win,
        )
        self.top_act[nf, ns], self.top_pid[nf, ns], self.top_pos[nf, ns] = cv[j], pid0 + nb, npos
        self.top_start[nf, ns], self.top_len[nf, ns], self.top_win[nf, ns] = start, stop - start, win

    def fold(self) -> None:
        """Fold the pending token rows into the folded ones (a sparse token table)."""
        if self.dense or not self.pending:
            return
        ks, vs = zip(*self.pending)
        ones = np.ones(sum(len(k) for k in ks), dtype=np.int64)
        self.tok = fold_tokens(
            np.concatenate([self.tok[0], *ks]),
            np.concatenate([self.tok[1], ones]),
            np.concatenate([self.tok[2], *vs]),
            np.concatenate([self.tok[3], *vs]),
        )
        self.pending = []

    # -- files ----------------------------------------------------------------------------------
    def tables(self) -> dict[str, pa.Table]:
        held = self.top_pid >= 0
        f, s = np.nonzero(held)
        ctx = PartContexts(
            f, self.top_pid[f, s], self.top_pos[f, s], self.top_act[f, s], self.top_start[f, s], self.top_len[f, s],
            self.top_win[f, s],
        )  # fmt: skip
        if self.dense:
            keys = np.flatnonzero(self.tok_n)
            tok = (keys, self.tok_n[keys], self.tok_sum[keys], self.tok_max[keys])
        else:
            self.fold()
            tok = self.tok
        return {
            "features": features_table(self.n_fire, self.sum_act, self.max_act, self.hist),
            "contexts": ctx.to_table(),
            "tokens": tokens_table(*tok, self.d_sae),
        }

    def save(self, folder: Path, part: int, first: int, n_prompts: int) -> dict:
        """Write the part's files and then its marker (atomically); return the marker."""
        parts = folder / "parts"
        parts.mkdir(exist_ok=True)
        stem = f"part-{part:06d}-{self.done:09d}"
        files = {}
        for name, t in self.tables().items():
            files[name] = f"{stem}.{name}.parquet"
            write_table(parts / files[name], t, compress=False)
        marker = {
            "part": part,
            "first_prompt": first,
            "n_prompts": n_prompts,
            "done": self.done,
            "n_tokens": self.n_tokens,
            "files": files,
        }
        write_json(parts / f"part-{part:06d}.json", marker)
        for p in parts.glob(f"part-{part:06d}-*.parquet"):  # an earlier checkpoint of this part
            if p.name not in files.values():
                p.unlink(missing_ok=True)
        return marker

    def load(self, folder: Path, marker: dict) -> None:
        """Continue from a saved checkpoint of this part (`marker`): the same state it was saved in."""
        parts, files = folder / "parts", marker["files"]
        t = read_parquet_table(parts / files["features"], "features")
        f = t.column("feature").to_numpy().astype(np.int64)
        self.n_fire[f] = t.column("n_fire").to_numpy()
        self.sum_act[f] = t.column("sum_act").to_numpy()
        self.max_act[f] = t.column("max_act").to_numpy()
        self.hist[f] = t.column("hist").combine_chunks().flatten().to_numpy().reshape(len(f), self.n_bins)
        c = PartContexts.from_table(read_parquet_table(parts / files["contexts"], "contexts"), self.width)
        if len(c):
            idx, rank = top_order(c.feature, c.act, self.top_n)  # the table is in rank order
            c = c.take(idx)
            for a, vals in (
                (self.top_act, c.act),
                (self.top_pid, c.prompt_id),
                (self.top_pos, c.pos),
                (self.top_start, c.start),
                (self.top_len, c.length),
                (self.top_win, c.win[:, : self.width]),
            ):
                a[c.feature, rank] = vals
        t = read_parquet_table(parts / files["tokens"], "tokens")
        keys = t.column("token_id").to_numpy().astype(np.int64) * self.d_sae + t.column("feature").to_numpy()
        n, s, m = (t.column(k).to_numpy() for k in ("n_fire", "sum_act", "max_act"))
        if self.dense:
            self.tok_n[keys], self.tok_sum[keys], self.tok_max[keys] = n, s, m
        else:
            self.tok = (keys, n.astype(np.int64), s.astype(np.float64), m.astype(np.float64))
        self.n_tokens, self.done = int(marker["n_tokens"]), int(marker["done"])


@dataclass(frozen=True)
class PartJob:
    """One part of a corpus to index (the payload of `index_part_job`): the store folder, the part's
    number, first prompt id and token ids, the store's manifest, and handles of the model and the
    SAE (`lenslab.jobs.share_model`)."""

    folder: str
    part: int
    first: int
    seqs: list
    meta: dict
    model: Any
    sae: Any


_CHECKED: dict[tuple, str] = {}  # in a worker: (model, SAE, store) handles already checked -> the hook


def _handle_key(handle) -> object:
    return handle.hex() if type(handle).__name__ == "ObjectRef" else id(handle)


def index_part_job(job: PartJob) -> dict:
    """Index one part in a worker (`lenslab.jobs.run_job`'s work function): the model and the SAE
    from their handles, checked against the store's manifest (once per worker process and job);
    returns the part's marker."""
    model, sae = jobs.worker_model(job.model), jobs.worker_model(job.sae)
    key = (_handle_key(job.model), _handle_key(job.sae), job.folder, job.meta["created"])
    if key not in _CHECKED:
        check_identity(job.meta, Path(job.folder).name, model, sae)
        _CHECKED.clear()  # one job at a time: keep only the latest
        _CHECKED[key] = check_pair(model, sae)
    return _index_part(model, sae, _CHECKED[key], job.seqs, Path(job.folder), job.part, job.first, job.meta)


def _index_part(
    model,
    sae,
    hook: str,
    seqs: Sequence[np.ndarray],
    folder: Path,
    part: int,
    first: int,
    meta: dict,
    *,
    on_batch: Callable[[int], None] | None = None,
    tick: Callable[[int], None] | None = None,
) -> dict:
    """Index prompts `seqs` (ids `first ..`) as part `part`, continuing its checkpoint if there is one;
    save it and return its marker. Stopped by an exception, it saves the batches done first."""
    bs = int(meta["batch_size"])
    tok = getattr(model, "tokenizer", None)
    bos, pad = getattr(tok, "bos_token_id", None), getattr(tok, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    device = getattr(model.cfg, "device", None) or "cpu"
    state = _Part(meta, int(meta["d_vocab"]))
    marker = next((m for m in part_markers(folder) if m["part"] == part), None)
    if marker is not None:
        state.load(folder, marker)
    saved, last = state.done, time.monotonic()
    try:
        for b0 in range(state.done, len(seqs), bs):
            batch = seqs[b0 : b0 + bs]
            lens = np.array([len(s) for s in batch])
            T = int(lens.max())
            toks = np.full((len(batch), T), pad, dtype=np.int64)
            for i, s in enumerate(batch):
                toks[i, : len(s)] = s
            acts = (
                feature_acts(model, sae, torch.from_numpy(toks).to(device), check=False).cpu().numpy()
            )  # [B, T, d_sae]
            valid = np.arange(T)[None, :] < lens[:, None]
            if meta["skip_bos"] and bos is not None:
                valid[:, 0] &= toks[:, 0] != int(bos)
            state.add_batch(acts, toks, valid, lens, first + b0)
            if tick is not None:
                tick(1)
            if on_batch is not None:
                on_batch((first + b0) // bs)
            if time.monotonic() - last > CHECKPOINT_S:
                state.save(folder, part, first, len(seqs))
                saved, last = state.done, time.monotonic()
    except BaseException:
        if state.intact and state.done > saved:
            state.save(folder, part, first, len(seqs))
        raise
    return state.save(folder, part, first, len(seqs))


def _run(model, sae, hook, seqs, path: Path, meta: dict, kind, *, progress, on_batch, num_cpus) -> None:
    """Index every unfinished part (here or on the cluster `kind`), then merge the parts into the store."""
    n, P, bs = len(seqs), int(meta["part_size"]), int(meta["batch_size"])
    done = {m["part"]: m for m in part_markers(path)}
    parts = [(k, k * P, min(n, (k + 1) * P)) for k in range(math.ceil(n / P))]
    todo = [(k, a, b) for k, a, b in parts if k not in done or done[k]["done"] < b - a]
    try:
        if kind is None:
            n_batches = sum(math.ceil((b - a) / bs) for _, a, b in parts)
            left = sum(math.ceil((b - a - (done[k]["done"] if k in done else 0)) / bs) for k, a, b in todo)
            bar = tqdm(
                total=n_batches,
                initial=n_batches - left,
                unit="batch",
                desc=f"indexing {hook}",
                disable=not progress,
                leave=False,
            )
            try:
                for k, a, b in todo:
                    _index_part(model, sae, hook, seqs[a:b], path, k, a, meta, on_batch=on_batch, tick=bar.update)
            finally:
                bar.close()
        elif todo:
            device = str(getattr(model.cfg, "device", None) or "cpu")
            handles = jobs.share_model(model, kind), jobs.share_model(sae, kind)
            shards = [
                jobs.Shard(
                    key=f"part-{k:06d}",
                    payload=PartJob(str(path), k, a, list(seqs[a:b]), meta, *handles),
                    size=b - a - (done[k]["done"] if k in done else 0),
                )
                for k, a, b in todo
            ]
            jobs.run_job(
                index_part_job,
                shards,
                cluster=kind,
                desc=f"indexing {hook} (parts)",
                progress=progress,
                num_cpus=num_cpus,
                num_gpus=1 if device.startswith("cuda") else 0,
            )
    except KeyboardInterrupt:
        got = sum(m["done"] for m in part_markers(path))
        print(
            f"\nlenslab: indexing interrupted after {got} of {n} prompts (saved); run the same command again to resume",
            file=sys.stderr,
        )
        raise
    markers = part_markers(path)
    missing = [k for k, a, b in parts if not any(m["part"] == k and m["done"] == b - a for m in markers)]
    if missing:
        raise LenslabError(
            f"parts {missing[:5]} of {path.name} were indexed but their files are not in {path / 'parts'}: on a "
            "cluster of several machines the store folder must be on a disk every worker sees (a shared filesystem)"
        )
    tables = merge_parts(path, markers, meta)
    for name, t in tables.items():
        write_table(path / f"{name}.parquet", t)
    write_json(
        path / MANIFEST,
        {**meta, "next_prompt": n, "total_tokens": int(sum(m["n_tokens"] for m in markers)), "complete": True},
    )
    remove_tree(path / "parts")
