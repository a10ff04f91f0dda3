"""The activation-maxima atlas: the planted maxima found exactly, every hook equal to a direct
run_with_cache computation (planted model, zoo models, Hugging Face tiny models of both TransformerLens
classes), the INT8 check against an independent implementation of the paper's, skipped hooks,
JSON, figures and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import lenslab
from lenslab import LenslabError, tasks, zoo
from lenslab.probes import atlas as A
from lenslab.probes import sinks
from lenslab.zoo import planted as P

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5  # activations are float32; the atlas and run_with_cache compute the same numbers


@pytest.fixture(scope="module")
def planted():
    model, toks = P.planted_atlas_model(), P.planted_atlas_tokens()
    return model, toks, A.activation_atlas(model, toks)


def _cache(model, prompts, hooks):
    """Each hook's activations per prompt batch, as the atlas orders the prompts (sinks.prompt_batches)."""
    out = {h: [] for h in hooks}
    for b in sinks.prompt_batches(model, prompts):
        with torch.no_grad():
            _, cache = model.run_with_cache(b, names_filter=lambda n: n in out)
        for h in out:
            out[h].append(cache[h].float().cpu())
    return out


def paper_int8(x: torch.Tensor) -> dict:
    """quant_sanity_check.py's ErrorCollector (policy max_abs) on the signed values, float32 as there."""
    vals = x.float().flatten()
    threshold = float(vals.abs().max())
    scale = threshold / 127
    q = torch.round(vals.clamp(-threshold, threshold) / scale).clamp(-127, 127)
    err = q * scale - vals
    n = vals.numel()
    rms, rmse = math.sqrt(float((vals * vals).sum()) / n), math.sqrt(float((err * err).sum()) / n)
    return {"rel_rmse": rmse / rms, "rel_mae": float(err.abs().sum()) / float(vals.abs().sum())}


def locate(batches, sample: int) -> tuple[int, int]:
    """(batch index, row in it) of a sample index of the atlas (rows in prompt_batches order)."""
    start = 0
    for bi, b in enumerate(batches):
        if sample < start + b.shape[0]:
            return bi, sample - start
        start += b.shape[0]
    raise AssertionError(f"sample {sample} out of range")


def check_against_cache(model, prompts, atlas: A.AtlasResult) -> int:
    """Every non-routed hook of `atlas` against run_with_cache: max |a|, its place and signed value, the
    median, the entry count, the INT8 errors. Returns how many hooks were checked."""
    plain = [h for h in atlas.hooks if h["kind"] != "expert_gate"]
    batches = sinks.prompt_batches(model, prompts)
    acts = _cache(model, prompts, [h["hook"] for h in plain])
    for h in plain:
        # [batch, pos, channel]; a bridge MoE's experts_out comes flat, [batch * pos, channel]
        per = [a.reshape(b.shape[0], b.shape[1], -1) for a, b in zip(acts[h["hook"]], batches)]
        flat = torch.cat([x.flatten() for x in per])
        assert h["n"] == flat.numel() and h["width"] == per[0].shape[-1], h["hook"]
        assert h["max_abs"] == pytest.approx(float(flat.abs().max()), abs=TOL), h["hook"]
        assert h["median_abs"] == pytest.approx(float(np.median(flat.abs().numpy())), rel=1e-6, abs=1e-9), h["hook"]
        bi, row = locate(batches, h["sample"])
        assert float(per[bi][row, h["pos"], h["channel"]]) == pytest.approx(h["value"], abs=TOL), h["hook"]
        assert abs(h["value"]) == h["max_abs"]
        ref = paper_int8(flat)
        assert h["int8_rel_rmse"] == pytest.approx(ref["rel_rmse"], rel=1e-4), h["hook"]
        assert h["int8_rel_mae"] == pytest.approx(ref["rel_mae"], rel=1e-4), h["hook"]
    return len(plain)


# --- the planted model ------------------------------------------------------------------------------
def test_planted_maxima_are_found_exactly(planted):
    model, toks, atlas = planted
    resid_at, mlp_at = P.PLANTED_ATLAS["resid_at"], P.PLANTED_ATLAS["mlp_at"]
    rc, mc, unit = P.PLANTED_ATLAS["resid_channel"], P.PLANTED_ATLAS["mlp_channel"], P.PLANTED_ATLAS["mlp_unit"]
    expected = {
        "hook_embed": (*resid_at, rc),
        "blocks.0.hook_resid_pre": (*resid_at, rc),
        "blocks.1.hook_resid_pre": (*resid_at, rc),
        "blocks.1.hook_resid_post": (*resid_at, rc),
        "blocks.1.hook_mlp_out": (*mlp_at, mc),
        "blocks.1.mlp.hook_pre": (*mlp_at, unit),
        "blocks.1.mlp.hook_pre_linear": (*mlp_at, unit),
    }
    _, cache = model.run_with_cache(toks)
    for hook, (s, p, c) in expected.items():
        row = atlas.hook(hook)
        assert (row["sample"], row["pos"], row["channel"]) == (s, p, c), hook
        direct = cache[hook]
        assert row["value"] == pytest.approx(float(direct[s, p, c]), abs=TOL)
        assert row["max_abs"] == pytest.approx(float(direct.abs().max()), abs=TOL)
        # planted, not a coincidence: at least 5x the next largest entry of that hook (the final
        # residual stream carries both plants: there, past the second one)
        n_plants = 2 if hook == "blocks.1.hook_resid_post" else 1
        nxt = direct.abs().flatten().topk(n_plants + 1).values
        assert row["max_abs"] > 5 * float(nxt[n_plants]), hook
        assert [e["abs"] for e in row["top"][: n_plants + 1]] == pytest.approx(nxt.tolist(), abs=TOL)
    second = atlas.hook("blocks.1.hook_resid_post")["top"][1]
    assert (second["sample"], second["pos"], second["channel"]) == (*mlp_at, mc)
    assert atlas.hook("hook_embed")["value"] == pytest.approx(P.PLANTED_ATLAS["resid_value"], abs=TOL)
    assert atlas.hook("blocks.1.hook_mlp_out")["value"] == pytest.approx(314.518, abs=1e-3)
    g = atlas.global_max()
    assert (g["hook"], g["sample"], g["pos"], g["channel"], g["token"]) == ("hook_embed", *resid_at, rc, "3")
    assert atlas.global_max(kinds=["mlp_out"])["hook"] == "blocks.1.hook_mlp_out"
    # the gates are not stream kinds: never the global maximum, even where larger than a stream hook
    assert atlas.global_max(kinds=["gate"])["hook"] == "blocks.1.mlp.hook_pre"
    assert check_against_cache(model, toks, atlas) == len(atlas.hooks) == 14


def test_hook_set_and_skips_on_the_planted_model(planted):
    _, _, atlas = planted
    kinds = [h["kind"] for h in atlas.hooks]
    assert kinds.count("resid_pre") == 2 and kinds.count("resid_post") == 1  # 0_pre, 1_pre, final_post
    assert {
        k: kinds.count(k) for k in ("embed", "pos_embed", "attn_out", "mlp_out", "gate", "gate_linear", "ln_final")
    } == {
        "embed": 1,
        "pos_embed": 1,
        "attn_out": 2,
        "mlp_out": 2,
        "gate": 2,
        "gate_linear": 2,
        "ln_final": 1,
    }
    assert atlas.hook("unembed.hook_in")["kind"] == "ln_final"
    assert {s["kind"]: s["reason"] for s in atlas.skipped} == {
        "expert_gate": "a dense model: no experts",
        "experts_out": "a dense model: no experts",
    }
    hooks, skipped = A.atlas_hooks(P.planted_model())  # attention-only, no LayerNorm
    assert {s["kind"] for s in skipped} >= {"ln_final"}
    assert not any(h.kind in ("gate", "ln_final") for h in hooks)
    reasons = {s["kind"]: s["reason"] for s in skipped}
    assert reasons["mlp_out"] == reasons["gate"] == "an attention-only model: no MLPs"
    assert reasons["ln_final"] == "the model has no final norm (ln_final)"


def test_ln_final_is_the_norm_output_with_its_weight(planted):
    """The atlas reads the final norm's output (as the paper hooks the norm module), which is
    ln_final.hook_normalized times its weight plus its bias."""
    model, toks, atlas = planted
    _, cache = model.run_with_cache(toks)
    out = cache["ln_final.hook_normalized"] * model.ln_final.w.detach() + model.ln_final.b.detach()
    assert atlas.hook("unembed.hook_in")["max_abs"] == pytest.approx(float(out.abs().max()), abs=TOL)
    assert float(out.abs().max()) != pytest.approx(float(cache["ln_final.hook_normalized"].abs().max()), rel=1e-3)


def test_int8_check_and_its_correlation(planted):
    _, _, atlas = planted
    # the planted 500 leaves the embedding's typical entries on one INT8 step (500 / 127 = 3.9): most round to 0
    embed = atlas.hook("hook_embed")
    assert embed["int8_rel_mae"] > 0.1 and embed["int8_rel_rmse"] < 0.05
    assert embed["int8_sqnr_db"] == pytest.approx(-20 * math.log10(embed["int8_rel_rmse"]), rel=1e-9)
    xs = [h["max_abs"] for h in atlas.hooks]
    ys = [h["int8_rel_rmse"] for h in atlas.hooks]
    c = atlas.correlation
    assert c["n_hooks"] == len(atlas.hooks) == 14
    assert c["pearson"] == pytest.approx(stats.pearsonr(xs, ys).statistic, abs=1e-12)
    assert c["spearman"] == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert c["pearson"] == pytest.approx(0.3961, abs=1e-4) and c["spearman"] == pytest.approx(0.6645, abs=1e-4)
    # the error of symmetric absmax INT8 depends on |a| only, and a tensor on the INT8 grid has none
    q = A.int8_error(torch.tensor([0.0, 1.0, 2.0, 127.0]))
    assert q["rel_rmse"] == 0.0 and q["sqnr_db"] is None and q["clip_rate"] == 0.0
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    assert A.int8_error(x.abs())["rel_rmse"] == pytest.approx(paper_int8(x)["rel_rmse"], rel=1e-5)
    clipped = A.int8_error(x.abs(), threshold=1.0)
    assert clipped["clip_rate"] == pytest.approx(float((x.abs() > 1.0).float().mean()))


# --- zoo, Hugging Face (HookedTransformer and TransformerBridge), MoE ----------------------------------
@pytest.mark.parametrize("name", ["zoo/ioi-4l", "zoo/moe-refusal"])
def test_zoo_models_match_run_with_cache(zoo_models, name):
    model = zoo_models(name)
    prompts = [zoo.default_prompts(name).prompt, "When Mary went home", "user : sort apple river assistant :"]
    atlas = A.activation_atlas(model, prompts, batch_size=1)
    assert check_against_cache(model, prompts, atlas) == {"zoo/ioi-4l": 16, "zoo/moe-refusal": 15}[name]
    if name == "zoo/moe-refusal":
        check_expert_gates(model, prompts, atlas)
        assert any(
            s["kind"] == "experts_out" and "no hook on the experts' outputs" in s["reason"] for s in atlas.skipped
        )
    else:
        assert any(s["kind"] == "gate" and "not gated" in s["reason"] for s in atlas.skipped)


def check_expert_gates(model, prompts, atlas):
    """Routed rows: each expert's maximum equals the hook's, and the place it reports is right: the
    expert's gate projection of the layer's normalised input at that (sample, position) is the value."""
    gates = [h for h in atlas.hooks if h["kind"] == "expert_gate"]
    assert gates
    acts = _cache(
        model,
        prompts,
        [h["hook"] for h in gates] + [f"blocks.{l}.ln2.hook_normalized" for l in range(model.cfg.n_layers)],
    )
    batches = sinks.prompt_batches(model, prompts)
    for h in gates:
        assert h["max_abs"] == pytest.approx(max(float(a.abs().max()) for a in acts[h["hook"]] if a.numel()), abs=TOL)
        l, e = h["layer"], h["expert"]
        bi, row = locate(batches, h["sample"])
        x = acts[f"blocks.{l}.ln2.hook_normalized"][bi][row, h["pos"]]
        x = x * model.blocks[l].ln2.w.detach().float()
        gate = model.blocks[l].mlp.experts[e].W_gate.weight.detach().float()[h["channel"]]
        assert float(x @ gate) == pytest.approx(h["value"], abs=1e-4)


@pytest.mark.parametrize("arch", ["gemma", "qwen2_moe", "mixtral", "llama"])
def test_hugging_face_models_of_both_classes(tiny_moe_dir, arch):
    """A dense gated bridge (Gemma), a MoE bridge (Qwen2-MoE: experts_out), a MoE HookedTransformer
    (Mixtral: expert_gate) and a dense HookedTransformer (Llama): the same hooks, each equal to run_with_cache."""
    model = lenslab.load_model(str(tiny_moe_dir(arch)), device="cpu")
    toks = torch.randint(4, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    atlas = A.activation_atlas(model, toks)
    kinds = {h["kind"] for h in atlas.hooks}
    assert {"embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "ln_final"} <= kinds
    reasons = {s["kind"]: s["reason"] for s in atlas.skipped}
    expected = {
        "gemma": ({"gate", "gate_linear"}, "did not fire on a forward pass"),
        "qwen2_moe": ({"experts_out"}, "did not fire on a forward pass"),
        "mixtral": ({"expert_gate"}, "not a hook of this model (hook_pos_embed)"),
        "llama": ({"gate", "gate_linear"}, "not a hook of this model (hook_pos_embed)"),
    }[arch]
    assert expected[0] <= kinds and reasons["pos_embed"] == expected[1]  # rotary models: no learned positions
    assert check_against_cache(model, toks, atlas) == {"gemma": 13, "qwen2_moe": 11, "mixtral": 9, "llama": 13}[arch]
    if arch == "mixtral":
        check_expert_gates(model, toks, atlas)
    if arch == "qwen2_moe":
        assert reasons["expert_gate"] == "the bridge exposes no per-expert activations"


# --- the result ------------------------------------------------------------------------------------
def test_json_round_trip_table_and_figures(planted, tmp_path):
    _, _, atlas = planted
    back = A.AtlasResult.from_json(atlas.to_json())
    assert json.loads(back.to_json()) == json.loads(atlas.to_json())
    df = atlas.table()
    assert list(df.columns) == list(A.ROW_FIELDS) and len(df) == 14
    layers = atlas.figure()
    assert {t.name for t in layers.data} == {k for k in A.KINDS if k not in ("expert_gate", "experts_out")}
    resid = next(t for t in layers.data if t.name == "resid_pre")
    assert list(resid.x) == [0, 1]
    top = atlas.figure(view="top", n=5)
    z = top.data[0].z
    rows, cols = list(top.data[0].y), list(top.data[0].x)
    assert z[rows.index("s1 5:3")][cols.index("c5")] == pytest.approx(500.0)
    assert z[rows.index("s2 8:4")][cols.index("c11")] == pytest.approx(314.518, abs=1e-3)
    entries = atlas.top_entries(n=2)
    assert [(e["sample"], e["pos"], e["channel"]) for e in entries] == [(1, 5, 5), (2, 8, 11)]
    assert len(atlas.figure(view="int8").data) == 9
    other = A.activation_atlas(P.planted_atlas_model(seed=1), P.planted_atlas_tokens())
    both = A.AtlasResult.compare([atlas, other], relative_depth=True)
    assert [t.name for t in both.data] == ["planted-atlas-2l", "planted-atlas-2l"]
    assert list(both.data[0].x) == [-0.5, 0.0, 0.5, 1.0] and max(both.data[0].y) == pytest.approx(500.0)
    with pytest.raises(LenslabError, match="view 'heat' is not one of"):
        atlas.figure(view="heat")


def test_bad_input_is_a_clear_error(planted):
    model, toks, atlas = planted
    with pytest.raises(LenslabError, match="hook kind 'resid' is not one of .*did you mean"):
        A.activation_atlas(model, toks, kinds=["resid"])
    with pytest.raises(LenslabError, match="top_k must be a positive integer"):
        A.activation_atlas(model, toks, top_k=0)
    with pytest.raises(LenslabError, match="batch_size must be a positive integer"):
        A.activation_atlas(model, toks, batch_size=0)
    with pytest.raises(LenslabError, match="prompts is empty"):
        A.activation_atlas(model, [])
    with pytest.raises(LenslabError, match="none of the kinds \\['gate'\\] has a hook"):
        A.activation_atlas(P.planted_model(), P.planted_tokens(), kinds=["gate"])
    with pytest.raises(LenslabError, match="hook 'blocks.9.hook_mlp_out' is not in this atlas"):
        atlas.hook("blocks.9.hook_mlp_out")
    only = A.activation_atlas(model, toks, kinds="gate")
    assert {h["kind"] for h in only.hooks} == {"gate"}
    with pytest.raises(LenslabError, match="measured no hook of the kinds"):
        only.global_max()


def test_documented_zoo_numbers(zoo_models, doc_numbers):
    """docs/norms.md's table of the zoo models, measured again."""
    text = (ROOT / "docs" / "norms.md").read_text()
    rows = doc_numbers.table(text, "| model | hooks (skipped)")
    assert [r[0] for r in rows] == ["zoo/ioi-4l", "zoo/moe-refusal"]
    for r in rows:
        model = zoo_models(r[0])
        if r[0] == "zoo/ioi-4l":
            prompts = tasks.ioi(model, n=16).clean_tokens
        else:
            sets = zoo.prompt_sets(r[0])
            prompts = sets["target"] + sets["other"]
        a = A.activation_atlas(model, prompts)
        assert r[1] == f"{len(a.hooks)} ({len(a.skipped)})"
        g = a.global_max()
        assert doc_numbers.close(g["max_abs"], r[2]), (r[0], g["max_abs"])
        assert r[3] == f'`{g["hook"]}`, "{g["token"]}", channel {g["channel"]}'
        assert doc_numbers.close(g["ratio"], r[4])
        top = max(a.hooks, key=lambda h: h["ratio"])
        value, hook = r[5].split(" (")
        assert doc_numbers.close(top["ratio"], value) and hook == f"`{top['hook']}`)"
        lo, hi = r[6].split("–")
        rmse = [h["int8_rel_rmse"] for h in a.hooks]
        assert doc_numbers.close(min(rmse), lo) and doc_numbers.close(max(rmse), hi)
        assert doc_numbers.close(a.correlation["pearson"], r[7])
        assert doc_numbers.close(a.correlation["spearman"], r[8])


def test_documented_planted_numbers(planted, doc_numbers):
    """docs/norms.md's planted-model table and INT8 sentence, from this atlas."""
    _, _, atlas = planted
    text = (ROOT / "docs" / "norms.md").read_text()
    rows = doc_numbers.table(text, "| hook | found (sample, position, channel) | value |")
    place = lambda h: f"({h['sample']}, {h['pos']}, {h['channel']})"
    resid = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert rows[0][0] == ", ".join(f"`{h}`" for h in resid) and rows[0][1] == place(atlas.hook(resid[0]))
    for h, printed in zip(resid, rows[0][2].split(", ")):
        assert doc_numbers.close(atlas.hook(h)["value"], printed), h
    mlp = atlas.hook("blocks.1.hook_mlp_out")
    assert rows[1][1] == place(mlp)
    value, nxt = re.fullmatch(r"(\S+) \(next largest entry (\S+)\)", rows[1][2]).groups()
    assert doc_numbers.close(mlp["value"], value) and doc_numbers.close(mlp["top"][1]["abs"], nxt)
    gate = atlas.hook("blocks.1.mlp.hook_pre")
    assert rows[2][1] == place(gate) and doc_numbers.close(gate["value"], rows[2][2])
    assert atlas.hook("blocks.1.mlp.hook_pre_linear")["value"] == pytest.approx(gate["value"], abs=TOL)
    embed = atlas.hook("hook_embed")
    assert f"(relative MAE {embed['int8_rel_mae']:.3f})" in " ".join(text.split())
    assert f"stays at {embed['int8_rel_rmse']:.4f}" in text
