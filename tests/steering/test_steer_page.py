"""The Steer page under Streamlit's AppTest: fit each method, show two generations, offer presets."""
from __future__ import annotations

from pathlib import Path

import torch

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_steer_page_fits_and_generates_side_by_side(monkeypatch, tiny_zoo_dir):
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
    assert "austeer" in at.caption[-1].value or any("austeer" in c.value for c in at.caption)
    at.radio(key="steer_method").set_value("ActAdd").run()
    at.button(key="steer_fit").click().run()
    _ok(at)
