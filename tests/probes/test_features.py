"""Feature store, lookup, dashboards and search (lenslab.probes.features) on zoo/steer-sentiment.

The SAE is built in code with sae-lens's `StandardSAE`: 48 random features plus one planted
feature whose encoder direction is the embedding of the token 'terrible' at
`blocks.0.hook_resid_pre` (= W_E[token] + W_pos[pos]), with a bias half-way between the lowest
projection of 'terrible' (over every position) and the highest projection of any other token,
so it fires on 'terrible' and nowhere else, at every position.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes import features as F
from lenslab.probes.features import indexing

HOOK = "blocks.0.hook_resid_pre"
D_SAE = 48
PLANTED = 17
WORD = "terrible"
SCALE = 40.0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model("zoo/steer-sentiment", device="cpu")


def _sae(model, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(
        d_in=model.cfg.d_model, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK, model_name="zoo/steer-sentiment")
    )
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc.mul_(0.5)
        sae.b_enc.fill_(-0.05)
        t = _token_id(model, WORD)
        WE, WP = model.W_E.detach(), model.W_pos.detach()
        u = WE[t] / WE[t].norm()
        grid = (WE @ u)[:, None] + (WP @ u)[None, :]  # [d_vocab, n_ctx]: projection of every (token, position)
        low = float(grid[t].min())
        high = float(torch.cat([grid[:t], grid[t + 1 :]]).max())
        assert low - high > 0.1, (low, high)  # the planted direction separates the token at every position
        sae.W_enc[:, PLANTED] = SCALE * u
        sae.b_enc[PLANTED] = -SCALE * (low + high) / 2
    return sae


def _token_id(model, word: str) -> int:
    ids = model.to_tokens(word, prepend_bos=False)[0].tolist()
    assert len(ids) == 1
    return ids[0]


@pytest.fixture(scope="module")
def sae(model):
    return _sae(model)


@pytest.fixture(scope="module")
def docs(model):
    return F.corpus_for(model, 96, seed=3)


@pytest.fixture(scope="module")
def store_path(model, sae, docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    F.index(model, sae, docs, path, batch_size=8, top_n=5, progress=False).close()
    return path


@pytest.fixture(scope="module")
def reference(model, sae, docs):
    return _reference(model, sae, docs)


def _reference(model, sae, docs):
    """Feature activations of every counted token (BOS skipped), one prompt at a time, unpadded."""
    rows, where = [], []
    for i, d in enumerate(docs):
        toks = model.to_tokens(d)
        _, cache = model.run_with_cache(toks, names_filter=[HOOK])
        with torch.no_grad():
            a = sae.encode(cache[HOOK])[0]
        rows.append(a[1:])
        where += [(i, p, int(toks[0, p])) for p in range(1, toks.shape[1])]
    return torch.cat(rows).double(), where


def test_store_statistics_match_a_direct_computation(model, sae, docs, store_path, reference):
    ref, where = reference
    with F.FeatureStore(store_path) as st:
        assert st.complete and st.n_prompts == 96 and st.total_tokens == ref.shape[0]
        arr = st.arrays()
        fire = ref > 0
        np.testing.assert_array_equal(arr["n_fire"], fire.sum(0).numpy())
        np.testing.assert_allclose(arr["max_act"], ref.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arr["sum_act"], ref.sum(0).numpy(), rtol=1e-5, atol=1e-5)
        edges = np.array(F.HIST_EDGES)
        for f in (0, 5, PLANTED, 30):
            v = ref[:, f][fire[:, f]].numpy()
            counts = np.bincount(
                np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2), minlength=len(edges) - 1
            )
            assert st.stats(f).hist_counts == counts.tolist()
            assert sum(st.stats(f).hist_counts) == st.stats(f).n_fire
        # top contexts: the 5 highest activations of each feature, with their windows
        for f in range(D_SAE):
            ctx = st.contexts(f)
            want = torch.sort(ref[:, f], descending=True).values[:5]
            want = want[want > 0]
            assert len(ctx) == len(want)
            np.testing.assert_allclose([c.act for c in ctx], want.numpy(), rtol=1e-5)
            for c in ctx:
                toks = model.to_tokens(docs[c.prompt_id])[0].tolist()
                assert c.token_ids == toks[c.start : c.start + len(c.acts)]
                assert c.acts[c.index] == pytest.approx(c.act, rel=1e-6)
                assert c.start == max(0, c.pos - 10) and c.start + len(c.acts) == min(len(toks), c.pos + 4)


def test_planted_feature_fires_exactly_on_its_token(model, sae, docs, store_path, reference):
    t = _token_id(model, WORD)
    ref, where = reference
    n_word = sum(1 for _, _, tok in where if tok == t)
    assert n_word >= 10
    with F.FeatureStore(store_path) as st:
        s = st.stats(PLANTED)
        assert s.n_fire == n_word  # fires on every 'terrible' and nowhere else
        assert s.density == pytest.approx(n_word / st.total_tokens, abs=1e-12)
        assert all(c.tokens[c.index] == WORD for c in st.contexts(PLANTED))
        assert st.top_tokens(PLANTED) == [(WORD, pytest.approx(s.max_act, rel=1e-6), n_word)]
    # search by token, by substring, by id
    hits = F.search(store_path, token=WORD, k=3)
    assert hits.features[0] == PLANTED and hits.hits[0].n_fire == n_word
    assert hits.matched_tokens == [WORD]
    spec = F.search(store_path, token=WORD, k=3, by="share")  # fires on nothing else: share 1
    assert spec.features[0] == PLANTED and spec.hits[0].share == 1.0 and spec.hits[1].share < 1.0
    with pytest.raises(LenslabError, match="not one of"):
        F.search(store_path, token=WORD, by="count")
    sub = F.search(store_path, substring="rribl", k=3)
    assert sub.features[0] == PLANTED and sorted(sub.matched_tokens) == ["horrible", WORD]
    one = F.search(store_path, feature=PLANTED)
    assert one.hits[0].tokens == [WORD] and one.hits[0].n_fire == n_word
    assert F.SearchResult.from_json(hits.to_json()).features == hits.features
    assert hits.table()["feature"].tolist() == hits.features  # one row per hit
    assert hits.to_text().splitlines()[1].split()[0] == str(PLANTED)  # the text `lenslab sae search` prints
    # lookup on a new prompt: the planted feature is top-1 on each 'terrible' and absent elsewhere
    res = F.lookup(model, sae, "the walk was terrible and i felt terrible about the terrible movie .", k=3)
    assert [i for i, tok in enumerate(res.tokens) if tok == WORD] == [4, 8, 11]
    for row in res.rows():
        feats = [f for f, _ in row["features"]]
        if row["token"] == WORD:
            assert feats[0] == PLANTED
        else:
            assert PLANTED not in feats
    df = res.table()  # one row per firing feature of each token
    assert df[df.feature == PLANTED]["pos"].tolist() == [4, 8, 11] and (df[df.feature == PLANTED]["rank"] == 0).all()
    assert res.to_text().splitlines()[1 + 4].split()[1:3] == [repr(WORD), f"f{PLANTED}"]
    got = F.LookupResult.from_json(res.to_json())
    assert got.features == res.features and got.union == res.union and PLANTED in got.union
    fig = res.figure()
    assert f"f{PLANTED}" in list(fig.data[0].x)


def _dump(path):
    with F.FeatureStore(path) as st:
        out = {
            t: sorted(tuple(map(repr, r.values())) for r in st.table(t).to_pylist())
            for t in ("features", "contexts", "token_features", "corpus")
        }
        out["meta"] = {k: st.meta[k] for k in ("next_prompt", "total_tokens", "complete", "corpus_hash")}
        return out


def test_interrupted_index_resumes_to_the_same_store(model, sae, docs, store_path, tmp_path, monkeypatch):
    path = tmp_path / "partial"

    def stop_after(k, exc):
        def cb(b):
            if b == k:
                raise exc

        return cb

    with pytest.raises(RuntimeError):
        F.index(
            model, sae, docs, path, batch_size=8, top_n=5, progress=False, on_batch=stop_after(2, RuntimeError("crash"))
        )
    with F.FeatureStore(path) as st:
        assert not st.complete and st.n_indexed == 24
    with pytest.raises(KeyboardInterrupt):
        F.index(
            model, sae, docs, path, batch_size=8, top_n=5, progress=False, on_batch=stop_after(6, KeyboardInterrupt())
        )
    with F.FeatureStore(path) as st:
        assert not st.complete and st.n_indexed == 56
    # a crash while a part's files are written: its marker still names the last checkpoint, nothing half-written counts
    real = indexing.write_table

    def broken(path, table, **kw):
        if "-000000096.tokens" in path.name:  # the part's last file, after the other two
            raise OSError("disk gone")
        real(path, table, **kw)

    monkeypatch.setattr(indexing, "write_table", broken)
    with pytest.raises(OSError):
        F.index(model, sae, None, path, batch_size=8, top_n=5, progress=False)
    with F.FeatureStore(path) as st:
        assert st.n_indexed == 56
    monkeypatch.setattr(indexing, "write_table", real)
    F.index(model, sae, docs, path, batch_size=8, top_n=5, progress=False).close()
    a, b = _dump(path), _dump(store_path)
    assert a["meta"] == b["meta"]
    for table in ("features", "contexts", "token_features", "corpus"):
        assert a[table] == b[table], table  # bit-identical to the uninterrupted run
    # settings that would change the numbers are refused on resume
    with pytest.raises(LenslabError, match="batch_size=8"):
        F.index(model, sae, docs, path, batch_size=4, top_n=5, progress=False)
    with pytest.raises(LenslabError, match="another corpus"):
        F.index(model, sae, docs[:10], path, batch_size=8, top_n=5, progress=False)


def test_mismatched_model_or_sae_is_refused(model, docs, store_path, tmp_path):
    other_sae = _sae(model, seed=1)
    with F.FeatureStore(store_path) as st:
        st.check(model, _sae(model))  # the same weights rebuilt: accepted
        with pytest.raises(LenslabError, match="another SAE"):
            st.check(model, other_sae)
    with pytest.raises(LenslabError, match="another SAE"):
        F.index(model, other_sae, docs, store_path, batch_size=8, top_n=5, progress=False)
    ioi = lenslab.load_model("zoo/ioi-4l", device="cpu")
    with F.FeatureStore(store_path) as st, pytest.raises(LenslabError, match="built with model zoo/steer-sentiment"):
        st.check(ioi)
    with pytest.raises(LenslabError, match="built with model"):
        F.FeatureDashboard.from_store(store_path, PLANTED, model=ioi)
    with pytest.raises(LenslabError, match="does not exist"):
        F.FeatureStore(tmp_path / "nope")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(LenslabError, match="not a lenslab feature store"):
        F.FeatureStore(tmp_path / "junk.sqlite")
    with F.FeatureStore(store_path) as st, pytest.raises(LenslabError, match="out of range"):
        st.stats(D_SAE)


def _hand_logits(model, sae, f, k=10):
    W_dec, W_U = sae.W_dec.detach().double(), model.W_U.detach().double()
    v = [(sum(W_dec[f, d] * W_U[d, j] for d in range(W_U.shape[0])).item(), j) for j in range(W_U.shape[1])]
    v.sort()
    toks = model.to_str_tokens(torch.arange(model.cfg.d_vocab))
    return [(toks[j], x) for x, j in v[::-1][:k]], [(toks[j], x) for x, j in v[:k]]


def test_dashboard_logits_and_exports(model, sae, store_path, tmp_path):
    pos, neg = _hand_logits(model, sae, PLANTED)
    for dash in (
        F.FeatureDashboard.from_store(store_path, PLANTED),  # logit effects stored at index time
        F.FeatureDashboard.from_store(store_path, PLANTED, model, sae),
    ):  # computed now
        assert [t for t, _ in dash.pos_logits] == [t for t, _ in pos]
        assert [t for t, _ in dash.neg_logits] == [t for t, _ in neg]
        np.testing.assert_allclose([v for _, v in dash.pos_logits], [v for _, v in pos], atol=1e-5)
        np.testing.assert_allclose([v for _, v in dash.neg_logits], [v for _, v in neg], atol=1e-5)
        assert sum(dash.logit_hist_heights) == model.cfg.d_vocab
    # JSON: Neuronpedia-like fields, parses, round-trips
    d = json.loads(dash.to_json())
    assert d["index"] == str(PLANTED) and d["layer"] == HOOK and d["modelId"] == "zoo/steer-sentiment"
    assert d["pos_str"] == [t for t, _ in pos] and len(d["freq_hist_data_bar_values"]) == len(
        d["freq_hist_data_bar_heights"]
    )
    assert d["frac_nonzero"] == pytest.approx(dash.n_fire / dash.total_tokens)
    assert d["maxActApprox"] == pytest.approx(dash.max_act) and d["maxActApprox"] > 0
    for a in d["activations"]:
        assert a["tokens"][a["maxValueTokenIndex"]] == WORD and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    back = F.FeatureDashboard.from_json(dash.to_json(tmp_path / "f.json"))
    assert back.to_dict() == dash.to_dict()
    # HTML: parses, holds every context (tokens in order, the context's token marked) and the plotly figure
    page = dash.to_html(tmp_path / "f.html")
    parser = _Collect()
    parser.feed((tmp_path / "f.html").read_text())
    parser.close()
    assert parser.balanced()
    assert parser.here == [WORD] * len(dash.contexts)
    for c in dash.contexts:
        assert c.tokens == parser.contexts.pop(0)
        assert f"{c.act:.4g}" in page
    assert "Plotly.newPlot" in page and parser.title == dash.title()


class _Collect(HTMLParser):
    """Texts of the token spans of each `div.ctx`, the marked tokens, the title, tag balance."""

    def __init__(self):
        super().__init__()
        self.contexts, self.here, self.stack, self.title = [], [], [], ""
        self._span = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("meta", "br"):
            return
        self.stack.append(tag)
        if tag == "div" and attrs.get("class") == "ctx":
            self.contexts.append([])
        classes = (attrs.get("class") or "").split()
        if tag == "span" and "tok" in classes and self.contexts:
            self._span = ["", "here" in classes]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack[-3:], tag)
        self.stack.pop()
        if tag == "span" and self._span is not None:
            text = self._span[0].replace("\xa0", " ")
            self.contexts[-1].append(text)
            if self._span[1]:
                self.here.append(text)
            self._span = None

    def handle_data(self, data):
        if self._span is not None:
            self._span[0] += data
        if self.stack and self.stack[-1] == "title":
            self.title += data

    def balanced(self):
        return not self.stack


def test_cli_index_lookup_export_search(model, sae, tmp_path, capsys):
    from lenslab.cli import main

    sae_dir = tmp_path / "sae"
    sae.save_model(sae_dir)
    db = tmp_path / "cli_store"
    rc = main(
        [
            "sae",
            "index",
            "--model",
            "zoo/steer-sentiment",
            "--sae",
            str(sae_dir),
            "--corpus",
            "zoo",
            "--n-docs",
            "40",
            "--batch-size",
            "8",
            "--out",
            str(db),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "40 prompts (complete)" in out
    with F.FeatureStore(db) as st:
        assert st.meta["sae_source"] == str(sae_dir) and st.meta["sae_hash"] == F.sae_hash(sae)
        n_word = sum(tok == _token_id(model, WORD) for p in st.corpus() for tok in p[1:])
        assert st.stats(PLANTED).n_fire == n_word > 0
    rc = main(
        [
            "sae",
            "lookup",
            "--model",
            "zoo/steer-sentiment",
            "--sae",
            str(sae_dir),
            "--prompt",
            "what a terrible day",
            "--k",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "'terrible'" in x][0]
    assert line.split("'terrible'")[1].split()[0] == f"f{PLANTED}"
    for ext in ("json", "html"):
        rc = main(["sae", "export", "--store", str(db), "--feature", str(PLANTED), "--out", str(tmp_path / f"f.{ext}")])
        assert rc == 0
    assert json.loads((tmp_path / "f.json").read_text())["index"] == str(PLANTED)
    assert "terrible" in (tmp_path / "f.html").read_text()
    capsys.readouterr()
    assert main(["sae", "search", "--store", str(db), "--token", WORD, "--k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == str(PLANTED)
    assert main(["sae", "export", "--store", str(db), "--feature", "999", "--out", str(tmp_path / "x.html")]) == 2
    assert "out of range" in capsys.readouterr().err
    # the same command again: nothing left to index, the store is unchanged
    before = _dump(db)
    assert (
        main(
            [
                "sae",
                "index",
                "--model",
                "zoo/steer-sentiment",
                "--sae",
                str(sae_dir),
                "--corpus",
                "zoo",
                "--n-docs",
                "40",
                "--batch-size",
                "8",
                "--out",
                str(db),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "0 tokens indexed this run" in capsys.readouterr().out
    assert _dump(db) == before


def test_zoo_sae_lookup_matches_its_encoder(model):
    """A trained zoo SAE (sae-lens TopK, k=16): lookup's values are the top-k of `sae.encode` on the
    full forward's cached activation (rtol 1e-5), and at most 16 features fire per token."""
    from lenslab.probes.sae import list_saes, load_sae

    name = list_saes("zoo/steer-sentiment")[0]
    sae = load_sae(name, model=model)
    prompt = "the movie was wonderful . what a lovely day . i felt"
    res = F.lookup(model, sae, prompt, k=20)
    _, cache = model.run_with_cache(model.to_tokens(prompt))
    with torch.no_grad():
        ref = sae.encode(cache[sae.cfg.metadata.hook_name])[0]
    top = ref.topk(20, dim=1)
    np.testing.assert_allclose(res.values, top.values.numpy(), rtol=1e-5, atol=1e-6)
    for row, want in zip(res.rows(), (ref > 0).sum(1).tolist()):
        assert len(row["features"]) == want <= 16
        assert [f for f, _ in row["features"]] == [f for f in top.indices[row["pos"]].tolist()][:want]


def test_one_feature_id_check():
    """Steering and the feature store share one check: integers (numpy and 0-d tensors too), never bools."""
    import numpy as np

    from lenslab.probes.features.plumbing import check_feature
    from lenslab.steering import features as steering_features

    assert [check_feature(3, 8), check_feature(np.int64(7), 8), check_feature(torch.tensor(0), 8)] == [3, 7, 0]
    for bad, match in [(True, "integer id"), (2.0, "integer id"), (torch.tensor(1.0), "integer id"), (8, "0 .. 7")]:
        with pytest.raises(LenslabError, match=match):
            check_feature(bad, 8)
    assert steering_features.check_feature is check_feature
