"""The Features page under AppTest on zoo/steer-sentiment with a planted SAE saved to disk (feature 3
fires exactly on 'terrible' at hook_embed, with activation 1, and its decoder row is
W_E['terrible'] - W_E['wonderful'], so ablating it makes the model read 'wonderful'), and on a zoo
model with its shipped SAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lenslab

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
MODEL = "zoo/steer-sentiment"
PROMPT = "the movie was terrible . the book was"
PLANTED = 3


def _meta(hook: str):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=hook, model_name=MODEL)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    from sae_lens import StandardSAE, StandardSAEConfig

    model = lenslab.load_model(MODEL, device="cpu")
    WE = model.W_E.detach()
    t, w = (int(model.to_tokens(x, prepend_bos=False)[0, 0]) for x in ("terrible", "wonderful"))
    u = WE[t] / WE[t].norm()
    proj = WE @ u
    top, other = float(proj[t]), float(torch.cat([proj[:t], proj[t + 1 :]]).max())
    mid = (top + other) / 2
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=8, metadata=_meta("hook_embed")))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(-100.0)  # the other features never fire
        sae.W_enc[:, PLANTED] = u / (top - mid)
        sae.b_enc[PLANTED] = -mid / (top - mid)
        sae.W_dec[PLANTED] = WE[t] - WE[w]
    out = tmp_path_factory.mktemp("planted_sae")
    sae.save_model(str(out))
    return out


@pytest.fixture(scope="module")
def wrong_dir(tmp_path_factory):
    """An SAE for a 128-wide residual stream: not this model's (96)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=128, d_sae=16, metadata=_meta("blocks.1.hook_resid_post")))
    out = tmp_path_factory.mktemp("wrong_sae")
    sae.save_model(str(out))
    return out


def _app(monkeypatch, tmp_path, model: str, prompt: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", model)
    monkeypatch.setenv("LENSLAB_FEATURE_DIR", str(tmp_path / "stores"))
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.text_area(key="prompt").set_value(prompt).run()
    return at.switch_page("page_features.py").run()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _folder(at, path) -> None:
    if at.radio(key="feat_source").value != "Folder":
        at.radio(key="feat_source").set_value("Folder").run()
    at.text_input(key="feat_path").set_value(str(path)).run()


def test_features_page_on_a_planted_sae(monkeypatch, tmp_path, planted_dir):
    at = _app(monkeypatch, tmp_path, MODEL, PROMPT)
    _ok(at)
    assert at.title[0].value == f"Features · {MODEL}"
    _folder(at, planted_dir)
    _ok(at)
    assert "`hook_embed` · StandardSAE · d_in 96 · 8 features" in at.caption[0].value
    # Lookup: the planted feature is the only one, on 'terrible' (position 4 after BOS), activation 1
    df = at.dataframe[0].value
    assert df["feature"].tolist() == [PLANTED] and df["token"].tolist() == ["terrible"]
    assert df["pos"].tolist() == [4] and abs(float(df["activation"].iloc[0]) - 1.0) < 1e-5
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert fig["data"][0]["x"] == [f"f{PLANTED}"]
    # opening it from the lookup sets the dashboard's feature
    at.button(key="feat_lookup_open").click().run()
    assert at.number_input(key="feat_id").value == PLANTED
    # before indexing: Search and Dashboard say what to do; logit effects already show
    assert any("build it in the Index tab" in i.value for i in at.info)
    # Index: 24 built-in documents into a store under LENSLAB_FEATURE_DIR
    at.number_input(key="feat_n_docs").set_value(24).run()
    at.number_input(key="feat_batch").set_value(8).run()
    at.button(key="feat_index").click().run()
    _ok(at)
    stores = list((tmp_path / "stores").glob("*.store"))
    assert len(stores) == 1 and "hook_embed" in stores[0].name and stores[0].name.endswith("builtin-24.store")
    assert any("complete" in s.value and "24 prompts" in s.value for s in at.success)
    # Dashboard: every top context is centred on 'terrible' with activation 1; downloads exist
    html = [m.value for m in at.markdown if "<span" in m.value]
    assert html and html[0].count(">1</b>") >= 1 and "terrible" in html[0]  # the context value, in bold
    labels = {b.label for b in at.get("download_button")}
    assert {"Dashboard HTML (standalone)", "JSON"} <= labels
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Max activation"] == "1" and float(metrics["Mean when firing"]) == pytest.approx(1.0, abs=1e-4)
    # Search: by token finds the planted feature first, by substring too, by id its summary
    at.text_input(key="feat_search_q").set_value("terrible").run()
    at.button(key="feat_search_go").click().run()
    _ok(at)
    hits = at.dataframe[-1].value
    assert int(hits["feature"].iloc[0]) == PLANTED and len(hits) == 1
    at.selectbox(key="feat_search_rank").set_value("share").run()
    at.button(key="feat_search_go").click().run()
    _ok(at)
    assert at.dataframe[-1].value["feature"].tolist() == [PLANTED]
    at.radio(key="feat_search_by").set_value("substring").run()
    at.text_input(key="feat_search_q").set_value("terr").run()
    at.button(key="feat_search_go").click().run()
    assert int(at.dataframe[-1].value["feature"].iloc[0]) == PLANTED
    at.radio(key="feat_search_by").set_value("feature").run()
    at.text_input(key="feat_search_q").set_value("5").run()
    at.button(key="feat_search_go").click().run()
    _ok(at)
    assert at.dataframe[-1].value["n_fire"].tolist() == [0]  # feature 5 never fires (bias -100)
    # Steer: ablating the planted feature turns 'terrible' into 'wonderful': the continuation changes
    at.radio(key="feat_steer_mode").set_value("ablate").run()
    at.button(key="feat_steer_go").click().run()
    _ok(at)
    gens = [m.value for m in at.markdown if m.value.startswith(PROMPT)]
    assert len(gens) == 2 and gens[0] != gens[1], gens
    from lenslab import steering

    model = lenslab.load_model(MODEL, device="cpu")
    want_bad = steering.generate(model, PROMPT, max_new_tokens=20)
    want_good = steering.generate(model, PROMPT.replace("terrible", "wonderful"), max_new_tokens=20)
    assert gens[0].replace("**", "") == PROMPT + want_bad
    assert gens[1].replace("**", "").startswith(PROMPT + want_good[:12])


def test_features_page_mismatched_sae_is_a_message(monkeypatch, tmp_path, wrong_dir):
    at = _app(monkeypatch, tmp_path, MODEL, PROMPT)
    _folder(at, wrong_dir)
    assert not at.exception
    assert any("expects d_in=128" in e.value and "width 96" in e.value for e in at.error), [e.value for e in at.error]
    _folder(at, tmp_path / "no_such_sae")
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)


def _planted_with_sae() -> str:
    from lenslab.probes.sae import list_saes

    return next(m for m in ("zoo/steer-sentiment", "zoo/ioi-4l", "zoo/induction-2l") if list_saes(m))


def _with_sae() -> list[str]:
    """A planted model with its SAE, and the English model the app opens on once its SAE is shipped."""
    from lenslab.probes.sae import list_saes

    return ["planted"] + (["zoo/english-4l"] if list_saes("zoo/english-4l") else [])


@pytest.mark.parametrize("which", _with_sae())
def test_features_page_on_a_zoo_sae(monkeypatch, tmp_path, which):
    """Every tab renders on a zoo model with its shipped SAE (the page's default source)."""
    from lenslab.probes.sae import list_saes

    model = _planted_with_sae() if which == "planted" else which
    at = _app(monkeypatch, tmp_path, model, lenslab.zoo.default_prompt(model) or "t1 t2 t3")
    _ok(at)
    assert at.radio(key="feat_source").value == "Zoo SAE" and at.selectbox(key="feat_zoo").value == list_saes(model)[0]
    assert any("SAE card" in e.label for e in at.expander)
    assert len(at.dataframe[0].value) > 0
    at.button(key="feat_lookup_open").click().run()  # the prompt's strongest feature
    top = at.selectbox(key="feat_lookup_pick").value
    assert at.number_input(key="feat_id").value == top
    at.number_input(key="feat_n_docs").set_value(16).run()
    at.button(key="feat_index").click().run()
    _ok(at)
    assert at.metric and any("<span" in m.value for m in at.markdown)
    at.radio(key="feat_steer_mode").set_value("clamp").run()
    at.number_input(key="feat_steer_value").set_value(50.0).run()
    at.button(key="feat_steer_go").click().run()
    _ok(at)
    assert len([s for s in at.subheader if s.value == "Unmodified"]) == 1


def test_features_page_indexes_a_corpus_file(monkeypatch, tmp_path, planted_dir):
    at = _app(monkeypatch, tmp_path, MODEL, PROMPT)
    _folder(at, planted_dir)
    at.radio(key="feat_corpus").set_value("Corpus file").run()
    at.text_input(key="feat_corpus_path").set_value(str(tmp_path / "missing.txt")).run()
    assert any("There is no file" in w.value for w in at.warning)
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("the movie was terrible .\nwhat a lovely day .\nmy trip was terrible and sad .\n")
    at.text_input(key="feat_corpus_path").set_value(str(corpus)).run()
    at.button(key="feat_index").click().run()
    _ok(at)
    (store,) = (tmp_path / "stores").glob("*.store")
    assert "__reviews-" in store.name
    from lenslab.probes.features import FeatureStore

    with FeatureStore(store) as st:
        assert st.complete and st.n_prompts == 3 and st.stats(PLANTED).n_fire == 2  # two 'terrible' tokens


def test_features_page_without_a_zoo_sae_explains(monkeypatch, tmp_path, tiny_zoo_dir):
    """A model with no shipped SAE gets a note (train one, or pick a model that has one), no error."""
    from lenslab.probes.sae import list_saes

    model = next((m for m in lenslab.zoo.zoo_names() if not list_saes(m)), str(tiny_zoo_dir))
    at = _app(monkeypatch, tmp_path, model, lenslab.zoo.default_prompts(model).prompt)
    _ok(at)
    assert at.radio(key="feat_source").value == "Folder"
    (note,) = [i.value for i in at.info]
    assert f"{model} has no zoo SAE" in note and f"lenslab sae train --model {model}" in note, note
    assert _planted_with_sae() in note  # the models that ship one are named
