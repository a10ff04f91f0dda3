"""MoE expert switches (MoTE) as `Intervention` edits: drop, mask, force.

Oracles, on tiny random checkpoints from `tiny_moe_dir` (tests/conftest.py):
- mask: the Hugging Face model rebuilt with the masked expert REMOVED (router row and expert
  weights deleted, num_experts - 1);
- drop / force: the Hugging Face model with a router hook written here by hand, independently of
  `lenslab.steering.experts.reroute`;
- a zeroed MoE block, hand-computed gate weights, and a planted routing for generation.
HookedTransformer (Mixtral, OLMoE) and TransformerBridge (Qwen2-MoE, Qwen3-MoE) paths both.
"""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S
from lenslab.steering import Edit, Intervention, reroute, switch_experts
from lenslab.steering.experts import hf_moe_layers

MOE = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
KIND = {
    "mixtral": "HookedTransformer",
    "olmoe": "HookedTransformer",
    "qwen2_moe": "TransformerBridge",
    "qwen3_moe": "TransformerBridge",
}
E, K, LAYERS = 4, 2, 2
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def loaded(tiny_moe_dir):
    """name -> (lenslab model, HF model, folder), loaded once."""
    assert (tiny_moe_dir.E, tiny_moe_dir.K, tiny_moe_dir.LAYERS) == (E, K, LAYERS)
    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny_moe_dir(name)
            model = lenslab.load_model(str(folder), device="cpu")
            assert type(model).__name__ == KIND.get(name, type(model).__name__)
            cache[name] = (model, _hf(folder), folder)
        return cache[name]

    return get


def _ids(batch=2, pos=7, seed=1):
    return torch.randint(4, 64, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _gate(hf, layer):
    block = hf.model.layers[layer]
    return (getattr(block, "block_sparse_moe", None) or block.mlp).gate


def _run_hf(hf, ids, router_fn=None, layers=range(LAYERS)):
    """HF logits; `router_fn(layer, probs [N, E], weights [N, k], indices [N, k]) -> (weights, indices)`
    replaces the router's top-k output at each of `layers`."""
    handles = []
    if router_fn is not None:
        for layer in layers:

            def hook(mod, inp, out, layer=layer):
                logits, w, idx = out
                w2, idx2 = router_fn(layer, logits.float().softmax(-1), w.float(), idx)
                return logits, w2.to(w.dtype), idx2

            handles.append(_gate(hf, layer).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def _run(model, ids, iv=None):
    with torch.no_grad(), S.apply(model, iv):
        return model(ids)


# --- hand-written references (independent of reroute) --------------------------------------------
def hand_drop(off: dict, strength: float = 1.0):
    """off: layer -> expert ids. Scale their weight by 1 - s, rescale the others to keep the total."""

    def fn(layer, probs, w, idx):
        w = w.clone()
        for row in range(w.shape[0]):
            total = float(w[row].sum())
            hit = [j for j in range(w.shape[1]) if int(idx[row, j]) in off.get(layer, ())]
            if not hit:
                continue
            for j in hit:
                w[row, j] = w[row, j] * (1 - strength)
            rest = [j for j in range(w.shape[1]) if j not in hit]
            old = sum(float(w[row, j]) for j in rest)
            new = total - sum(float(w[row, j]) for j in hit)
            for j in rest:
                w[row, j] = w[row, j] * (new / old) if old > 0 else w[row, j]
        return w, idx

    return fn


def hand_force(on: dict, strength: float = 1.0):
    """on: layer -> one expert id. Not selected: it takes the lowest-weight slot, s x that weight."""

    def fn(layer, probs, w, idx):
        if layer not in on:
            return w, idx
        w, idx = w.clone(), idx.clone()
        f = on[layer]
        for row in range(w.shape[0]):
            if f in idx[row].tolist():
                continue
            j = int(torch.argmin(w[row]))
            idx[row, j] = f
            w[row, j] = strength * w[row, j]
        return w, idx

    return fn


def removed_expert_hf(folder, removed: dict):
    """The HF model with expert `removed[layer]` deleted from each layer (router row + weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = _hf(folder)
    cfg = AutoConfig.from_pretrained(folder)
    key = "num_local_experts" if hasattr(cfg, "num_local_experts") else "num_experts"
    setattr(cfg, key, getattr(cfg, key) - 1)
    small = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    state = {}
    for name, t in full.state_dict().items():
        layer = next((l for l in removed if f"layers.{l}." in name), None)
        if layer is not None and (name.endswith(".gate.weight") or ".experts." in name) and t.shape[0] == E:
            keep = [e for e in range(E) if e != removed[layer]]
            t = t[keep]
        state[name] = t
    small.load_state_dict(state, strict=True)
    assert getattr(cfg, key) == E - 1 and _gate(small, 0).weight.shape[0] == E - 1
    return small


# --- reroute: the one routing function ----------------------------------------------------------
def _e(op, units, strength=1.0, positions="all"):
    return Edit(hook="blocks.0.mlp", op=op, units=units, strength=strength, positions=positions)


P = torch.tensor([[0.40, 0.30, 0.20, 0.10], [0.05, 0.15, 0.50, 0.30]])
ROWS = torch.tensor([0, 1])


def test_reroute_without_edits_is_the_models_top_k():
    idx, w = reroute(P, 2, True, [], ROWS)
    assert idx.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.4 / 0.7, 0.3 / 0.7], [0.5 / 0.8, 0.3 / 0.8]]), atol=1e-6, rtol=0)
    idx, w = reroute(P, 2, False, [], ROWS)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3], [0.5, 0.3]]), atol=0, rtol=0)


def test_reroute_drop_renormalises_and_keeps_the_total():
    # norm_topk_prob: set to 0 and renormalise the rest of the top k
    idx, w = reroute(P, 2, True, [_e("drop_experts", (0,))], ROWS)
    assert idx.tolist() == [[0, 1], [2, 3]]  # no other expert enters
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0], [0.5 / 0.8, 0.3 / 0.8]]), atol=1e-6, rtol=0)
    # raw top-k weights (OLMoE, Qwen2-MoE): the row total 0.7 is kept
    idx, w = reroute(P, 2, False, [_e("drop_experts", (0,))], ROWS)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.7], [0.5, 0.3]]), atol=1e-6, rtol=0)
    # strength 0.5 halves the dropped weight: 0.2, the other gets 0.7 - 0.2
    idx, w = reroute(P, 2, False, [_e("drop_experts", (0,), strength=0.5)], ROWS)
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.5], [0.5, 0.3]]), atol=1e-6, rtol=0)
    # an expert nobody selected: nothing changes
    _, w = reroute(P, 2, True, [_e("drop_experts", (3,))], ROWS[:1].clone(), n_pos=2)
    torch.testing.assert_close(w[0], torch.tensor([0.4 / 0.7, 0.3 / 0.7]), atol=1e-6, rtol=0)


def test_reroute_every_selected_expert_dropped_gives_weight_zero_not_nan():
    for norm in (True, False):
        idx, w = reroute(P, 2, norm, [_e("drop_experts", (0, 1))], ROWS)
        assert idx[0].tolist() == [0, 1]
        assert w[0].tolist() == [0.0, 0.0]
        assert torch.isfinite(w).all()


def test_reroute_mask_lets_the_next_expert_in():
    idx, w = reroute(P, 2, False, [_e("mask_experts", (0,))], ROWS)
    assert idx.tolist() == [[1, 2], [2, 3]]
    # softmax over the other experts: 0.3 / 0.6, 0.2 / 0.6; row 1 loses 0.05 of mass
    torch.testing.assert_close(w, torch.tensor([[0.5, 1 / 3], [0.5 / 0.95, 0.3 / 0.95]]), atol=1e-6, rtol=0)


def test_reroute_force_replaces_the_lowest_slot():
    idx, w = reroute(P, 2, False, [_e("force_experts", (3,))], ROWS)
    assert idx.tolist() == [[0, 3], [2, 3]]  # row 0: expert 3 takes slot 1 (weight 0.3); row 1 already has it
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3], [0.5, 0.3]]), atol=0, rtol=0)
    idx, w = reroute(P, 2, False, [_e("force_experts", (3,), strength=0.5)], ROWS)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.15], [0.5, 0.3]]), atol=1e-6, rtol=0)
    # two forced experts: the second may not evict the first
    idx, _ = reroute(P, 2, False, [_e("force_experts", (3, 2))], ROWS)
    assert sorted(idx[0].tolist()) == [2, 3] and sorted(idx[1].tolist()) == [2, 3]


def test_reroute_positions_pick_rows():
    probs = P.repeat(3, 1)  # batch 2 x pos 3 would be rows 0..5; here batch 3 x pos 2
    rows = torch.arange(6) % 2
    _, w = reroute(probs, 2, False, [_e("drop_experts", (0,), positions="last")], rows, n_pos=2)
    assert [float(x) for x in w[:, 0]] == pytest.approx(
        [0.4, 0.5, 0.4, 0.5, 0.4, 0.5]
    )  # last = row 1: expert 0 unselected
    _, w = reroute(probs, 2, False, [_e("drop_experts", (0,), positions=(0,))], rows, n_pos=2)
    assert [float(x) for x in w[:, 0]] == pytest.approx([0.0, 0.5, 0.0, 0.5, 0.0, 0.5])
    _, w = reroute(probs, 2, False, [_e("drop_experts", (0,), positions="generated")], rows, n_pos=2, prompt_len=1)
    assert [float(x) for x in w[:, 0]] == pytest.approx([0.4, 0.5] * 3)


def test_switch_experts_builds_edits():
    iv = switch_experts(
        off=[(1, 3), (0, 2), (1, 3)], on=[(1, 0)], mode="mask", positions="last", strength=0.5, name="x"
    )
    assert [(e.hook, e.op, e.units, e.positions, e.strength) for e in iv.edits] == [
        ("blocks.0.mlp", "mask_experts", (2,), "last", 0.5),
        ("blocks.1.mlp", "mask_experts", (3,), "last", 0.5),
        ("blocks.1.mlp", "force_experts", (0,), "last", 0.5),
    ]
    assert iv.name == "x" and iv.provenance["off"] == [[1, 3], [0, 2]]
    assert switch_experts().edits == ()


# --- against Hugging Face -----------------------------------------------------------------------
@pytest.mark.parametrize("name", MOE)
def test_mask_equals_the_model_with_the_expert_removed(loaded, name):
    model, hf, folder = loaded(name)
    removed = {0: 1, 1: 2}
    ids = _ids()
    base = _run(model, ids)
    got = _run(model, ids, switch_experts(off=list(removed.items()), mode="mask"))
    ref = _run_hf(removed_expert_hf(folder, removed), ids)
    assert (got - base).abs().max() > 1e-3  # the mask does act
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_drop_equals_a_hand_router_hook(loaded, name, strength):
    model, hf, _ = loaded(name)
    off = {0: (1,), 1: (2, 3)}
    iv = switch_experts(off=[(l, e) for l, es in off.items() for e in es], strength=strength)
    ids = _ids()
    ref = _run_hf(hf, ids, hand_drop(off, strength))
    got = _run(model, ids, iv)
    assert (ref - _run_hf(hf, ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    with torch.no_grad(), S.hf_hooks(hf, iv):  # the plain-HF backend, for training scripts
        torch.testing.assert_close(hf(ids).logits, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen3_moe"])
def test_every_expert_dropped_zeroes_the_moe_output(loaded, name):
    """Mixtral renormalises its top k, so TL would divide 0 by 0: the output must be exactly 0."""
    model, hf, _ = loaded(name)
    ids = _ids()
    iv = switch_experts(off=[(0, e) for e in range(E)])
    got = _run(model, ids, iv)
    h = (getattr(hf.model.layers[0], "block_sparse_moe", None) or hf.model.layers[0].mlp).register_forward_hook(
        lambda m, i, o: torch.zeros_like(o)
    )
    try:
        ref = _run_hf(hf, ids)
    finally:
        h.remove()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    if KIND[name] == "HookedTransformer":
        with torch.no_grad(), S.apply(model, iv):
            _, cache = model.run_with_cache(ids, names_filter="blocks.0.hook_mlp_out")
        assert cache["blocks.0.hook_mlp_out"].abs().max() == 0


@pytest.mark.parametrize("name", MOE)
def test_force_puts_the_expert_in_every_token(loaded, name):
    model, hf, _ = loaded(name)
    on = {0: 3, 1: 0}
    iv = switch_experts(on=list(on.items()))
    ids = _ids()
    seen = {}
    with torch.no_grad(), S.apply(model, iv):
        if KIND[name] == "HookedTransformer":
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_expert_indices"))
            seen = {l: cache[f"blocks.{l}.mlp.hook_expert_indices"] for l in range(LAYERS)}
        else:  # read the router output after lenslab's hook (hooks run in registration order)
            from lenslab.probes import routers

            hs = [
                routers.hf_router(model, l).register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(l, o[2]))
                for l in range(LAYERS)
            ]
            try:
                model(ids)
            finally:
                for h in hs:
                    h.remove()
    for layer, expert in on.items():
        assert seen[layer].shape == (ids.numel(), K)
        assert (seen[layer] == expert).any(-1).all(), f"layer {layer}: expert {expert} missing for some token"
    base_idx = {}
    hs = [_gate(hf, l).register_forward_hook(lambda m, i, o, l=l: base_idx.__setitem__(l, o[2])) for l in range(LAYERS)]
    _run_hf(hf, ids)
    for h in hs:
        h.remove()
    assert not all((base_idx[l] == e).any(-1).all() for l, e in on.items())  # it was not so before
    ref = _run_hf(hf, ids, hand_force(on))
    torch.testing.assert_close(_run(model, ids, iv), ref, atol=TOL, rtol=0)
    half = switch_experts(on=list(on.items()), strength=0.5)
    torch.testing.assert_close(_run(model, ids, half), _run_hf(hf, ids, hand_force(on, 0.5)), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_positions_last_only_touches_the_last_token(loaded, name):
    model, hf, _ = loaded(name)
    ids = _ids(pos=6)
    off = {0: (0, 1), 1: (2,)}
    iv = switch_experts(off=[(l, e) for l, es in off.items() for e in es], positions="last")
    drop = hand_drop(off)

    def last_only(layer, probs, w, idx):
        w2, _ = drop(layer, probs, w, idx)
        last = (torch.arange(w.shape[0]) % 6 == 5)[:, None]
        return torch.where(last, w2, w), idx

    got, base = _run(model, ids, iv), _run(model, ids)
    torch.testing.assert_close(got, _run_hf(hf, ids, last_only), atol=TOL, rtol=0)
    torch.testing.assert_close(got[:, :5], base[:, :5], atol=1e-6, rtol=0)
    assert (got[:, 5] - base[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_empty_and_zero_strength_are_bit_identical(loaded, name):
    model, _, _ = loaded(name)
    ids = _ids()
    base = _run(model, ids)
    iv = switch_experts(off=[(0, 1)], on=[(1, 2)])
    for same in (
        switch_experts(),
        iv.with_strength(0.0),
        Intervention(edits=(_e("mask_experts", (1,), strength=0.0),)),
    ):
        assert torch.equal(_run(model, ids, same), base)
    if KIND[name] == "HookedTransformer":
        assert S.hooks(model, iv.with_strength(0.0)) == []
    assert not torch.equal(_run(model, ids, iv), base)


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "iv,msg",
    [
        (switch_experts(off=[(5, 0)]), r"layer 5 is not a MoE layer of this model; MoE layers: \[0, 1\]"),
        (switch_experts(off=[(1, 4)]), r"expert 4 does not exist in layer 1: it has experts 0..3"),
        (switch_experts(on=[(0, 9)]), r"expert 9 does not exist in layer 0: it has experts 0..3"),
        (switch_experts(off=[(0, 0), (0, 1), (0, 2)], mode="mask"), r"mask at most 2"),
        (switch_experts(on=[(0, 0), (0, 1), (0, 2)]), r"force at most 2"),
    ],
)
def test_bad_ids_name_the_valid_range(loaded, iv, msg):
    for name in ("olmoe", "qwen3_moe"):
        model = loaded(name)[0]
        with pytest.raises(LenslabError, match=msg):
            S.validate(model, iv)
        with pytest.raises(LenslabError, match=msg), S.apply(model, iv):
            pass


def test_bad_specs_and_dense_models(loaded, tiny_moe_dir):
    with pytest.raises(LenslabError, match="takes no vector or shift"):
        Edit(hook="blocks.0.mlp", op="drop_experts", units=(1,), vector=torch.ones(1))
    with pytest.raises(LenslabError, match="needs units=\\(expert ids"):
        Edit(hook="blocks.0.mlp", op="force_experts")
    with pytest.raises(LenslabError, match="use 'blocks.1.mlp'"):
        Edit(hook="blocks.1.mlp.hook_expert_weights", op="mask_experts", units=(1,))
    with pytest.raises(LenslabError, match="did you mean 'drop'"):
        switch_experts(off=[(0, 1)], mode="dorp")
    with pytest.raises(LenslabError, match="both switched off and forced on"):
        switch_experts(off=[(0, 1)], on=[(0, 1)])
    with pytest.raises(LenslabError, match="not a \\(layer, expert\\) pair"):
        switch_experts(off=[3])
    dense = lenslab.load_model(str(tiny_moe_dir("llama")), device="cpu")
    with pytest.raises(
        LenslabError, match="needs a Mixture-of-Experts model, but this model has no Mixture-of-Experts"
    ):
        S.validate(dense, switch_experts(off=[(0, 1)]))
    with pytest.raises(LenslabError, match="this model has no Mixture-of-Experts layers"):
        hf_moe_layers(_hf(tiny_moe_dir("llama")))
    with pytest.raises(LenslabError, match="use `with lenslab.steering.apply"):
        S.hooks(loaded("qwen2_moe")[0], switch_experts(off=[(0, 1)]))
    with (
        pytest.raises(LenslabError, match="hf_hooks applies expert switches only"),
        S.hf_hooks(loaded("olmoe")[1], Intervention(edits=(Edit(hook="blocks.0.hook_resid_post", op="zero"),))),
    ):
        pass


# --- generation and presets ---------------------------------------------------------------------
TARGET = "w20"  # the planted behaviour expert (layer 1, expert 3) writes this token's unembedding


@pytest.fixture(scope="module")
def behaviour_model(behaviour_moe_dir):
    """The planted behaviour Mixtral of tests/conftest.py: expert (1, 3) writes TARGET after w7."""
    return lenslab.load_model(str(behaviour_moe_dir), device="cpu")


def test_generate_with_a_switch_on_the_planted_model(behaviour_model):
    model = behaviour_model
    with_token, without = "w3 w9 w7", "w3 w9 w12"
    off, on = switch_experts(off=[(1, 3)]), switch_experts(on=[(1, 3)])
    # the planted route: only w7 uses expert (1, 3), so switching it off changes only w7's MoE output
    ids = model.to_tokens(with_token)
    hook = "blocks.1.hook_mlp_out"
    with torch.no_grad():
        base = model.run_with_cache(ids, names_filter=hook)[1][hook][0]
        with S.apply(model, off):
            got = model.run_with_cache(ids, names_filter=hook)[1][hook][0]
    torch.testing.assert_close(got[:-1], base[:-1], atol=1e-6, rtol=0)
    assert (got[-1] - base[-1]).norm() > 0.5 * base[-1].norm()
    # the behaviour: w7 makes the model say TARGET next; switching the expert off stops it,
    # forcing it on makes every token say it
    first = lambda prompt, iv=None: S.generate(model, prompt, iv, max_new_tokens=1).strip()
    assert first(with_token) == TARGET and first(without) != TARGET
    assert first(with_token, off) != TARGET
    assert S.generate(model, without, on, max_new_tokens=4).split() == [TARGET] * 4
    steered = S.generate(model, with_token, off, max_new_tokens=5)
    assert steered == S.generate(model, with_token, off, max_new_tokens=5)  # deterministic
    assert S.generate(model, with_token, off.with_strength(0.0), max_new_tokens=5) == S.generate(
        model, with_token, max_new_tokens=5
    )
    # positions="generated": the prompt routes as usual, generated tokens get the expert
    gen = switch_experts(on=[(1, 3)], positions="generated")
    pieces = list(S.stream(model, without, gen, max_new_tokens=3))
    assert "".join(pieces).split()[1:] == [TARGET] * 2


def test_preset_round_trip(tmp_path, loaded):
    iv = switch_experts(off=[(0, 1), (1, 2)], on=[(1, 0)], mode="mask", positions=(0, -1), strength=0.75, name="moe")
    iv = iv + switch_experts(off=[(0, 3)])
    path = S.save(iv, tmp_path / "switch.json")
    back = S.load(path)
    assert back == iv
    assert [e.op for e in back.edits] == ["mask_experts", "mask_experts", "force_experts", "drop_experts"]
    model = loaded("olmoe")[0]
    ids = _ids()
    assert torch.equal(_run(model, ids, back), _run(model, ids, iv))


def test_hf_hooks_train_with_experts_switched(loaded):
    """The plain-HF backend is differentiable: gradients reach the routers and stay finite, even
    with every expert of a layer dropped (Mixtral renormalises, so 0 / 0 must not leak)."""
    _, hf, _ = loaded("mixtral")
    ids = _ids()
    iv = switch_experts(off=[(0, e) for e in range(E)] + [(1, 2)], mode="drop") + switch_experts(on=[(1, 1)])
    hf.zero_grad()
    with S.hf_hooks(hf, iv):
        hf(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.1.mlp.gate.weight"].abs().max() > 0
    # layer 0's experts are all off: no gradient reaches them
    assert grads["model.layers.0.mlp.experts.gate_up_proj"].abs().max() == 0
    hf.zero_grad()
