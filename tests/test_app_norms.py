"""The Scale & norms page under Streamlit's AppTest on zoo/moe-refusal: the atlas shows the
library's numbers, compares with another zoo model, a pasted trajectory is fitted back to its
parameters, and bad rows show a message, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lenslab
from lenslab.probes import atlas, trajectory

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
MODEL = "zoo/moe-refusal"
TRUE = dict(A=120.0, lam=0.15, gamma=0.004, t0=-50.0, K=40.0)
pytestmark = pytest.mark.slow


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_norms_page_atlas_compare_and_fit(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", MODEL)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=300).run()
    at.switch_page("page_norms.py").run()
    _ok(at)
    assert at.title[0].value == f"Scale & norms · {MODEL}"
    prompts = [p for p in at.text_area(key="prompt").value.splitlines() if p.strip()]
    ref = atlas.activation_atlas(lenslab.load_model(MODEL, device="cpu"), prompts)
    top = ref.global_max()
    assert any(f"Global max |a| {top['max_abs']:.4g} at {top['hook']}" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert len(table) == len(ref.hooks) and table["max_abs"].max() == pytest.approx(
        max(h["max_abs"] for h in ref.hooks), rel=1e-6
    )
    at.radio(key="atlas_view").set_value("int8").run()
    _ok(at)
    at.multiselect(key="atlas_compare").set_value(["zoo/ioi-4l"]).run()
    _ok(at)
    compare = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert len(compare["data"]) == 2  # one line per model

    t = np.linspace(100, 6000, 30)
    v = trajectory.trajectory_curve(t, **TRUE)
    at.text_area(key="fit_text").set_value(
        "step,top |a|\n" + "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in zip(t, v))
    ).run()
    at.button(key="fit_go").click().run()
    _ok(at)
    fit = at.dataframe[-1].value.set_index("param")["value"].to_dict()
    for k, want in TRUE.items():
        assert fit[k] == pytest.approx(want, rel=1e-5), k  # a noise-free curve is fitted back exactly

    at.text_area(key="fit_text").set_value("1,2\n3,x").run()
    at.button(key="fit_go").click().run()
    assert not at.exception and any("row 2 is not two numbers" in e.value for e in at.error)
