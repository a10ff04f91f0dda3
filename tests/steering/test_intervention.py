"""Intervention spec, apply, presets and the two baselines (mean difference, ActAdd).

Oracles: hand-written TransformerLens hooks for each op, `run_with_cache` for the mean
difference, and the next-token distribution of zoo/ioi-4l for ActAdd.
"""

from __future__ import annotations

import json

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S
from lenslab.steering import Edit, Intervention

PROMPT = "t1 t2 t3 t4 t1 t2"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.to_tokens(PROMPT)  # [1, 7]


def _logits(model, tokens, iv=None):
    with torch.no_grad(), S.apply(model, iv):
        return model(tokens)


def _all_ops(d=32, heads=4, d_head=8):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    return Intervention(
        edits=(
            Edit(hook="blocks.0.hook_resid_post", op="add", vector=r(d)),
            Edit(hook="blocks.1.attn.hook_z", op="multiply", vector=r(5), units=(0, 3, 9, 17, 31), positions="last"),
            Edit(hook="blocks.0.mlp.hook_post", op="affine", vector=r(64), shift=r(64), positions=(1, -2)),
            Edit(hook="blocks.1.hook_resid_mid", op="clamp", vector=r(2), units=(4, 5), positions="prompt"),
            Edit(hook="blocks.1.hook_mlp_out", op="zero", units=(0, 1, 2)),
            Edit(hook="blocks.0.hook_resid_pre", op="add", vector=r(3, d), positions=(0, 1, 2)),
        ),
        name="every op",
        provenance={"method": "test", "seed": 0},
    )


def test_zero_strength_is_bit_identical(tiny_model, tokens):
    base = _logits(tiny_model, tokens)
    iv = _all_ops().with_strength(0.0)
    assert torch.equal(_logits(tiny_model, tokens, iv), base)
    assert not torch.equal(_logits(tiny_model, tokens, _all_ops()), base)  # and the edits do act at strength 1


def test_preset_round_trips_exactly(tmp_path):
    iv = _all_ops()
    path = S.save(iv, tmp_path / "preset.json")
    assert (tmp_path / "preset.safetensors").is_file()
    spec = json.loads(path.read_text())
    assert spec["format"] == "lenslab.intervention/1" and spec["tensors"] == "preset.safetensors"
    assert spec["edits"][1]["units"] == [0, 3, 9, 17, 31] and spec["edits"][2]["positions"] == [1, -2]
    back = S.load(path)
    assert back == iv
    for a, b in zip(back.edits, iv.edits):
        assert torch.equal(
            a.vector if a.vector is not None else torch.zeros(0), b.vector if b.vector is not None else torch.zeros(0)
        )
    assert b"pickle" not in (tmp_path / "preset.safetensors").read_bytes()[:200]


@pytest.mark.parametrize("strength", [1.0, 2.5, -0.5])
def test_add_equals_hand_written_hook(tiny_model, tokens, strength):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))

    def hand(act, hook):  # act: [batch, pos, d_model]
        return act + strength * v

    with torch.no_grad():
        want = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hand)])
    got = _logits(tiny_model, tokens, Intervention(edits=(Edit(hook=HOOK, vector=v, strength=strength),)))
    assert torch.equal(got, want)


def test_each_op_equals_hand_written_hook(tiny_model, tokens):
    iv = _all_ops().with_strength(0.7)
    e = iv.edits
    s = 0.7

    def add0(a, hook):
        return a + s * e[0].vector

    def mult_z(a, hook):  # [batch, pos, head, d_head]; units index head*d_head+j
        f = a.reshape(*a.shape[:2], -1).clone()
        u = list(e[1].units)
        f[:, -1, u] = f[:, -1, u] * (1 + s * (e[1].vector - 1))
        return f.reshape(a.shape)

    def affine(a, hook):
        a = a.clone()
        for p in (1, a.shape[1] - 2):
            a[:, p] = s * (e[2].vector * a[:, p] + e[2].shift) + (1 - s) * a[:, p]
        return a

    def clamp(a, hook):
        a = a.clone()
        a[:, :, 4:6] = s * e[3].vector + (1 - s) * a[:, :, 4:6]
        return a

    def zero(a, hook):
        a = a.clone()
        a[:, :, :3] = (1 - s) * a[:, :, :3]
        return a

    def add_pos(a, hook):
        a = a.clone()
        a[:, :3] = a[:, :3] + s * e[5].vector
        return a

    hand = [(x.hook, fn) for x, fn in zip(e, [add0, mult_z, affine, clamp, zero, add_pos])]
    with torch.no_grad():
        want = tiny_model.run_with_hooks(tokens, fwd_hooks=hand)
    torch.testing.assert_close(_logits(tiny_model, tokens, iv), want, rtol=0, atol=1e-5)


def test_compose_equals_applying_both(tiny_model, tokens):
    g = torch.Generator().manual_seed(2)
    a = Intervention(edits=(Edit(hook="blocks.0.hook_resid_post", vector=torch.randn(32, generator=g)),), name="a")
    b = Intervention(edits=(Edit(hook=HOOK, op="multiply", vector=torch.rand(32, generator=g) * 2),), name="b")
    both = a + b
    assert both == S.compose([a, b]) and both.name == "a + b" and len(both.edits) == 2
    with torch.no_grad(), S.apply(tiny_model, a), S.apply(tiny_model, b):
        nested = tiny_model(tokens)
    with torch.no_grad():
        listed = tiny_model.run_with_hooks(tokens, fwd_hooks=S.hooks(tiny_model, a) + S.hooks(tiny_model, b))
    got = _logits(tiny_model, tokens, both)
    assert torch.equal(got, nested) and torch.equal(got, listed)
    assert not torch.equal(got, _logits(tiny_model, tokens, a))


def test_hooks_are_removed_after_apply(tiny_model, tokens):
    base = _logits(tiny_model, tokens)
    with S.apply(tiny_model, _all_ops()):
        pass
    assert torch.equal(_logits(tiny_model, tokens), base)
    with (
        pytest.raises(LenslabError),
        S.apply(tiny_model, Intervention(edits=(Edit(hook=HOOK, vector=torch.ones(32), positions=(9,)),))),
    ):
        tiny_model(tokens)
    assert torch.equal(_logits(tiny_model, tokens), base)


BAD_SPECS = [
    (lambda: Edit(hook=HOOK, vector=torch.ones(32), strength=float("nan")), "finite number"),
    (lambda: Edit(hook=HOOK, vector=torch.ones(32), strength=float("inf")), "finite number"),
    (lambda: Edit(hook=HOOK, vector=torch.tensor([1.0, float("nan")])), "NaN or infinite entry at index [1]"),
    (lambda: Edit(hook=HOOK, op="multply", vector=torch.ones(32)), "did you mean 'multiply'"),
    (lambda: Edit(hook=HOOK, op="mask_experts", units=(1,)), "use 'blocks.1.mlp'"),  # expert ops name the MoE block
    (lambda: Edit(hook="blocks.1.mlp", op="mask_experts", units=(1,), vector=torch.ones(1)), "takes no vector"),
    (lambda: Edit(hook=HOOK, op="add"), "needs a vector"),
    (lambda: Edit(hook=HOOK, vector=torch.ones(3), units=(0, 1)), "one entry per unit"),
    (lambda: Edit(hook=HOOK, vector=torch.ones(32), positions="lats"), "did you mean 'last'"),
    (lambda: Edit(hook=HOOK, op="zero", units=(-1,)), "negative"),
]


@pytest.mark.parametrize("make,msg", BAD_SPECS)
def test_bad_spec_errors(make, msg):
    with pytest.raises(LenslabError, match=None) as err:
        make()
    assert msg in str(err.value)


@pytest.mark.parametrize(
    "edit,msg",
    [
        (Edit(hook="blocks.1.hook_resid_pots", vector=torch.ones(32)), "did you mean 'blocks.1.hook_resid_post'"),
        (Edit(hook=HOOK, vector=torch.ones(31)), "has 31 entries but the hook's last dimension has 32"),
        (Edit(hook="blocks.0.mlp.hook_post", vector=torch.ones(32)), "last dimension has 64"),
        (
            Edit(hook="blocks.0.attn.hook_z", op="zero", units=(32,)),
            "unit index 32 is out of range at blocks.0.attn.hook_z, which has 32 units",
        ),
        (Edit(hook="blocks.0.attn.hook_pattern", op="zero"), "not [batch, pos, ...]"),
    ],
)
def test_bad_spec_for_model(tiny_model, tokens, edit, msg):
    iv = Intervention(edits=(edit,))
    with pytest.raises(LenslabError) as err:
        S.validate(tiny_model, iv)
    assert msg in str(err.value)
    with pytest.raises(LenslabError), S.apply(tiny_model, iv):
        pass


def test_positions_out_of_range_at_apply(tiny_model, tokens):
    iv = Intervention(edits=(Edit(hook=HOOK, vector=torch.ones(32), positions=(0, 7)),))
    with pytest.raises(LenslabError, match="position 7 .* out of range for an input of 7 tokens"):
        _logits(tiny_model, tokens, iv)
    with pytest.raises(LenslabError, match="needs the prompt length"):
        _logits(
            tiny_model, tokens, Intervention(edits=(Edit(hook=HOOK, vector=torch.ones(32), positions="generated"),))
        )


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_difference_matches_run_with_cache(tiny_model, position):
    pos = ["t1 t2 t3", "t4 t5 t6 t7", "t8 t9 t10"]
    neg = ["t11 t12", "t13 t14 t15 t16 t17"]
    iv = S.mean_difference(tiny_model, pos, neg, layers=[0, 1], site="resid_post", position=position, strength=3.0)
    assert [e.hook for e in iv.edits] == ["blocks.0.hook_resid_post", HOOK] and iv.strengths() == [3.0, 3.0]
    for L, e in enumerate(iv.edits):

        def mean(prompts, L=L):
            rows = []
            for p in prompts:
                _, cache = tiny_model.run_with_cache(p)
                a = cache[f"blocks.{L}.hook_resid_post"][0]  # [pos, d_model]
                rows.append(a[-1] if position == "last" else a.mean(0))
            return torch.stack(rows).mean(0)

        torch.testing.assert_close(e.vector, mean(pos) - mean(neg), rtol=0, atol=1e-5)
    z = S.mean_difference(tiny_model, pos, neg, layers=0, site="blocks.{layer}.attn.hook_z")
    assert z.edits[0].vector.shape == (32,)
    with pytest.raises(LenslabError, match="did you mean 'resid_post'"):
        S.mean_difference(tiny_model, pos, neg, layers=0, site="resid_pots")
    with pytest.raises(LenslabError, match="layers 0..1"):
        S.mean_difference(tiny_model, pos, neg, layers=2)


def test_actadd_vector_and_positions(tiny_model):
    iv = S.actadd(tiny_model, "t1 t2 t3", "t4 t5", layer=1, strength=2.0)
    (e,) = iv.edits
    assert e.hook == "blocks.1.hook_resid_pre" and e.positions == (0, 1, 2, 3) and e.vector.shape == (4, 32)
    assert torch.equal(e.vector[0], torch.zeros(32))  # BOS: same activation in both prompts
    pad = tiny_model.tokenizer.pad_token_id
    toks = torch.stack(
        [tiny_model.to_tokens("t1 t2 t3")[0], torch.cat([tiny_model.to_tokens("t4 t5")[0], torch.tensor([pad])])]
    )
    _, cache = tiny_model.run_with_cache(toks)
    a = cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(e.vector, a[0] - a[1], rtol=0, atol=1e-6)
    with pytest.raises(LenslabError, match="out of range for an input of 3 tokens"):
        _logits(tiny_model, tiny_model.to_tokens("t7 t8"), iv)


@pytest.mark.slow
def test_actadd_steers_ioi_towards_positive_name():
    """On zoo/ioi-4l, the Mary-minus-John ActAdd vector makes a Mary-free prompt answer Mary.

    Measured (layer 2, strength 1): p(Mary) 0.000 -> 0.970, logit(Mary) - logit(John) -0.84 -> 25.5.
    """
    torch.manual_seed(0)
    model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    pos = "When Mary and John went to the store, John gave a drink to"  # -> Mary
    neg = "When John and Mary went to the store, Mary gave a drink to"  # -> John
    user = "When Anna and Bob went to the park, Bob gave a ball to"  # -> Anna
    mary, john, anna = (model.to_tokens(w, prepend_bos=False)[0, 0].item() for w in ("Mary", "John", "Anna"))
    iv = S.actadd(model, pos, neg, layer=2, strength=1.0)
    before = _logits(model, model.to_tokens(user))[0, -1].log_softmax(-1)
    after = _logits(model, model.to_tokens(user), iv)[0, -1].log_softmax(-1)
    assert before.argmax() == anna and before[mary].exp() < 0.01
    assert after.argmax() == mary and after[mary].exp() > 0.9
    assert (after[mary] - after[john]) - (before[mary] - before[john]) > 20
    assert S.generate(model, user, max_new_tokens=1).strip() == "Anna"
    assert S.generate(model, user, iv, max_new_tokens=1).strip() == "Mary"


def test_generate_same_seed_and_stream(tiny_model):
    iv = S.mean_difference(tiny_model, ["t1 t1 t1"], ["t2 t2 t2"], layers=1, strength=20.0)
    plain = S.generate(tiny_model, PROMPT, max_new_tokens=5)
    assert plain == S.generate(tiny_model, PROMPT, max_new_tokens=5)
    assert plain == "".join(S.stream(tiny_model, PROMPT, max_new_tokens=5))
    assert len(plain.split()) == 5  # word-level tokens joined by single spaces
    assert S.generate(tiny_model, PROMPT, iv.with_strength(0.0), max_new_tokens=5) == plain
    steered = S.generate(tiny_model, PROMPT, iv, max_new_tokens=5)
    assert steered != plain
    sampled = [S.generate(tiny_model, PROMPT, iv, max_new_tokens=5, seed=3, temperature=1.0) for _ in range(2)]
    assert sampled[0] == sampled[1]
    gen_only = Intervention(edits=(Edit(hook=HOOK, vector=iv.edits[0].vector, strength=20.0, positions="generated"),))
    # "generated" positions: the first new token is read before any generated position exists
    assert S.generate(tiny_model, PROMPT, gen_only, max_new_tokens=1).split() == plain.split()[:1]
    assert S.generate(tiny_model, PROMPT, gen_only, max_new_tokens=5) != plain


@pytest.mark.slow
def test_plumbing_on_a_transformer_bridge(tiny_moe_dir):
    """A tiny random Gemma loads as a TransformerBridge; edits act through the same hook names."""
    model = lenslab.load_model(str(tiny_moe_dir("gemma")), device="cpu")  # tests/conftest.py: tiny random Gemma
    assert type(model).__name__ == "TransformerBridge"
    tokens = model.to_tokens("w1 w2 w3 w4")
    base = _logits(model, tokens)
    iv = S.mean_difference(model, ["w1 w2 w3", "w5 w6 w7"], ["w9 w8 w7"], layers=[0, 1])
    assert torch.equal(_logits(model, tokens, iv.with_strength(0.0)), base)
    assert (_logits(model, tokens, iv.with_strength(5.0)) - base).abs().max() > 0.1
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: a + v)])
    assert torch.equal(_logits(model, tokens, Intervention(edits=(Edit(hook=HOOK, vector=v),))), want)
    with pytest.raises(LenslabError, match="last dimension has 64"):
        S.validate(model, Intervention(edits=(Edit(hook="blocks.0.mlp.hook_post", vector=torch.ones(32)),)))
    assert len(S.generate(model, "w1 w2 w3 w4", S.actadd(model, "w1 w2", "w3", layer=1), max_new_tokens=3).split()) <= 3
    for site in ("resid", "neurons"):  # AUSteer reads and multiplies through the bridge's hooks too
        au = S.austeer(model, ["w1 w2 w3", "w5 w6 w7"], ["w9 w8 w7", "w4 w4 w4"], k=4, alpha=50.0, site=site)
        assert len(au.edits) >= 1 and sum(len(e.units) for e in au.edits) == 4
        assert torch.equal(_logits(model, tokens, au.with_strength(0.0)), base)
        assert (_logits(model, tokens, au) - base).abs().max() > 1e-4
