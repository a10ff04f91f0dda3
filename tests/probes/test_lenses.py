"""lenslab.probes.lenses: the tuned lens against an exact affine map, the shipped zoo lenses against
their cards and the logit lens, tuned-lens's on-disk layout, clear errors, the Result contract, and
`lenslab lens`.

Tolerances are stated at each assertion. The zoo lenses' numbers are recomputed from the committed
weights (nothing is retrained here) on the cards' held-out rows, one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lenslab import LenslabError, figures, inspection
from lenslab.cli import main
from lenslab.probes import lenses
from lenslab.zoo import train_lenses

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "t1 t2 t3 t4 t1 t2 t3"
TL_CONFIG_KEYS = [  # tuned-lens's TunedLensConfig fields, in its order (tuned_lens/nn/lenses.py)
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
]


# --- (a) an exact affine map is recovered ------------------------------------------------------
D, V, N_CTX = 8, 32, 8


def _affine_model():
    """A 2-layer model without LayerNorm whose block 1 is exactly affine: attention writes only
    its bias (W_O = 0) and the ReLU MLP's pre-activations stay far above 0 (b_in = 10), so
    `resid_post_1 = h + h M + c` for `h = resid_pre_1`, with `M = W_in W_out` and `c` chosen.
    Block 0 is an ordinary random block. Returns `(model, M, c)`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D,
        n_heads=2,
        d_head=D // 2,
        d_mlp=2 * D,
        d_vocab=V,
        n_ctx=N_CTX,
        act_fn="relu",
        normalization_type=None,
        seed=0,
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.W_E.copy_(torch.randn(V, D, generator=g))
        model.W_pos.copy_(0.3 * torch.randn(N_CTX, D, generator=g))
        model.W_U.copy_(3 * torch.randn(D, V, generator=g) / D**0.5)
        model.b_U.copy_(0.5 * torch.randn(V, generator=g))
        blk = model.blocks[1]
        blk.attn.W_O.zero_()
        blk.attn.b_O.copy_(0.5 * torch.randn(D, generator=g))
        blk.mlp.W_in.copy_(0.1 * torch.randn(D, 2 * D, generator=g))
        blk.mlp.b_in.fill_(10.0)
        blk.mlp.W_out.copy_(0.5 * torch.randn(2 * D, D, generator=g))
        M = blk.mlp.W_in @ blk.mlp.W_out
        c = 0.5 * torch.randn(D, generator=g)
        # resid_mid = h + b_O, so resid_post = h + h M + (b_O + b_O M + b_in W_out + b_out): solve for b_out
        blk.mlp.b_out.copy_(c - blk.attn.b_O - blk.attn.b_O @ M - blk.mlp.b_in @ blk.mlp.W_out)
    model.eval()
    return model, M.detach().clone(), c


def test_tuned_lens_recovers_an_exact_affine_map():
    """Translator 1 learns `W = M^T`, `b = c` (nn.Linear's convention), and its KL goes to ~0; the
    logit lens stays far off. Settings: 500 steps of 128 tokens, lr 4 (the authors' 1.0 needs about
    four times the steps for this accuracy) and no weight decay (decay pulls the minimiser towards
    the identity, off the exact map). Measured: relative error of W 0.009, bias error 0.0013,
    translated residual 0.004 of the final one's spread, KL 5e-7 nats; the bounds leave ~3x room."""
    model, M, c = _affine_model()
    tokens = torch.randint(0, V, (4096, N_CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:256])
    h, final = cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_post"]
    assert float(cache["blocks.1.mlp.hook_pre"].min()) > 1.0  # ReLU is the identity here: block 1 is affine
    torch.testing.assert_close(h + h @ M + c, final, atol=1e-4, rtol=0)

    lens = lenses.train_tuned_lens(
        model, tokens, steps=500, tokens_per_step=128, lr=4.0, weight_decay=0.0, seed=0, progress=False
    )
    W, b = lens.translators[1].weight.detach(), lens.translators[1].bias.detach()
    assert float((W - M.T).norm() / M.norm()) < 0.03
    assert float((b - c).abs().max()) < 0.005
    with torch.no_grad():  # the translated residual against the final one, relative to its spread
        assert float((lens(h, 1) - final).norm() / (final - final.mean((0, 1))).norm()) < 0.01

    kl = lenses.lens_kl(model, lens, tokens[-512:])  # held-out rows
    assert float(kl.of("tuned")[1]) < 1e-4 < 1.0 < float(kl.of("logit")[1])
    assert float(kl.top1[1, 1]) > 0.99
    assert (kl.of("tuned") < kl.of("logit")).all()  # layer 0 (a nonlinear block away) improves too


def test_training_is_deterministic_and_leaves_the_model_alone(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [p.requires_grad for p in tiny_model.parameters()]
    seen = []
    kw = dict(steps=4, tokens_per_step=64, seed=3)
    a = lenses.train_tuned_lens(
        tiny_model, [PROMPT, "t5 t6 t7", "t8 t9"], progress=lambda d, t: seen.append((d, t)), **kw
    )
    b = lenses.train_tuned_lens(tiny_model, [PROMPT, "t5 t6 t7", "t8 t9"], progress=False, **kw)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert any(float(p.detach().abs().max()) > 0 for p in a.parameters())  # it moved off the identity
    assert seen == [(i, 4) for i in range(1, 5)]
    assert a.info["steps"] == 4 and a.info["seed"] == 3 and a.model_name == tiny_model.cfg.model_name
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    assert [p.requires_grad for p in tiny_model.parameters()] == grads


# --- (b) the shipped lenses --------------------------------------------------------------------
@pytest.mark.parametrize("name", train_lenses.MODELS)
def test_shipped_tuned_lens_beats_the_logit_lens_and_matches_its_card(zoo_models, name, doc_numbers):
    """On the card's held-out rows, the committed translators' KL is below the logit lens's at every
    layer, and every number of the card's table is this measurement at its printed digits."""
    model = zoo_models(name)
    folder = train_lenses.lens_folder(name)
    assert (
        sum(f.stat().st_size for f in folder.iterdir()) < 700_000
    )  # small files (KB; english-4l: 4 x 192 x 192 float32 translators, 594 KB)
    kl = lenses.lens_kl(model, None, train_lenses.held_out(model))
    assert kl.layer_labels == [f"{l}_pre" for l in range(model.cfg.n_layers)]
    assert (kl.of("tuned") < kl.of("logit")).all(), kl.table()
    assert (kl.top1[1] >= kl.top1[0]).all()
    card = (folder / "card.md").read_text()
    rows = doc_numbers.table(card, "| layer | logit lens KL")
    assert [r[0] for r in rows] == [f"`{label}`" for label in kl.layer_labels]
    for i, (_, kl_logit, kl_tuned, top_logit, top_tuned) in enumerate(rows):
        assert doc_numbers.close(float(kl.kl[0, i]), kl_logit), (name, i, kl_logit)
        assert doc_numbers.close(float(kl.kl[1, i]), kl_tuned), (name, i, kl_tuned)
        assert doc_numbers.pct(float(kl.top1[0, i]), top_logit) and doc_numbers.pct(float(kl.top1[1, i]), top_tuned)
    assert f"{kl.n_tokens:,} tokens of {train_lenses.N_EVAL} fresh rows" in card


def test_lenses_doc_quotes_the_cards(doc_numbers):
    """docs/lenses.md's table of the shipped lenses is the cards' (which the test above recomputes)."""
    doc = (Path(__file__).parents[2] / "docs" / "lenses.md").read_text()
    rows = doc_numbers.table(doc, "| model | layer | logit lens KL")
    cards = {}
    for name in train_lenses.MODELS:
        card = (train_lenses.lens_folder(name) / "card.md").read_text()
        for r in doc_numbers.table(card, "| layer | logit lens KL"):
            cards[(name, r[0])] = r[1:3]
    assert {(r[0], r[1]): r[2:] for r in rows} == cards


def test_tuned_lens_reads_the_shipped_translators(zoo_models):
    """`tuned_lens` on the prompt: each row is norm(h + W h + b) @ W_U + b_U recomputed from the
    cache and the weights (LayerNorm written out), to 1e-4; the last row is the model's output."""
    model = zoo_models("zoo/ioi-4l")
    prompt = "When Mary and John went to the store, John gave a drink to"
    res = lenses.tuned_lens(model, prompt, k=3)
    assert res.lens == "tuned" and res.provenance["tuned_lens"] == "zoo/ioi-4l (shipped)"
    lens = lenses.load_tuned_lens("zoo/ioi-4l")
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens)
        rows = []
        for l in range(model.cfg.n_layers):
            h = cache["resid_pre", l][0]
            t = lens.translators[l]
            x = h + h @ t.weight.T + t.bias
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + model.cfg.eps).sqrt()
            rows.append((x * model.ln_final.w + model.ln_final.b) @ model.W_U + model.b_U)
        ref = torch.stack([*rows, out[0]]).softmax(-1)
    torch.testing.assert_close(res.top_probs, ref.topk(3, dim=-1).values, atol=1e-4, rtol=0)
    assert res.top_ids[-1, -1, 0] == out[0, -1].argmax() and res.top_tokens[-1][-1][0] == "Mary"
    logit = lenses.logit_lens(model, prompt, k=3)
    assert logit.lens == "logit" and torch.equal(logit.top_ids[-1], res.top_ids[-1])


# --- (c) tuned-lens's on-disk layout -----------------------------------------------------------
def _write_tuned_lens_folder(folder: Path, d_model: int, n_layers: int, *, bias=True, dtype=torch.float32, **cfg):
    """Files as tuned-lens's `TunedLens.save` writes them: `params.pt` (torch.save of the
    `layer_translators` ModuleList's state dict) and `config.json` (`TunedLensConfig.to_dict()`)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    state = {}
    for i in range(n_layers):
        state[f"{i}.weight"] = (0.1 * torch.randn(d_model, d_model, generator=g)).to(dtype)
        if bias:
            state[f"{i}.bias"] = (0.1 * torch.randn(d_model, generator=g)).to(dtype)
    torch.save(state, folder / "params.pt")
    config = dict(
        base_model_name_or_path="tiny",
        d_model=d_model,
        num_hidden_layers=n_layers,
        bias=bias,
        base_model_revision=None,
        unembed_hash=None,
        lens_type="linear_tuned_lens",
    )
    config.update(cfg)
    (folder / "config.json").write_text(json.dumps(config))
    return state


def test_tuned_lens_layout_loads_and_round_trips(tiny_model, tmp_path):
    state = _write_tuned_lens_folder(tmp_path / "tl", 32, 2, base_model_name_or_path=str(tiny_model.cfg.model_name))
    lens = lenses.load_tuned_lens(tmp_path / "tl", tiny_model)
    for i in range(2):
        assert torch.equal(lens.translators[i].weight, state[f"{i}.weight"])
        assert torch.equal(lens.translators[i].bias, state[f"{i}.bias"])
    # tuned logits: ln_final(h + h W^T + b) unembedded, row by row, to 1e-5
    tokens = tiny_model.to_tokens(PROMPT)
    read = lenses.lens_logits(tiny_model, tokens, lens)  # [layer, batch, pos, vocab]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
        for l in range(2):
            h = cache["resid_pre", l]
            ref = tiny_model.unembed(tiny_model.ln_final(h + h @ state[f"{l}.weight"].T + state[f"{l}.bias"]))
            torch.testing.assert_close(read[l], ref, atol=1e-5, rtol=0)
    res = lenses.tuned_lens(tiny_model, PROMPT, tmp_path / "tl", k=2)
    assert res.lens == "tuned" and res.provenance["tuned_lens"] == str(tmp_path / "tl")

    # written back in tuned-lens's layout: the same files, keys and values
    lens.save_tuned_lens(tmp_path / "back", tiny_model)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert list(cfg) == TL_CONFIG_KEYS and cfg["d_model"] == 32 and cfg["num_hidden_layers"] == 2
    assert cfg["lens_type"] == "linear_tuned_lens" and len(cfg["unembed_hash"]) == 64
    assert cfg["unembed_hash"] == lenses.unembed_hash(tiny_model)
    back = torch.load(tmp_path / "back" / "params.pt", weights_only=True)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    again = lenses.TunedLens.from_tuned_lens(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lens.state_dict().values()))

    # lenslab's own layout: config.json + translators.safetensors, exact
    lens.save(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "translators.safetensors"]
    ours = lenses.TunedLens.load(tmp_path / "ours")
    assert ours.config()["lenslab_format"] == "lenslab_tuned_lens" and ours.d_model == 32 and ours.n_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), lens.state_dict().values()))


def test_tuned_lens_layout_without_bias_and_in_half_precision(tiny_model, tmp_path):
    state = _write_tuned_lens_folder(tmp_path / "nb", 32, 2, bias=False, dtype=torch.float16)
    lens = lenses.TunedLens.load(tmp_path / "nb")  # TunedLens.load recognises params.pt too
    assert not lens.bias and lens.translators[0].bias is None
    assert lens.translators[1].weight.dtype == torch.float32
    assert torch.equal(lens.translators[1].weight, state["1.weight"].float())
    h = torch.randn(3, 32)
    torch.testing.assert_close(lens(h, 1), h + h @ state["1.weight"].float().T)


def test_shipped_lens_converts_to_tuned_lens_layout_and_back(zoo_models, tmp_path):
    model = zoo_models("zoo/steer-sentiment")
    lens = lenses.load_tuned_lens(None, model)
    lens.save_tuned_lens(tmp_path / "tl", model)
    again = lenses.load_tuned_lens(tmp_path / "tl", model)
    assert again.model_name == "zoo/steer-sentiment"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lens.state_dict().values()))


# --- (d) clear errors --------------------------------------------------------------------------
def test_a_lens_for_another_model_is_a_clear_error(tiny_model, zoo_models, tmp_path):
    with pytest.raises(LenslabError, match=r"has d_model=16 but .* has d_model=32"):
        lenses.load_tuned_lens(lenses.TunedLens(16, 2), tiny_model)
    with pytest.raises(LenslabError, match=r"has 3 translators but .* has 2 layers"):
        lenses.tuned_lens(tiny_model, PROMPT, lenses.TunedLens(32, 3))
    with pytest.raises(LenslabError, match=r"d_model=128 but 'zoo/steer-sentiment' has d_model=96"):
        lenses.lens_kl(zoo_models("zoo/steer-sentiment"), "zoo/ioi-4l", ["the movie was good ."])
    _write_tuned_lens_folder(tmp_path / "deep", 32, 5)
    with pytest.raises(LenslabError, match="has 5 translators but .* has 2 layers"):
        lenses.tuned_lens(tiny_model, PROMPT, tmp_path / "deep")
    _write_tuned_lens_folder(tmp_path / "liar", 32, 2, num_hidden_layers=3)
    with pytest.raises(LenslabError, match=r"params.pt does not match its config .* missing \['2.bias', '2.weight'\]"):
        lenses.TunedLens.load(tmp_path / "liar")
    _write_tuned_lens_folder(tmp_path / "other", 32, 2, lens_type="something_else")
    with pytest.raises(LenslabError, match="lens_type 'something_else' is not supported"):
        lenses.TunedLens.load(tmp_path / "other")
    with pytest.raises(LenslabError, match="holds no tuned lens"):
        lenses.TunedLens.load(tmp_path)
    with pytest.raises(LenslabError, match="is not a zoo model, so it ships no tuned lens"):
        lenses.tuned_lens(tiny_model, PROMPT)
    with pytest.raises(LenslabError, match="'zoo/nope' ships no tuned lens .* zoo/ioi-4l"):
        lenses.load_tuned_lens("zoo/nope")
    with pytest.raises(LenslabError, match="could not be fetched from the Hub"):  # HF_HUB_OFFLINE=1 here
        lenses.load_tuned_lens("no-such-org/no-such-lens")
    with pytest.raises(LenslabError, match="steps must be a positive integer"):
        lenses.train_tuned_lens(tiny_model, [PROMPT], steps=0)


def test_a_lens_for_a_model_of_another_name_warns(tiny_model):
    lens = lenses.TunedLens(32, 2, model_name="zoo/some-other-model")
    with pytest.warns(UserWarning, match="trained for 'zoo/some-other-model'"):
        lenses.load_tuned_lens(lens, tiny_model)


# --- (e) the Result contract -------------------------------------------------------------------
def test_one_result_for_both_lenses(tiny_model, tmp_path):
    trained = lenses.train_tuned_lens(tiny_model, [PROMPT, "t3 t2 t1 t9"], steps=3, tokens_per_step=16, progress=False)
    for res, name in (
        (lenses.logit_lens(tiny_model, PROMPT, k=2), "Logit lens"),
        (lenses.tuned_lens(tiny_model, PROMPT, trained, k=2), "Tuned lens"),
    ):
        assert type(res) is inspection.LogitLens
        back = inspection.LogitLens.from_json(res.to_json())
        assert back.lens == res.lens and torch.equal(back.top_ids, res.top_ids)
        torch.testing.assert_close(back.top_probs, res.top_probs)
        df = res.table()
        assert len(df) == res.top_ids.numel() and df["layer"].iloc[-1] == "final_post"
        fig = res.figure()
        assert fig.layout.title.text.startswith(name) and list(fig.data[0].y) == res.layer_labels
        figures.export(res, tmp_path / f"{res.lens}.json")
        assert inspection.LogitLens.from_json(tmp_path / f"{res.lens}.json").lens == res.lens
    old = json.loads(res.to_json())
    del old["lens"]  # JSON written before the tuned lens existed reads as a logit lens
    assert inspection.LogitLens.from_dict(old).lens == "logit"
    with pytest.raises(LenslabError, match="unknown lens 'nope'"):
        inspection.lens_result(tiny_model, PROMPT, res.top_probs.log(), res.layer_labels, lens="nope")


def test_lens_kl_result_contract(tiny_model, tmp_path):
    trained = lenses.train_tuned_lens(tiny_model, [PROMPT, "t3 t2 t1 t9"], steps=3, tokens_per_step=16, progress=False)
    kl = lenses.lens_kl(tiny_model, trained, [PROMPT, "t1 t5"], batch_size=1)
    assert kl.n_tokens == len(tiny_model.to_tokens(PROMPT)[0]) + 3 and kl.kl.shape == (2, 2)
    back = lenses.LensKL.from_json(kl.to_json())
    assert torch.equal(back.kl, kl.kl) and torch.equal(back.top1, kl.top1) and back.lenses == ["logit", "tuned"]
    df = kl.table()
    assert list(df.columns) == ["layer", "kl_logit", "kl_tuned", "top1_logit", "top1_tuned"]
    assert df["kl_tuned"].tolist() == kl.of("tuned").tolist() and df["layer"].tolist() == ["0_pre", "1_pre"]
    fig = kl.figure()
    assert [t.name for t in fig.data] == ["Logit lens", "Tuned lens"] and list(fig.data[1].y) == kl.of("tuned").tolist()
    assert kl.to_markdown().startswith("| layer | kl_logit |")
    assert figures.export(kl, tmp_path / "kl.html").stat().st_size > 0
    with pytest.raises(LenslabError, match="no lens 'x'"):
        kl.of("x")


# --- the CLI -----------------------------------------------------------------------------------
def test_cli_lens_commands(tmp_path, tiny_zoo_dir, capsys):
    assert main(["lens", "logit", "--model", "zoo/ioi-4l", "--k", "3", "--out", str(tmp_path / "logit.json")]) == 0
    assert inspection.LogitLens.from_json(tmp_path / "logit.json").lens == "logit"
    assert main(["lens", "tuned", "--model", "zoo/ioi-4l", "--out", str(tmp_path / "tuned.json")]) == 0
    tuned = inspection.LogitLens.from_json(tmp_path / "tuned.json")
    assert tuned.lens == "tuned" and tuned.top_tokens[-1][-1][0] == "Mary"  # the model's answer, default prompt
    out = capsys.readouterr().out
    assert "tuned lens of zoo/ioi-4l" in out and "final_post: 'Mary'" in out

    corpus = tmp_path / "docs.txt"
    corpus.write_text("t1 t2 t3 t1 t2 t3\nt4 t5 t6 t4 t5\nt7 t8 t9\n")
    lens_dir = tmp_path / "lens"
    assert (
        main(
            [
                "lens",
                "train",
                "--model",
                str(tiny_zoo_dir),
                "--corpus",
                str(corpus),
                "--steps",
                "2",
                "--out",
                str(lens_dir),
            ]
        )
        == 0
    )
    assert lenses.TunedLens.load(lens_dir).info["steps"] == 2
    args = ["lens", "kl", "--model", str(tiny_zoo_dir), "--lens", str(lens_dir), "--corpus", str(corpus)]
    assert main([*args, "--out", str(tmp_path / "kl.json")]) == 0
    assert lenses.LensKL.from_json(tmp_path / "kl.json").n_tokens == (6 + 1) + (5 + 1) + (3 + 1)  # each row with <bos>
    assert main(["lens", "tuned", "--model", str(tiny_zoo_dir), "--lens", str(lens_dir), "--prompt", "t1 t2"]) == 0

    zoo_dir = tmp_path / "zoo_lens"  # the zoo recipe, cut to 3 steps
    assert main(["lens", "train", "--model", "zoo/induction-2l", "--steps", "3", "--out", str(zoo_dir)]) == 0
    assert (zoo_dir / "card.md").read_text().startswith("# Tuned lens of zoo/induction-2l")
    capsys.readouterr()
    assert main(["lens", "tuned", "--model", str(tiny_zoo_dir)]) == 2
    assert "is not a zoo model, so it ships no tuned lens" in capsys.readouterr().err
    assert main(["lens", "train", "--model", "gpt2", "--out", str(tmp_path / "x")]) == 2
    assert "has no built-in corpus: pass --corpus FILE" in capsys.readouterr().err
