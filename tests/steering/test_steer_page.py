"""The Steer page under Streamlit's AppTest: fit each method, show two generations, offer presets."""

from __future__ import annotations

from pathlib import Path

import torch

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_steer_page_fits_and_generates_side_by_side(monkeypatch, tiny_zoo_dir, tiny_model):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(tiny_zoo_dir))
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page("page_steer.py").run()
    _ok(at)
    assert at.title[0].value.startswith("Steer")
    at.text_area(key="steer_pos").set_value("t1 t1 t1\nt1 t2 t1")
    at.text_area(key="steer_neg").set_value("t5 t5 t5\nt5 t6 t5")
    at.number_input(key="steer_layer").set_value(1)
    at.button(key="steer_fit").click().run()
    _ok(at)
    assert [s.value for s in at.subheader][:2] == ["Unsteered", "Steered (strength 1)"]
    at.slider(key="steer_strength").set_value(4.0).run()
    _ok(at)
    gens = [m.value for m in at.markdown if "**" in m.value]
    assert len(gens) == 2 and gens[0] != gens[1], gens  # strength 4 changes the tiny model's continuation
    assert {b.label for b in at.get("download_button")} >= {"Preset JSON", "Preset tensors"}
    at.slider(key="steer_strength").set_value(0.0).run()
    gens = [m.value for m in at.markdown if "**" in m.value]
    assert gens[0] == gens[1]  # strength 0: the same text under the same seed

    at.radio(key="steer_method").set_value("AUSteer").run()
    at.button(key="steer_fit").click().run()
    _ok(at)
    from lenslab import steering

    # the page's defaults (k 16, alpha 5, the first site) on both prompt boxes, as the library fits them
    site = at.session_state["steer_au_site"]
    assert site == list(steering.AU_SITES)[0]
    ref = steering.austeer(tiny_model, ["t1 t1 t1", "t1 t2 t1"], ["t5 t5 t5", "t5 t6 t5"], k=16, alpha=5.0, site=site)
    got = at.session_state["steer_iv"]
    assert [(e.hook, e.op, e.units) for e in got.edits] == [(e.hook, e.op, e.units) for e in ref.edits]
    for e, r in zip(got.edits, ref.edits):
        torch.testing.assert_close(e.vector, r.vector, atol=1e-6, rtol=1e-5)
    assert sum(len(e.units) for e in ref.edits) == 16
    assert any(
        c.value.startswith(f"**{ref.name}** · {len(ref.edits)} edit(s)") and "austeer" in c.value for c in at.caption
    ), [c.value for c in at.caption]
    at.radio(key="steer_method").set_value("ActAdd").run()
    at.button(key="steer_fit").click().run()
    _ok(at)
    # what the page fitted and shows is lenslab.steering.actadd on the first prompt of each box
    from lenslab.app._shell import continuation_markdown

    model = tiny_model
    ref = steering.actadd(model, "t1 t1 t1", "t5 t5 t5", layer=1)
    got = at.session_state["steer_iv"]
    assert [(e.hook, e.op, e.positions) for e in got.edits] == [(e.hook, e.op, e.positions) for e in ref.edits]
    assert ref.edits[0].vector.shape == (4, model.cfg.d_model)  # BOS + 3 words
    torch.testing.assert_close(got.edits[0].vector, ref.edits[0].vector, atol=1e-6, rtol=1e-5)
    caption = f"**{ref.name}** · 1 edit(s) at blocks.1.hook_resid_pre · {ref.n_units(model)} units"
    assert any(c.value == caption for c in at.caption), [c.value for c in at.caption]
    at.slider(key="steer_strength").set_value(4.0).run()
    _ok(at)
    prompt = at.session_state["prompt"]
    expected = [
        continuation_markdown(prompt, steering.generate(model, prompt, iv, max_new_tokens=20, seed=0))
        for iv in (None, ref.with_strength(4.0))
    ]
    assert expected[0] != expected[1]  # ActAdd at strength 4 changes the continuation
    assert _column_texts(at) == expected


SENTIMENT = "zoo/steer-sentiment"


def _sentiment_app(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", SENTIMENT)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page("page_steer.py").run()
    _ok(at)
    return at


def _column_texts(at) -> list[str]:
    """The generation shown in each of the two side-by-side columns (the markdown under its subheader)."""
    cols = [c for c in at.columns if any(h.value.startswith(("Unsteered", "Steered")) for h in c.subheader)]
    return [[m.value for m in c.markdown][-1] for c in cols]


def test_steer_page_on_the_sentiment_model_streams_both_columns_and_runs_the_tradeoff(monkeypatch):
    import lenslab
    from lenslab import steering, zoo
    from lenslab.data import sentiment

    model = lenslab.load_model(SENTIMENT, device="cpu")
    sets = zoo.prompt_sets(SENTIMENT)
    calls: list[list[str]] = []
    real_stream = steering.stream

    def recording_stream(*args, **kwargs):
        pieces: list[str] = []
        calls.append(pieces)
        for piece in real_stream(*args, **kwargs):
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(steering, "stream", recording_stream)
    at = _sentiment_app(monkeypatch)
    # the contrastive prompts default to the zoo model's own prompt sets
    assert at.text_area(key="steer_pos").value == "\n".join(sets["positive"])
    assert at.text_area(key="steer_neg").value == "\n".join(sets["negative"])
    at.number_input(key="steer_layer").set_value(1)
    at.button(key="steer_fit").click().run()
    _ok(at)
    calls.clear()
    at.number_input(key="steer_n_new").set_value(8).run()
    _ok(at)

    prompt = at.text_area(key="prompt").value
    iv = steering.mean_difference(model, sets["positive"], sets["negative"], layers=1)
    plain = steering.generate(model, prompt, max_new_tokens=8)
    steered = steering.generate(model, prompt, iv, max_new_tokens=8)
    # the page streamed both continuations, token by token, with the library's stream (8 pieces each)
    assert [len(c) for c in calls] == [8, 8] and ["".join(c) for c in calls] == [plain, steered]
    left, right = _column_texts(at)
    assert left == f"{prompt} **{plain.strip()}**" and right == f"{prompt} **{steered.strip()}**", (left, right)
    assert not sentiment.is_positive(plain) and sentiment.is_positive(steered)  # the planted concept moves

    # trade-off on the model's "negative" prompt set for the current intervention
    at.multiselect(key="steer_to_strengths").set_value([0.0, 1.0])
    at.number_input(key="steer_to_tokens").set_value(4)
    at.button(key="steer_to_run").click().run()
    _ok(at)
    fig = [c for c in at.get("plotly_chart") if "trade-off" in c.proto.spec]
    assert len(fig) == 1
    rows = at.dataframe[-1].value
    assert rows["strength"].tolist() == [0.0, 1.0] and set(rows["method"]) == {"mean difference"}
    base = [steering.generate(model, p, max_new_tokens=4) for p in sets["negative"]]
    assert rows["concept_rate"].iloc[0] == sum(map(sentiment.is_positive, base)) / len(base) == 0.0
    assert rows["concept_rate"].iloc[1] >= 0.75  # DiffMean at layer 1 flips the negative contexts (measured 1.0)
    lo, hi = rows["concept_rate_ci"].iloc[1]  # the spread: a 95% bootstrap interval over the prompts
    assert 0 <= lo <= rows["concept_rate"].iloc[1] <= hi <= 1
    assert any("bootstrap interval" in c.value for c in at.caption)
    assert "JSON" in {b.label for b in at.get("download_button")}


def test_steer_page_fits_lineas(monkeypatch):
    at = _sentiment_app(monkeypatch)
    at.radio(key="steer_method").set_value("LinEAS").run()
    at.number_input(key="steer_steps").set_value(10)
    at.number_input(key="steer_lr").set_value(0.05)
    at.button(key="steer_fit").click().run()
    _ok(at)
    iv = at.session_state["steer_iv"]
    from lenslab import zoo

    sets = zoo.prompt_sets(SENTIMENT)
    # source = negative prompts, target = positive; 10 Adam steps lower the Wasserstein loss
    assert iv.provenance["source"] == sets["negative"] and iv.provenance["target"] == sets["positive"]
    assert iv.provenance["config"]["steps"] == 10
    assert iv.provenance["loss_final"] < 0.8 * iv.provenance["loss_initial"], iv.provenance
    assert {e.op for e in iv.edits} == {"affine"} and len(iv.edits) == 6  # attn_out and mlp_out of 3 layers
    assert any("lineas" in c.value for c in at.caption)
    assert len(_column_texts(at)) == 2
    # away and back: the prompts are the zoo's sets again (not emptied) and the fit is kept
    at.switch_page("page_model.py").run()
    at.switch_page("page_steer.py").run()
    _ok(at)
    assert at.text_area(key="steer_neg").value == "\n".join(sets["negative"])
    assert at.session_state["steer_iv"] is iv and len(_column_texts(at)) == 2


def test_lineas_with_too_few_prompts_is_a_message(monkeypatch, tiny_zoo_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(tiny_zoo_dir))
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page("page_steer.py").run()
    at.radio(key="steer_method").set_value("LinEAS").run()
    at.button(key="steer_fit").click().run()
    assert not at.exception
    assert any("at least 4" in e.value for e in at.error), [e.value for e in at.error]


def test_steer_page_fits_a_probe_direction(monkeypatch, tiny_zoo_dir, tiny_model):
    """Method "Linear probe": the page's intervention is lenslab.steering.probe_steering's."""
    from streamlit.testing.v1 import AppTest

    from lenslab import steering

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(tiny_zoo_dir))
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page("page_steer.py").run()
    pos, neg = ["t1 t1 t1", "t1 t2 t1", "t2 t1 t1"], ["t5 t5 t5", "t5 t6 t5", "t6 t5 t5"]
    at.text_area(key="steer_pos").set_value("\n".join(pos))
    at.text_area(key="steer_neg").set_value("\n".join(neg))
    at.radio(key="steer_method").set_value("Linear probe").run()
    at.number_input(key="steer_layer").set_value(1)
    at.button(key="steer_fit").click().run()
    _ok(at)
    ref = steering.probe_steering(tiny_model, pos, neg, layers=1)
    got = at.session_state["steer_iv"]
    assert (
        [(e.hook, e.op) for e in got.edits]
        == [(e.hook, e.op) for e in ref.edits]
        == [("blocks.1.hook_resid_post", "add")]
    )
    torch.testing.assert_close(got.edits[0].vector, ref.edits[0].vector, atol=1e-6, rtol=1e-5)
    assert [s.value for s in at.subheader][:2] == ["Unsteered", "Steered (strength 1)"]
