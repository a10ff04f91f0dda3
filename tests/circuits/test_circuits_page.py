"""The Circuits page under Streamlit's AppTest: each tab runs its analysis and shows a figure."""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


def _page(monkeypatch, model_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(model_dir))
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page("page_circuits.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_circuits_page_runs_every_tab(monkeypatch, tiny_zoo_dir):
    at = _page(monkeypatch, tiny_zoo_dir)
    _ok(at)
    assert at.title[0].value.startswith("Circuits")
    at.selectbox(key="patch_site").set_value("z")
    at.button(key="run_patch").click().run()
    _ok(at)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any("z (denoise)" in c["layout"]["title"]["text"] for c in charts)
    assert any(b.label == "JSON" for b in at.get("download_button"))

    at.multiselect(key="attr_sites").set_value(["resid_pre"])
    at.button(key="run_attr").click().run()
    _ok(at)
    at.multiselect(key="faith_sites").set_value(["attn_out"])
    at.button(key="run_faith").click().run()
    _ok(at)
    assert at.dataframe, "faithfulness table missing"
    at.selectbox(key="graph_method").set_value("eap")
    at.button(key="run_graph").click().run()
    _ok(at)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("Circuit (eap") for t in titles)
    assert any(t.startswith("Faithfulness") for t in titles)


def test_circuits_page_bad_prompts_show_a_message(monkeypatch, tiny_zoo_dir):
    at = _page(monkeypatch, tiny_zoo_dir)
    at.radio(key="circ_task_kind").set_value("My own prompts").run()
    at.text_area(key="circ_clean").set_value("t1 t2 t3").run()
    at.text_area(key="circ_corrupt").set_value("t1 t2").run()
    at.text_input(key="circ_answers").set_value("t3,t4").run()
    assert not at.exception
    assert any("same token length" in e.value for e in at.error)
