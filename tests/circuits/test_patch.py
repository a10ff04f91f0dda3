"""Exact activation patching: equal to TransformerLens `patching`, batch invariant, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

import lenslab
from lenslab import circuits, tasks
from lenslab.results import PatchResult

TL = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "resid_mid": patching.get_act_patch_resid_mid,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
    "z": patching.get_act_patch_attn_head_out_all_pos,
    "z_by_pos": patching.get_act_patch_attn_head_out_by_pos,
    "q": patching.get_act_patch_attn_head_q_all_pos,
    "k": patching.get_act_patch_attn_head_k_all_pos,
    "v": patching.get_act_patch_attn_head_v_all_pos,
    "q_by_pos": patching.get_act_patch_attn_head_q_by_pos,
    "k_by_pos": patching.get_act_patch_attn_head_k_by_pos,
    "v_by_pos": patching.get_act_patch_attn_head_v_by_pos,
    "pattern": patching.get_act_patch_attn_head_pattern_all_pos,
    "pattern_by_pos": patching.get_act_patch_attn_head_pattern_by_pos,
}
TOL = 1e-4  # float32, as the issue states


@pytest.fixture(scope="module")
def task(tiny_model):
    return tasks.induction(tiny_model, n=3, seq_len=5, seed=1)


@pytest.mark.parametrize("site", sorted(TL))
def test_equals_transformer_lens(tiny_model, task, site):
    metric = tasks.get_metric("logit_diff", tiny_model, task)
    with torch.no_grad():
        _, clean_cache = tiny_model.run_with_cache(task.clean_tokens)
        ref = TL[site](tiny_model, task.corrupt_tokens, clean_cache, metric)
    ours = circuits.patch(tiny_model, task, site, progress=False)
    assert ours.scores.shape == ref.shape
    assert (ours.scores - ref.cpu()).abs().max() <= TOL
    assert ours.method == "exact" and ours.clean_value == pytest.approx(metric.clean_value)


def test_noising_equals_transformer_lens_with_roles_swapped(tiny_model, task):
    metric = tasks.get_metric("logit_diff", tiny_model, task)
    with torch.no_grad():
        _, corrupt_cache = tiny_model.run_with_cache(task.corrupt_tokens)
        ref = patching.get_act_patch_resid_pre(tiny_model, task.clean_tokens, corrupt_cache, metric)
    ours = circuits.patch(tiny_model, task, "resid_pre", direction="noise", progress=False)
    assert (ours.scores - ref).abs().max() <= TOL
    assert ours.baseline == pytest.approx(metric.clean_value)


def test_neurons_match_manual_patch(tiny_model, task):
    res = circuits.patch(tiny_model, task, "mlp_neuron", layer=1, progress=False)
    assert res.axes == ("neuron",) and res.scores.shape == (tiny_model.cfg.d_mlp,)
    metric = tasks.get_metric("logit_diff", tiny_model, task)
    _, cache = tiny_model.run_with_cache(task.clean_tokens)
    src = cache["blocks.1.mlp.hook_post"]

    def hook(act, hook):
        act = act.clone()
        act[..., 7] = src[..., 7]
        return act

    with torch.no_grad():
        logits = tiny_model.run_with_hooks(task.corrupt_tokens, fwd_hooks=[("blocks.1.mlp.hook_post", hook)])
    assert float(res.scores[7]) == pytest.approx(float(metric(logits)), abs=TOL)


@pytest.mark.parametrize("site", ["resid_pre", "z_by_pos", "pattern"])
def test_batch_invariance(tiny_model, site):
    """The batch score equals the mean of the scores computed prompt by prompt (logit_diff is a batch mean)."""
    task = tasks.induction(tiny_model, n=4, seq_len=4, seed=5)
    batch = circuits.patch(tiny_model, task, site, progress=False).scores
    single = torch.stack([circuits.patch(tiny_model, task.subset([i]), site, progress=False).scores for i in range(4)])
    assert (batch - single.mean(0)).abs().max() <= TOL


def test_layers_subset_and_progress_callback(tiny_model, task):
    seen = []
    res = circuits.patch(tiny_model, task, "attn_out", layers=[1], progress=lambda d, t: seen.append((d, t)))
    full = circuits.patch(tiny_model, task, "attn_out", progress=False)
    assert res.scores.shape == (1, task.seq_len) and res.labels["layer"] == ["L1"]
    assert torch.allclose(res.scores[0], full.scores[1])
    assert seen[-1] == (task.seq_len, task.seq_len)


def test_result_json_and_dataframe_roundtrip(tiny_model, task, tmp_path):
    res = circuits.patch(tiny_model, task, "z", progress=False)
    back = PatchResult.from_json(res.to_json(tmp_path / "r.json"))
    assert torch.equal(back.scores, res.scores) and back.labels == res.labels and back.axes == ("layer", "head")
    assert back.provenance["model"] == res.provenance["model"] and back.provenance["task"] == "induction"
    assert PatchResult.from_json(tmp_path / "r.json").site == "z"
    df = res.table()
    assert len(df) == res.scores.numel() and df["score"].tolist() == pytest.approx(res.scores.flatten().tolist())
    norm = res.normalized()
    assert torch.allclose(norm, (res.scores - res.corrupt_value) / (res.clean_value - res.corrupt_value))


def test_bad_input_errors(tiny_model, task):
    with pytest.raises(lenslab.LenslabError, match="did you mean 'resid_pre'"):
        circuits.patch(tiny_model, task, "resid_pree")
    with pytest.raises(lenslab.LenslabError, match="layer 5 is out of range: the model has 2 layers"):
        circuits.patch(tiny_model, task, "resid_pre", layers=[5])
    with pytest.raises(lenslab.LenslabError, match="needs layer=N"):
        circuits.patch(tiny_model, task, "mlp_neuron")
    with pytest.raises(lenslab.LenslabError, match="direction"):
        circuits.patch(tiny_model, task, "resid_pre", direction="sideways")
    with pytest.raises(lenslab.LenslabError, match="returned nan"):
        circuits.patch(tiny_model, task, "resid_pre", metric=lambda logits: logits.mean() * float("nan"))
    with pytest.raises(lenslab.LenslabError, match="engine 'warp' is not available"):
        circuits.patch(tiny_model, task, "resid_pre", engine="warp")
    big = tasks.from_tokens(task.clean_tokens, task.corrupt_tokens, torch.full((3, 2), 10_000))
    with pytest.raises(lenslab.LenslabError, match="was the task built for another model"):
        circuits.patch(tiny_model, big, "resid_pre")
    with pytest.raises(lenslab.LenslabError, match="same .batch, pos. shape"):
        tasks.from_tokens(task.clean_tokens, task.corrupt_tokens[:, :-1], task.answer_tokens)
