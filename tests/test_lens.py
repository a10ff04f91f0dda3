"""lenslab.inspection (the Model page's analyses) against TransformerLens's own forward pass and
cache, the figures built from them, and the deprecated aliases lenslab.lens / lenslab.plots."""

from __future__ import annotations

import math

import pytest
import torch

import lenslab
from lenslab import LenslabError, inspection, zoo

TINY_PROMPT = "t1 t2 t3 t4 t1 t2 t3"


@pytest.fixture(scope="session")
def default_model():
    """The zoo's default model (the zoo ships with the package: an empty zoo is a failure)."""
    assert zoo.zoo_names(), "the model zoo is empty (run `lenslab zoo train induction-2l`)"
    name = zoo.default_model()
    return lenslab.load_model(name, device="cpu")


@pytest.fixture(scope="session")
def bridge_model(tmp_path_factory):
    """A tiny random Qwen2-MoE checkpoint, which lenslab loads as a TransformerBridge."""
    import transformers as T

    torch.manual_seed(0)
    tok = zoo.word_tokenizer([f"t{i}" for i in range(60)])
    cfg = T.Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    hf = T.AutoModelForCausalLM.from_config(cfg)
    hf.config.architectures = [type(hf).__name__]
    with torch.no_grad():  # HF starts biases at 0 and norm weights at 1: random ones, so neither can hide
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("qwen2_moe")
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    model = lenslab.load_model(str(out), device="cpu")
    assert type(model).__name__ == "TransformerBridge"
    return model


@pytest.fixture(params=["tiny", "bridge", "default"])
def model_and_prompt(request, tiny_model):
    if request.param == "tiny":
        return tiny_model, TINY_PROMPT
    if request.param == "bridge":
        return request.getfixturevalue("bridge_model"), TINY_PROMPT
    model = request.getfixturevalue("default_model")
    return model, zoo.default_prompt(model.cfg.model_name) or "a b c d a b c"


def test_tokenize_matches_model(model_and_prompt):
    model, prompt = model_and_prompt
    tok = inspection.tokenize(model, prompt)
    assert tok.ids.tolist() == model.to_tokens(prompt)[0].tolist()
    assert tok.str_tokens == list(model.to_str_tokens(prompt))
    assert [r["id"] for r in tok.rows()] == tok.ids.tolist() and len(tok) == tok.ids.shape[0]
    assert tok.model == model.cfg.model_name


def test_attention_rows_sum_to_one_and_match_cache(model_and_prompt):
    model, prompt = model_and_prompt
    pat = inspection.attention_patterns(model, prompt)
    n = model.to_tokens(prompt).shape[1]
    assert pat.shape == (model.cfg.n_layers, model.cfg.n_heads, n, n)
    torch.testing.assert_close(pat.sum(-1), torch.ones(pat.shape[:-1]), atol=1e-5, rtol=0)
    assert pat.triu(diagonal=1).abs().max() == 0  # causal: no attention to later tokens
    ref = _reference_patterns(model, prompt)
    torch.testing.assert_close(pat, ref, atol=1e-5, rtol=1e-5)


def _reference_patterns(model, prompt: str) -> torch.Tensor:
    """Attention probabilities recomputed outside the hooks: a TransformerBridge's from a fresh
    eager Hugging Face model's `output_attentions`; a HookedTransformer's as
    softmax(q k^T / sqrt(d_head) + causal mask), q and k from the block's weights applied to the
    LayerNorm (its w, b, eps) of the cached residual stream (+ W_pos after the LN for shortformer
    positions, as TransformerLens adds them; rotary positions applied to q and k, GPT-NeoX's halves)."""
    tokens = model.to_tokens(prompt)
    if type(model).__name__ == "TransformerBridge":
        import transformers as T

        path = model.original_model.config._name_or_path
        hf = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            att = hf(tokens, output_attentions=True).attentions
        return torch.stack([a[0].float() for a in att])
    cfg = model.cfg
    assert cfg.normalization_type == "LN" and cfg.positional_embedding_type in ("standard", "shortformer", "rotary")
    assert cfg.attn_scale == math.sqrt(cfg.d_head)  # TransformerLens's default scale, unchanged by these models
    n = tokens.shape[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_pre"))
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    out = []
    for layer in range(cfg.n_layers):
        blk = model.blocks[layer]
        x = cache["resid_pre", layer][0].double()
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + cfg.eps).sqrt()
        x = x * blk.ln1.w.double() + blk.ln1.b.double()
        if cfg.positional_embedding_type == "shortformer":
            x = x + model.W_pos[:n].double()
        W_Q, W_K, b_Q, b_K = (t.detach().double() for t in (blk.attn.W_Q, blk.attn.W_K, blk.attn.b_Q, blk.attn.b_K))
        q = torch.einsum("pd,hde->hpe", x, W_Q) + b_Q[:, None]
        k = torch.einsum("pd,hde->hpe", x, W_K) + b_K[:, None]
        if cfg.positional_embedding_type == "rotary":
            q, k = _rotary(q, cfg), _rotary(k, cfg)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head)).masked_fill(future, float("-inf"))
        out.append(scores.softmax(-1).float())
    return torch.stack(out)


def _rotary(x: torch.Tensor, cfg) -> torch.Tensor:
    """Rotary positions on `[head, pos, d_head]` (float64): the first `rotary_dim` dims in two halves
    rotated by pos / base^(i / (rotary_dim / 2)) (GPT-NeoX's layout, TransformerLens's default)."""
    assert not cfg.rotary_adjacent_pairs and cfg.rotary_dim % 2 == 0
    r, n = cfg.rotary_dim, x.shape[1]
    freq = cfg.rotary_base ** (torch.arange(r // 2, dtype=torch.float64) / (r / 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] / freq.repeat(2)[None, :]
    rot, rest = x[..., :r], x[..., r:]
    flipped = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], -1)
    return torch.cat([rot * angles.cos() + flipped * angles.sin(), rest], -1)


def test_logit_lens_final_layer_is_model_output(model_and_prompt):
    model, prompt = model_and_prompt
    tokens = model.to_tokens(prompt)
    logits, labels = inspection.logit_lens_logits(model, prompt)
    with torch.no_grad():
        ref_logits, cache = model.run_with_cache(tokens)
    assert labels == [f"{i}_pre" for i in range(model.cfg.n_layers)] + ["final_post"]
    torch.testing.assert_close(logits[-1], ref_logits[0].float(), atol=1e-5, rtol=1e-5)
    # every layer: TransformerLens's accumulated_resid(apply_ln=True), then the unembedding
    acc, tl_labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert tl_labels == labels
    with torch.no_grad():
        tl_logits = model.unembed(acc[:, 0])
    torch.testing.assert_close(logits, tl_logits.float(), atol=1e-4, rtol=1e-4)

    ll = inspection.logit_lens(model, prompt, k=3)
    n_pos = tokens.shape[1]
    assert ll.top_ids.shape == ll.top_probs.shape == (model.cfg.n_layers + 1, n_pos, 3)
    log_probs = ref_logits[0].float().log_softmax(-1)
    assert ll.top_ids[-1, :, 0].tolist() == log_probs.argmax(-1).tolist()
    torch.testing.assert_close(ll.top_probs[-1, :, 0].log(), log_probs.max(-1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ll.final_prob[-1], ll.top_probs[-1, :, 0])
    assert (ll.top_probs[..., :-1] >= ll.top_probs[..., 1:]).all()
    assert ll.top_tokens[-1][-1][0] == model.tokenizer.decode([int(ll.top_ids[-1, -1, 0])])
    assert ll.str_tokens == list(model.to_str_tokens(prompt)) and ll.layer_labels == labels


def test_top_predictions_equal_softmax_of_logits(model_and_prompt):
    model, prompt = model_and_prompt
    preds = inspection.top_predictions(model, prompt, k=5)
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))[0, -1].float()
    probs = logits.softmax(-1)
    ref_p, ref_i = probs.topk(5)
    assert [p.id for p in preds] == ref_i.tolist()
    torch.testing.assert_close(torch.tensor([p.prob for p in preds]), ref_p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor([p.logit for p in preds]), logits[ref_i], atol=1e-5, rtol=1e-5)
    assert preds[0].token == model.tokenizer.decode([preds[0].id])
    assert sum(p.prob for p in preds) <= 1 + 1e-6


def test_errors_are_clear(tiny_model):
    with pytest.raises(LenslabError, match="prompt is empty"):
        inspection.attention_patterns(tiny_model, "   ")
    with pytest.raises(LenslabError, match="reads at most 64"):
        inspection.logit_lens(tiny_model, " ".join(["t1"] * 80))
    with pytest.raises(LenslabError, match="k must be a positive integer"):
        inspection.top_predictions(tiny_model, TINY_PROMPT, k=0)
    pat = inspection.attention_patterns(tiny_model, TINY_PROMPT)
    with pytest.raises(LenslabError, match="layer 5 does not exist"):
        inspection.attention_heatmap(pat, ["x"] * pat.shape[-1], layer=5, head=0)
    with pytest.raises(LenslabError, match="head 9 does not exist"):
        inspection.attention_heatmap(pat, ["x"] * pat.shape[-1], layer=0, head=9)


def test_k_larger_than_vocab_is_clamped(tiny_model):
    preds = inspection.top_predictions(tiny_model, TINY_PROMPT, k=10_000)
    assert len(preds) == tiny_model.cfg.d_vocab
    assert abs(sum(p.prob for p in preds) - 1.0) < 1e-4


def test_figures_label_tokens_and_name_the_model(tiny_model):
    name = tiny_model.cfg.model_name
    tok = inspection.tokenize(tiny_model, TINY_PROMPT)
    pat = inspection.attention_patterns(tiny_model, TINY_PROMPT)
    fig = inspection.attention_heatmap(pat, tok.str_tokens, layer=1, head=2, model=name)
    assert name in fig.layout.title.text and "layer 1 head 2" in fig.layout.title.text
    hm = fig.data[0]
    assert list(hm.x) == list(hm.y) == [f"{i} {t}" for i, t in enumerate(tok.str_tokens)]
    assert torch.tensor(hm.z).allclose(pat[1, 2]) and "attention" in hm.hovertemplate
    grid = inspection.attention_heads(pat, tok.str_tokens, layer=0, model=name)
    assert len(grid.data) == tiny_model.cfg.n_heads
    torch.testing.assert_close(torch.tensor(grid.data[3].z), pat[0, 3])

    ll = inspection.logit_lens(tiny_model, TINY_PROMPT, k=2)
    fig = inspection.logit_lens_heatmap(ll)
    assert name in fig.layout.title.text
    assert list(fig.data[0].y) == ll.layer_labels
    assert fig.data[0].text[-1][-1] == ll.top_tokens[-1][-1][0]
    torch.testing.assert_close(torch.tensor(fig.data[0].z), ll.top_probs[..., 0])
    torch.testing.assert_close(torch.tensor(inspection.logit_lens_heatmap(ll, value="final").data[0].z), ll.final_prob)
    with pytest.raises(LenslabError, match="'top' or 'final'"):
        inspection.logit_lens_heatmap(ll, value="nope")

    preds = inspection.top_predictions(tiny_model, TINY_PROMPT, k=4)
    bar = inspection.predictions_bar(preds, model=name)
    assert list(bar.data[0].x) == [p.prob for p in preds] and name in bar.layout.title.text


def test_model_card_and_default_prompt(tiny_zoo_dir, tiny_model):
    card = inspection.model_card(tiny_model)
    assert card.startswith("# tiny") and "| layers | `2` |" in card
    assert zoo.default_prompt(str(tiny_zoo_dir)) == "t1 t2 t3 t1 t2"
    assert zoo.default_prompt("gpt2") is None and zoo.default_prompt("zoo/does-not-exist") is None
    for name in zoo.zoo_names():
        assert zoo.read_card(name).strip()[:40] in inspection.model_card(lenslab.load_model(name, device="cpu"))


def test_predictions_and_logit_lens_are_results(tiny_model):
    """`top_predictions` returns `Predictions`, still the list of `Prediction` tuples it was;
    `LogitLens` and `Predictions` draw the figures the Model page shows and round-trip JSON."""
    preds = inspection.top_predictions(tiny_model, TINY_PROMPT, k=4)
    as_list = list(preds)
    assert isinstance(preds, inspection.Predictions) and all(isinstance(p, inspection.Prediction) for p in as_list)
    assert preds == as_list and preds[1:] == as_list[1:] and preds[-1] is as_list[-1] and len(preds) == 4
    assert preds.table()["id"].tolist() == [p.id for p in preds]
    assert preds.figure().to_dict() == inspection.predictions_bar(preds, model=preds.model).to_dict()
    assert inspection.Predictions.from_json(preds.to_json()) == preds

    ll = inspection.logit_lens(tiny_model, TINY_PROMPT, k=2)
    assert ll.figure().to_dict() == inspection.logit_lens_heatmap(ll).to_dict()
    df = ll.table()
    assert len(df) == ll.top_ids.numel() and df["layer"].iloc[-1] == "final_post"
    assert df["prob"].tolist() == ll.top_probs.flatten().tolist()
    back = inspection.LogitLens.from_json(ll.to_json())
    assert torch.equal(back.top_ids, ll.top_ids) and torch.equal(back.final_prob, ll.final_prob)


def test_deprecated_aliases_warn_and_reexport():
    import importlib
    import sys

    for name, names in [
        ("lenslab.lens", ["logit_lens", "top_predictions", "LogitLens"]),
        ("lenslab.plots", ["attention_heatmap", "predictions_bar"]),
    ]:
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match="use lenslab.inspection"):
            mod = importlib.import_module(name)
        assert all(getattr(mod, n) is getattr(inspection, n) for n in names)
