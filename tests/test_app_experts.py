"""The Experts page under AppTest on a tiny planted Mixtral (token w7 -> expert 3 of layer 1, which
makes the model say w20), and
the `lenslab moe` commands on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lenslab.cli import main

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"


@pytest.fixture(scope="module")
def planted(behaviour_moe_dir):
    return str(behaviour_moe_dir)


def _app(monkeypatch, model: str, prompt: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", model)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    at.text_area(key="prompt").set_value(prompt).run()
    return at.switch_page("page_experts.py").run()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_experts_page_routes_ranks_and_switches(monkeypatch, planted):
    at = _app(monkeypatch, planted, "w7 w1 w2 w7")
    _ok(at)
    assert at.title[0].value.startswith("Experts")
    assert "2 MoE layers" in at.caption[0].value and "top-2" in at.caption[0].value
    # routing: the planted token picks expert 3 at layer 1 (top expert on the heatmap)
    route = json.loads(at.get("plotly_chart")[0].proto.spec)
    z = route["data"][0]["z"]  # [layer, pos] of the top expert
    assert z[1][1] == 3 and z[1][4] == 3 and z[1][2] != 3
    # fTRI: prompts with w7 vs without -> (1, 3) ranks first
    at.text_area(key="moe_target").set_value("w7 w1 w2\nw3 w7 w4").run()
    at.text_area(key="moe_other").set_value("w1 w2 w3\nw4 w5 w6").run()
    at.button(key="moe_rank").click().run()
    _ok(at)
    top = at.dataframe[-1].value
    assert (int(top.iloc[0]["layer"]), int(top.iloc[0]["expert"])) == (1, 3)
    # switch: use the ranking's top expert; the switched column differs from the baseline
    at.number_input(key="moe_top_k").set_value(1).run()
    at.button(key="moe_use_top").click().run()
    _ok(at)
    assert at.text_input(key="moe_off").value == "1:3"
    md = [m.value for m in at.markdown if m.value.startswith("w7 w1 w2 w7")]
    assert len(md) == 2 and "w20" in md[0] and md[0] != md[1]  # planted: expert (1,3) writes w20
    assert all(m.startswith("w7 w1 w2 w7 **w") and m.endswith("**") for m in md)  # bold renders: no space inside **


def test_experts_page_bad_input_is_a_message(monkeypatch, planted):
    at = _app(monkeypatch, planted, "w7 w1")
    at.text_input(key="moe_off").set_value("1:99").run()
    assert not at.exception
    assert any("expert 99 does not exist in layer 1" in e.value for e in at.error)
    at.text_input(key="moe_off").set_value("one three").run()
    assert any("LAYER:EXPERT" in e.value for e in at.error)


def test_experts_page_on_a_dense_model_says_so(monkeypatch, tiny_zoo_dir):
    at = _app(monkeypatch, str(tiny_zoo_dir), "t1 t2")
    _ok(at)
    assert any("Mixture-of-Experts model" in i.value for i in at.info)


def test_moe_cli(planted, tmp_path, capsys):
    assert (
        main(
            [
                "moe",
                "inspect",
                "--model",
                planted,
                "--device",
                "cpu",
                "--prompts",
                "w7 w1",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "RouterResult"
    assert (
        main(
            [
                "moe",
                "rank",
                "--model",
                planted,
                "--device",
                "cpu",
                "--target",
                "w7 w1 w2",
                "w3 w7",
                "--other",
                "w1 w2 w3",
                "w4 w5",
                "--top-k",
                "1",
                "--out",
                str(tmp_path / "rank.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "L1 e3" in out
    assert json.loads((tmp_path / "rank.json").read_text())["top"][0][:2] == [1, 3]
    assert (
        main(
            [
                "moe",
                "generate",
                "--model",
                planted,
                "--device",
                "cpu",
                "--prompt",
                "w7 w1 w2 w7",
                "--ranking",
                str(tmp_path / "rank.json"),
                "--top-k",
                "1",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    base = next(l for l in lines if l.startswith("baseline:"))
    sw = next(l for l in lines if l.startswith("switched:"))
    assert "w20" in base and "w20" not in sw.split("[")[0] and "off 1:3" in sw
    # bad ids: a clear error, exit 2
    assert main(["moe", "generate", "--model", planted, "--device", "cpu", "--off", "5:0"]) == 2
    assert "layer 5 is not a MoE layer" in capsys.readouterr().err
