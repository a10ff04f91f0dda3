"""The Streamlit app, run in-process with `streamlit.testing.v1.AppTest`: every page renders
without an exception, reacts to its inputs, and bad input shows a message, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lenslab import inspection, zoo

APP_DIR = Path(__file__).resolve().parent.parent / "app"
MAIN = APP_DIR / "main.py"
PAGES = sorted(p.name for p in APP_DIR.glob("page_*.py"))
TIMEOUT = 120  # the first run imports torch and TransformerLens


@pytest.fixture(scope="session")
def app_model(request) -> str:
    """The model the app opens with: the zoo's default model, or the tiny test model while the
    zoo is still empty."""
    if zoo.zoo_names():
        return zoo.default_model()
    return str(request.getfixturevalue("tiny_zoo_dir"))


def _app(monkeypatch, model: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", model)
    torch.set_num_threads(1)
    return AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)


def _charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_every_page_renders(monkeypatch, app_model):
    at = _app(monkeypatch, app_model).run()
    _ok(at)
    assert PAGES, "no app/page_*.py files"
    for page in PAGES:
        at.switch_page(page).run()
        _ok(at)
        assert at.title or at.header, f"{page} rendered nothing"


def test_model_page_shows_model_content(monkeypatch, app_model, request):
    at = _app(monkeypatch, app_model).run()
    _ok(at)
    assert at.title[0].value == f"Model · {app_model}"
    assert [h.value for h in at.subheader] == ["Model card", "Tokenization"]
    assert [h.value for h in at.header] == ["Attention patterns", "Logit lens", "Top next-token predictions"]
    prompt = at.text_area(key="prompt").value
    assert prompt == (
        zoo.default_prompt(app_model) or "The quick brown fox jumps over the lazy dog. The quick brown fox"
    )
    model = _load(app_model)
    tok = inspection.tokenize(model, prompt)
    table = at.dataframe[0].value
    assert table["id"].tolist() == tok.ids.tolist()
    charts = _charts(at)
    assert len(charts) == 3  # attention, logit lens, predictions
    assert app_model in charts[0]["layout"]["title"]["text"]
    assert charts[1]["data"][0]["y"] == inspection.logit_lens(model, prompt).layer_labels
    preds = inspection.top_predictions(model, prompt, k=10)
    assert at.dataframe[1].value["id"].tolist() == [p.id for p in preds]
    assert any(app_model in m.value or "config" in m.value for m in at.markdown)  # card or config table


def _load(name):
    import lenslab

    return lenslab.load_model(name, device="cpu")


def test_prompt_change_updates_output(monkeypatch, app_model):
    at = _app(monkeypatch, app_model).run()
    before_tokens = at.dataframe[0].value["id"].tolist()
    before_charts = _charts(at)
    model = _load(app_model)
    vocab = [t for t in model.tokenizer.get_vocab() if t.isalnum()][:6]
    new_prompt = " ".join(vocab[:3] + vocab[:3])
    at.text_area(key="prompt").input(new_prompt).run()
    _ok(at)
    after_tokens = at.dataframe[0].value["id"].tolist()
    assert after_tokens == inspection.tokenize(model, new_prompt).ids.tolist() != before_tokens
    assert _charts(at)[1]["data"][0]["z"] != before_charts[1]["data"][0]["z"]  # logit lens recomputed

    at.text_area(key="prompt").input("   ").run()
    assert not at.exception
    assert any("prompt is empty" in e.value for e in at.error)


def test_layer_and_head_selectors_change_the_figure(monkeypatch, app_model):
    at = _app(monkeypatch, app_model).run()
    layer_box = next(s for s in at.selectbox if s.label == "Layer")
    head_box = next(s for s in at.selectbox if s.label == "Head")
    assert head_box.value == "all"
    n_layers = len(layer_box.options)
    assert "layer 0, all heads" in _charts(at)[0]["layout"]["title"]["text"]
    head_box.select(1).run()
    layer_box = next(s for s in at.selectbox if s.label == "Layer")
    layer_box.select(n_layers - 1).run()
    _ok(at)
    fig = _charts(at)[0]
    assert f"layer {n_layers - 1} head 1" in fig["layout"]["title"]["text"]
    model = _load(app_model)
    pat = inspection.attention_patterns(model, at.text_area(key="prompt").value)
    torch.testing.assert_close(torch.tensor(fig["data"][0]["z"]), pat[n_layers - 1, 1], atol=1e-6, rtol=0)

    at.radio(key="lens_colour").set_value("final").run()
    _ok(at)
    assert "final prediction" in _charts(at)[1]["layout"]["title"]["text"]
    at.number_input(key="top_k").set_value(3).run()
    _ok(at)
    assert len(at.dataframe[1].value) == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        ("zoo/no-such-model", "does not exist"),
        ("/no/such/model/dir", "does not exist"),
        ("no-such-org/no-such-model", "not in the local Hugging Face cache"),
    ],
)
def test_bad_model_shows_error_not_exception(monkeypatch, bad, message):
    at = _app(monkeypatch, bad).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in errors[0], errors
    assert not at.get("plotly_chart")


def test_switching_source_in_sidebar(monkeypatch, app_model, tiny_zoo_dir):
    at = _app(monkeypatch, app_model).run()
    at.radio(key="model_source").set_value("Local path").run()
    at.text_input(key="local_path").input(str(tiny_zoo_dir)).run()
    _ok(at)
    assert at.title[0].value == f"Model · {tiny_zoo_dir}"
    assert at.text_area(key="prompt").value == "t1 t2 t3 t1 t2"  # the folder's default_prompt
    at.text_input(key="local_path").input(str(tiny_zoo_dir / "missing")).run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)
