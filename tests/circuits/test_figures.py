"""Figures of patching results exported to every format parse (SVG XML, PNG/PDF headers, PDF renders)."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

import lenslab
from lenslab import circuits, tasks
from lenslab.figures import save_figure


@pytest.fixture(scope="module")
def figs(tiny_model):
    task = tasks.induction(tiny_model, n=2, seq_len=4, seed=0)
    return {
        "2d": circuits.patch(tiny_model, task, "resid_pre", progress=False).figure(),
        "3d": circuits.patch(tiny_model, task, "z_by_pos", progress=False).figure(normalize=True),
        "1d": circuits.patch(tiny_model, task, "mlp_neuron", layer=0, progress=False).figure(),
    }


def test_heatmap_is_centred_and_titled(figs):
    fig = figs["2d"]
    hm = fig.data[0]
    assert hm.type == "heatmap" and hm.colorscale is not None
    assert hm.zmax - hm.zmid == pytest.approx(hm.zmid - hm.zmin)
    assert "resid_pre" in fig.layout.title.text and "logit_diff" in fig.layout.title.text
    assert len(figs["3d"].data) == 4 and figs["3d"].data[0].zmid == 0.0
    assert figs["1d"].data[0].type == "bar"


@pytest.mark.slow
def test_export_every_format(figs, tmp_path):
    fig = figs["2d"]
    assert json.loads(save_figure(fig, tmp_path / "f.json").read_text())["data"][0]["type"] == "heatmap"
    assert "<html" in save_figure(fig, tmp_path / "f.html").read_text()[:500].lower()
    root = ET.parse(save_figure(fig, tmp_path / "f.svg")).getroot()
    assert root.tag.endswith("svg")
    assert save_figure(fig, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = save_figure(figs["3d"], tmp_path / "f.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert shutil.which("pdftoppm"), "poppler-utils is installed by run.py"
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(pdf), str(tmp_path / "page")], check=True)
    assert (tmp_path / "page-1.png").read_bytes()[:4] == b"\x89PNG"


def test_export_bad_extension(figs, tmp_path):
    with pytest.raises(lenslab.LenslabError, match="use one of .json"):
        save_figure(figs["2d"], tmp_path / "f.bmp")
