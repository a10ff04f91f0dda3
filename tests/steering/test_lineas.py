"""LinEAS (lenslab.steering.lineas): loss, proximal step, identity init, end-to-end fit, presets."""

from __future__ import annotations

import math

import pytest
import torch

import lenslab
from lenslab import steering as S
from lenslab._errors import LenslabError
from lenslab.steering.lineas import _pooled, _tokenize

SRC = ["t1 t2 t3", "t4 t5 t6 t7", "t8 t9", "t10 t11 t12", "t3 t1", "t2 t2 t5 t9 t1", "t7 t6", "t5 t4 t3"]
TGT = ["t40 t41 t42", "t43 t44", "t45 t46 t47 t48", "t50 t51", "t52 t53 t54", "t60 t61 t62"]  # 6: unequal counts
QUIET = {"progress": False}


def _logits(model, tokens, iv=None):
    with torch.no_grad(), S.apply(model, iv):
        return model(tokens)


# --- the loss ---------------------------------------------------------------------------------


def test_wasserstein_1d_equals_sorting_by_hand():
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 2 + 1
    want = 0.0
    for k in range(5):  # per unit: sort both columns, mean squared difference; then mean over units
        zs, vs = sorted(z[:, k].tolist()), sorted(v[:, k].tolist())
        want += sum((a - b) ** 2 for a, b in zip(zs, vs)) / 6
    want /= 5
    assert float(S.wasserstein_1d(z, v)) == pytest.approx(want, rel=1e-6)
    # Unequal counts by hand: quantile functions of {0, 1} and {0, 1, 2} differ by 1 on
    # [1/3, 1/2) and on [2/3, 1): W2^2 = 1/6 + 1/3 = 1/2.
    assert float(S.wasserstein_1d(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0], [2.0]]))) == pytest.approx(
        0.5, abs=1e-7
    )
    # Unequal counts in general: each sample repeated to lcm(n, m) rows gives equal counts.
    z4, v6 = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    rep = ((z4.repeat_interleave(3, 0).sort(0).values - v6.repeat_interleave(2, 0).sort(0).values) ** 2).mean()
    assert float(S.wasserstein_1d(z4, v6)) == pytest.approx(float(rep), rel=1e-6)
    # Not scipy's wasserstein_distance, which is W1 (mean |sorted difference|, unsquared).
    stats = pytest.importorskip("scipy.stats")
    w1 = stats.wasserstein_distance(z[:, 0].numpy(), v[:, 0].numpy())
    assert w1 == pytest.approx(float((z[:, 0].sort().values - v[:, 0].sort().values).abs().mean()), rel=1e-5)
    assert abs(float(S.wasserstein_1d(z[:, :1], v[:, :1])) - w1) > 0.1


def test_wasserstein_1d_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: S.wasserstein_1d(x, v), (z,), eps=1e-6, atol=1e-6)


# --- the proximal step --------------------------------------------------------------------------
# Oracle: the math of apple/ml-lineas `lineas/utils/proximal.py`, rebuilt from its pieces:
# L1.prox(x, t) = sign(x) relu(|x| - t); L2.prox(x, t) = relu(1 - t / ||x||) x (NaN -> 0);
# PostComposition(f, alpha).prox(v, t) = f.prox(v, t * alpha);
# PreComposition(f, alpha=1, b).prox(v, t) = (f.prox(alpha v + b, t alpha^2) - b) / alpha;
# SparseGroupLasso(lam_l1, lam_l2).prox(groups, t): per group L1 with alpha=lam_l1, then L2 with
# alpha=lam_l2 * sqrt(dim); apply_sparse_group_lasso wraps the weight prox in PreComposition(b=-1);
# apply_l1 uses PostComposition(L1, lam) (inside PreComposition(b=-1) for the weights).


def _ref_l1(x, t):
    return torch.sign(x) * torch.relu(torch.abs(x) - t)


def _ref_l2(x, t):
    norm = torch.linalg.norm(x, ord=2, dim=-1, keepdim=True)
    out = torch.relu(1.0 - (t / norm)) * x
    return torch.where(torch.isnan(out), 0.0, out)


def _ref_sgl(groups, t, lam_l1, lam_l2):
    return [_ref_l2(_ref_l1(x, t * lam_l1), t * lam_l2 * math.sqrt(x.shape[-1])) for x in groups]


def _ref_pre(prox, groups, t, b, alpha=1.0):
    out = prox([alpha * x + b for x in groups], t * alpha**2)
    return [(x - b) / alpha for x in out]


def test_proximal_step_equals_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    dims = (5, 7, 3, 9)
    ws = [
        1 + 0.3 * torch.randn(1, d, generator=g) * (0.05 if i == 2 else 1) for i, d in enumerate(dims)
    ]  # hook 2: tiny
    bs = [0.3 * torch.randn(1, d, generator=g) * (0.05 if i == 0 else 1) for i, d in enumerate(dims)]
    tau, l1, lg, l1b, lgb = 0.1, 0.4, 0.6, 0.2, 0.9
    want_w = _ref_pre(lambda gs, t: _ref_sgl(gs, t, l1, lg), ws, tau, b=-1.0)
    want_b = _ref_sgl(bs, tau, l1b, lgb)
    got_w, got_b = [w.clone()[0] for w in ws], [b.clone()[0] for b in bs]
    reg = S.proximal_step(
        got_w, got_b, tau, proximal="sparse-group", lambda_1=l1, lambda_G=lg, lambda_1_bias=l1b, lambda_G_bias=lgb
    )
    for got, want in zip(got_w + got_b, want_w + want_b):
        torch.testing.assert_close(got, want[0], atol=1e-7, rtol=0)
    # the test is not vacuous: some groups were zeroed whole, others kept non-zero entries
    assert torch.equal(got_w[2], torch.ones(3)) and torch.equal(got_b[0], torch.zeros(5))
    assert (got_w[0] != 1).any() and (got_b[1] != 0).any()
    want_reg = sum(l1 * (w[0] - 1).abs().sum() + lg * math.sqrt(w.shape[-1]) * (w[0] - 1).norm() for w in want_w)
    want_reg += sum(l1b * b.abs().sum() + lgb * math.sqrt(b.shape[-1]) * b.norm() for b in want_b)
    assert reg == pytest.approx(float(want_reg), rel=1e-5)
    # l1 only (bias lambda defaults to the weight's, as in apply_l1)
    got_w, got_b = [w.clone()[0] for w in ws], [b.clone()[0] for b in bs]
    S.proximal_step(got_w, got_b, tau, proximal="l1", lambda_1=l1)
    for got, w in zip(got_w, ws):
        torch.testing.assert_close(got, (_ref_l1(w - 1.0, tau * l1) + 1.0)[0], atol=1e-7, rtol=0)
    for got, b in zip(got_b, bs):
        torch.testing.assert_close(got, _ref_l1(b, tau * l1)[0], atol=1e-7, rtol=0)


# --- identity init, padding, end to end ----------------------------------------------------------


def test_identity_init_leaves_logits_unchanged(tiny_model):
    iv = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(steps=0, **QUIET))
    assert [e.hook for e in iv.edits] == [f"blocks.{i}.hook_{s}_out" for i in range(2) for s in ("attn", "mlp")]
    assert all(
        e.op == "affine" and torch.equal(e.vector, torch.ones(32)) and torch.equal(e.shift, torch.zeros(32))
        for e in iv.edits
    )
    tokens = tiny_model.to_tokens("t1 t2 t3 t1 t2")
    base = _logits(tiny_model, tokens)
    assert torch.equal(_logits(tiny_model, tokens, iv.with_strength(0.0)), base)
    assert (_logits(tiny_model, tokens, iv) - base).abs().max() <= 1e-6
    assert S.support(iv) == 0.0 and iv.provenance["loss_initial"] == iv.provenance["loss_final"]


def test_padded_batch_pools_like_one_prompt_at_a_time(tiny_model):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    tokens, lengths = _tokenize(tiny_model, SRC)
    assert tokens.shape == (8, 6) and lengths.tolist() == [4, 5, 3, 4, 3, 6, 3, 4]
    pooled = _pooled(tiny_model, tokens, lengths, hooks, None)
    for i, p in enumerate(SRC):
        _, cache = tiny_model.run_with_cache(p)
        for h in hooks:
            want = cache[h][0].reshape(lengths[i], -1).mean(0)
            torch.testing.assert_close(pooled[h][i], want, atol=1e-5, rtol=1e-5)


def test_fit_reduces_the_loss_and_matches_an_independent_readout(tiny_model):
    iv = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(steps=60, lr=1e-2, **QUIET))
    p = iv.provenance
    # measured: 0.01886 -> 0.00731 (ratio 0.39)
    assert p["loss_final"] < 0.5 * p["loss_initial"]
    assert p["loss_first"] == pytest.approx(p["loss_initial"], rel=1e-6)  # step 0 sees all 8 sources at identity
    # The same objective read a second way: the fitted Intervention through `apply` and
    # `run_with_cache`, one unpadded prompt at a time, all maps active.
    assert S.lineas_loss(tiny_model, iv, SRC, TGT) == pytest.approx(p["loss_final"], rel=1e-5)
    assert S.lineas_loss(tiny_model, None, SRC, TGT, hooks=p["hooks"]) == pytest.approx(p["loss_initial"], rel=1e-5)
    assert p["support"] == S.support(iv) == 1.0 and p["n_units"] == 4 * 32
    assert p["config"]["betas"] == [0.9, 0.9] and len(p["loss_curve"]) == 50 and p["loss_curve"][-1][0] == 59


def test_gradient_reaches_earlier_maps_through_the_network(tiny_model):
    """End to end: the loss read at layer 1 moves the map at layer 0 (finite differences agree)."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    tokens, lengths = _tokenize(tiny_model, SRC)
    t_tokens, t_lengths = _tokenize(tiny_model, TGT)
    with torch.no_grad():
        target = _pooled(tiny_model, t_tokens, t_lengths, hooks, None)[hooks[1]]
    g = torch.Generator().manual_seed(0)
    w0 = (1 + 0.1 * torch.randn(32, generator=g)).requires_grad_()
    maps = {hooks[0]: (w0, torch.zeros(32)), hooks[1]: (torch.ones(32), torch.zeros(32))}

    def loss1(w):
        maps[hooks[0]] = (w, torch.zeros(32))
        return S.wasserstein_1d(_pooled(tiny_model, tokens, lengths, hooks, maps)[hooks[1]], target)

    (grad,) = torch.autograd.grad(loss1(w0), w0)
    k = int(grad.abs().argmax())
    assert grad.abs().max() > 1e-4
    eps = 1e-2
    with torch.no_grad():
        e = torch.zeros(32)
        e[k] = eps
        fd = (loss1(w0 + e) - loss1(w0 - e)) / (2 * eps)
    assert float(fd) == pytest.approx(float(grad[k]), rel=0.05)


def _toy():
    """A 1-layer attention-only model over words w0..w15 with d_model = 8, no positional embedding."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lenslab import zoo

    tok = zoo.word_tokenizer([f"w{i}" for i in range(16)])
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_ctx=8,
        d_head=4,
        n_heads=2,
        d_vocab=len(tok),
        attn_only=True,
        normalization_type=None,
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tok)
    with torch.no_grad():
        model.W_pos.zero_()
    return model, tok.convert_tokens_to_ids, [f"w{i}" for i in range(8)], [f"w{i}" for i in range(8, 16)]


def test_linear_toy_recovers_the_known_affine_map():
    """Planted: target embedding = a * source embedding + 2b per unit, so at `hook_embed` (mean over
    BOS, whose embedding is 0, and the word) the optimal map is exactly omega = a, shift = b."""
    model, ids, src, tgt = _toy()
    g = torch.Generator().manual_seed(0)
    a, b = 0.8 + 0.4 * torch.rand(8, generator=g), 0.6 * torch.rand(8, generator=g) - 0.3
    with torch.no_grad():
        model.W_E[ids("<bos>")] = 0
        for s, t, row in zip(src, tgt, torch.randn(8, 8, generator=g) ** 3):  # skewed, so no sign flip fits
            model.W_E[ids(s)] = row
            model.W_E[ids(t)] = a * row + 2 * b
    iv = S.fit_lineas(model, src, tgt, hooks=["hook_embed"], config=S.LineasConfig(steps=300, lr=1e-2, **QUIET))
    # measured: max errors 1e-6 (omega) and 2e-6 (shift); loss 0.168 -> 6e-12
    assert (iv.edits[0].vector - a).abs().max() < 1e-4
    assert (iv.edits[0].shift - b).abs().max() < 1e-4
    assert iv.provenance["loss_final"] < 1e-8


def test_sparse_group_with_a_large_lambda_zeroes_whole_hooks(tiny_model):
    common = dict(steps=30, lr=1e-2, **QUIET)
    iv = S.fit_lineas(
        tiny_model, SRC, TGT, config=S.LineasConfig(proximal="sparse-group", lambda_1=0.0, lambda_G=1e3, **common)
    )
    assert S.support(iv) == 0.0 and set(iv.provenance["support_per_hook"].values()) == {0.0}
    assert all(torch.equal(e.vector, torch.ones(32)) and torch.equal(e.shift, torch.zeros(32)) for e in iv.edits)
    # zero lambdas: the same fit as no proximal step, bit for bit
    free = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(**common))
    zero = S.fit_lineas(
        tiny_model, SRC, TGT, config=S.LineasConfig(proximal="sparse", lambda_1=0.0, lambda_G=0.0, **common)
    )
    assert all(
        torch.equal(x.vector, y.vector) and torch.equal(x.shift, y.shift) for x, y in zip(free.edits, zero.edits)
    )


def test_sparse_group_selects_hooks_as_whole_groups():
    """Planted: half of `hook_embed`'s units are 0 everywhere and unread downstream, so the loss
    pulls on 4 of its 8 units and on all 8 of `attn_out`'s. Adam moves each pulled unit by about
    lr per step, a group's step has norm ~ lr sqrt(pulled) against the shrink lr lambda_G sqrt(d):
    the half-pulled hook is dropped whole for lambda_G > 1/sqrt(2), the other kept up to ~1."""
    model, _, src, tgt = _toy()
    with torch.no_grad():
        model.W_E[:, 4:] = 0
        for w in (model.blocks[0].attn.W_Q, model.blocks[0].attn.W_K, model.blocks[0].attn.W_V):
            w[:, 4:] = 0
    hooks = ["hook_embed", "blocks.0.hook_attn_out"]

    def per_hook(lam):
        cfg = S.LineasConfig(steps=100, lr=1e-2, proximal="sparse-group", lambda_1=0.0, lambda_G=lam, **QUIET)
        return S.fit_lineas(model, src, tgt, hooks=hooks, config=cfg).provenance["support_per_hook"]

    # measured: {0.5, 1.0} at lambda_G 0 and 0.6; {0, 1} at 0.75 to 0.95; {0, 0} at 1.05
    assert per_hook(0.0) == {"hook_embed": 0.5, "blocks.0.hook_attn_out": 1.0}
    assert per_hook(0.85) == {"hook_embed": 0.0, "blocks.0.hook_attn_out": 1.0}


def test_seeded_batches_are_reproducible(tiny_model):
    cfg = dict(steps=8, lr=1e-2, batch_size=4, **QUIET)
    one = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(seed=1, **cfg))
    two = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(seed=1, **cfg))
    other = S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(seed=2, **cfg))
    assert one == two
    assert any(not torch.equal(x.vector, y.vector) for x, y in zip(one.edits, other.edits))


def test_preset_round_trip(tiny_model, tmp_path):
    iv = S.fit_lineas(
        tiny_model,
        SRC,
        TGT,
        hooks="blocks.{layer}.hook_resid_post",
        config=S.LineasConfig(steps=5, lr=1e-2, proximal="l1", **QUIET),
        strength=0.7,
    )
    assert [e.hook for e in iv.edits] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    back = S.load(S.save(iv, tmp_path / "lineas.json"))
    assert back == iv and back.strengths() == [0.7, 0.7]
    tokens = tiny_model.to_tokens("t1 t2 t3")
    assert torch.equal(_logits(tiny_model, tokens, back), _logits(tiny_model, tokens, iv))


def test_bad_input_raises(tiny_model):
    with pytest.raises(LenslabError, match="at least 4"):
        S.fit_lineas(tiny_model, SRC[:3], TGT, config=S.LineasConfig(steps=1, **QUIET))
    with pytest.raises(LenslabError, match="at least 4"):
        S.LineasConfig(batch_size=2)
    with pytest.raises(LenslabError, match="did you mean 'blocks.0.hook_resid_post'"):
        S.fit_lineas(tiny_model, SRC, TGT, hooks=["blocks.0.hook_resid_pots"], config=S.LineasConfig(steps=1, **QUIET))
    with pytest.raises(LenslabError, match="position"):
        S.fit_lineas(
            tiny_model, SRC, TGT, hooks=["blocks.0.attn.hook_pattern"], config=S.LineasConfig(steps=1, **QUIET)
        )
    with pytest.raises(LenslabError, match="proximal"):
        S.LineasConfig(proximal="l2")
    with pytest.raises(LenslabError, match="larger than the 8"):
        S.fit_lineas(tiny_model, SRC, TGT, config=S.LineasConfig(batch_size=9, **QUIET))
    with pytest.raises(LenslabError, match="affine"):
        S.support(S.Intervention(edits=(S.Edit(hook="blocks.0.hook_resid_post", vector=torch.ones(32)),)))


@pytest.mark.slow
def test_fit_on_a_transformer_bridge(tiny_moe_dir):
    model = lenslab.load_model(str(tiny_moe_dir("gemma")), device="cpu")  # tests/conftest.py: tiny random Gemma
    assert type(model).__name__ == "TransformerBridge"
    src = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11", "w3 w2"]
    tgt = ["w40 w41", "w42 w43 w44", "w45 w46", "w50 w51 w52 w53"]
    assert S.default_hooks(model) == [f"blocks.{i}.hook_{s}_out" for i in range(2) for s in ("attn", "mlp")]
    # The random Gemma's sublayer outputs are tiny (loss ~5e-6), so steer the residual stream here.
    iv = S.fit_lineas(
        model, src, tgt, hooks="blocks.{layer}.hook_resid_post", config=S.LineasConfig(steps=40, lr=1e-2, **QUIET)
    )
    p = iv.provenance
    # measured: 1.81e-3 -> 6.61e-4 (ratio 0.36)
    assert p["loss_final"] < 0.5 * p["loss_initial"]
    assert S.lineas_loss(model, iv, src, tgt) == pytest.approx(p["loss_final"], rel=1e-4)
    tokens = model.to_tokens("w1 w2 w3 w4")
    assert torch.equal(_logits(model, tokens, iv.with_strength(0.0)), _logits(model, tokens))
