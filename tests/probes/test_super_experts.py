"""Super experts (Su et al. 2025): exact recovery of a hand-planted super expert, profiling equal to
an independent Hugging Face computation on tiny random Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE,
pruning that restores the weights, the rules against numpy, JSON and figure export, CLI, page,
and bad input.

Oracles: the planted model's weights (its super expert outputs 10 x silu(10) x 10 in dimension 7
on the BOS); for the real architectures, every expert applied to every token with einsum over
the HF model's own fused weights, masked by the HF router's own choices, and checked to add up
(with the gate weights, and the gated shared expert) to the HF MoE block's output.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lenslab
from lenslab import LenslabError, figures
from lenslab.probes import sinks as S
from lenslab.probes import super_experts as SE
from lenslab.zoo import planted as P

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"
D, LAYERS, E, K = 32, 2, 4, 2  # the tiny_moe_dir checkpoints
SE_VALUE = 10 * (10 * torch.sigmoid(torch.tensor(10.0, dtype=torch.float64)).item()) * 10  # W_out x silu(10) x W_in


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- tiny random MoE checkpoints (tests/conftest.py: tiny_moe_dir) ---------------------------------
@pytest.fixture(scope="module")
def dirs(tiny_moe_dir):
    assert (tiny_moe_dir.D, tiny_moe_dir.E, tiny_moe_dir.K, tiny_moe_dir.LAYERS) == (D, E, K, LAYERS)
    return {n: tiny_moe_dir(n) for n in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")}


def _hf_reference(folder: Path, ids: torch.Tensor):
    """Per layer: output_max, input_max, channel and routed-token count of every expert (last column:
    the shared expert), from the HF model: all experts on all tokens, masked by HF's routing."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    got, handles = {}, []
    for l, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("mlp", l), (i[0], o))))
        handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("gate", l), o)))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    rows = []
    for l, layer in enumerate(hf.model.layers):
        mlp = layer.mlp
        x, y = got[("mlp", l)]
        x, y = x.reshape(-1, D), y.reshape(-1, D)
        _, weights, idx = got[("gate", l)]
        ex = mlp.experts
        with torch.no_grad():
            gate, up = torch.einsum("nd,efd->enf", x, ex.gate_up_proj).chunk(2, -1)
            hidden = ex.act_fn(gate) * up  # [E, N, I]
            out = torch.einsum("enf,edf->end", hidden, ex.down_proj)  # [E, N, D]
            routed = F.one_hot(idx, E).sum(1).T.bool()  # [E, N]
            w = torch.zeros(x.shape[0], E).scatter(1, idx, weights.float())
            total = torch.einsum("ne,end->nd", w, out)
            cols = [(hidden[e][routed[e]], out[e][routed[e]], routed[e].nonzero()[:, 0]) for e in range(E)]
            if hasattr(mlp, "shared_expert"):
                sh = mlp.shared_expert
                h_sh = sh.act_fn(F.linear(x, sh.gate_proj.weight)) * F.linear(x, sh.up_proj.weight)
                o_sh = F.linear(h_sh, sh.down_proj.weight)
                total = total + torch.sigmoid(F.linear(x, mlp.shared_expert_gate.weight)) * o_sh
                cols.append((h_sh, o_sh, torch.arange(x.shape[0])))
        # the reference is what the block computes: gate-weighted experts (+ gated shared expert) = block output
        torch.testing.assert_close(total, y, atol=1e-5, rtol=0)
        rows.append(
            [
                (
                    float(o.abs().max()),
                    float(h.abs().max()),
                    int(o.abs().max(0).values.argmax()),
                    o.shape[0],
                    int(tok[o.abs().max(1).values.argmax()]),
                )
                if o.numel()
                else (0.0, 0.0, -1, 0, -1)
                for h, o, tok in cols
            ]
        )
    return rows


# --- the planted model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    return P.planted_moe_model(), P.planted_tokens(batch=4, seq_len=32)


def test_planted_super_expert_massive_activation_and_sink_are_found_exactly(planted):
    model, toks = planted
    prof = SE.profile_experts(model, toks)
    assert prof.layers == [0, 1] and prof.n_experts == 4 and not prof.shared and prof.cutoff == 2
    assert prof.value(0, 2) == pytest.approx(SE_VALUE, rel=1e-5)  # 999.95
    assert (int(prof.channel[0, 2]), int(prof.pos[0, 2])) == (P.PLANTED_MOE["massive_dim"], 0)
    assert float(prof.input_max[0, 2]) == pytest.approx(SE_VALUE / 10, rel=1e-5)  # silu(10) x 10
    others = prof.output_max.clone()
    others[0, 2] = 0
    assert float(others.max()) < 0.1  # no other expert writes anything large
    assert int(prof.tokens.sum()) == 2 * 4 * 32 * 2  # layers x tokens x top-2
    assert int(prof.tokens[0, 2]) >= 4  # at least every BOS
    found = prof.super_experts()
    assert found.experts == [P.PLANTED_MOE["super_expert"]] and found.labels == ["L0e2"]
    assert found.population == 8
    vals = prof.output_max.flatten().double().numpy()
    assert found.thresholds["percentile"] == pytest.approx(np.percentile(vals, 99.5), rel=1e-6)
    assert found.thresholds["floor_max_over_times"] == 99.0  # floor(999.95 / 10)
    with pytest.warns(DeprecationWarning, match="sinks.super_experts is deprecated"):
        alias = S.super_experts  # the old re-export, kept for one release
    assert alias is SE.super_experts and alias(model, toks).experts == [(0, 2)]
    # the massive activation it writes, and the sink that reads it
    m = S.massive_activations(model, toks)
    assert m.massive_dims == [7] and m.massive_positions == [0]
    assert {(e["layer"], e["dim"], e["pos"]) for e in m.massive} == {(0, 7, 0), (1, 7, 0)}
    assert len(m.massive) == 2 * 4
    assert all(e["value"] == pytest.approx(SE_VALUE, rel=1e-3) for e in m.massive)  # x gate weight ~1
    sinks = S.attention_sinks(model, toks)
    assert sinks.sink_heads() == [P.PLANTED_MOE["sink_head"]]
    assert float(sinks.attn_to_first[1, 0]) > 0.999
    assert sinks.sink_rate == pytest.approx(0.25)


def test_pruning_the_planted_super_expert_removes_the_massive_activation_and_the_sink(planted):
    model, toks = planted
    r = SE.ablate_super_experts(model, toks, random_draws=3, seed=0)
    assert r.experts == [(0, 2)] and r.rule == "su"
    assert len(r.massive_clean.massive) == 8 and r.massive_pruned.massive == []
    assert r.sinks_clean.sink_rate == pytest.approx(0.25) and r.sinks_pruned.sink_rate == 0.0
    uniform = sum(1 / (t + 1) for t in range(32)) / 32  # alpha_0 of a uniform head over 32 tokens
    assert float(r.sinks_pruned.attn_to_first[1, 0]) == pytest.approx(uniform, abs=0.02)
    assert float(r.massive_pruned.top_values.abs().max()) < 2.0
    assert abs(r.loss_pruned - r.loss_clean) > 1e-4
    assert len(r.random) == 3
    for draw in r.random:  # random non-super experts leave the massive activation and the sink alone
        assert len(draw["experts"]) == 1 and draw["experts"][0] != [0, 2] and draw["experts"][0][0] in (0, 1)
        assert draw["n_massive"] == 8 and draw["massive_dims"] == [7]
        assert draw["sink_rate"] == pytest.approx(0.25)
        assert draw["max_abs"] == pytest.approx(SE_VALUE, rel=1e-3)
    assert r.random_sink_rate == pytest.approx(0.25)
    assert len({tuple(d["experts"][0]) for d in r.random}) == 3  # 3 draws from 7 candidates: all different
    rows = r.summary()
    assert [row["run"] for row in rows] == ["clean", "super experts pruned", "random 0", "random 1", "random 2"]
    # the same seed draws the same experts
    again = SE.ablate_super_experts(model, toks, random_draws=3, seed=0)
    assert [d["experts"] for d in again.random] == [d["experts"] for d in r.random]
    # pruning the super expert by hand gives the same numbers
    with SE.prune_experts(model, "0:2"):
        assert S.massive_activations(model, toks).massive == []


# --- real architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind",
    [
        ("mixtral", "HookedTransformer"),
        ("olmoe", "HookedTransformer"),
        ("qwen2_moe", "TransformerBridge"),
        ("qwen3_moe", "TransformerBridge"),
    ],
)
def test_profile_equals_an_independent_hf_computation(dirs, name, kind):
    model = lenslab.load_model(str(dirs[name]), device="cpu")
    assert type(model).__name__ == kind
    ids = torch.randint(4, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    prof = SE.profile_experts(model, ids)
    ref = _hf_reference(dirs[name], ids)
    n_cols = E + (1 if name == "qwen2_moe" else 0)
    assert prof.output_max.shape == (LAYERS, n_cols) and prof.shared == (name == "qwen2_moe")
    assert prof.expert_ids[-1] == (SE.SHARED if name == "qwen2_moe" else E - 1)
    for l in range(LAYERS):
        out_max, in_max, chan, count, flat = (torch.tensor([r[i] for r in ref[l]]) for i in range(5))
        torch.testing.assert_close(prof.output_max[l].double(), out_max.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(prof.input_max[l].double(), in_max.double(), atol=1e-5, rtol=0)
        assert prof.channel[l].tolist() == chan.tolist()
        assert prof.tokens[l].tolist() == count.tolist()
        assert (prof.sample[l] * 9 + prof.pos[l]).tolist() == flat.tolist()  # the token of each maximum
    assert int(prof.tokens[:, :E].sum()) == LAYERS * 27 * K  # every routed (token, choice) seen once
    # kurtosis as scipy computes it
    scipy_stats = pytest.importorskip("scipy.stats")
    for l in range(LAYERS):
        assert float(prof.kurtosis()[l]) == pytest.approx(
            float(scipy_stats.kurtosis(prof.output_max[l].double().numpy(), fisher=True)), rel=1e-6
        )


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_prune_zeroes_the_down_projection_and_restores_it(dirs, name):
    model = lenslab.load_model(str(dirs[name]), device="cpu")
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    before = {k: v.detach().clone() for k, v in _all_params(model).items()}
    clean = SE.profile_experts(model, ids)
    experts = [(0, 1), (1, 3)] + ([(1, SE.SHARED)] if name == "qwen2_moe" else [])
    with SE.prune_experts(model, experts) as pairs:
        assert pairs == experts
        pruned = SE.profile_experts(model, ids)
        changed = [k for k, v in _all_params(model).items() if not torch.equal(v, before[k])]
        assert changed  # something was zeroed ...
    for l, e in experts:  # ... the pruned experts output exactly 0; the router still sends them tokens
        assert pruned.value(l, e) == 0.0
    assert pruned.tokens[0].tolist() == clean.tokens[0].tolist()  # layer 0's routing is untouched
    assert pruned.value(0, 0) == pytest.approx(clean.value(0, 0), abs=1e-6)  # and its other experts too
    after = _all_params(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # restored exactly
    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with SE.prune_experts(model, [(0, 2)]):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in _all_params(model).items())


def _all_params(model) -> dict:
    """Every parameter, including the HF experts' fused 3-D weights that a bridge's state_dict drops."""
    out = {f"p.{k}": v for k, v in model.named_parameters()}
    for k, v in model.named_modules():
        for pk, pv in v.named_parameters(recurse=False):
            out[f"m.{k}.{pk}"] = pv
    return out


# --- rules ------------------------------------------------------------------------------------------
def _synthetic(values: torch.Tensor, n_layers: int, include: float = 0.75) -> SE.ExpertProfile:
    L, C = values.shape
    return SE.ExpertProfile(
        output_max=values.float(),
        input_max=values.float() / 10,
        channel=torch.zeros(L, C, dtype=torch.long),
        pos=torch.zeros(L, C, dtype=torch.long),
        sample=torch.zeros(L, C, dtype=torch.long),
        tokens=torch.ones(L, C, dtype=torch.long),
        token_labels=[["t"] * C for _ in range(L)],
        layers=list(range(L)),
        n_experts=C,
        n_layers=n_layers,
        include_layers=include,
        provenance={"model": "synthetic"},
    )


def test_rules_match_the_authors_formulas():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(16, 64, generator=g, dtype=torch.float64) + 0.5  # 1024 experts, 12 layers included
    vals[1, 5], vals[3, 17], vals[4, 2], vals[7, 40] = 2000.0, 900.0, 150.0, 95.0  # planted outliers
    vals[14, 0] = 5000.0  # the largest of all, but in an excluded layer (14 >= round(0.75 * 16) = 12)
    prof = _synthetic(vals, n_layers=16)
    assert prof.cutoff == 12
    pop = vals[:12].flatten().float().double().numpy()
    flag = lambda bar: sorted((l, e) for l in range(12) for e in range(64) if float(vals[l, e].float()) > bar)
    p995 = np.percentile(pop, 99.5)
    su = prof.super_experts("su")
    assert sorted(su.experts) == flag(max(p995, np.max(pop) // 10)) == [(1, 5), (3, 17)]  # 150 < floor(2000/10)
    assert su.experts == [(1, 5), (3, 17)]  # largest first
    assert su.values == pytest.approx([2000.0, 900.0])
    assert sorted(prof.super_experts("p99.5").experts) == flag(p995)
    # P99.5 of 768 values sits at rank 0.995 x 767 = 763.2 (0-based): the top 4 are above it
    assert prof.super_experts("p99.5").experts == [(1, 5), (3, 17), (4, 2), (7, 40)]
    assert sorted(prof.super_experts("mean+3std").experts) == flag(pop.mean() + 3 * pop.std())
    assert sorted(prof.super_experts("50xmean").experts) == flag(50 * pop.mean())
    assert sorted(prof.super_experts("su", times=100).experts) == flag(max(p995, np.max(pop) // 100))
    assert (14, 0) not in prof.super_experts("p99.5").experts
    assert (14, 0) in _synthetic(vals, n_layers=16, include=1.0).super_experts("su").experts
    # kurtosis: [0, 0, 0, x] has excess kurtosis 84/36 - 3 = -2/3
    k = _synthetic(torch.tensor([[0.0, 0.0, 0.0, 7.0]]), n_layers=1, include=1.0).kurtosis()
    assert float(k[0]) == pytest.approx(-2 / 3, rel=1e-6)
    # a small model: P99.5 lies between the two largest values, so "su" can flag only the largest
    small = _synthetic(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]), n_layers=2)
    assert small.super_experts("su").experts == [(1, 3)]
    assert small.super_experts("mean+3std").experts == []


# --- JSON, figures, errors ----------------------------------------------------------------------------
def test_json_round_trip_and_figure_export(planted, tmp_path):
    model, toks = planted
    prof = SE.profile_experts(model, toks)
    found = prof.super_experts()
    abl = SE.ablate_super_experts(model, toks, random_draws=2)
    for r in (prof, found, abl):
        back = type(r).from_json(r.to_json())
        assert back.to_dict() == r.to_dict()
        out = figures.export(r, tmp_path / f"{type(r).__name__}.json")
        assert type(r).from_json(out).to_json() == r.to_json()
        fig_json = figures.save_figure(r.figure(), tmp_path / f"{type(r).__name__}_fig.json")
        assert json.loads(fig_json.read_text())["data"]
    assert SE.SuperExperts.from_json(found.to_json()).experts == [(0, 2)]
    assert abl.to_dict()["sink_rate_pruned"] == 0.0
    fig = found.figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 2 and fig.data[0].x == ("e0", "e1", "e2", "e3")
    assert "L0e2" in fig.layout.title.text
    svg = figures.export(found, tmp_path / "super_experts.svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    svg = figures.export(abl, tmp_path / "ablation.svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    table = prof.table()
    assert table.iloc[0][["layer", "expert", "channel", "pos", "super"]].tolist() == [0, 2, 7, 0, True]
    assert int(table["super"].sum()) == 1
    with pytest.raises(LenslabError, match="not a SuperExperts"):
        SE.SuperExperts.from_json(prof.to_json())


def test_bad_input_names_the_problem(planted, tiny_model):
    model, toks = planted
    for dense in (P.planted_model(), tiny_model):
        with pytest.raises(LenslabError, match="super experts need an MoE model"):
            SE.profile_experts(dense, toks)
        with pytest.raises(LenslabError, match="super experts need an MoE model"):
            SE.super_experts(dense, toks)
        with pytest.raises(LenslabError, match="super experts need an MoE model"):
            with SE.prune_experts(dense, [(0, 0)]):
                pass
    with pytest.raises(LenslabError, match=r"out of range.*layers 0\.\.1"):
        SE.profile_experts(model, toks, layers=[5])
    with pytest.raises(LenslabError, match="out of range"):
        SE.profile_experts(model, toks, layers=-1)
    with pytest.raises(LenslabError, match="prompts is empty"):
        SE.profile_experts(model, [])
    with pytest.raises(LenslabError, match=r"include_layers .* must lie in \(0, 1\]"):
        SE.profile_experts(model, toks, include_layers=0)
    prof = SE.profile_experts(model, toks)
    with pytest.raises(LenslabError, match="did you mean 'su'"):
        prof.super_experts("sux")
    with pytest.raises(LenslabError, match="did you mean 'mean\\+3std'"):
        SE.super_experts(model, toks, rule="mean+3sd")
    with pytest.raises(LenslabError, match="no profiled layer lies below"):
        SE.profile_experts(model, toks, layers=[1], include_layers=0.5).super_experts()
    with pytest.raises(
        LenslabError, match=r"expert 4 does not exist in layer 0: it has experts 0..3 \(it has no shared"
    ):
        with SE.prune_experts(model, [(0, 4)]):
            pass
    with pytest.raises(LenslabError, match="expert -1 does not exist"):
        with SE.prune_experts(model, [(0, -1)]):
            pass
    with pytest.raises(LenslabError, match=r"layer 3 is not a MoE layer.*\[0, 1\]"):
        with SE.prune_experts(model, [(3, 0)]):
            pass
    with pytest.raises(LenslabError, match="not a \\(layer, expert\\) pair"):
        with SE.prune_experts(model, [3]):
            pass
    with pytest.raises(LenslabError, match="no super experts under rule 'mean\\+3std'"):
        SE.ablate_super_experts(model, toks, rule="mean+3std")
    with pytest.raises(LenslabError, match="at least 2 tokens"):
        SE.ablate_super_experts(model, toks[:, :1], experts=[(0, 2)])
    with pytest.raises(LenslabError, match="random_draws must be"):
        SE.ablate_super_experts(model, toks, experts=[(0, 2)], random_draws=-1)
    with pytest.raises(LenslabError, match="experts is empty"):
        SE.ablate_super_experts(model, toks, experts=[])


def test_cli_profiles_and_prunes(dirs, tmp_path, capsys):
    from lenslab.cli import main

    out = tmp_path / "se.json"
    prompts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9"]
    assert main(["sinks", "experts", "--model", str(dirs["qwen2_moe"]), "--prompts", *prompts, "--out", str(out)]) == 0
    found = SE.SuperExperts.from_json(out)
    assert found.profile.shared and found.profile.output_max.shape == (LAYERS, E + 1) and len(found) == 1
    assert "super experts (su)" in capsys.readouterr().out
    out2 = tmp_path / "prune.json"
    assert (
        main(
            [
                "sinks",
                "experts",
                "--model",
                str(dirs["qwen2_moe"]),
                "--prompts",
                *prompts,
                "--prune",
                "--experts",
                "0:1",
                "1:-1",
                "--random-draws",
                "2",
                "--absolute",
                "0",
                "--ratio",
                "5",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    abl = SE.SuperExpertAblation.from_json(out2)
    assert abl.experts == [(0, 1), (1, -1)] and abl.rule == "given" and len(abl.random) == 2
    assert "pruned [(0, 1), (1, -1)]" in capsys.readouterr().out
    assert (
        main(["sinks", "experts", "--model", str(dirs["qwen2_moe"]), "--experts", "0:9", "--prune", "--out", str(out2)])
        == 2
    )
    assert "expert 9 does not exist in layer 0" in capsys.readouterr().err


def test_cli_dense_model_errors(tiny_zoo_dir, tmp_path, capsys):
    from lenslab.cli import main

    assert main(["sinks", "experts", "--model", str(tiny_zoo_dir), "--out", str(tmp_path / "x.json")]) == 2
    assert "super experts need an MoE model" in capsys.readouterr().err


def test_sinks_page_shows_super_experts_on_moe_models(monkeypatch, dirs):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(dirs["qwen3_moe"]))
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    at.switch_page("page_sinks.py").run()
    at.text_area(key="prompt").set_value("w1 w2 w3 w4 w5 w6 w7 w8\nw9 w10 w11 w12").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "Super experts" in [h.value for h in at.subheader]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("Super experts (su: L") for t in titles)
    assert any(b.label == "JSON" for b in at.get("download_button"))
    at.button(key="se_prune").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("Pruning super experts") for t in titles)


def test_sinks_page_hides_super_experts_on_dense_models(monkeypatch, tiny_zoo_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", str(tiny_zoo_dir))
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    at.switch_page("page_sinks.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Super experts" not in [h.value for h in at.subheader]


def test_random_controls_are_drawn_from_experts_that_saw_a_token(dirs):
    model = lenslab.load_model(str(dirs["qwen3_moe"]), device="cpu")
    ids = torch.tensor([[0, 17, 33]])  # 3 tokens x top-2: some experts idle
    prof = SE.profile_experts(model, ids)
    idle = {(l, e) for l in range(LAYERS) for e in range(E) if int(prof.tokens[l, e]) == 0}
    busy = sorted({(l, e) for l in range(LAYERS) for e in range(E)} - idle)
    assert idle and len(busy) >= 3
    r = SE.ablate_super_experts(model, ids, experts=[busy[0]], random_draws=8, seed=1)
    drawn = {tuple(d["experts"][0]) for d in r.random}
    assert drawn == set(busy[1:])  # every other busy expert, and no idle one (8 draws cycle through them)
