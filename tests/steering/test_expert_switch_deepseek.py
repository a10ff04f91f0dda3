"""MoE expert switches (MoTE) on DeepSeek-style MoE: DeepSeek-V3 and DeepSeek-V2 through the bridge.

Oracles, on the tiny random DeepSeek checkpoints of `tiny_moe_dir` (tests/conftest.py; 8 routed
experts in 2 groups, 1 group searched, top 2, one shared expert):
- mask, DeepSeek-V3: the Hugging Face model with the masked experts' `e_score_correction_bias`
  set to -1e9 (so HF's own router never picks them, through its own group selection);
- mask, DeepSeek-V2: the Hugging Face router running its own code on logits whose masked
  columns are -1e9 (its `F.linear` patched for the test);
- drop / force: the Hugging Face model with a router hook written here by hand;
- all routed experts dropped: the Hugging Face model with its routed experts' output zeroed
  (the shared expert keeps working).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S
from lenslab.probes import routers
from lenslab.steering import Intervention, switch_experts

E, K, GROUP = 8, 2, 4
MOE_LAYERS = {"deepseek_v3": (1, 2), "deepseek_v2": (0, 1)}
NAMES = ["deepseek_v3", "deepseek_v2"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(tiny_moe_dir):
    """name -> (lenslab model, HF model), loaded once."""
    assert (tiny_moe_dir.DS_E, tiny_moe_dir.K) == (E, K)
    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny_moe_dir(name)
            cache[name] = (lenslab.load_model(str(folder), device="cpu"), _hf(folder))
        return cache[name]

    return get


def _ids(batch=2, pos=7, seed=1):
    return torch.randint(4, 64, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _gate(hf, layer):
    return hf.model.layers[layer].mlp.gate


def _run(model, ids, iv=None):
    with torch.no_grad(), S.apply(model, iv):
        return model(ids)


def _run_hf(hf, ids, router_fn=None, layers=()):
    """HF logits; `router_fn(layer, weights [N, k], indices [N, k]) -> (weights, indices)` replaces
    the router's output at each of `layers`."""
    handles = []
    for layer in layers:

        def hook(mod, inp, out, layer=layer):
            logits, w, idx = out
            w2, idx2 = router_fn(layer, w.float().clone(), idx.clone())
            return logits, w2.to(w.dtype), idx2

        handles.append(_gate(hf, layer).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def _routing(model, ids, iv=None):
    """layer -> experts [N, k] the router hands to the experts (after any switch)."""
    seen, hs = {}, []
    with torch.no_grad(), S.apply(model, iv):  # registered after the switch's hooks: they run first
        try:
            for layer in _moe_layers_of(model):
                hs.append(
                    routers.hf_router(model, layer).register_forward_hook(
                        lambda m, i, o, layer=layer: seen.__setitem__(layer, o[2].clone())
                    )
                )
            model(ids)
        finally:
            for h in hs:
                h.remove()
    return seen


def _moe_layers_of(model) -> list[int]:
    return [m.layer for m in routers.moe_layers(model)]


# --- hand-written references (independent of lenslab's reroute) ----------------------------------
def hand_drop(off: dict, strength: float = 1.0):
    """off: layer -> expert ids. Their weight x (1 - s); the others rescaled to keep each row's total."""

    def fn(layer, w, idx):
        for row in range(w.shape[0]):
            total = float(w[row].sum())
            hit = [j for j in range(K) if int(idx[row, j]) in off.get(layer, ())]
            if not hit:
                continue
            for j in hit:
                w[row, j] = w[row, j] * (1 - strength)
            rest = [j for j in range(K) if j not in hit]
            old = sum(float(w[row, j]) for j in rest)
            new = total - sum(float(w[row, j]) for j in hit)
            for j in rest:
                w[row, j] = w[row, j] * (new / old) if old > 0 else w[row, j]
        return w, idx

    return fn


def hand_force(on: dict, strength: float = 1.0):
    """on: layer -> one expert. Not selected: it takes the lowest-weight slot, s x that weight."""

    def fn(layer, w, idx):
        f = on.get(layer)
        for row in range(w.shape[0]):
            if f is None or f in idx[row].tolist():
                continue
            j = int(torch.argmin(w[row]))
            idx[row, j] = f
            w[row, j] = strength * w[row, j]
        return w, idx

    return fn


def biased_hf(hf, removed: dict):
    """DeepSeek-V3 reference for a mask: a copy whose masked experts have e_score_correction_bias -1e9."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for layer, experts in removed.items():
            _gate(ref, layer).e_score_correction_bias[list(experts)] = -1e9
    return ref


class _MaskedLinear:
    """Stands in for `torch.nn.functional` inside transformers' DeepSeek-V2 module (whose only use
    of `F` is the router's `F.linear`): router logits of the current layer's masked experts -1e9."""

    def __init__(self, real):
        self.real, self.cols = real, ()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def linear(self, x, w, b=None):
        out = self.real.linear(x, w, b)
        if self.cols:
            out = out.clone()
            out[..., list(self.cols)] = -1e9
        return out


def v2_masked_logits(hf, ids, removed: dict, monkeypatch):
    """DeepSeek-V2 reference for a mask: HF's own router code on logits with masked columns -1e9."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod

    shim = _MaskedLinear(mod.F)
    monkeypatch.setattr(mod, "F", shim)
    hs = [
        _gate(hf, layer).register_forward_pre_hook(
            lambda m, a, layer=layer: setattr(shim, "cols", removed.get(layer, ()))
        )
        for layer in MOE_LAYERS["deepseek_v2"]
    ]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in hs:
            h.remove()
        monkeypatch.setattr(mod, "F", shim.real)


# --- mask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_mask_equals_the_hf_router_never_choosing_the_expert(loaded, name, monkeypatch):
    model, hf = loaded(name)
    ids = _ids()
    a, b = MOE_LAYERS[name]
    base_route = _routing(model, ids)
    # the most used expert of each layer, so the mask certainly acts
    removed = {layer: (int(base_route[layer].flatten().mode().values),) for layer in (a, b)}
    iv = switch_experts(off=[(l, e) for l, es in removed.items() for e in es], mode="mask")
    got, base = _run(model, ids, iv), _run(model, ids)
    if name == "deepseek_v3":
        ref = _run_hf(biased_hf(hf, removed), ids)
    else:
        ref = v2_masked_logits(hf, ids, removed, monkeypatch)
    assert (got - base).abs().max() > 1e-3  # the mask does act
    assert (ref - _run_hf(hf, ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # the masked expert is never chosen; the next one enters inside one group (1 group searched)
    after = _routing(model, ids, iv)
    for layer, (e,) in removed.items():
        assert not (after[layer] == e).any() and (base_route[layer] == e).any()
        assert (after[layer] // GROUP)[:, 0].eq((after[layer] // GROUP)[:, 1]).all()
    # routers.route inside the switch reports the switched routing
    with S.apply(model, iv):
        r = routers.route(model, ids)
    for li, layer in enumerate(r.layers):
        assert not (r.indices[0][:, li] == removed[layer][0]).any()


def test_mask_moves_tokens_to_the_other_group(loaded):
    """Masking two of a group's experts: DeepSeek-V3 ranks groups by their best two choice scores,
    so tokens may move to the other group; HF with biases -1e9 agrees."""
    model, hf = loaded("deepseek_v3")
    ids = _ids(batch=3, pos=9, seed=4)
    base_route = _routing(model, ids)
    layer = 1
    g0 = (base_route[layer] // GROUP)[:, 0]
    busiest = int(g0.mode().values)
    removed = {layer: tuple(sorted(set(base_route[layer][g0 == busiest].flatten().tolist())))[:2]}
    iv = switch_experts(off=[(layer, e) for e in removed[layer]], mode="mask")
    torch.testing.assert_close(_run(model, ids, iv), _run_hf(biased_hf(hf, removed), ids), atol=TOL, rtol=0)
    moved = (_routing(model, ids, iv)[layer] // GROUP)[:, 0] != g0
    assert moved.any()


# --- drop and force ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_drop_equals_a_hand_router_hook(loaded, name, strength):
    model, hf = loaded(name)
    a, b = MOE_LAYERS[name]
    base_route = _routing(model, _ids())
    off = {a: (int(base_route[a].flatten().mode().values),), b: tuple(int(x) for x in base_route[b][0])}
    iv = switch_experts(off=[(l, e) for l, es in off.items() for e in es], strength=strength)
    ids = _ids()
    ref = _run_hf(hf, ids, hand_drop(off, strength), layers=(a, b))
    assert (ref - _run_hf(hf, ids)).abs().max() > 1e-3
    torch.testing.assert_close(_run(model, ids, iv), ref, atol=TOL, rtol=0)
    with torch.no_grad(), S.hf_hooks(hf, iv):  # the plain-HF backend
        torch.testing.assert_close(hf(ids).logits, ref, atol=TOL, rtol=0)
    # the row totals are kept: DeepSeek-V3's are routed_scaling_factor (2.5)
    seen = {}
    h = _gate(hf, a).register_forward_hook(lambda m, i, o: seen.__setitem__("w", o[1]))
    try:
        with torch.no_grad(), S.hf_hooks(hf, iv):
            hf(ids)
    finally:
        h.remove()
    if name == "deepseek_v3":
        torch.testing.assert_close(seen["w"].sum(-1), torch.full((ids.numel(),), 2.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_every_routed_expert_dropped_leaves_the_shared_expert(loaded, name):
    model, hf = loaded(name)
    a = MOE_LAYERS[name][0]
    ids = _ids()
    iv = switch_experts(off=[(a, e) for e in range(E)])
    h = hf.model.layers[a].mlp.experts.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        ref = _run_hf(hf, ids)
    finally:
        h.remove()
    got = _run(model, ids, iv)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # and the shared expert does contribute: zeroing it too changes the output
    h = hf.model.layers[a].mlp.shared_experts.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    h2 = hf.model.layers[a].mlp.experts.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        assert (_run_hf(hf, ids) - got).abs().max() > 1e-4
    finally:
        h.remove()
        h2.remove()


@pytest.mark.parametrize("name", NAMES)
def test_force_puts_the_expert_in_every_token(loaded, name):
    model, hf = loaded(name)
    a, b = MOE_LAYERS[name]
    ids = _ids()
    base_route = _routing(model, ids)
    # an expert that some tokens do not pick, in the group they do not search
    on = {a: 7 if (base_route[a] // GROUP == 0).any() else 0, b: 3}
    assert not all((base_route[l] == e).any(-1).all() for l, e in on.items())
    iv = switch_experts(on=list(on.items()))
    seen = _routing(model, ids, iv)
    for layer, expert in on.items():
        assert (seen[layer] == expert).any(-1).all(), f"layer {layer}: expert {expert} missing for some token"
    ref = _run_hf(hf, ids, hand_force(on), layers=(a, b))
    torch.testing.assert_close(_run(model, ids, iv), ref, atol=TOL, rtol=0)
    half = switch_experts(on=list(on.items()), strength=0.5)
    torch.testing.assert_close(
        _run(model, ids, half), _run_hf(hf, ids, hand_force(on, 0.5), layers=(a, b)), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_empty_and_zero_strength_are_bit_identical(loaded, name):
    model, _ = loaded(name)
    a, b = MOE_LAYERS[name]
    ids = _ids()
    base = _run(model, ids)
    iv = switch_experts(off=[(a, 1)], on=[(b, 2)]) + switch_experts(off=[(b, 5)], mode="mask")
    for same in (switch_experts(), iv.with_strength(0.0), Intervention()):
        assert torch.equal(_run(model, ids, same), base)
    assert not torch.equal(_run(model, ids, iv), base)


# --- errors -------------------------------------------------------------------------------------
def test_bad_ids_and_group_masks(loaded):
    model = loaded("deepseek_v3")[0]
    with pytest.raises(LenslabError, match=r"layer 0 is not a MoE layer of this model; MoE layers: \[1, 2\]"):
        S.validate(model, switch_experts(off=[(0, 1)]))  # layer 0 is dense
    with pytest.raises(LenslabError, match=r"expert 8 does not exist in layer 1: it has experts 0..7"):
        S.validate(model, switch_experts(off=[(1, 8)]))
    # 3 of each group of 4 masked: 2 experts remain, but no group keeps the 2 its ranking needs
    six = switch_experts(off=[(1, e) for e in (0, 1, 2, 4, 5, 6)], mode="mask")
    with pytest.raises(LenslabError, match=r"leaves \[1, 1\] choosable experts in its 2 groups of 4"):
        S.validate(model, six)
    # 3 of one group masked: the other group still holds top-k experts for every token
    S.validate(model, switch_experts(off=[(1, e) for e in (0, 1, 2)], mode="mask"))
