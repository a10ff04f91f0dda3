"""SAE feature steering (lenslab.steering.features): ablate, clamp and add one feature.

Oracles: sae-lens itself (an SAE with `use_error_term=True` and a hook that sets the feature in
`hook_sae_acts_post`: the decomposition with one activation replaced and the error kept),
re-encoding with the SAE, a hand-written TransformerLens hook, and a planted feature on
zoo/steer-sentiment whose decoder row is W_E['terrible'] - W_E['wonderful'] at `hook_embed`, so
ablating it turns 'terrible' into 'wonderful' and clamping it does the reverse.
SAEs are built in code with sae-lens's classes (random weights, seeded).
"""

from __future__ import annotations

import json

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S
from lenslab.steering import features as SF

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["the movie was terrible . i felt so", "what a lovely day . the garden is so", "my trip is very"]
TOL = 1e-5  # feature activations (re-encoded) and small activations
XTOL = 2e-6 * 30  # edited activations at HOOK (entries up to ~28): 2e-6 of the largest, float32 rounding


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return lenslab.load_model("zoo/steer-sentiment", device="cpu")


@pytest.fixture(scope="module")
def acts(model):
    """Activations at HOOK for three prompts, [n_tokens, d_model]."""
    rows = []
    for p in PROMPTS:
        _, cache = model.run_with_cache(p, names_filter=[HOOK])
        rows.append(cache[HOOK][0])
    return torch.cat(rows)


def _meta(hook=HOOK, **kw):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=hook, model_name="zoo/steer-sentiment", **kw)


def make_sae(kind: str, d_in: int = 96, d_sae: int = 64, *, hook: str = HOOK, tied: bool = False, seed: int = 0, **cfg):
    """A sae-lens inference SAE with random weights: non-zero b_dec, negative b_enc (sparse codes);
    `tied`: unit-norm decoder rows and W_enc = W_dec.T (so W_dec[f] . W_enc[:, f] = 1)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    cls, ccls = {
        "relu": (StandardSAE, StandardSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "topk": (TopKSAE, TopKSAEConfig),
    }[kind]
    torch.manual_seed(seed)
    sae = cls(ccls(d_in=d_in, d_sae=d_sae, metadata=_meta(hook), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W = torch.randn(d_sae, d_in, generator=g)
        W = W / W.norm(dim=-1, keepdim=True) if tied else W * 0.3
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T if tied else torch.randn(d_in, d_sae, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.b_enc.copy_(-0.5 - torch.rand(d_sae, generator=g))
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


def _edit(model, iv, x):
    """The intervention's hook applied to activations `x` [n, d] (as one batch row)."""
    ((name, fn),) = S.hooks(model, iv)
    assert name == iv.edits[0].hook
    return fn(x[None].clone(), None)[0]


def _double(sae):
    import copy

    return copy.deepcopy(sae).to(dtype=torch.float64)


def _sae_lens_reference(sae, x, f, target):
    """sae-lens, in float64: forward with the error term, feature f of hook_sae_acts_post set to `target`."""

    def set_f(a, hook):
        a = a.clone()
        a[..., f] = target
        return a

    ref = _double(sae)
    ref.use_error_term = True
    with torch.no_grad():
        return ref.run_with_hooks(x.double(), fwd_hooks=[("hook_sae_acts_post", set_f)]).float()


def _busy_feature(sae, x) -> int:
    """A feature active on some but not all tokens (the one closest to half)."""
    with torch.no_grad():
        frac = (sae.encode(x) > 0).float().mean(0)
    f = int((frac - 0.5).abs().argmin())
    assert 0 < frac[f] < 1, frac[f]
    return f


# --- the edit is the SAE decomposition with one activation replaced -------------------------------
@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("target", [0.0, 3.0])
def test_feature_edit_equals_sae_lens_error_term_forward(model, acts, kind, target):
    sae = make_sae(kind, **({"k": 8} if kind == "topk" else {}))
    f = _busy_feature(sae, acts)
    iv = SF.clamp_feature(sae, f, target) if target else SF.ablate_feature(sae, f)
    out = _edit(model, iv, acts)
    ref = _sae_lens_reference(sae, acts, f, target)
    torch.testing.assert_close(out, ref, atol=XTOL, rtol=0)
    assert (out - acts).abs().max() > 0.1  # it did act
    # the reconstruction error term is untouched: out = decode(acts with f := target) + (x - decode(encode(x)))
    dsae, x = _double(sae), acts.double()
    with torch.no_grad():
        a = dsae.encode(x)
        err = x - dsae.decode(a)
        a_mod = a.clone()
        a_mod[:, f] = target
        torch.testing.assert_close(out.double() - dsae.decode(a_mod), err, atol=XTOL, rtol=0)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_ablated_feature_reencodes_to_zero(model, acts, kind):
    """With W_dec[f] . W_enc[:, f] = 1 (a tied SAE) re-encoding the ablated activation gives 0 for f;
    clamping re-encodes to c on the tokens where f fired."""
    sae = make_sae(kind, tied=True, **({"k": 8} if kind == "topk" else {}))
    f = _busy_feature(sae, acts)
    with torch.no_grad():
        before = sae.encode(acts)[:, f]
        after = sae.encode(_edit(model, SF.ablate_feature(sae, f), acts))[:, f]
    assert (before > 0.05).sum() >= 2
    assert after.abs().max() <= TOL
    if kind != "topk":  # (a clamped TopK feature may leave the top k)
        c = float(before.max()) * 2
        with torch.no_grad():
            clamped = sae.encode(_edit(model, SF.clamp_feature(sae, f, c), acts))[:, f]
        fired = before > 0
        torch.testing.assert_close(clamped[fired], torch.full_like(clamped[fired], c), atol=TOL, rtol=0)


def test_strength_blends_linearly(model, acts):
    sae = make_sae("relu")
    f = _busy_feature(sae, acts)
    iv = SF.clamp_feature(sae, f, 2.0)
    full = _edit(model, iv, acts)
    half = _edit(model, iv.with_strength(0.5), acts)
    torch.testing.assert_close(half, (acts + full) / 2, atol=XTOL, rtol=0)


def test_topk_relu_mode_is_the_documented_approximation(model, acts):
    """topk='relu' reads max(pre, 0) from the feature's column alone: exact where the feature is in
    the top k, and it counts max(pre, 0) where the feature's pre-activation is positive but not chosen."""
    sae = make_sae("topk", k=4)
    with torch.no_grad():
        sae.b_enc.zero_()  # many positive pre-activations, only 4 chosen
        pre = (acts - sae.b_dec) @ sae.W_enc + sae.b_enc
        chosen = sae.encode(acts) > 0
    f = int(((pre > 0) & ~chosen).sum(0).mul(chosen.sum(0) > 0).argmax())
    loose = _edit(model, SF.ablate_feature(sae, f, topk="relu"), acts)
    exact = _edit(model, SF.ablate_feature(sae, f), acts)
    d = sae.W_dec[f].detach()
    torch.testing.assert_close(loose, acts - pre[:, f].clamp(min=0)[:, None] * d, atol=XTOL, rtol=0)
    on, off = chosen[:, f], (pre[:, f] > 0) & ~chosen[:, f]
    assert on.any() and off.any()
    torch.testing.assert_close(loose[on], exact[on], atol=XTOL, rtol=0)
    torch.testing.assert_close(exact[off], acts[off], atol=0, rtol=0)  # exact: nothing to remove there
    assert (loose[off] - acts[off]).norm(dim=-1).min() > 1e-3  # relu mode: removes a direction that was not there
    assert SF.ablate_feature(sae, f, topk="relu").edits[0].feature.encoder.shape == (96,)
    assert SF.ablate_feature(sae, f).edits[0].feature.encoder.shape == (96, 64)


def test_topk_rescaled_by_decoder_norm(model, acts):
    sae = make_sae("topk", k=8, rescale_acts_by_decoder_norm=True)
    f = _busy_feature(sae, acts)
    out = _edit(model, SF.clamp_feature(sae, f, 1.5), acts)
    torch.testing.assert_close(out, _sae_lens_reference(sae, acts, f, 1.5), atol=XTOL, rtol=0)


def test_add_feature_equals_a_hand_written_hook(model):
    sae = make_sae("relu")
    f, coeff = 5, 4.0
    toks = model.to_tokens(PROMPTS[0])

    def hand(act, hook):
        return act + coeff * sae.W_dec[f].detach()

    with torch.no_grad():
        want = model.run_with_hooks(toks, fwd_hooks=[(HOOK, hand)])
        with S.apply(model, SF.add_feature(sae, f, coeff)):
            got = model(toks)
        base = model(toks)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - base).abs().max() > 0.1


def test_strength_zero_is_bit_identical(model, acts):
    sae = make_sae("topk", k=8)
    f = _busy_feature(sae, acts)
    toks = model.to_tokens(" ".join(PROMPTS))
    with torch.no_grad():
        base = model(toks)
        for iv in (SF.ablate_feature(sae, f), SF.clamp_feature(sae, f, 5.0), SF.add_feature(sae, f, 5.0)):
            with S.apply(model, iv.with_strength(0.0)):
                assert torch.equal(model(toks), base)
            with S.apply(model, iv):
                assert not torch.equal(model(toks), base)


def test_presets_round_trip(model, tmp_path):
    toks = model.to_tokens(PROMPTS[0])
    ivs = [
        SF.ablate_feature(make_sae("jumprelu"), 7, positions="prompt"),
        SF.clamp_feature(make_sae("topk", k=8), 2, 3.5, strength=0.5),
        SF.clamp_feature(make_sae("topk", k=8), 2, 3.5, topk="relu"),
        SF.add_feature(make_sae("relu"), 1, -2.0),
    ]
    iv = S.compose(ivs)
    path = S.save(iv, tmp_path / "features.json")
    spec = json.loads(path.read_text())
    feat = spec["edits"][0]["feature"]
    assert spec["edits"][0]["op"] == "feature" and feat["kind"] == "jumprelu" and feat["index"] == 7
    assert feat["encoder"] == "edits.0.feature.encoder" and feat["b_dec"] == "edits.0.feature.b_dec"
    assert spec["edits"][1]["feature"]["kind"] == "topk" and spec["edits"][1]["feature"]["k"] == 8
    assert spec["edits"][2]["feature"]["kind"] == "relu" and spec["edits"][3]["op"] == "add"
    back = S.load(path)
    assert back == iv and back.edits[1].feature.target == 3.5
    with torch.no_grad(), S.apply(model, iv):
        a = model(toks)
    with torch.no_grad(), S.apply(model, back):
        b = model(toks)
    assert torch.equal(a, b)


def test_wrong_width_or_hook_is_a_clear_error(model):
    wide = SF.ablate_feature(make_sae("relu", d_in=128), 0)
    with pytest.raises(LenslabError, match="reads d_in=128 entries, but this model's blocks.1.hook_resid_post has 96"):
        S.validate(model, wide)
    with pytest.raises(LenslabError, match="trained on another model"):
        S.generate(model, "the movie was", wide, max_new_tokens=2)
    nohook = SF.ablate_feature(make_sae("relu", hook="blocks.7.hook_resid_post"), 0)
    with pytest.raises(LenslabError, match="not a hook point of this model"):
        S.validate(model, nohook)
    with pytest.raises(LenslabError, match="out of range: this SAE has features 0 .. 63"):
        SF.ablate_feature(make_sae("relu"), 64)
    with pytest.raises(LenslabError, match="finite"):
        SF.clamp_feature(make_sae("relu"), 1, float("nan"))
    with pytest.raises(LenslabError, match="topk must be one of"):
        SF.ablate_feature(make_sae("topk", k=4), 1, topk="approx")


def test_unsupported_saes_are_refused():
    from sae_lens import GatedSAE, GatedSAEConfig

    gated = GatedSAE(GatedSAEConfig(d_in=96, d_sae=16, metadata=_meta()))
    with pytest.raises(LenslabError, match="StandardSAE .ReLU., JumpReLUSAE and TopKSAE"):
        SF.ablate_feature(gated, 0)
    ln = make_sae("relu", normalize_activations="layer_norm")
    with pytest.raises(LenslabError, match="normalises its input at run time"):
        SF.clamp_feature(ln, 0, 1.0)
    nameless = make_sae("relu", hook="")
    with pytest.raises(LenslabError, match="names no hook point"):
        SF.ablate_feature(nameless, 0)


def test_head_sae_edits_its_head_only(model):
    """An SAE on one head of hook_z (hook_head_index) edits that head's entries."""
    hook = "blocks.0.attn.hook_z"
    sae = make_sae("relu", d_in=24, hook=hook)
    sae.cfg.metadata.hook_head_index = 2
    iv = SF.clamp_feature(sae, 0, 4.0)
    assert iv.edits[0].units == tuple(range(48, 72))
    _, cache = model.run_with_cache(PROMPTS[0], names_filter=[hook])
    z = cache[hook]  # [1, pos, 4, 24]
    ((_, fn),) = S.hooks(model, iv)
    out = fn(z.clone(), None)
    ref = _sae_lens_reference(sae, z[0, :, 2], 0, 4.0)
    torch.testing.assert_close(out[0, :, 2], ref, atol=TOL, rtol=0)
    assert torch.equal(out[0, :, [0, 1, 3]], z[0, :, [0, 1, 3]])


# --- a planted feature changes the generation as planted -----------------------------------------
def planted_sae(model, bad: str = "terrible", good: str = "wonderful"):
    """A StandardSAE at hook_embed whose feature 3 is 1 exactly on `bad` (0 on every other token)
    and whose decoder row is W_E[bad] - W_E[good]: ablating it turns `bad` into `good`, clamping it
    to 1 turns `good` into `bad`. Other features: random, never firing (bias -100)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    WE = model.W_E.detach()
    t, w = (int(model.to_tokens(x, prepend_bos=False)[0, 0]) for x in (bad, good))
    u = WE[t] / WE[t].norm()
    proj = WE @ u
    top, other = float(proj[t]), float(torch.cat([proj[:t], proj[t + 1 :]]).max())
    assert top - other > 0.1
    mid = (top + other) / 2
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=8, metadata=_meta("hook_embed")))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(-100.0)
        sae.W_enc[:, 3] = u / (top - mid)
        sae.b_enc[3] = -mid / (top - mid)
        sae.W_dec[3] = WE[t] - WE[w]
    return sae


def test_planted_feature_flips_the_generation(model):
    sae = planted_sae(model)
    bad, good = "the movie was terrible . the book was", "the movie was wonderful . the book was"
    kw = dict(max_new_tokens=8)
    with torch.no_grad():
        acts = sae.encode(model.embed(model.to_tokens(bad)))[0, :, 3]
    assert torch.allclose(acts[4], torch.tensor(1.0), atol=1e-5) and (acts[torch.arange(len(acts)) != 4] == 0).all()
    plain_bad, plain_good = S.generate(model, bad, **kw), S.generate(model, good, **kw)
    assert plain_bad != plain_good
    ablate = SF.ablate_feature(sae, 3)
    # ablating the planted feature: the model reads 'wonderful' where the prompt says 'terrible'
    assert S.generate(model, bad, ablate, **kw) == S.generate(model, good, ablate, **kw) != plain_bad
    # clamping it to 1 at the adjective's position: 'wonderful' reads as 'terrible'
    clamp = SF.clamp_feature(sae, 3, 1.0, positions=(4,))
    assert S.generate(model, good, clamp, **kw) == plain_bad
    # side by side, streamed: unmodified vs modified differ
    assert "".join(S.stream(model, bad, None, **kw)) != "".join(S.stream(model, bad, ablate, **kw))
