"""lenslab.probes.transcoders: training recovers a planted MLP, splicing with the error term is exact,
circuit-tracer's on-disk layouts load, the shipped zoo transcoders' card numbers re-measure, bad input errs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lenslab import LenslabError
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


@pytest.mark.parametrize("model_name", list(SHIPPED_TC))
def test_shipped_card_numbers_remeasure(model_name, zoo_models, doc_numbers):
    folder = ZOO_DIR / model_name.removeprefix("zoo/") / "transcoders" / "per-layer"
    saved = json.loads((folder / "metrics.json").read_text())
    m = recipe.held_out_metrics(zoo_models(model_name), folder)
    # one thread, fixed seeds: bit-reproducible on one machine; 1e-5 relative across CPUs
    for key in ("mse", "explained_variance", "l0", "dead_fraction"):
        torch.testing.assert_close(torch.tensor(getattr(m, key)), torch.tensor(saved[key]), rtol=1e-5, atol=1e-7)
    for key in ("ce_loss_clean", "ce_loss_replaced", "ce_loss_zero", "kl", "n_tokens"):
        assert getattr(m, key) == pytest.approx(saved[key], rel=1e-5, abs=1e-7), key
    text = (folder / "card.md").read_text()
    assert f"| loss, replacement model | {m.ce_loss_replaced:.4f} |" in text
    assert f"| KL(original ‖ replacement), mean per prediction | {m.kl:.4f} |" in text
    size = sum(p.stat().st_size for p in folder.iterdir())
    doc_row = next(
        r for r in (ROOT_DOCS / "transcoders.md").read_text().splitlines() if r.startswith(f"| {model_name} |")
    )
    assert f"| {m.ce_loss_clean:.4f} → {m.ce_loss_replaced:.4f} |" in doc_row, doc_row  # docs/transcoders.md's table
    max_size, min_ev = SHIPPED_TC[model_name]
    assert size < max_size  # small files
    # the replacement model stays close to the original (measured: see the card)
    assert m.loss_recovered > 0.9 and min(m.explained_variance) > min_ev


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
