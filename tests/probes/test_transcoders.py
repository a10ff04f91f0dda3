"""lenslab.probes.transcoders: training recovers a planted MLP, splicing with the error term is exact,
circuit-tracer's on-disk layouts load, the shipped zoo transcoders' card numbers re-measure, bad input errs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lenslab import LenslabError, labels
from lenslab.probes import attribution_graph as AG
from lenslab.probes import transcoders as T
from lenslab.zoo import ZOO_DIR
from lenslab.zoo import train_transcoders as recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(randomize_params):
    """A 1-layer model whose MLP is itself a sparse ReLU transcoder (ReLU MLP, neurons biased off)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=40, n_ctx=16, act_fn="relu",
        normalization_type="LN", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    randomize_params(model, seed=1)
    with torch.no_grad():
        model.blocks[0].mlp.b_in.sub_(0.5)  # most neurons off on most tokens: a sparse code
    model.eval()
    return model


def _tokens(n=96, pos=16, seed=0):
    return torch.randint(0, 40, (n, pos), generator=torch.Generator().manual_seed(seed))


# --- training on a planted MLP ----------------------------------------------------------------------
def test_relu_transcoder_recovers_a_planted_sparse_mlp(planted):
    tcs = T.train_transcoders(
        planted, _tokens(), d_transcoder=48, activation="relu", k=None, sparsity=1e-4, skip=False,
        steps=1500, batch_size=256, lr=3e-3, progress=False,
    )  # fmt: skip
    m = T.transcoder_metrics(planted, tcs, _tokens(32, seed=1))
    # Measured 0.996 EV, KL 1.3e-4: the MLP is in the transcoder's function class, so it is recovered
    # up to the optimiser's error (tolerance: EV >= 0.97, KL <= 5e-3 nats).
    assert m.explained_variance[0] >= 0.97, m.explained_variance
    assert m.kl <= 5e-3
    # the MLP's neurons that fire are matched by learned decoder directions. Measured: 23 live
    # neurons, 21 with a decoder direction at cosine >= 0.9, median 0.988.
    w_out = planted.blocks[0].mlp.W_out.detach()  # [d_mlp, d_model]
    cos = torch.nn.functional.normalize(w_out, dim=-1) @ torch.nn.functional.normalize(tcs[0].W_dec, dim=-1).T
    _, cache = planted.run_with_cache(_tokens(32, seed=1), names_filter="blocks.0.mlp.hook_post")
    live = (cache["blocks.0.mlp.hook_post"] > 0).float().mean((0, 1)) > 0.05
    best = cos.max(1).values[live]
    assert live.sum() >= 10 and (best >= 0.9).float().mean() >= 0.85 and best.median() >= 0.97, best


def test_topk_and_jumprelu_train_and_deterministic(planted):
    kw = dict(d_transcoder=32, k=4, steps=60, batch_size=128, progress=False, layers=[0])
    a = T.train_transcoders(planted, _tokens(), activation="topk", **kw)
    b = T.train_transcoders(planted, _tokens(), activation="topk", **kw)
    assert torch.equal(a[0].W_dec, b[0].W_dec)  # deterministic for a seed
    assert T.transcoder_metrics(planted, a, _tokens(8, seed=2)).l0 == [4.0]
    j = T.train_transcoders(planted, _tokens(), activation="jumprelu", sparsity=1e-3, **kw)
    assert j[0].threshold is not None and bool((j[0].threshold != 0.05).any())  # the threshold learned


def test_clt_trains_and_reconstructs(planted):
    clt = T.train_clt(
        planted,
        _tokens(),
        d_transcoder=48,
        activation="relu",
        k=None,
        sparsity=1e-4,
        steps=800,
        lr=3e-3,
        batch_size=256,
        progress=False,
    )
    m = T.transcoder_metrics(planted, clt, _tokens(32, seed=1))
    assert m.kind_of == "cross-layer" and m.explained_variance[0] >= 0.9, m.explained_variance


# --- splicing --------------------------------------------------------------------------------------
def test_error_term_reproduces_the_original_logits(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    tcs = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    toks = model.to_tokens(["When Mary and John went to the store, John gave a drink to"] * 2)
    clean = model(toks)
    same = model.run_with_hooks(toks, fwd_hooks=T.replacement_hooks(model, tcs, error=True))
    assert (same - clean).abs().max() < 1e-5
    replaced = model.run_with_hooks(toks, fwd_hooks=T.replacement_hooks(model, tcs))
    assert (replaced - clean).abs().max() > 1e-3  # without the error term it is the replacement model
    # a random CLT with the error term: also exact
    clt = T.CrossLayerTranscoder(4, 128, 16, activation="relu", skip=True)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.1)
    same = model.run_with_hooks(toks, fwd_hooks=T.replacement_hooks(model, clt, error=True))
    assert (same - clean).abs().max() < 1e-5


# --- circuit-tracer's layouts ------------------------------------------------------------------------
def test_load_circuit_tracer_per_layer_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_model, d_t = 8, 12
    ref = {}
    for layer in range(2):
        d = {
            "W_enc": torch.randn(d_t, d_model, generator=g),  # F.linear(x, W_enc, b_enc)
            "W_dec": torch.randn(d_t, d_model, generator=g),  # acts @ W_dec + b_dec
            "b_enc": torch.randn(d_t, generator=g),
            "b_dec": torch.randn(d_model, generator=g),
            "W_skip": torch.randn(d_model, d_model, generator=g),  # x @ W_skip.T
            "activation_function.threshold": torch.rand(d_t, generator=g),
        }
        save_file(d, str(tmp_path / f"layer_{layer}.safetensors"))
        ref[layer] = d
    tcs = T.load_transcoders(tmp_path)
    assert tcs.layers == [0, 1] and tcs.input_hook == T.INPUT_HOOK and tcs[0].activation == "jumprelu"
    x = torch.randn(5, d_model, generator=g)
    for layer, d in ref.items():
        pre = torch.nn.functional.linear(x, d["W_enc"], d["b_enc"])
        acts = pre * (pre > d["activation_function.threshold"])
        want = acts @ d["W_dec"] + d["b_dec"] + x @ d["W_skip"].T
        torch.testing.assert_close(tcs[layer](x), want, rtol=1e-5, atol=1e-5)
    # circuit-tracer's older ReLU layout: W_dec stored [d_model, d_sae], no threshold, no skip
    old = {
        "W_enc": ref[0]["W_enc"],
        "W_dec": ref[0]["W_dec"].T.contiguous(),
        "b_enc": ref[0]["b_enc"],
        "b_dec": ref[0]["b_dec"],
    }
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "layer_0.safetensors"))
    t = T.load_transcoders(tmp_path / "old")[0]
    assert t.activation == "relu" and t.W_skip is None
    torch.testing.assert_close(
        t(x), torch.relu(x @ ref[0]["W_enc"].T + ref[0]["b_enc"]) @ ref[0]["W_dec"] + ref[0]["b_dec"]
    )


def test_load_circuit_tracer_clt_layout(tmp_path):
    g = torch.Generator().manual_seed(1)
    n, d_model, d_t = 3, 8, 10
    enc, dec = [], []
    for i in range(n):
        e = {
            f"W_enc_{i}": torch.randn(d_t, d_model, generator=g),
            f"b_enc_{i}": torch.randn(d_t, generator=g),
            f"b_dec_{i}": torch.randn(d_model, generator=g),
            f"threshold_{i}": torch.rand(d_t, generator=g),
        }
        w = {f"W_dec_{i}": torch.randn(d_t, n - i, d_model, generator=g)}
        save_file(e, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file(w, str(tmp_path / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(w[f"W_dec_{i}"])
    clt = T.load_transcoders(tmp_path)
    assert isinstance(clt, T.CrossLayerTranscoder) and clt.activation == "jumprelu" and clt.n_layers == n
    xs = torch.randn(n, 4, d_model, generator=g)
    # circuit-tracer: features = einsum("lbd,lfd->lbf", x, W_enc) + b_enc; JumpReLU mask; decoder i writes to i..n-1
    feats = []
    for i in range(n):
        pre = xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        feats.append(pre * (pre > enc[i][f"threshold_{i}"]))
    want = torch.stack(
        [sum(feats[i] @ dec[i][:, l - i] for i in range(l + 1)) + enc[l][f"b_dec_{l}"] for l in range(n)]
    )
    torch.testing.assert_close(clt(xs), want, rtol=1e-5, atol=1e-5)
    # and lenslab's writer gives back the same files' contents
    T.save_transcoders(clt, tmp_path / "again")
    torch.testing.assert_close(T.load_transcoders(tmp_path / "again")(xs), want, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_topk(tmp_path):
    tcs = T.load_transcoders("zoo/steer-sentiment/per-layer")
    T.save_transcoders(tcs, tmp_path / "tc")
    back = T.load_transcoders(tmp_path / "tc")
    assert back.layers == tcs.layers and back[0].activation == "topk" and back[0].k == tcs[0].k
    for layer in tcs.layers:
        for name, p in tcs[layer].state_dict().items():
            assert torch.equal(back[layer].state_dict()[name], p), name


# --- the shipped transcoders ----------------------------------------------------------------------
# model -> (largest folder in bytes, smallest explained variance of an MLP): english-4l's transcoders
# are three times wider (d_transcoder 768 on d_model 192: 5.2 MB) and read ordinary text
ROOT_DOCS = Path(__file__).resolve().parents[2] / "docs"
SHIPPED_TC = {
    "zoo/ioi-4l": (2_000_000, 0.8),
    "zoo/steer-sentiment": (2_000_000, 0.8),
    "zoo/english-4l": (6_000_000, 0.88),
}


def _remeasured(model_name: str, name: str, zoo_models):
    """A shipped transcoder set's held-out metrics measured again from its weights, checked against
    its metrics.json (one thread, fixed seeds: bit-reproducible on one machine; 1e-5 relative
    across CPUs) and its card's loss and KL lines. Returns (folder, metrics, metrics.json)."""
    folder = ZOO_DIR / model_name.removeprefix("zoo/") / "transcoders" / name
    saved = json.loads((folder / "metrics.json").read_text())
    m = recipe.held_out_metrics(zoo_models(model_name), folder)
    for key in ("mse", "explained_variance", "l0", "dead_fraction"):
        torch.testing.assert_close(torch.tensor(getattr(m, key)), torch.tensor(saved[key]), rtol=1e-5, atol=1e-7)
    for key in ("ce_loss_clean", "ce_loss_replaced", "ce_loss_zero", "kl", "n_tokens"):
        assert getattr(m, key) == pytest.approx(saved[key], rel=1e-5, abs=1e-7), key
    text = (folder / "card.md").read_text()
    assert f"| loss, replacement model | {m.ce_loss_replaced:.4f} |" in text
    assert f"| KL(original ‖ replacement), mean per prediction | {m.kl:.4f} |" in text
    return folder, m, saved


@pytest.mark.parametrize("model_name", list(SHIPPED_TC))
def test_shipped_card_numbers_remeasure(model_name, zoo_models, doc_numbers):
    folder, m, _ = _remeasured(model_name, "per-layer", zoo_models)
    size = sum(p.stat().st_size for p in folder.iterdir())
    doc_row = next(
        r for r in (ROOT_DOCS / "transcoders.md").read_text().splitlines() if r.startswith(f"| {model_name} |")
    )
    assert f"| {m.ce_loss_clean:.4f} → {m.ce_loss_replaced:.4f} |" in doc_row, doc_row  # docs/transcoders.md's table
    max_size, min_ev = SHIPPED_TC[model_name]
    assert size < max_size  # small files
    # the replacement model stays close to the original (measured: see the card)
    assert m.loss_recovered > 0.9 and min(m.explained_variance) > min_ev


# model -> (largest folder in bytes, smallest explained variance of an MLP output, smallest loss
# recovered) of its shipped CLT: english-4l's is held to 2 MB (128 features per layer) on ordinary text
SHIPPED_CLT = {
    "zoo/english-4l": (2_000_000, 0.8, 0.9),  # measured 0.922 (0.966 on the first english-4l)
    "zoo/ioi-4l": (2_000_000, 0.9, 0.95),
    "zoo/steer-sentiment": (2_000_000, 0.9, 0.95),
}


@pytest.mark.parametrize(
    "model_name",
    [pytest.param(m, marks=pytest.mark.slow) if m == "zoo/english-4l" else m for m in SHIPPED_CLT],  # 32,768 tokens
)
def test_shipped_clt_card_numbers_remeasure(model_name, zoo_models, doc_numbers):
    """The committed cross-layer transcoder's held-out metrics, re-measured from its weights, are
    metrics.json's (one thread: bit-equal on one machine; tolerance 1e-5 relative across CPUs)."""
    folder, m, saved = _remeasured(model_name, "clt", zoo_models)
    assert m.kind_of == saved["kind_of"] == "cross-layer" and m.layers == saved["layers"]
    # docs/transcoders.md's table: every number is the measurement at its printed digits
    rows = doc_numbers.table((ROOT_DOCS / "transcoders.md").read_text(), "| cross-layer transcoders |")
    _, ev, l0, dead, loss, kl = next(r for r in rows if r[0] == f"{model_name}/clt")

    def cells(cell: str, values: list[float], check) -> None:
        if "–" in cell:  # a range: min–max
            lo, hi = cell.split("–")
            assert check(min(values), lo) and check(max(values), hi), (cell, values)
        else:  # one number per layer, or one for all
            parts = cell.split(", ")
            parts = parts * len(values) if len(parts) == 1 else parts
            assert len(parts) == len(values) and all(check(v, x) for v, x in zip(values, parts)), (cell, values)

    cells(ev, m.explained_variance, doc_numbers.close)
    cells(l0, m.l0, doc_numbers.close)
    cells(dead, m.dead_fraction, doc_numbers.pct)
    clean, replaced = loss.split(" → ")
    assert doc_numbers.close(m.ce_loss_clean, clean) and doc_numbers.close(m.ce_loss_replaced, replaced), loss
    assert doc_numbers.close(m.kl, kl), kl
    max_size, min_ev, min_recovered = SHIPPED_CLT[model_name]
    assert sum(p.stat().st_size for p in folder.iterdir()) < max_size
    # the replacement model stays close to the original (measured: see the card)
    assert m.loss_recovered > min_recovered and min(m.explained_variance) > min_ev


def test_shipped_clt_loads_by_name_and_its_graph_is_exact(zoo_models):
    """`load_transcoders("zoo/ioi-4l/clt")` is the recipe's CLT, listed beside the per-layer set; its
    frozen replacement with error nodes reproduces the original logits, and its attribution graph
    keeps circuit-tracer's identity: each node's input is the sum of its incoming edges plus its
    constant, and zeroing a feature moves the logit target by exactly the edge."""
    model = zoo_models("zoo/ioi-4l")
    clt = T.load_transcoders("zoo/ioi-4l/clt", model=model)
    settings = recipe.RECIPES[("zoo/ioi-4l", "clt")]
    assert isinstance(clt, T.CrossLayerTranscoder) and clt.kind == "cross-layer"
    assert (clt.n_layers, clt.d_transcoder, clt.activation, clt.k) == (
        4,
        settings["d_transcoder"],
        "topk",
        settings["k"],
    )
    assert clt.W_skip is not None and clt.model_name == "zoo/ioi-4l"
    assert {"zoo/english-4l/clt", "zoo/ioi-4l/clt", "zoo/steer-sentiment/clt"} <= set(T.list_transcoders())
    prompt = "When Mary and John went to the store, John gave a drink to"
    toks = model.to_tokens(prompt)
    frozen = AG.FrozenReplacement(model, toks[0], clt)
    with torch.no_grad():
        clean = model(toks)
        assert (frozen.logits() - clean).abs().max() < 1e-5  # error nodes: the original logits
        same = model.run_with_hooks(toks, fwd_hooks=T.replacement_hooks(model, clt, error=True))
        assert (same - clean).abs().max() < 1e-5
    g = AG.attribution_graph(model, prompt, "zoo/ioi-4l/clt")  # every active feature
    assert g.provenance["transcoders"] == "cross-layer" and 0 < g.replacement_score < 1
    kinds = [labels.parse(n).kind for n in g.nodes]
    n_active = int(sum((frozen.values["features"][layer] != 0).sum() for layer in range(4)))
    assert kinds.count("feature") == g.provenance["n_active_features"] == n_active > 100
    assert kinds.count("error") == 4 * toks.shape[1]
    rows = [i for i, k in enumerate(kinds) if k in ("feature", "logit")]
    torch.testing.assert_close(g.adjacency[rows].sum(1) + g.biases[rows], g.inputs[rows], atol=1e-4, rtol=1e-5)
    # the strongest feature -> logit edge (decoded into every later layer) equals its intervention
    top = len(g.nodes) - len(g.target_weights)
    n = labels.parse(g.nodes[top])
    W_U = model.W_U.detach().float()
    tgt = [AG.Target(g.nodes[top], AG.FINAL_HOOK, n.pos, W_U[:, n.index] - W_U.mean(-1))]
    src = max((i for i, k in enumerate(kinds) if k == "feature"), key=lambda i: abs(float(g.adjacency[top, i])))
    moved = frozen.read(tgt) - frozen.read(tgt, frozen.without(g.nodes[src]))
    assert abs(float(g.adjacency[top, src])) > 1e-3
    assert float(moved[0]) == pytest.approx(float(g.adjacency[top, src]), abs=1e-4)


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input_errors(zoo_models):
    ioi, sent = zoo_models("zoo/ioi-4l"), zoo_models("zoo/steer-sentiment")
    tcs = T.load_transcoders("zoo/ioi-4l/per-layer")
    with pytest.raises(LenslabError, match="d_model=128 but model 'zoo/steer-sentiment' has d_model=96"):
        T.replacement_hooks(sent, tcs)
    with pytest.raises(LenslabError, match="out of range"):
        T.check_transcoders(ioi, T.TranscoderSet({7: T.Transcoder(128, 8, layer=7)}))
    with pytest.raises(LenslabError, match="spans 3 layers but model 'zoo/ioi-4l' has 4"):
        T.check_transcoders(ioi, T.CrossLayerTranscoder(3, 128, 8))
    with pytest.raises(LenslabError, match="TopK transcoder needs k"):
        T.Transcoder(8, 4, layer=0, activation="topk", k=9)
    with pytest.raises(LenslabError, match="no zoo transcoders"):
        T.load_transcoders("zoo/ioi-4l/nope")


def test_attention_only_model_has_no_transcoders(zoo_models):
    ind = zoo_models("zoo/induction-2l")
    with pytest.raises(LenslabError, match="attention-only: it has no MLPs"):
        T.train_transcoders(ind, _tokens(4), steps=1, progress=False)
    with pytest.raises(LenslabError, match="attention-only: it has no MLPs"):
        T.load_transcoders("zoo/induction-2l/per-layer")
    with pytest.raises(LenslabError, match="attention-only"):
        T.train_clt(ind, _tokens(4), steps=1, progress=False)
