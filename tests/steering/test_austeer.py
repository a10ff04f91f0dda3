"""AUSteer: scores against a hand computation from run_with_cache, global top-k selection,
zero strength bit-identical, and a measured push on zoo/ioi-4l."""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S

POS = ["t1 t2 t3", "t4 t5 t6 t7", "t8 t9", "t10 t11 t12", "t13 t14 t15 t16 t17"]
NEG = ["t21 t22 t23", "t24 t25", "t28 t29 t30", "t30 t31 t32", "t33 t34 t35"]
HOOKS = {
    "resid": "blocks.{L}.hook_resid_post",
    "mlp": "blocks.{L}.hook_mlp_out",
    "attn": "blocks.{L}.attn.hook_z",
    "neurons": "blocks.{L}.mlp.hook_post",
}


def _hand_beta(model, site):
    rows = []
    for L in range(model.cfg.n_layers):

        def last(p, L=L):
            _, cache = model.run_with_cache(p)
            return cache[HOOKS[site].format(L=L)][0, -1].flatten()  # [n_units]

        d = torch.stack([last(p) - last(n) for p, n in zip(POS, NEG)])  # [S, n_units]
        npos, nneg = (d > 0).sum(0).tolist(), (d < 0).sum(0).tolist()
        rows.append([(-1 if a < b else 1) * max(a, b) / len(POS) for a, b in zip(npos, nneg)])
    return torch.tensor(rows)


@pytest.mark.parametrize("site", ["resid", "mlp", "attn", "neurons"])
def test_scores_match_hand_computation(tiny_model, site):
    beta = S.austeer_scores(tiny_model, POS, NEG, site=site)
    assert beta.shape == (2, 64 if site == "neurons" else 32)  # neurons: d_mlp
    assert torch.equal(beta, _hand_beta(tiny_model, site))
    assert set((beta.abs() * 5).round().unique().tolist()) <= {3.0, 4.0, 5.0}  # S = 5: max(n+, n-) in 3..5


def test_select_exactly_k_global_top(tiny_model):
    beta = S.austeer_scores(tiny_model, POS, NEG, site="mlp")
    iv = S.austeer(tiny_model, POS, NEG, k=7, alpha=3.0, site="mlp", strength=0.5)
    chosen = [(L, u) for L, u, _ in iv.provenance["units"]]
    assert len(chosen) == 7 == iv.n_units() and len(set(chosen)) == 7
    # the global top-7 by |beta|: nothing unchosen scores higher than anything chosen
    kth = min(abs(beta[L, u].item()) for L, u in chosen)
    assert all(abs(beta[L, u].item()) <= kth for L in range(2) for u in range(32) if (L, u) not in chosen)
    # ties break layer-major, unit-minor (stable sort)
    flat = beta.flatten()
    order = sorted(range(flat.numel()), key=lambda i: -abs(flat[i].item()))[:7]
    assert chosen == [(i // 32, i % 32) for i in order]
    for e in iv.edits:
        L = int(e.hook.split(".")[1])
        assert e.op == "multiply" and e.positions == "all" and e.strength == 0.5
        assert e.hook == f"blocks.{L}.hook_mlp_out"
        torch.testing.assert_close(e.vector, 1 + 3.0 * beta[L, list(e.units)], rtol=0, atol=0)


def test_tie_breaks_choose_only_among_tied_units():
    # |beta| 1.0 at two units, 0.75 tied at five, 0.5 at one: k = 4 takes both 1.0 units and two of the five
    beta = torch.tensor([[0.75, -1.0, 0.0, -0.75, 0.5], [0.75, 0.75, 1.0, -0.75, 0.0]])
    gap = torch.tensor([[0.1, 9.0, 0.0, 0.3, 9.0], [0.2, 0.5, 1.0, 0.4, 0.0]])
    assert S.tie_report(beta, 4) == {"threshold": 0.75, "above": 2, "tied": 5, "slots": 2, "decided_by_ties": True}
    assert S.tie_report(beta, 2)["decided_by_ties"] is False
    assert S.select_units(beta, 4) == [(0, 1), (1, 2), (0, 0), (0, 3)]  # the authors' order: layer-major
    assert S.select_units(beta, 4, tie_break="gap", gap=gap) == [(0, 1), (1, 2), (1, 1), (1, 3)]
    picks = {tuple(S.select_units(beta, 4, tie_break="random", seed=s)) for s in range(30)}
    assert len(picks) > 3 and all(p[:2] in {((0, 1), (1, 2)), ((1, 2), (0, 1))} for p in picks)
    assert S.select_units(beta, 4, tie_break="random", seed=5) == S.select_units(beta, 4, tie_break="random", seed=5)
    tied = {(0, 0), (0, 3), (1, 0), (1, 1), (1, 3)}
    assert all(set(p[2:]) <= tied for p in picks)
    with pytest.raises(LenslabError, match="tie_break 'gapp' is not one of order, gap, random"):
        S.select_units(beta, 4, tie_break="gapp")
    with pytest.raises(LenslabError, match="needs gap"):
        S.select_units(beta, 4, tie_break="gap")


def test_gap_tie_break_uses_mean_abs_difference(tiny_model):
    iv = S.austeer(tiny_model, POS, NEG, k=7, alpha=3.0, site="mlp", tie_break="gap")
    from lenslab.steering.austeer import last_token_activations

    pos, neg = last_token_activations(tiny_model, POS, "mlp"), last_token_activations(tiny_model, NEG, "mlp")
    beta, gap = S.austeer_scores(tiny_model, POS, NEG, site="mlp"), (pos - neg).abs().mean(0)
    chosen = [(L, u) for L, u, _ in iv.provenance["units"]]
    flat, g = beta.flatten(), gap.flatten()
    order = sorted(range(flat.numel()), key=lambda i: (-abs(flat[i].item()), -g[i].item(), i))[:7]
    assert chosen == [(i // 32, i % 32) for i in order]
    assert iv.provenance["tie_break"] == "gap" and iv.provenance["ties"] == S.tie_report(beta, 7)


def test_steering_is_x_times_one_plus_alpha_beta(tiny_model):
    iv = S.austeer(tiny_model, POS, NEG, k=5, alpha=2.0, site="resid", strength=0.5)
    beta = S.austeer_scores(tiny_model, POS, NEG, site="resid")
    toks = tiny_model.to_tokens("t1 t2 t3 t4")
    fwd = []
    for e in iv.edits:
        L, u = int(e.hook.split(".")[1]), list(e.units)

        def hand(act, hook, L=L, u=u):  # act: [batch, pos, d_model]
            act = act.clone()
            act[..., u] = act[..., u] * (1 + 0.5 * 2.0 * beta[L, u])
            return act

        fwd.append((e.hook, hand))
    with torch.no_grad():
        want = tiny_model.run_with_hooks(toks, fwd_hooks=fwd)
        with S.apply(tiny_model, iv):
            got = tiny_model(toks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_zero_alpha_or_strength_is_bit_identical(tiny_model):
    toks = tiny_model.to_tokens("t1 t2 t3 t4 t5")
    with torch.no_grad():
        base = tiny_model(toks)
        for iv in (
            S.austeer(tiny_model, POS, NEG, k=10, alpha=0.0, site="attn"),
            S.austeer(tiny_model, POS, NEG, k=10, alpha=50.0, site="attn").with_strength(0.0),
        ):
            with S.apply(tiny_model, iv):
                assert torch.equal(tiny_model(toks), base)
        with S.apply(tiny_model, S.austeer(tiny_model, POS, NEG, k=10, alpha=50.0, site="attn")):
            assert not torch.equal(tiny_model(toks), base)


def test_bad_arguments(tiny_model):
    with pytest.raises(LenslabError, match="did you mean 'resid'"):
        S.austeer(tiny_model, POS, NEG, site="resd")
    with pytest.raises(LenslabError, match="in pairs"):
        S.austeer(tiny_model, POS, NEG[:3])
    with pytest.raises(LenslabError, match="k must be a positive integer"):
        S.austeer(tiny_model, POS, NEG, k=0)
    with pytest.raises(LenslabError, match="alpha must be a finite"):
        S.austeer(tiny_model, POS, NEG, alpha=float("nan"))
    with pytest.raises(LenslabError, match="every AUSteer score is 0"):
        S.austeer(tiny_model, POS, POS)


@pytest.mark.slow
def test_austeer_pushes_ioi_towards_positive_name():
    """zoo/ioi-4l: positive prompts answer Mary, negative ones (names swapped) answer John.

    Steering 16 residual units (alpha 5) on a held-out John-answer prompt raises
    logit(Mary) - logit(John) from -23.6 to -7.3 (measured +16.4). Multiplicative steering only
    rescales what is there: the gap closes but John stays the top answer (p(Mary) stays ~0).
    """
    torch.set_num_threads(1)
    model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    t = [
        "When {a} and {b} went to the store, {b} gave a drink to",
        "When {a} and {b} went to the office, {b} gave a book to",
        "When {a} and {b} went to the garden, {b} gave a cup to",
        "When {a} and {b} went to the school, {b} gave a map to",
    ]
    pos = [x.format(a="Mary", b="John") for x in t]
    neg = [x.format(a="John", b="Mary") for x in t]
    user = model.to_tokens("When John and Mary went to the park, Mary gave a ball to")  # -> John
    mary, john = (model.to_tokens(w, prepend_bos=False)[0, 0].item() for w in ("Mary", "John"))
    iv = S.austeer(model, pos, neg, k=16, alpha=5.0, site="resid")
    assert iv.n_units() == 16
    with torch.no_grad():
        before = model(user)[0, -1].log_softmax(-1)
        with S.apply(model, iv):
            after = model(user)[0, -1].log_softmax(-1)
        with S.apply(model, iv.with_strength(0.5)):
            half = model(user)[0, -1].log_softmax(-1)
    gap = lambda lp: (lp[mary] - lp[john]).item()
    assert gap(before) < -20
    assert gap(after) - gap(before) > 10  # measured 16.4
    assert gap(before) < gap(half) < gap(after)  # strength interpolates


def test_one_site_vocabulary(tiny_model):
    """AUSteer's names are spellings of the registry's sites, whose names work too; steering's
    SITES is the registry circuits reads."""
    from lenslab import circuits, sites

    assert S.SITES is sites.SITES is circuits.SITES
    for au, name in S.AU_SITES.items():
        assert torch.equal(
            S.austeer_scores(tiny_model, POS, NEG, site=au), S.austeer_scores(tiny_model, POS, NEG, site=name)
        )
    assert S.hook_name(1, "z") == "blocks.1.attn.hook_z" and S.hook_name(0, "mlp_neuron") == "blocks.0.mlp.hook_post"
    with pytest.raises(LenslabError, match="site 'pattern' is not one of attn, mlp, resid, neurons"):
        S.austeer_scores(tiny_model, POS, NEG, site="pattern")
