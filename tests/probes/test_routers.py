"""Router inspection and fTRI ranking on tiny random MoE checkpoints built here.

Oracle: the Hugging Face model's own router modules (each returns logits, top-k weights and
indices), read with a forward hook; the tiny checkpoints come from `tiny_moe_dir` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab import steering
from lenslab._errors import LenslabError
from lenslab.probes import routers, super_experts

# the shapes and the planted route of the `tiny_moe_dir` checkpoints (checked in `dirs`)
LAYERS, E, K = 2, 4, 2
PLANT_TOKEN, PLANT_LAYER, PLANT_EXPERT = "w7", 1, 3


def _gate(hf, layer: int):
    block = hf.model.layers[layer]
    return (getattr(block, "block_sparse_moe", None) or block.mlp).gate


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dirs(tiny_moe_dir):
    t = tiny_moe_dir
    assert (t.LAYERS, t.E, t.K, t.PLANT_TOKEN, t.PLANT_LAYER, t.PLANT_EXPERT) == (
        LAYERS,
        E,
        K,
        PLANT_TOKEN,
        PLANT_LAYER,
        PLANT_EXPERT,
    )
    return {n: tiny_moe_dir(n) for n in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "llama")}


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_routing(hf, ids):
    """HF's own (weights, indices) per layer, each [batch*pos, k], from its router modules."""
    got = {}
    handles = [
        _gate(hf, layer).register_forward_hook(lambda m, i, o, layer=layer: got.__setitem__(layer, o))
        for layer in range(LAYERS)
    ]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return {layer: (o[1].float(), o[2]) for layer, o in got.items()}


@pytest.mark.parametrize(
    "name,kind",
    [
        ("olmoe", "HookedTransformer"),
        ("mixtral", "HookedTransformer"),
        ("qwen2_moe", "TransformerBridge"),
        ("qwen3_moe", "TransformerBridge"),
    ],
)
def test_route_matches_hf_router(dirs, name, kind):
    model = lenslab.load_model(str(dirs[name]), device="cpu")
    assert type(model).__name__ == kind
    hf = _hf(dirs[name])
    ids = torch.randint(4, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    r = routers.route(model, ids)
    assert r.layers == (0, 1) and r.n_experts == E and r.top_k == K
    ref = _hf_routing(hf, ids)
    with torch.no_grad():
        logits = hf(ids, output_router_logits=True).router_logits
    for i in range(3):
        assert r.indices[i].shape == r.weights[i].shape == (7, LAYERS, K)
        assert r.probs[i].shape == (7, LAYERS, E)
    for layer in range(LAYERS):
        idx = torch.stack([r.indices[i][:, layer] for i in range(3)]).reshape(-1, K)
        w = torch.stack([r.weights[i][:, layer] for i in range(3)]).reshape(-1, K)
        p = torch.stack([r.probs[i][:, layer] for i in range(3)]).reshape(-1, E)
        torch.testing.assert_close(idx, ref[layer][1], atol=0, rtol=0)
        torch.testing.assert_close(w, ref[layer][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(p, logits[layer].softmax(-1), atol=1e-5, rtol=0)
    sums = torch.cat([t.sum(-1) for t in r.weights])
    if name in ("mixtral", "qwen3_moe"):  # renormalised top-k
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:  # OLMoE / Qwen2-MoE default: raw top-k probabilities, summing below 1
        assert float(sums.max()) < 1.0 - 1e-3
    # load over the corpus: each layer holds tokens x k selections
    load = r.load()
    assert load.shape == (LAYERS, E)
    assert load.sum(1).tolist() == [21.0 * K] * LAYERS
    torch.testing.assert_close(r.load(fraction=True).sum(1), torch.ones(LAYERS))
    # a round trip through JSON keeps every decision
    back = routers.RouterResult.from_json(r.to_json())
    assert all(torch.equal(a, b) for a, b in zip(back.indices, r.indices))
    torch.testing.assert_close(back.activation_maps(weights=True), r.activation_maps(weights=True))


def test_text_prompts_of_different_lengths(dirs):
    model = lenslab.load_model(str(dirs["olmoe"]), device="cpu")
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11 w12"]
    r = routers.route(model, prompts)
    one = [routers.route(model, [p]) for p in prompts]  # batched equals one by one
    for i, single in enumerate(one):
        assert torch.equal(r.indices[i], single.indices[0])
        torch.testing.assert_close(r.weights[i], single.weights[0])
    n_tok = sum(t.shape[0] for t in r.indices)
    assert routers.expert_load(model, prompts).sum(1).tolist() == [float(n_tok * K)] * LAYERS
    maps = routers.activation_maps(model, prompts)
    assert maps.shape == (4, LAYERS, E)
    assert maps[1].sum(1).tolist() == [float(r.indices[1].shape[0] * K)] * LAYERS
    assert r.tokens[0][-1] == "w3"
    assert r.figure(0).data[0].z is not None


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_ftri_ranks_the_planted_expert_first(tiny_moe_dir, name):
    hf = _hf(tiny_moe_dir(name, plant=True))  # the plant runs on random norm weights (not the 1-init)
    norms = [p for n, p in hf.named_parameters() if "norm" in n]
    assert len(norms) >= 2 * LAYERS + 1 and not any(bool((p == p.flatten()[0]).all()) for p in norms)
    model = lenslab.load_model(str(tiny_moe_dir(name, plant=True)), device="cpu")
    target = [f"w3 {PLANT_TOKEN} w9 w12", f"w20 w21 {PLANT_TOKEN}", f"{PLANT_TOKEN} w30 w31 w32 w33"]
    other = ["w3 w8 w9 w12", "w20 w21 w22", "w40 w30 w31 w32 w33", "w50 w51"]
    r = routers.route(model, target + other)
    for i in range(len(target) + len(other)):  # the planted token, and only it, routes to the planted expert
        toks = r.tokens[i]
        chosen = (r.indices[i][:, PLANT_LAYER] == PLANT_EXPERT).any(-1)
        assert chosen.tolist() == [t == PLANT_TOKEN for t in toks]
    ranking = routers.ftri_rank(model, target, other)
    (layer, expert, score), second = ranking.top(2)
    assert (layer, expert) == (PLANT_LAYER, PLANT_EXPERT)
    assert score == pytest.approx(1.0)  # one planted token per target prompt, none in the others
    assert second[2] < score
    assert ranking.score(PLANT_LAYER, PLANT_EXPERT) == pytest.approx(1.0)
    assert ranking.diff.shape == (LAYERS, E) and ranking.n_target == 3 and ranking.n_other == 4
    weighted = routers.ftri_rank(model, target, other, weights=True)
    assert weighted.top(1)[0][:2] == (PLANT_LAYER, PLANT_EXPERT)
    back = routers.ExpertRanking.from_json(ranking.to_json())
    torch.testing.assert_close(back.diff, ranking.diff)
    assert back.top(3) == ranking.top(3)
    fig = ranking.figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == LAYERS


def test_dense_model_has_no_moe(dirs):
    model = lenslab.load_model(str(dirs["llama"]), device="cpu")
    with pytest.raises(LenslabError, match="this model has no Mixture-of-Experts layers"):
        routers.route(model, ["w1 w2"])
    with pytest.raises(LenslabError, match="this model has no Mixture-of-Experts layers"):
        routers.ftri_rank(model, ["w1"], ["w2"])


def test_bad_ids_and_inputs(dirs):
    model = lenslab.load_model(str(dirs["olmoe"]), device="cpu")
    assert routers.check_experts(model, [(1, 3), (0, 0)]) == [(1, 3), (0, 0)]
    assert routers.check_experts(model, "1:3, 0:0, L1e3") == [(1, 3), (0, 0)]  # text; each pair once
    with pytest.raises(LenslabError, match=r"expert \(0, -1\) is negative"):
        routers.check_experts(model, [(0, -1)])  # no shared expert admitted unless shared_layers is given
    with pytest.raises(LenslabError, match=r"expert -1 does not exist in layer 0: .* \(it has no shared expert\)"):
        routers.check_experts(model, [(0, -1)], shared_layers=[])
    assert routers.check_experts(model, [(0, "shared")], shared_layers=[0]) == [(0, -1)]
    with pytest.raises(LenslabError, match=r"layer 5 is not a MoE layer.*\[0, 1\]"):
        routers.check_experts(model, [(5, 0)])
    with pytest.raises(LenslabError, match=r"expert 4 does not exist in layer 1: it has experts 0..3"):
        routers.check_experts(model, [(1, 4)])
    with pytest.raises(LenslabError, match="not a \\(layer, expert\\) pair"):
        routers.check_experts(model, [3])
    ranking = routers.ftri_rank(model, ["w1 w2"], ["w3 w4"])
    with pytest.raises(LenslabError, match="expert -1 does not exist"):
        ranking.score(0, -1)
    with pytest.raises(LenslabError, match="layer 2 is not a MoE layer"):
        ranking.score(2, 0)
    with pytest.raises(LenslabError, match="other_prompts is empty"):
        routers.ftri_rank(model, ["w1"], [])
    with pytest.raises(LenslabError, match="prompts must be a non-empty list"):
        routers.route(model, [])


def test_one_expert_id_check_serves_every_area(dirs):
    """routers.expert_pairs / check_experts is the one expert-id check: switching experts off or on
    (steering) and pruning super experts (probes) give its messages."""
    model = lenslab.load_model(str(dirs["olmoe"]), device="cpu")
    assert routers.expert_pairs([(1, 1), (1, 1), ("0", 2)]) == [(1, 1), (0, 2)]  # ints, each once
    with pytest.raises(LenslabError, match=r"expert \(1, True\) is not a \(layer, expert\) pair of ints"):
        routers.expert_pairs([(1, True)])  # never a bool, as the feature-id check
    with pytest.raises(LenslabError, match=r"off entry \(0, -2\) is negative"):
        steering.switch_experts(off=[(0, -2)])
    with pytest.raises(LenslabError, match=r"on entry 'x' is not a \(layer, expert\) pair of ints"):
        steering.switch_experts(on=["x"])
    with pytest.raises(
        LenslabError, match=r"expert 4 does not exist in layer 1: it has experts 0..3 \(it has no shared"
    ):
        with super_experts.prune_experts(model, [(1, 4)]):
            pass
