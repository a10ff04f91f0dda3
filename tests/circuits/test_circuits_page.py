"""The Circuits page under Streamlit's AppTest: each tab runs its analysis and shows a figure."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lenslab import circuits, tasks

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


def test_circuits_page_runs_every_tab(monkeypatch, tiny_zoo_dir, tiny_model):
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
    # each method's heatmap shows lenslab.circuits.attribute's scores on the page's task (the
    # tiny model's defaults: induction, 8 prompts, seed 0, logit_diff, 10 IG steps)
    assert at.session_state["circ_task_spec"] == "induction" and at.session_state["circ_metric"] == "logit_diff"
    model = tiny_model  # the same folder the page loaded
    task = tasks.from_spec(model, "induction", n=8, seed=0)
    shown = {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    for method in ("atp", "relp"):
        ref = circuits.attribute(model, task, method, ["resid_pre"], metric="logit_diff", steps=10, progress=False)[
            "resid_pre"
        ]
        fig = shown[f"attr_fig_{method}_resid_pre"]
        assert fig["layout"]["title"]["text"].startswith(f"{method} patching: resid_pre (denoise)")
        z = torch.tensor(fig["data"][0]["z"], dtype=torch.float32)
        assert ref.axes == ("layer", "pos") and ref.scores.abs().max() > 1e-3  # not an all-zero map
        torch.testing.assert_close(z, ref.scores.float(), atol=1e-6, rtol=1e-4)  # float32, another thread
        assert fig["data"][0]["y"] == ref.labels["layer"] and fig["data"][0]["x"] == ref.labels["pos"]
    at.multiselect(key="faith_sites").set_value(["attn_out"])
    at.button(key="run_faith").click().run()
    _ok(at)
    # the table is lenslab.circuits.faithfulness's on the same task
    ref = circuits.faithfulness(model, task, ["atp", "relp"], ["attn_out"], metric="logit_diff", progress=False).table()
    table = at.dataframe[-1].value
    assert table[["site", "method", "n_cells"]].values.tolist() == ref[["site", "method", "n_cells"]].values.tolist()
    assert table["n_cells"].min() > 2  # a correlation over more than two cells
    torch.testing.assert_close(
        torch.tensor(table[["pearson", "spearman"]].values),
        torch.tensor(ref[["pearson", "spearman"]].values),
        atol=1e-5,
        rtol=0,
    )
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
