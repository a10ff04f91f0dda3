"""The Lens page, run in-process with `streamlit.testing.v1.AppTest` on zoo/ioi-4l: the logit and
tuned lenses show the library's grids, DLA finds the model card's name movers, a probe trains on
the planted indirect-object name, and bad input shows a message, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab.probes import dla, lenses

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
MODEL = "zoo/ioi-4l"
pytestmark = pytest.mark.slow


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def page(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", MODEL)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=300).run()
    at.switch_page("page_lens.py").run()
    _ok(at)
    return at


def _chart(at, key: str) -> dict:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if c.proto.id and key in c.proto.id:
            return spec
    raise AssertionError(f"no chart {key}")


def test_lens_tab_shows_the_library_lenses(page):
    at = page
    model = lenslab.load_model(MODEL, device="cpu")
    prompt = at.text_area(key="prompt").value
    assert at.title[0].value == f"Lens · {MODEL}"
    logit = lenses.logit_lens(model, prompt, k=5)
    grid = _chart(at, "lens_grid_fig")
    assert grid["data"][0]["y"] == logit.layer_labels
    at.radio(key="lens_which").set_value("tuned").run()
    _ok(at)
    tuned = lenses.tuned_lens(model, prompt, k=5)
    assert _chart(at, "lens_grid_fig")["data"][0]["text"] == json.loads(tuned.figure().to_json())["data"][0]["text"]
    at.number_input(key="lens_kl_n").set_value(16).run()
    at.button(key="lens_kl_go").click().run()
    _ok(at)
    kl = _chart(at, "lens_kl_fig")
    assert len(kl["data"]) >= 2  # logit and tuned lens, per layer
    # a lens that does not exist: a message naming the fix, no traceback
    at.text_input(key=f"lens_source::{MODEL}").set_value("no/such-lens").run()
    assert not at.exception and any("Pass a folder" in e.value for e in at.error)


def test_dla_tab_finds_the_name_movers(page):
    at = page
    at.radio(key="dla_on").set_value("the built-in task").run()
    _ok(at)
    table = at.dataframe[0].value
    heads = table[table["component"].str.fullmatch(r"L\d+H\d+")].sort_values("score", ascending=False)
    assert sorted(heads["component"].head(4)) == ["L1H0", "L1H1", "L1H2", "L1H3"]  # the card's name movers
    model = lenslab.load_model(MODEL, device="cpu")
    at.radio(key="dla_on").set_value("the sidebar prompt").run()
    at.selectbox(key="dla_view").set_value("position").run()
    _ok(at)
    ref = dla.direct_logit_attribution(model, at.text_area(key="prompt").value, "Mary", "John", pos="all")
    assert any(f"{float(ref.total.mean()):.4g}" in c.value for c in at.caption)
    at.text_input(key=f"dla_answer::{MODEL}").set_value("Zzyzx").run()
    assert not at.exception and any("Direct logit attribution" in e.value for e in at.error)


def test_probe_tab_decodes_the_indirect_object(page):
    at = page
    at.selectbox(key="probe_site").set_value("resid_post").run()
    at.number_input(key="probe_n").set_value(64).run()
    at.button(key="probe_go").click().run()
    _ok(at)
    table = at.dataframe[-1].value
    layer1 = table[table["layer"] == 1].iloc[0]
    assert layer1["test"] >= 0.9 and layer1["control_test"] <= 0.1  # written by layer 1; control near chance
    # my prompts with a single label: a message, not a traceback
    at.selectbox(key=f"probe_data::{MODEL}").set_value("my prompts").run()
    at.text_area(key=f"probe_text::{MODEL}").set_value("a\tone two\na\tthree four").run()
    at.button(key="probe_go").click().run()
    assert not at.exception and any("Training probes" in e.value for e in at.error)
