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
TRUE = dict(A=120.0, lam=0.15, gamma=0.004, t0=0.2, K=40.0)
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
    fit = next(d.value for d in at.dataframe if "param" in d.value.columns).set_index("param")["value"].to_dict()
    for k, want in TRUE.items():
        assert fit[k] == pytest.approx(want, rel=1e-5), k  # a noise-free curve is fitted back exactly

    at.text_area(key="fit_text").set_value("1,2\n3,x").run()
    at.button(key="fit_go").click().run()
    assert not at.exception and any("row 2 is not two numbers" in e.value for e in at.error)


def test_norms_page_ln_free_tab_and_a_checkpoint_series(monkeypatch):
    """The LN-free tab shows the twin's stored claims table for the sidebar model; the committed
    checkpoint series is measured on the sidebar prompts exactly as the library measures it."""
    from streamlit.testing.v1 import AppTest

    from lenslab.zoo import checkpoints, noln

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", "zoo/ioi-4l")
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=300).run()
    at.switch_page("page_norms.py").run()
    _ok(at)
    assert at.selectbox(key="noln_parent").value == "zoo/ioi-4l"
    stored = noln.stored_claims("zoo/ioi-4l")
    table = at.dataframe[-1].value
    assert list(table["measurement"]) == list(stored.rows)
    assert list(table["zoo/ioi-4l-noln"]) == pytest.approx([v["free"] for v in stored.rows.values()])

    name = "zoo/norm-study/pre-2l"
    assert at.selectbox(key="traj_series").value == name
    at.button(key="traj_go").click().run()
    _ok(at)
    prompts = [p for p in at.text_area(key="prompt").value.splitlines() if p.strip()]
    ref = trajectory.measure_checkpoints(checkpoints.series_path(name), prompts, device="cpu")
    shown = next(d.value for d in at.dataframe if "top_magnitude" in d.value.columns)
    assert list(shown["step"]) == ref.steps
    assert list(shown["top_magnitude"]) == pytest.approx(ref.top_magnitude, rel=1e-6)
