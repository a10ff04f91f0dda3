"""Router inspection on DeepSeek-style MoE (DeepSeek-V3 and DeepSeek-V2 through TransformerLens's bridge).

Oracle: the Hugging Face model itself. Its router modules return `(router_logits, topk_weights,
topk_indices)`; a forward hook written here reads them. The tiny checkpoints come from
`tiny_moe_dir` (tests/conftest.py): DeepSeek-V3 (3 layers, layer 0 dense, 8 routed experts in 2
groups of which 1 is searched, top 2, sigmoid scores with a seeded non-zero
`e_score_correction_bias`, `norm_topk_prob`, `routed_scaling_factor` 2.5, one shared expert, MLA)
and DeepSeek-V2 (2 MoE layers, softmax, "group_limited_greedy", `routed_scaling_factor` 1.5).
"""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab.probes import routers
from lenslab.steering.experts import hf_route

E, K, GROUPS = 8, 2, 2
MOE_LAYERS = {"deepseek_v3": (1, 2), "deepseek_v2": (0, 1)}
SCALE = {"deepseek_v3": 2.5, "deepseek_v2": 1.5}
NAMES = ["deepseek_v3", "deepseek_v2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(tiny_moe_dir):
    """name -> (lenslab model, HF model), loaded once."""
    t = tiny_moe_dir
    assert (t.DS_E, t.K, t.DS_GROUPS, t.DS_TOPK_GROUP) == (E, K, GROUPS, 1)
    assert {n: tuple(t.DS_LAYERS[n]) for n in NAMES} == MOE_LAYERS
    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny_moe_dir(name)
            cache[name] = (lenslab.load_model(str(folder), device="cpu"), _hf(folder))
        return cache[name]

    return get


def _ids(batch=3, pos=7, seed=1):
    return torch.randint(4, 64, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _hf_router_out(hf, ids):
    """layer -> HF router output (logits [N, E], weights [N, k], indices [N, k]) for the MoE layers."""
    got, handles = {}, []
    for layer, block in enumerate(hf.model.layers):
        gate = getattr(block.mlp, "gate", None)
        if gate is not None:
            handles.append(gate.register_forward_hook(lambda m, i, o, layer=layer: got.__setitem__(layer, o)))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return got


def _dense(idx, w, n_exp=E):
    """[N, k] experts and weights -> [N, E] weight per expert (order-free comparison)."""
    return torch.zeros(idx.shape[0], n_exp).scatter(1, idx.long(), w.float())


@pytest.mark.parametrize("name", NAMES)
def test_bridge_loads_with_hf_logits(loaded, name):
    model, hf = loaded(name)
    assert type(model).__name__ == "TransformerBridge"
    ids = _ids()
    with torch.no_grad():
        got, ref = model(ids), hf(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    layers = routers.moe_layers(model)
    assert [m.layer for m in layers] == list(MOE_LAYERS[name])  # V3's dense layer 0 is skipped
    for m in layers:
        assert (m.kind, m.n_experts, m.top_k, m.n_group, m.topk_group) == ("bridge", E, K, GROUPS, 1)
        assert m.scoring == ("sigmoid" if name == "deepseek_v3" else "softmax")
        assert m.norm_topk_prob is (name == "deepseek_v3")  # V2's router never renormalises


@pytest.mark.parametrize("name", NAMES)
def test_route_is_what_the_hf_router_returns(loaded, name):
    model, hf = loaded(name)
    ids = _ids()
    r = routers.route(model, ids)
    assert r.layers == MOE_LAYERS[name] and r.n_experts == E and r.top_k == K
    assert r.scoring == ("sigmoid" if name == "deepseek_v3" else "softmax")
    ref = _hf_router_out(hf, ids)
    assert sorted(ref) == list(MOE_LAYERS[name])
    n = ids.numel()
    differs_from_plain_top_k = 0
    for li, layer in enumerate(r.layers):
        logits, w_ref, idx_ref = ref[layer]
        idx = torch.stack([r.indices[i][:, li] for i in range(3)]).reshape(n, K)
        w = torch.stack([r.weights[i][:, li] for i in range(3)]).reshape(n, K)
        p = torch.stack([r.probs[i][:, li] for i in range(3)]).reshape(n, E)
        # the same experts with the same weights (HF's DeepSeek top k is unsorted: compare per expert)
        torch.testing.assert_close(_dense(idx, w), _dense(idx_ref, w_ref), atol=1e-6, rtol=0)
        assert (idx.sort(-1).values == idx_ref.sort(-1).values).all()
        assert (w[:, :-1] >= w[:, 1:]).all()  # heaviest first
        # per-expert scores: the sigmoid (V3) or softmax (V2) of HF's router logits
        score = logits.sigmoid() if name == "deepseek_v3" else logits.softmax(-1)
        torch.testing.assert_close(p, score, atol=1e-6, rtol=0)
        # group-limited: one group of 4 searched per token, so both experts share a group
        group = idx // (E // GROUPS)
        assert (group[:, 0] == group[:, 1]).all()
        # weights follow the router's rule: V3 renormalised sigmoid scores x 2.5, V2 softmax x 1.5
        if name == "deepseek_v3":
            torch.testing.assert_close(w.sum(-1), torch.full((n,), 2.5), atol=1e-5, rtol=0)
            chosen = p.gather(-1, idx)
            torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(-1, keepdim=True), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(w, 1.5 * p.gather(-1, idx), atol=1e-6, rtol=0)
        plain = torch.topk(p, K, dim=-1).indices.sort(-1).values  # what re-deriving from logits would give
        differs_from_plain_top_k += int((plain != idx.sort(-1).values).any(-1).sum())
    # the bias (V3) and the groups make the router's choice differ from a plain top k for some tokens
    assert differs_from_plain_top_k > 0
    back = routers.RouterResult.from_json(r.to_json())
    assert back.scoring == r.scoring and all(torch.equal(a, b) for a, b in zip(back.indices, r.indices))
    assert r.load().sum(1).tolist() == [float(n * K)] * 2


@pytest.mark.parametrize("name", NAMES + ["qwen2_moe"])
def test_hf_route_without_masks_equals_the_router(loaded, tiny_moe_dir, name):
    """`hf_route` (used by mask switches) re-implements each router rule; unmasked it is the router."""
    if name == "qwen2_moe":
        hf, n_exp = _hf(tiny_moe_dir(name)), tiny_moe_dir.E
    else:
        hf, n_exp = loaded(name)[1], E
    ref = _hf_router_out(hf, _ids(seed=3))
    for layer, (logits, w_ref, idx_ref) in ref.items():
        idx, w = hf_route(hf.model.layers[layer].mlp.gate, logits)
        assert torch.equal(_dense(idx, w, n_exp), _dense(idx_ref, w_ref, n_exp))  # bit-identical


@pytest.mark.parametrize("name", NAMES)
def test_ftri_ranks_the_planted_expert_first(tiny_moe_dir, name):
    """Planted (tests/conftest.py): token w7 routes to expert 3 of layer 1, every other decision is
    the same for every token."""
    t = tiny_moe_dir
    model = lenslab.load_model(str(t(name, plant=True)), device="cpu")
    target = [f"w3 {t.PLANT_TOKEN} w9 w12", f"w20 w21 {t.PLANT_TOKEN}", f"{t.PLANT_TOKEN} w30 w31 w32 w33"]
    other = ["w3 w8 w9 w12", "w20 w21 w22", "w40 w30 w31 w32 w33", "w50 w51"]
    r = routers.route(model, target + other)
    li = r.layers.index(t.PLANT_LAYER)
    for i in range(len(target) + len(other)):
        chosen = (r.indices[i][:, li] == t.PLANT_EXPERT).any(-1)
        assert chosen.tolist() == [tok == t.PLANT_TOKEN for tok in r.tokens[i]]
    ranking = routers.ftri_rank(model, target, other)
    (layer, expert, score), second = ranking.top(2)
    assert (layer, expert) == (t.PLANT_LAYER, t.PLANT_EXPERT)
    assert score == pytest.approx(1.0)  # one planted token per target prompt, none in the others
    assert second[2] < score
    assert routers.ftri_rank(model, target, other, weights=True).top(1)[0][:2] == (t.PLANT_LAYER, t.PLANT_EXPERT)
