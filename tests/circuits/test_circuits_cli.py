"""`lenslab circuits ...`: outputs follow the extension and parse; bad input is one clear line."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from lenslab.cli import main
from lenslab.results import PatchResult


def _run(tiny_zoo_dir, *args):
    return main(["circuits", *args, "--model", str(tiny_zoo_dir), "--task", "induction", "--n", "3"])


def test_patch_json_and_svg(tiny_zoo_dir, tmp_path, capsys):
    assert _run(tiny_zoo_dir, "patch", "--site", "z", "--out", str(tmp_path / "z.json")) == 0
    res = PatchResult.from_json(tmp_path / "z.json")
    assert res.axes == ("layer", "head") and res.provenance["task"] == "induction"
    assert _run(tiny_zoo_dir, "patch", "--site", "resid_pre", "--out", str(tmp_path / "r.svg")) == 0
    assert ET.parse(tmp_path / "r.svg").getroot().tag.endswith("svg")


def test_attribute_several_sites_and_graph(tiny_zoo_dir, tmp_path, capsys):
    assert (
        _run(
            tiny_zoo_dir,
            "attribute",
            "--method",
            "relp",
            "--site",
            "resid_pre",
            "mlp_out",
            "--out",
            str(tmp_path / "a.json"),
        )
        == 0
    )
    assert PatchResult.from_json(tmp_path / "a_mlp_out.json").method == "relp"
    assert _run(tiny_zoo_dir, "graph", "--method", "eap", "--top-k", "5", "--out", str(tmp_path / "g.json")) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["kind"] == "CircuitGraph" and len(g["edges"]) >= 5
    assert _run(tiny_zoo_dir, "graph", "--method", "nodes", "--top-k", "3", "--out", str(tmp_path / "n.json")) == 0
    assert len(json.loads((tmp_path / "n.json").read_text())["node_scores"]) == 3


def test_faithfulness_prints_table(tiny_zoo_dir, tmp_path, capsys):
    assert (
        _run(
            tiny_zoo_dir,
            "faithfulness",
            "--site",
            "attn_out",
            "--method",
            "atp",
            "relp",
            "--out",
            str(tmp_path / "f.json"),
        )
        == 0
    )
    assert "| attn_out | relp |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["patch", "--site", "resid_prre", "--out", "x.json"], "did you mean 'resid_pre'"),
        (["patch", "--site", "resid_pre", "--out", "x.bmp"], "the extension picks the format"),
        (["patch", "--site", "resid_pre", "--layer", "0", "--out", "x.json"], "layer= is only for site 'mlp_neuron'"),
    ],
)
def test_errors_are_one_line(tiny_zoo_dir, tmp_path, capsys, args, message):
    args = [a if a not in ("x.json", "x.bmp") else str(tmp_path / a) for a in args]
    assert _run(tiny_zoo_dir, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
