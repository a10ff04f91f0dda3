"""Indexing: run a model and an SAE over a corpus once and write a feature store (resumable).

`index(model, sae, corpus, path)` writes per-feature statistics, top-activating contexts, the
per-token table and the logit effects to one SQLite file (the schema is in
`lenslab.probes.features.store`) and returns the `FeatureStore`.

Indexing commits once per batch (statistics, contexts, token table and ``next_prompt`` in one
transaction), so an interrupted run resumes at the first batch not committed, with nothing lost
or counted twice; a resumed run must use the same settings (the batch composition fixes the
order of floating-point sums). The position of the BOS token is skipped by default (it carries
outsized activations in most models), as are padding positions.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes.features.corpora import corpus_hash, tokenize_corpus
from lenslab.probes.features.plumbing import (
    LOGIT_K,
    check_pair,
    feature_acts,
    logit_summary,
    model_identity,
    sae_identity,
    str_tokens,
)
from lenslab.probes.features.store import FORMAT, HIST_EDGES, SCHEMA, SCHEMA_VERSION, FeatureStore

__all__ = ["index"]


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
            con.executescript(SCHEMA)
            _set_meta(con, **meta)
            con.executemany(
                "INSERT INTO corpus VALUES (?, ?, ?)",
                [(i, len(s), s.astype("<i4").tobytes()) for i, s in enumerate(seqs)],
            )
            d_vocab = int(model.cfg.d_vocab)
            con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(str_tokens(model, range(d_vocab))))
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
def _logit_rows(model, sae, k: int, chunk: int = 256):
    try:
        W_U = model.W_U.float()
    except Exception:
        return
    W_dec = sae.W_dec.float().to(W_U.device)
    for lo in range(0, W_dec.shape[0], chunk):
        for j, row in enumerate(logit_summary(W_dec[lo : lo + chunk] @ W_U, k)):
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
    hook = check_pair(model, sae)
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
            and corpus_hash(tokenize_corpus(model, corpus, context_size)) != store.meta["corpus_hash"]
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
        seqs = tokenize_corpus(model, corpus, context_size)

        meta = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            **ident,
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
    """Index `seqs` from the store's `next_prompt` on, one committed transaction per batch."""
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
