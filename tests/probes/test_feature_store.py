"""The Parquet feature store (lenslab.probes.features.store / .indexing): exact merges, resumption,
Ray workers, the SQLite store of the first format and its conversion, DuckDB search.

zoo/steer-sentiment with the SAE of tests/fixtures/make_feature_store_v1.py (32 ReLU features set
from a seeded generator) over that script's corpus (24 documents) or a larger one (48 documents).
What "bit-identical" means is in the store's module docstring: every table (integers, float64
sums, maxima, float32 window activations) and the manifest equal exactly, compared as Arrow
tables.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes import features as F
from lenslab.probes.features import indexing
from lenslab.probes.features.store import MERGED, SCHEMA

FIXTURES = Path(__file__).parents[1] / "fixtures"
V1 = FIXTURES / "feature_store_v1.sqlite"

pytestmark = pytest.mark.usefixtures("one_thread")


def _maker():
    spec = importlib.util.spec_from_file_location("make_feature_store_v1", FIXTURES / "make_feature_store_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKER = _maker()
SETTINGS = dict(batch_size=8, top_n=4, progress=False)  # 48 documents: 6 batches, 3 parts of 16 prompts


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model(MAKER.MODEL, device="cpu")


@pytest.fixture(scope="module")
def sae(model):
    return MAKER.build_sae(model)


@pytest.fixture(scope="module")
def docs(model):
    return F.corpus_for(model, 48, seed=11)


@pytest.fixture(scope="module")
def reference(model, sae, docs, tmp_path_factory):
    """One uninterrupted run in this process, 3 parts."""
    path = tmp_path_factory.mktemp("ref") / "store"
    F.index(model, sae, docs, path, part_size=16, **SETTINGS).close()
    return path


def _same_store(a: Path, b: Path) -> None:
    """Every table and the manifest (but its time stamp) equal bit for bit."""
    with F.FeatureStore(a) as x, F.FeatureStore(b) as y:
        for name in SCHEMA:
            assert x.table(name).equals(y.table(name)), name
        drop = lambda m: {k: v for k, v in m.items() if k != "created"}
        assert drop(x.meta) == drop(y.meta)
    assert sorted(p.name for p in Path(b).iterdir()) == sorted(p.name for p in Path(a).iterdir())  # no parts/ left


def test_store_layout_and_parts_merge_exactly(model, sae, docs, reference, tmp_path):
    with F.FeatureStore(reference) as st:
        assert st.complete and st.n_prompts == 48 and st.meta["part_size"] == 16
        assert sorted(p.name for p in reference.iterdir()) == sorted(
            ["manifest.json", *(f"{t}.parquet" for t in SCHEMA)]
        )
        arr = st.arrays()
        # the merge of 3 parts: counts and histograms add up, every firing counted once
        assert arr["n_fire"].sum() == arr["hist"].sum() == sum(n for _, _, n, _, _ in st.token_table(range(86)))
        assert st.total_tokens == sum(len(p) - 1 for p in st.corpus())  # BOS skipped
        # the sums are the left fold of the parts' sums (checked against each part run on its own)
        parts = []
        for k in range(3):
            p = tmp_path / f"part{k}"
            F.index(model, sae, docs[16 * k : 16 * k + 16], p, part_size=16, **SETTINGS).close()
            with F.FeatureStore(p) as one:
                parts.append(one.arrays())
        fold = np.zeros(32)
        for a in parts:
            fold = fold + a["sum_act"]
        np.testing.assert_array_equal(arr["sum_act"], fold)
        np.testing.assert_array_equal(arr["max_act"], np.max([a["max_act"] for a in parts], axis=0))
        np.testing.assert_array_equal(arr["n_fire"], np.sum([a["n_fire"] for a in parts], axis=0))
        # contexts: the top 4 of each feature over all parts (prompt ids shifted by each part's offset)
        for f in (0, 7, 31):
            got = [(c.act, c.prompt_id, c.pos) for c in st.contexts(f)]
            allc = []
            for k in range(3):
                with F.FeatureStore(tmp_path / f"part{k}") as one:
                    allc += [(c.act, c.prompt_id + 16 * k, c.pos) for c in one.contexts(f)]
            assert got == sorted(allc, key=lambda c: (-c[0], c[1], c[2]))[:4]


def test_sums_are_left_folds_in_corpus_order(model, sae, docs, tmp_path, monkeypatch):
    """Activations planted per (token, feature, position) over 56 orders of magnitude, where the order
    of float64 additions changes the bits: every sum equals a Python loop that adds in corpus order
    inside each part and then folds the parts in order; so does a run interrupted in the middle of
    a part and resumed, with the dense and with the sparse token table."""
    import torch

    rng = np.random.default_rng(0)
    table = (10.0 ** rng.uniform(-6, 20, size=(86, 32))).astype(np.float32)
    table[rng.random((86, 32)) < 0.5] = 0.0
    scale = (10.0 ** rng.uniform(-15, 15, size=64)).astype(np.float32)  # per position

    def planted(model, sae, toks, check=True):
        return torch.from_numpy(table[toks.numpy()] * scale[: toks.shape[1], None])

    monkeypatch.setattr(indexing, "feature_acts", planted)
    seqs = [model.to_tokens(d)[0].tolist() for d in docs]
    sums, tok_sums, flat = np.zeros(32), {}, []
    for k in range(3):
        part, tok_part = np.zeros(32), {}
        for s in seqs[16 * k : 16 * k + 16]:
            for p in range(1, len(s)):  # BOS skipped
                for f in np.flatnonzero(table[s[p]]):
                    v = float(table[s[p], f] * scale[p])
                    part[f] += v
                    tok_part[s[p], f] = tok_part.get((s[p], f), 0.0) + v
                    flat.append(v)
        sums = sums + part
        for key, v in tok_part.items():
            tok_sums[key] = tok_sums.get(key, 0.0) + v
    assert np.sum(flat) != sum(flat)  # the data are order-sensitive: a pairwise sum differs

    def stop(b):
        if b == 2:  # the first batch of part 1
            raise RuntimeError("stopped")

    for name, dense in (("dense", indexing.DENSE_TOKEN_TABLE), ("sparse", 0)):
        monkeypatch.setattr(indexing, "DENSE_TOKEN_TABLE", dense)
        path = tmp_path / name
        with pytest.raises(RuntimeError):
            F.index(model, sae, docs, path, part_size=16, on_batch=stop, **SETTINGS)
        assert [(m["part"], m["done"]) for m in F.store.part_markers(path)] == [(0, 16), (1, 8)]
        with F.index(model, sae, docs, path, part_size=16, **SETTINGS) as st:
            assert st.arrays()["sum_act"].tolist() == sums.tolist(), name
            got = {(t, f): s for t, f, _, s, _ in st.token_table(range(86))}
            assert got == tok_sums, name


def test_part_size_and_the_sparse_token_table(model, sae, docs, reference, tmp_path, monkeypatch):
    # the sparse (sort-based) token table gives the dense one's bits
    monkeypatch.setattr(indexing, "DENSE_TOKEN_TABLE", 0)
    monkeypatch.setattr(indexing, "TOKEN_BUFFER_ROWS", 100)  # and folds often on the way
    F.index(model, sae, docs, tmp_path / "sparse", part_size=16, **SETTINGS).close()
    _same_store(reference, tmp_path / "sparse")
    monkeypatch.undo()
    # another part size: the same counts, maxima, histograms and contexts; sums within rounding
    with F.index(model, sae, docs, tmp_path / "one_part", **SETTINGS) as one, F.FeatureStore(reference) as ref:
        a, b = one.arrays(), ref.arrays()
        for k in ("n_fire", "max_act", "hist"):
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_allclose(a["sum_act"], b["sum_act"], rtol=1e-13)
        assert one.table("contexts").equals(ref.table("contexts"))
    with pytest.raises(LenslabError, match="multiple of batch_size=8"):
        F.index(model, sae, docs, tmp_path / "bad", part_size=12, **SETTINGS)


def test_resume_after_interruptions_is_bit_identical(model, sae, docs, reference, tmp_path, monkeypatch):
    path = tmp_path / "store"

    def stop_at(k, exc):
        def cb(b):
            if b == k:
                raise exc

        return cb

    # Ctrl+C in the middle of part 1 (after batch 3): parts 0 and the first half of 1 are saved
    with pytest.raises(KeyboardInterrupt):
        F.index(model, sae, docs, path, part_size=16, on_batch=stop_at(2, KeyboardInterrupt()), **SETTINGS)
    with F.FeatureStore(path) as st:
        assert not st.complete and st.n_indexed == 24
        assert st.total_tokens == sum(len(p) - 1 for p in st.corpus()[:24])
    markers = F.store.part_markers(path)
    assert [(m["part"], m["done"]) for m in markers] == [(0, 16), (1, 8)]
    # a crash inside a batch (the forward pass): nothing of that batch is counted
    calls = []
    real = indexing.feature_acts

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*a, **kw)

    monkeypatch.setattr(indexing, "feature_acts", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        F.index(model, sae, None, path, part_size=16, **SETTINGS)
    monkeypatch.setattr(indexing, "feature_acts", real)
    assert [(m["part"], m["done"]) for m in F.store.part_markers(path)] == [(0, 16), (1, 16)]
    # the rest, resumed with the corpus saved in the store
    F.index(model, sae, None, path, part_size=16, **SETTINGS).close()
    _same_store(reference, path)
    # settings that would change the numbers are refused
    with pytest.raises(LenslabError, match="part_size=16"):
        F.index(model, sae, docs, path, part_size=8, **SETTINGS)


@pytest.mark.slow
def test_a_killed_process_resumes_from_its_checkpoints(model, sae, docs, reference, tmp_path):
    """SIGKILL in the middle of part 1, checkpoints after every batch: the next run starts at the last
    checkpoint and ends bit-identical to the uninterrupted run."""
    path = tmp_path / "store"
    code = f"""
import os, signal, importlib.util, torch
torch.set_num_threads(1)
import lenslab
from lenslab.probes import features as F
from lenslab.probes.features import indexing
spec = importlib.util.spec_from_file_location("maker", {str(FIXTURES / "make_feature_store_v1.py")!r})
maker = importlib.util.module_from_spec(spec); spec.loader.exec_module(maker)
model = lenslab.load_model(maker.MODEL, device="cpu")
indexing.CHECKPOINT_S = 0.0
def kill(b):
    if b == 3:
        os.kill(os.getpid(), signal.SIGKILL)
F.index(model, maker.build_sae(model), F.corpus_for(model, 48, seed=11), {str(path)!r}, part_size=16,
        batch_size=8, top_n=4, progress=False, on_batch=kill)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # batch 3 (prompts 24-31) was added but never saved: part 1 holds its checkpoint after batch 2
    assert [(m["part"], m["done"]) for m in F.store.part_markers(path)] == [(0, 16), (1, 8)]
    F.index(model, sae, docs, path, part_size=16, **SETTINGS).close()
    _same_store(reference, path)


@pytest.mark.slow
def test_ray_workers_give_the_single_process_store(model, sae, docs, reference, tmp_path, ray_cluster):
    """3 parts as 3 shards on a local Ray cluster (2 workers, each with its own model and SAE copy,
    writing its own part files), merged by the driver: bit-identical to one process. Then a store
    interrupted in this process is finished by the cluster: the same again."""
    F.index(model, sae, docs, tmp_path / "ray", part_size=16, cluster=ray_cluster, **SETTINGS).close()
    _same_store(reference, tmp_path / "ray")
    path = tmp_path / "mixed"

    def stop(b):
        if b == 2:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        F.index(model, sae, docs, path, part_size=16, on_batch=stop, **SETTINGS)
    F.index(model, sae, None, path, part_size=16, cluster=ray_cluster, **SETTINGS).close()
    _same_store(reference, path)
    with pytest.raises(LenslabError, match="this process only"):
        F.index(model, sae, docs, tmp_path / "x", cluster=ray_cluster, on_batch=print, **SETTINGS)
    # the CLI: --ray ADDRESS, the same store as the library in this process
    from lenslab.cli import main

    sae.save_model(tmp_path / "sae")
    args = ["--model", MAKER.MODEL, "--sae", str(tmp_path / "sae"), "--n-docs", "24", "--batch-size", "8"]
    args += ["--top-n", "4", "--part-size", "8", "--device", "cpu"]
    assert main(["sae", "index", *args, "--out", str(tmp_path / "cli"), "--ray", ray_cluster]) == 0
    F.index(
        model, sae, F.corpus_for(model, 24), tmp_path / "lib", part_size=8, sae_source=str(tmp_path / "sae"), **SETTINGS
    ).close()
    _same_store(tmp_path / "lib", tmp_path / "cli")


# --- the first format: a SQLite store ------------------------------------------------------------
def _v1_rows(path: Path) -> dict:
    """The SQLite store's rows, read with sqlite3 (the independent oracle)."""
    con = sqlite3.connect(str(path))
    try:
        q = lambda sql: con.execute(sql).fetchall()
        return {
            "meta": {k: json.loads(v) for k, v in q("SELECT key, value FROM meta")},
            "features": q("SELECT feature, n_fire, sum_act, max_act, hist FROM features ORDER BY feature"),
            "contexts": q("SELECT feature, prompt_id, pos, act, start, acts FROM contexts"),
            "token_features": q("SELECT * FROM token_features ORDER BY token_id, feature"),
            "logits": q("SELECT * FROM logits ORDER BY feature"),
            "vocab": q("SELECT token_id, token FROM vocab ORDER BY token_id"),
            "corpus": q("SELECT tokens FROM corpus ORDER BY prompt_id"),
        }
    finally:
        con.close()


def _reads(st) -> dict:
    """Everything the reader API gives for every feature."""
    return {
        "arrays": {k: v.tolist() for k, v in st.arrays().items()},
        "stats": [st.stats(f) for f in range(st.d_sae)],
        "contexts": [[c.to_dict() for c in st.contexts(f)] for f in range(st.d_sae)],
        "logits": [st.logits(f) for f in range(st.d_sae)],
        "top_tokens": [st.top_tokens(f, 5) for f in range(st.d_sae)],
        "token_table": st.token_table(range(st.meta["d_vocab"])),
        "vocab": st.vocab(),
        "corpus": st.corpus(),
        "describe": st.describe().split(":", 1)[1],
        "total_tokens": st.total_tokens,
    }


def test_a_v1_store_opens_and_converts_with_the_same_numbers(tmp_path, capsys):
    rows = _v1_rows(V1)
    assert rows["meta"]["schema_version"] == 1 and rows["meta"]["complete"]
    with F.FeatureStore(V1) as old:
        assert old.legacy
        # the reader of the SQLite file against sqlite3's rows
        arr = old.arrays()
        assert arr["n_fire"].tolist() == [r[1] for r in rows["features"]]
        assert arr["sum_act"].tolist() == [r[2] for r in rows["features"]]
        assert arr["max_act"].tolist() == [r[3] for r in rows["features"]]
        assert arr["hist"].tolist() == [np.frombuffer(r[4], "<i8").tolist() for r in rows["features"]]
        assert old.token_table(range(86)) == rows["token_features"]
        want = {
            (f, pid, pos): (act, start, np.frombuffer(a, "<f4").tolist())
            for f, pid, pos, act, start, a in rows["contexts"]
        }
        got = {(f, c.prompt_id, c.pos): (c.act, c.start, c.acts) for f in range(32) for c in old.contexts(f)}
        assert got == want and len(want) == 32 * 4
        assert old.vocab() == dict(rows["vocab"])
        assert old.corpus() == [np.frombuffer(b, "<i4").tolist() for (b,) in rows["corpus"]]
        assert old.logits(5)["pos"] == list(zip(*(json.loads(rows["logits"][5][i]) for i in (1, 2))))
        before = _reads(old)
    # one command converts it; the new store reads the same, bit for bit
    from lenslab.cli import main

    assert main(["sae", "convert", str(V1), str(tmp_path / "v2")]) == 0
    assert "24 prompts (complete)" in capsys.readouterr().out
    with F.FeatureStore(tmp_path / "v2") as new:
        assert not new.legacy and new.meta["converted_from"] == V1.name
        assert _reads(new) == before
        extra = {"schema_version": 2, "converted_from": V1.name, "part_size": None}
        assert new.meta == rows["meta"] | extra  # the meta carried over, plus what says it was converted
    with pytest.raises(LenslabError, match="exists"):
        F.convert(V1, tmp_path / "v2")
    with pytest.raises(LenslabError, match="nothing to convert"):
        F.convert(tmp_path / "v2", tmp_path / "v3")


def test_todays_index_agrees_with_the_v1_store(model, tmp_path):
    """The fixture's model, SAE, corpus and settings indexed again by today's code: counts, maxima,
    histograms, contexts, token counts and maxima equal the v1 store's exactly; sums within 1e-12."""
    sae = MAKER.build_sae(model)
    with F.FeatureStore(V1) as old:
        assert old.meta["sae_hash"] == F.sae_hash(sae)  # the SAE is rebuilt exactly
        new = F.index(
            model,
            sae,
            MAKER.corpus(model),
            tmp_path / "s",
            batch_size=MAKER.BATCH_SIZE,
            top_n=MAKER.TOP_N,
            progress=False,
        )
        a, b = old.arrays(), new.arrays()
        for k in ("n_fire", "max_act", "hist"):
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_allclose(a["sum_act"], b["sum_act"], rtol=1e-12)
        assert new.total_tokens == old.total_tokens and new.corpus() == old.corpus()
        for f in range(32):
            assert [c.to_dict() for c in new.contexts(f)] == [c.to_dict() for c in old.contexts(f)]
            assert new.logits(f) == old.logits(f)
        t_old, t_new = old.token_table(range(86)), new.token_table(range(86))
        assert [r[:3] + r[4:] for r in t_new] == [r[:3] + r[4:] for r in t_old]
        np.testing.assert_allclose([r[3] for r in t_new], [r[3] for r in t_old], rtol=1e-12)
        new.close()


def _old_search(path: Path, ids: list[int], by: str, k: int) -> list[tuple]:
    """lenslab's search before DuckDB (commit 8fd1ae2), on the SQLite file: a Python aggregation of
    the token-table rows of `ids`, in (token id, feature) order."""
    rows = _v1_rows(path)
    vocab = dict(rows["vocab"])
    total = rows["meta"]["total_tokens"]
    n_all = {r[0]: r[1] for r in rows["features"]}
    agg: dict[int, list] = {}
    for tid, f, n, s, m in rows["token_features"]:
        if tid not in ids:
            continue
        a = agg.setdefault(int(f), [0.0, 0, 0.0, []])
        a[0] = max(a[0], float(m))
        a[1] += int(n)
        a[2] += float(s)
        a[3].append((float(m), vocab.get(int(tid), str(tid))))
    hits = [
        (
            f,
            a[0],
            a[2] / a[1] if a[1] else 0.0,
            a[1],
            n_all[f] / total,
            [t for _, t in sorted(a[3], key=lambda x: -x[0])],
            a[1] / n_all[f] if n_all[f] else 0.0,
        )
        for f, a in agg.items()
    ]
    col = {"max": 1, "mean": 2, "share": 6}[by]
    return sorted(hits, key=lambda h: (-h[col], h[0]))[:k]


def test_duckdb_search_equals_the_old_search(tmp_path):
    F.convert(V1, tmp_path / "v2").close()
    vocab = dict(_v1_rows(V1)["vocab"])
    queries = [("token", "terrible"), ("token", "the"), ("token", 5), ("substring", "ful"), ("substring", "e")]
    n_hits = 0
    for store in (V1, tmp_path / "v2"):
        for kind, q in queries:
            if kind == "token":
                ids = [q] if isinstance(q, int) else [i for i, t in vocab.items() if t == q]
            else:
                ids = [i for i, t in vocab.items() if q in t.lower()]
            assert ids, q
            for by in ("max", "mean", "share"):
                res = F.search(store, **{kind: q}, by=by, k=12)
                got = [(h.feature, h.max_act, h.mean_act, h.n_fire, h.density, h.tokens, h.share) for h in res.hits]
                assert got == _old_search(V1, ids, by, 12), (kind, q, by)  # exactly
                n_hits += len(got)
    assert n_hits > 100


def test_bad_paths_are_refused(model, sae, docs, tmp_path):
    with pytest.raises(LenslabError, match="SQLite feature store of the first format"):
        F.index(model, sae, docs, V1, **SETTINGS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(LenslabError, match="not a feature store"):
        F.index(model, sae, docs, tmp_path / "mine", resume=False, **SETTINGS)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    F.convert(V1, tmp_path / "v2").close()
    with pytest.raises(LenslabError, match="cannot be resumed"):
        F.index(model, sae, docs, tmp_path / "v2", **SETTINGS)
    for name in MERGED:
        assert (tmp_path / "v2" / f"{name}.parquet").is_file()
