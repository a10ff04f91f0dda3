"""Attribution methods against exact patching where they must be exact, and their invariants."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks, zoo

TOK = zoo.word_tokenizer([f"t{i}" for i in range(40)])


def _model(**kw):
    cfg = dict(n_layers=2, d_model=24, n_ctx=32, d_head=6, n_heads=3, d_vocab=len(TOK), seed=3)
    cfg.update(kw)
    m = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=TOK)
    m.cfg.model_name = "test"
    return m


@pytest.fixture(scope="module")
def linear_model():
    return _model(attn_only=True, normalization_type=None)


@pytest.fixture(scope="module")
def mlp_model():
    return _model(d_mlp=48, act_fn="gelu", normalization_type="LN")


def _exact_delta(model, task, site, **kw):
    r = circuits.patch(model, task, site, progress=False, **kw)
    return r.scores - r.baseline


@pytest.mark.parametrize("method", ["atp", "relp", "ig"])
def test_exact_where_metric_is_linear(linear_model, method):
    """Last-layer resid_post / attn_out of a model without LayerNorm: logit_diff is linear in them."""
    task = tasks.induction(linear_model, n=3, seq_len=5, seed=0)
    res = circuits.attribute(linear_model, task, method, ["resid_post", "attn_out"], steps=3, progress=False)
    for site in ("resid_post", "attn_out"):
        exact = _exact_delta(linear_model, task, site)[-1]
        assert (res[site].scores[-1] - exact).abs().max() <= 1e-4, site


def test_qk_fix_is_exact_when_metric_is_linear_in_the_pattern():
    """One attention-only layer without LayerNorm: the metric is linear in the pattern, so AtP*'s
    QK fix (exact softmax, linear afterwards) equals exact patching of queries and keys; plain AtP does not."""
    model = _model(n_layers=1, attn_only=True, normalization_type=None)
    with torch.no_grad():  # sharpen attention so the softmax saturates (where AtP fails)
        model.blocks[0].attn.W_Q.mul_(30)
        model.blocks[0].attn.W_K.mul_(30)
        model.blocks[0].attn.W_O.mul_(30)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(4, 44, (2, 3, 8), generator=gen)  # differ at every position
    task = tasks.from_tokens(clean, corrupt, torch.randint(4, 44, (3, 2), generator=gen))
    star = circuits.attribute(model, task, "atp*", ["q_by_pos", "k_by_pos", "q", "k"], graddrop=False, progress=False)
    atp = circuits.attribute(model, task, "atp", ["q_by_pos", "k"], progress=False)
    for site in ("q_by_pos", "k_by_pos", "q", "k"):
        assert (star[site].scores - _exact_delta(model, task, site)).abs().max() <= 1e-4, site
    assert _exact_delta(model, task, "q_by_pos").abs().max() > 1e-2  # the check is not vacuous
    assert (atp["q_by_pos"].scores - _exact_delta(model, task, "q_by_pos")).abs().max() > 1e-4


def test_relp_keeps_forward_values_and_differs_from_atp(mlp_model):
    from lenslab.circuits.attribution import _relp_hooks

    task = tasks.induction(mlp_model, n=2, seq_len=5, seed=2)
    with torch.no_grad():
        plain = mlp_model(task.clean_tokens)
        with mlp_model.hooks(fwd_hooks=_relp_hooks(mlp_model, None)):
            lrp = mlp_model(task.clean_tokens)
    assert (plain - lrp).abs().max() <= 1e-5
    relp = circuits.attribute(mlp_model, task, "relp", "mlp_out", progress=False)["mlp_out"].scores
    atp = circuits.attribute(mlp_model, task, "atp", "mlp_out", progress=False)["mlp_out"].scores
    assert (relp - atp).abs().max() > 1e-4
    # the last MLP output feeds the logits only through ln_final: RelP treats its scale as constant
    assert relp.shape == atp.shape == (2, task.seq_len)


def test_relp_equals_atp_without_nonlinear_rules(linear_model):
    """No LayerNorm, no MLP, AH-rule off: every RelP rule is inactive, so RelP == AtP exactly."""
    task = tasks.induction(linear_model, n=2, seq_len=5, seed=4)
    relp = circuits.attribute(linear_model, task, "relp", ["resid_pre", "z"], progress=False)
    atp = circuits.attribute(linear_model, task, "atp", ["resid_pre", "z"], progress=False)
    for site in ("resid_pre", "z"):
        assert torch.equal(relp[site].scores, atp[site].scores)


def test_ig_completeness(mlp_model):
    """IG over a whole activation sums to the exact effect of patching that whole activation."""
    task = tasks.induction(mlp_model, n=2, seq_len=4, seed=6)
    ig = circuits.attribute(mlp_model, task, "ig", "resid_pre", steps=64, progress=False)["resid_pre"].scores
    metric = tasks.get_metric("logit_diff", mlp_model, task)
    _, clean = mlp_model.run_with_cache(task.clean_tokens)
    with torch.no_grad():
        logits = mlp_model.run_with_hooks(
            task.corrupt_tokens,
            fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: clean["blocks.1.hook_resid_pre"])],
        )
    full = float(metric(logits)) - metric.corrupt_value
    assert float(ig[1].sum()) == pytest.approx(full, abs=2e-3)


def test_graddrop_scores_are_magnitudes(mlp_model):
    task = tasks.induction(mlp_model, n=2, seq_len=4, seed=0)
    star = circuits.attribute(mlp_model, task, "atp*", ["resid_pre", "z", "q"], progress=False)
    for r in star.values():
        assert (r.scores >= 0).all() and r.provenance["estimate"] == "magnitude"
    # a last-layer node has no indirect path: GradDrop reduces to |AtP| * (L-1 terms)/(L-1)
    atp = circuits.attribute(mlp_model, task, "atp", "z", progress=False)["z"].scores
    assert torch.allclose(star["z"].scores[-1], atp[-1].abs(), atol=1e-5)


def test_attribute_errors(mlp_model, linear_model):
    task = tasks.induction(mlp_model, n=2, seq_len=4, seed=0)
    with pytest.raises(lenslab.LenslabError, match="did you mean 'atp'"):
        circuits.attribute(mlp_model, task, "apt", "resid_pre")
    with pytest.raises(lenslab.LenslabError, match="did you mean 'attn_out'"):
        circuits.attribute(mlp_model, task, "atp", ["attn_outt"])
    with pytest.raises(lenslab.LenslabError, match="needs layer=N"):
        circuits.attribute(mlp_model, task, "atp", "mlp_neuron")
    with pytest.raises(lenslab.LenslabError, match="attention-only"):
        circuits.attribute(linear_model, tasks.induction(linear_model, n=2, seq_len=4), "atp", "mlp_out")
    with pytest.raises(lenslab.LenslabError, match="returned nan"):
        circuits.attribute(mlp_model, task, "atp", "resid_pre", metric=lambda l: l.mean() * float("nan"))


def test_attribute_returns_one_result_type(linear_model):
    """`attribute` returns an `AttributionResult` for one site or several: a read-only mapping
    site -> PatchResult whose table, figure and JSON cover every site."""
    from lenslab.circuits.attribution import AttributionResult

    task = tasks.induction(linear_model, n=2, seq_len=4, seed=1)
    one = circuits.attribute(linear_model, task, "atp", "resid_pre", progress=False)
    res = circuits.attribute(linear_model, task, "atp", ["resid_pre", "z_by_pos"], progress=False)
    assert isinstance(one, AttributionResult) and isinstance(res, AttributionResult)
    assert list(res) == res.sites == ["resid_pre", "z_by_pos"] and len(one) == 1 and "z_by_pos" in res
    assert torch.equal(one["resid_pre"].scores, res["resid_pre"].scores) and res.method == "atp"
    assert dict(res.items()) == {s: res[s] for s in res.sites}
    with pytest.raises(TypeError):
        res["z"] = res["resid_pre"]  # read-only
    with pytest.raises(KeyError, match="no site 'mlp_out'"):
        res["mlp_out"]
    df = res.table()
    assert df.columns[0] == "site" and len(df) == sum(r.scores.numel() for r in res.values())
    assert df[df.site == "resid_pre"]["score"].tolist() == res["resid_pre"].scores.flatten().tolist()
    assert one.figure().to_dict() == one["resid_pre"].figure().to_dict()
    fig = res.figure()
    assert len(fig.data) == 2 and [a.text for a in fig.layout.annotations][1].startswith("z_by_pos (summed over")
    torch.testing.assert_close(torch.tensor(fig.data[1].z), res["z_by_pos"].scores.sum(-1))
    back = AttributionResult.from_json(res.to_json())
    assert back.sites == res.sites and all(torch.equal(back[s].scores, res[s].scores) for s in res)
