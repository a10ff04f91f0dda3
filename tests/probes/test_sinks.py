"""Attention sinks and massive activations: recovery of a hand-planted sink and massive
activation, equality with a hand computation from run_with_cache, JSON and figure export, the
CLI, the page, and bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from lenslab import LenslabError, figures
from lenslab.probes import sinks as S
from lenslab.probes import super_experts as SE
from lenslab.zoo import planted as P

torch.set_num_threads(1)
MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


@pytest.fixture(scope="module")
def planted():
    return P.planted_model(), P.planted_tokens(batch=4, seq_len=32)


def test_planted_sink_and_massive_activation_are_found_exactly(planted):
    model, toks = planted
    sinks = S.attention_sinks(model, toks)
    assert sinks.sink_heads() == [P.PLANTED["sink_head"]]
    assert sinks.attn_to_first[1, 0] > 0.999
    # every other head is near-uniform: alpha_0 = H_32 / 32
    h = sum(1 / (t + 1) for t in range(32)) / 32
    others = torch.ones(2, 2, dtype=torch.bool)
    others[1, 0] = False
    assert torch.allclose(sinks.attn_to_first[others], torch.full((3,), h), atol=0.02)
    assert sinks.sink_rate == pytest.approx(0.25)
    m = S.massive_activations(model, toks)
    assert m.massive_dims == [P.PLANTED["massive_dim"]]
    assert m.massive_positions == [0]
    assert {(e["layer"], e["dim"], e["pos"]) for e in m.massive} == {(0, 7, 0), (1, 7, 0)}
    assert len(m.massive) == 2 * 4  # two layers x four samples, nothing else
    assert all(e["value"] == pytest.approx(1000.0) and e["ratio"] > 1000 for e in m.massive)


def test_the_planted_models_old_names_are_deprecated_aliases():
    """`sinks.planted_model` etc. moved to `lenslab.zoo.planted`; the old names warn, for one release."""
    for name in ("PLANTED", "PLANTED_MOE", "planted_model", "planted_moe_model", "planted_tokens"):
        with pytest.warns(DeprecationWarning, match=f"sinks.{name} is deprecated; use lenslab.zoo.planted.{name}"):
            alias = getattr(S, name)
        assert alias is getattr(P, name)
        assert name not in S.__all__
    with pytest.raises(AttributeError, match="no attribute 'planted_nothing'"):
        _ = S.planted_nothing


def test_zeroing_the_massive_activation_removes_the_sink_and_the_mean_keeps_it(planted):
    model, toks = planted
    zero = S.ablate_massive(model, toks, mode="zero")
    assert zero.layer == 0 and zero.dims == [7] and len(zero.entries) == 4
    assert zero.sinks_clean.sink_rate == pytest.approx(0.25)
    assert zero.sinks_ablated.sink_rate == 0.0
    assert zero.sinks_ablated.attn_to_first[1, 0] < 0.2
    assert zero.loss_ablated != zero.loss_clean
    mean = S.ablate_massive(model, toks, mode="mean")
    assert mean.sinks_ablated.sink_rate == pytest.approx(0.25)
    assert mean.loss_ablated == pytest.approx(mean.loss_clean, abs=1e-6)


def test_numbers_equal_a_hand_computation(tiny_model):
    prompts = ["t1 t2 t3 t4 t5 t6", "t9 t8 t7 t6 t5 t4 t3 t2 t1"]  # two lengths
    r = S.attention_sinks(tiny_model, prompts, threshold=0.2)
    alpha, vw = [], []
    for p in prompts:
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(p))
        for_l, vw_l = [], []
        for l in range(2):
            A = cache[f"blocks.{l}.attn.hook_pattern"][0]  # [head, q, k]
            v = cache[f"blocks.{l}.attn.hook_v"][0].norm(dim=-1).T  # [head, k]
            T = A.shape[-1]
            a = torch.stack([A[:, k:, k].mean(-1) for k in range(T)], -1)
            for_l.append(a)
            vw_l.append(torch.stack([(A[:, k:, k] * v[:, k : k + 1]).mean(-1) for k in range(T)], -1))
        alpha.append(torch.stack(for_l))
        vw.append(torch.stack(vw_l))
    first = (alpha[0][..., 0] + alpha[1][..., 0]) / 2
    assert torch.allclose(r.attn_to_first, first, atol=1e-5)
    assert torch.allclose(r.key_attention[..., 8], alpha[1][..., 8], atol=1e-5)  # only the long prompt has pos 8
    assert torch.allclose(r.value_weighted[..., 3], (vw[0][..., 3] + vw[1][..., 3]) / 2, atol=1e-5)
    frac = ((alpha[0][..., 0] > 0.2).float() + (alpha[1][..., 0] > 0.2).float()) / 2
    assert torch.equal(r.sink_fraction, frac)
    assert r.sink_rate == pytest.approx(float(frac.mean()))

    m = S.massive_activations(tiny_model, prompts[1], top_k=2)
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(prompts[1]))
    x = cache["blocks.1.hook_resid_post"][0]
    assert float(m.medians[1]) == pytest.approx(float(x.abs().flatten().median()), rel=1e-6)
    assert float(m.top_values[1, 0].abs()) == pytest.approx(float(x.abs().max()), rel=1e-6)
    p, d = divmod(int(x.abs().flatten().argmax()), x.shape[1])
    assert (int(m.top_pos[1, 0]), int(m.top_dims[1, 0])) == (p, d)
    assert torch.allclose(m.magnitudes[1], x.abs().amax(0))
    assert m.massive == []  # a random model has nothing massive


def test_json_round_trip_and_figure_export(planted, tmp_path):
    model, toks = planted
    for r in (
        S.attention_sinks(model, toks),
        S.massive_activations(model, toks),
        S.ablate_massive(model, toks, mode="zero"),
    ):
        back = type(r).from_json(r.to_json())
        assert back.to_dict() | {"provenance": None} == r.to_dict() | {"provenance": None}
        assert back.provenance["model"] == "planted-sink-2l"
        out = figures.export(r, tmp_path / f"{type(r).__name__}.json")
        assert type(r).from_json(out).to_json() == back.to_json()
        fig_json = figures.save_figure(r.figure(), tmp_path / f"{type(r).__name__}_fig.json")
        assert json.loads(fig_json.read_text())["data"]
    svg = figures.export(S.attention_sinks(model, toks), tmp_path / "sinks.svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    with pytest.raises(LenslabError, match="not a MassiveResult"):
        S.MassiveResult.from_json(S.attention_sinks(model, toks).to_json())


def test_bad_input_names_the_problem(planted, tiny_model):
    model, toks = planted
    with pytest.raises(LenslabError, match=r"out of range.*layers 0\.\.1"):
        S.attention_sinks(model, toks, layers=[5])
    with pytest.raises(LenslabError, match=r"out of range"):
        S.massive_activations(model, toks, layers=-1)
    with pytest.raises(LenslabError, match="prompts is empty"):
        S.attention_sinks(tiny_model, [])
    with pytest.raises(LenslabError, match="prompts is empty"):
        S.massive_activations(tiny_model, ["  "])
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(LenslabError, match="strictly between 0 and 1"):
            S.attention_sinks(model, toks, threshold=bad)
    with pytest.raises(LenslabError, match="needs absolute, ratio or both"):
        S.MassiveRule(absolute=None, ratio=None)
    with pytest.raises(LenslabError, match="no massive activations"):
        S.ablate_massive(tiny_model, "t1 t2 t3")
    with pytest.raises(LenslabError, match="super experts need an MoE model"):
        SE.super_experts(model, toks)
    with pytest.raises(LenslabError, match="no tokenizer"):
        S.attention_sinks(model, "hello")


def test_cli_writes_files(tiny_zoo_dir, tmp_path, capsys):
    from lenslab.cli import main

    out = tmp_path / "sinks.json"
    assert (
        main(["sinks", "attention", "--model", str(tiny_zoo_dir), "--prompts", "t1 t2 t3", "t4 t5", "--out", str(out)])
        == 0
    )
    r = S.SinkResult.from_json(out)
    assert r.attn_to_first.shape == (2, 4)
    out2 = tmp_path / "massive.json"
    assert (
        main(["sinks", "massive", "--model", str(tiny_zoo_dir), "--ratio", "2", "--absolute", "0", "--out", str(out2)])
        == 0
    )
    assert S.MassiveResult.from_json(out2).rule.absolute is None
    assert main(["sinks", "attention", "--model", str(tiny_zoo_dir), "--threshold", "3", "--out", str(out)]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_sinks_page_renders(monkeypatch, tiny_zoo_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(tiny_zoo_dir))
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    at.switch_page("page_sinks.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value.startswith("Sinks")
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("Attention sinks") for t in titles)
    assert any(t.startswith("Residual magnitudes") for t in titles)
    assert any(b.label == "JSON" for b in at.get("download_button"))
    at.number_input(key="sinks_abs").set_value(0.0).run()
    at.number_input(key="sinks_ratio").set_value(2.0).run()
    at.button(key="sinks_ablate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("Massive activations set to") for t in titles)
