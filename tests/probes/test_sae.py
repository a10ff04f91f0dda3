"""lenslab.probes.sae: loading (folders, zoo, sae-lens releases offline), checks against the model,
metrics against sae-lens's own evaluation code, training with sae-lens's runner, the shipped zoo SAEs."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from lenslab import LenslabError
from lenslab.probes import sae as S

IOI_SAE = "zoo/ioi-4l/blocks.2.hook_resid_post"
IND_SAE = "zoo/induction-2l/blocks.0.hook_resid_post"

# Bounds on the committed weights, measured on the cards' held-out rows (cards: lenslab/zoo/*/saes/*/card.md).
# (zoo SAE, loss recovered on all next-token predictions >=, on the model's objective >=, explained variance >=)
# Measured: english 0.944 / 0.944 / 0.920, induction 1.004 / 0.997 / 0.943, ioi 0.973 / 0.999 / 0.904, sentiment 1.000 / 1.000 / 0.997.
SHIPPED = [
    ("zoo/english-4l/blocks.2.hook_resid_post", 0.93, 0.93, 0.91),
    ("zoo/induction-2l/blocks.0.hook_resid_post", 0.96, 0.99, 0.89),
    ("zoo/ioi-4l/blocks.2.hook_resid_post", 0.96, 0.99, 0.89),
    ("zoo/steer-sentiment/blocks.1.hook_resid_post", 0.96, 0.99, 0.89),
]


def _random_sae(d_in: int, d_sae: int, hook: str, seed: int = 0, arch: str = "topk"):
    """An untrained sae-lens inference SAE with random weights (b_enc shifted so that features fire)."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook, model_name="test")
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        if hasattr(sae, "b_enc"):
            sae.b_enc.normal_(0, 0.1)
    return sae


# --- loading ----------------------------------------------------------------------------------
def test_folder_round_trip(tmp_path, tiny_model):
    sae = _random_sae(32, 64, "blocks.1.hook_resid_post")
    sae.save_model(tmp_path / "s")
    back = S.load_sae(tmp_path / "s", model=tiny_model)  # with model: check_sae passes
    assert type(back) is type(sae)
    assert back.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and (back.cfg.d_in, back.cfg.d_sae) == (32, 64)
    for name, p in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    x = torch.randn(5, 32)
    assert torch.equal(back.encode(x), sae.encode(x))
    # the same folder through a string path and the card/metrics readers (none written here)
    assert torch.equal(S.load_sae(str(tmp_path / "s")).W_dec, sae.W_dec)
    assert S.read_metrics(tmp_path / "s") == {} and S.read_sae_card(str(tmp_path / "s")) == ""


def test_zoo_sae_is_the_sae_lens_folder():
    from sae_lens import SAE

    sae = S.load_sae(IOI_SAE)
    ref = SAE.load_from_disk(str(S.zoo_sae_path(IOI_SAE)))
    assert torch.equal(sae.W_enc, ref.W_enc) and torch.equal(sae.W_dec, ref.W_dec)
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post" and sae.cfg.d_in == 128
    assert S.list_saes("zoo/ioi-4l") == [IOI_SAE] and S.list_saes("ioi-4l") == [IOI_SAE]
    assert S.list_saes("gpt2") == [] and S.list_saes("zoo/moe-refusal") == []
    assert "loss recovered" in S.read_sae_card(IOI_SAE)


def test_unknown_sources_name_the_fix(tmp_path):
    with pytest.raises(LenslabError, match=r"did you mean 'zoo/ioi-4l/blocks.2.hook_resid_post'"):
        S.load_sae("zoo/ioi-4l/blocks.2.hook_resid_pst")
    with pytest.raises(LenslabError, match="zoo SAEs"):
        S.load_sae("definitely-not-an-sae")
    with pytest.raises(LenslabError, match="does not exist"):
        S.load_sae(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LenslabError, match="no cfg.json"):
        S.load_sae(tmp_path / "empty")
    # release and id are checked against sae-lens's local directory before any download
    with pytest.raises(LenslabError, match=r"did you mean 'gpt2-small-res-jb'"):
        S.load_sae("gpt2-small-res-j", "blocks.8.hook_resid_pre")
    with pytest.raises(
        LenslabError, match=r"not an SAE of release 'gpt2-small-res-jb' \(did you mean 'blocks.8.hook_resid_pre'"
    ):
        S.load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pr")


def test_offline_from_pretrained_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # Offline, with an empty Hugging Face cache: the user's real cache may hold this SAE. The hub
    # client reads its constants at call time; lenslab reads the environment.
    for var, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": tmp_path / "hf",
        "HF_HUB_CACHE": tmp_path / "hf" / "hub",
    }.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(LenslabError, match="not in the local Hugging Face cache and the Hub cannot be reached") as e:
        S.load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert "zoo/" in str(e.value)  # points at SAEs that do work offline
    with pytest.raises(LenslabError, match="cannot load gpt2-small-res-jb/blocks.8.hook_resid_pre"):
        S.load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_mismatched_sae_and_model(tiny_model):
    ioi = S.load_sae(IOI_SAE)  # blocks.2: the tiny model has 2 layers
    with pytest.raises(
        LenslabError,
        match=r"hook 'blocks.2.hook_resid_post' \(trained on zoo/ioi-4l\).*did you mean 'blocks.1.hook_resid_post'",
    ):
        S.check_sae(tiny_model, ioi)
    with pytest.raises(LenslabError, match="which model"):
        S.load_sae(IOI_SAE, model=tiny_model)
    ind = S.load_sae(IND_SAE)  # blocks.0.hook_resid_post exists, but it is 32 wide here, not 64
    with pytest.raises(LenslabError, match=r"d_in=64 at 'blocks.0.hook_resid_post'.*width 32.*lenslab sae train"):
        S.check_sae(tiny_model, ind)
    with pytest.raises(LenslabError, match="hook names look like"):
        S.train_sae(tiny_model, "blocks.0.hook_resid_pots", corpus=torch.zeros(2, 8, dtype=torch.long), d_sae=8)
    hz = _random_sae(32, 16, "blocks.0.attn.hook_z")  # n_heads * d_head = 4 * 8: fits
    S.check_sae(tiny_model, hz)


# --- metrics against sae-lens's evaluation code ----------------------------------------------
@pytest.mark.parametrize("hook,arch", [("blocks.1.hook_resid_post", "topk"), ("blocks.0.attn.hook_z", "standard")])
def test_metrics_match_sae_lens_evals(tiny_model, hook, arch):
    """On pad-free tokens, lenslab's metrics equal sae-lens's get_recons_loss (CE clean / with SAE /
    zero-ablated) and ExplainedVarianceCalculator, and L0 / dead features a hand count."""
    from sae_lens.evals import ExplainedVarianceCalculator, get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = _random_sae(32, 48, hook, seed=1, arch=arch)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, tiny_model.cfg.d_vocab, (6, 12), generator=g)
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    m = S.sae_metrics(tiny_model, sae, tokens, batch_size=4)  # two batches

    ref = get_recons_loss(sae, tiny_model, ActivationScaler(), tokens, compute_kl=False, compute_ce_loss=True)
    assert m.ce_loss_clean == pytest.approx(ref["ce_loss_without_sae"].mean().item(), rel=1e-5)
    assert m.ce_loss_spliced == pytest.approx(ref["ce_loss_with_sae"].mean().item(), rel=1e-5)
    assert m.ce_loss_zero == pytest.approx(ref["ce_loss_with_ablation"].mean().item(), rel=1e-5)
    assert m.ce_loss_spliced != pytest.approx(m.ce_loss_clean, rel=1e-3)  # a random SAE does change the loss

    _, cache = tiny_model.run_with_cache(tokens, names_filter=[hook])
    x = cache[hook].flatten(2).reshape(-1, 32)  # [tokens, d_in]
    f = sae.encode(x)
    x_hat = sae.decode(f)
    ev = ExplainedVarianceCalculator()
    ev.add_batch(x_hat.detach(), x)
    assert m.explained_variance == pytest.approx(ev.compute(), rel=1e-5, abs=1e-6)
    assert m.mse == pytest.approx((x - x_hat).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert m.l0 == pytest.approx((f != 0).sum(-1).float().mean().item(), rel=1e-6)
    assert m.dead_fraction == pytest.approx(((f != 0).sum(0) == 0).float().mean().item(), abs=1e-9)
    assert m.n_tokens == 72 and m.n_predictions == 66
    assert m.loss_recovered == pytest.approx((m.ce_loss_zero - m.ce_loss_spliced) / (m.ce_loss_zero - m.ce_loss_clean))
    back = S.SaeMetrics.from_json(m.to_json())
    assert back.to_dict() == m.to_dict()


def test_metrics_padding_and_loss_mask(tiny_model):
    """Pad positions are left out; a loss mask picks predictions (reference: TL's per-token loss)."""
    sae = _random_sae(32, 48, "blocks.1.hook_resid_post", seed=2)
    docs = ["t1 t2 t3 t4 t5 t6 t7", "t9 t8", "t3 t3 t3 t3"]
    toks = S.corpus_tokens(tiny_model, docs)
    pad = tiny_model.tokenizer.pad_token_id
    assert toks.shape == (3, 8) and toks[1, 3:].eq(pad).all() and toks[:, 0].eq(tiny_model.tokenizer.bos_token_id).all()
    m = S.sae_metrics(tiny_model, sae, docs)
    per_tok = tiny_model(toks, return_type="loss", loss_per_token=True)  # [3, 7]
    keep = toks[:, 1:] != pad
    assert m.n_tokens == int((toks != pad).sum()) == 8 + 3 + 5
    assert m.ce_loss_clean == pytest.approx(per_tok[keep].mean().item(), rel=1e-5)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2] = mask[2, 1] = True
    mm = S.sae_metrics(tiny_model, sae, toks, loss_mask=mask)
    assert mm.n_predictions == 2
    assert mm.ce_loss_clean == pytest.approx(per_tok[mask].mean().item(), rel=1e-5)
    assert mm.mse == pytest.approx(m.mse) and mm.l0 == pytest.approx(m.l0)  # the mask only touches the losses
    values = dict(zip(m.table()["metric"], m.table()["value"]))  # one row per metric
    assert values["ce_loss_clean"] == m.ce_loss_clean and values["n_tokens"] == 16
    assert (
        m.to_markdown().startswith("| metric | value |")
        and f"| next-token loss, clean | {m.ce_loss_clean:.4f} |" in m.to_markdown()
    )
    with pytest.raises(LenslabError, match="loss_mask must be"):
        S.sae_metrics(tiny_model, sae, toks, loss_mask=mask[:, :3])


# --- training -----------------------------------------------------------------------------------
def _tiny_corpus(n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, 68, (n, 16), generator=g)
    toks[:, 0] = 0  # <bos>
    return toks


def test_train_sae_reduces_mse_and_is_deterministic(tiny_model, tmp_path):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    hook = "blocks.0.hook_resid_post"
    kw = dict(corpus=_tiny_corpus(), d_sae=64, k=4, training_tokens=4096, batch_size_tokens=128, lr=1e-2)
    threads = torch.get_num_threads()
    sae = S.train_sae(tiny_model, hook, out_dir=tmp_path / "a", seed=3, **kw)
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "card.md", "metrics.json", "runner_cfg.json"} <= files
    assert sae.cfg.architecture() == "topk" and sae.cfg.metadata.hook_name == hook and sae.cfg.d_in == 32

    # the SAE as sae-lens initialises it with the same seed, before any step: the reference to beat
    torch.manual_seed(3)
    init = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    held = _tiny_corpus(16, seed=9)
    trained = S.sae_metrics(tiny_model, sae, held)
    _, cache = tiny_model.run_with_cache(held, names_filter=[hook])
    x = cache[hook].reshape(-1, 32)
    with torch.no_grad():
        init_mse = (init.decode(init.encode(x)) - x).pow(2).sum(-1).mean().item()
    assert trained.mse < 0.5 * init_mse, (trained.mse, init_mse)
    assert trained.l0 == pytest.approx(4.0)
    saved = S.read_metrics(tmp_path / "a")["all next-token predictions"]
    assert saved.n_tokens == 4 * 16 and saved.d_sae == 64  # the last 10% of the 48 rows are held out

    again = S.train_sae(tiny_model, hook, out_dir=tmp_path / "b", seed=3, **kw)
    for name, p in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    other = S.train_sae(tiny_model, hook, seed=4, **kw)  # no out_dir: nothing written
    assert not torch.equal(other.W_dec, sae.W_dec)
    assert torch.get_num_threads() == threads  # training pins torch to one thread, then restores the caller's count


def test_train_sae_checks_arguments(tiny_model):
    c = _tiny_corpus(4)
    with pytest.raises(LenslabError, match="not both"):
        S.train_sae(tiny_model, "blocks.0.hook_resid_post", corpus=c, d_sae=8, k=2, l1=1.0)
    with pytest.raises(LenslabError, match="k must be between"):
        S.train_sae(tiny_model, "blocks.0.hook_resid_post", corpus=c, d_sae=8, k=9)
    with pytest.raises(LenslabError, match="at least batch_size_tokens"):
        S.train_sae(tiny_model, "blocks.0.hook_resid_post", corpus=c, d_sae=8, training_tokens=10, batch_size_tokens=64)
    with pytest.raises(LenslabError, match="corpus is empty"):
        S.train_sae(tiny_model, "blocks.0.hook_resid_post", corpus=["  "], d_sae=8)


def test_cli_sae_train(tiny_zoo_dir, tmp_path, capsys):
    from lenslab.cli import main

    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(" ".join(f"t{(i * 7 + j) % 60}" for j in range(10)) for i in range(40)) + "\n")
    out = tmp_path / "sae"
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(tiny_zoo_dir),
            "--hook",
            "blocks.1.hook_resid_post",
            "--corpus",
            str(docs),
            "--d-sae",
            "32",
            "--k",
            "4",
            "--training-tokens",
            "1024",
            "--batch-size-tokens",
            "128",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "loss recovered" in text and str(out) in text
    sae = S.load_sae(out)
    assert (sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (32, "blocks.1.hook_resid_post")
    # a model without a built-in corpus needs --corpus
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(tiny_zoo_dir),
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "--corpus" in capsys.readouterr().err


# --- the shipped zoo SAEs -----------------------------------------------------------------------
@pytest.mark.parametrize("name,rec_all,rec_obj,ev", SHIPPED, ids=[s[0].split("/")[1] for s in SHIPPED])
def test_shipped_sae_matches_its_card(zoo_models, name, rec_all, rec_obj, ev):
    from lenslab.zoo import train_saes

    model_name = "/".join(name.split("/")[:2])
    model = zoo_models(model_name)
    sae = S.load_sae(name, model=model)
    held = train_saes.held_out(model_name, model)
    got = train_saes.measure(model, sae, held)
    stored = S.read_metrics(name)
    assert list(got) == list(stored)
    card = S.read_sae_card(name)
    for key, m in got.items():
        s = stored[key]
        for f in (
            "mse",
            "explained_variance",
            "ce_loss_clean",
            "ce_loss_spliced",
            "ce_loss_zero",
            "loss_recovered",
            "l0",
        ):
            assert getattr(m, f) == pytest.approx(getattr(s, f), rel=1e-4, abs=1e-6), (key, f)
        assert (m.n_tokens, m.n_predictions, m.dead_fraction) == (s.n_tokens, s.n_predictions, s.dead_fraction)
        assert f"| {m.loss_recovered:.3f} |" in card
    first = got["all next-token predictions"]
    objective = got[next(k for k in got if k.startswith("objective"))]
    assert first.loss_recovered >= rec_all, first.loss_recovered
    assert objective.loss_recovered >= rec_obj, objective.loss_recovered
    assert first.explained_variance >= ev, first.explained_variance
    assert f"| L0 (active features per token) | {first.l0:.2f} |" in card
    assert f"{first.dead_fraction:.1%} of {first.d_sae}" in card
    assert f"| explained variance | {first.explained_variance:.3f} |" in card
    assert "(deterministic; `lenslab/zoo/train_saes.py`)" in card  # the rebuild line build_zoo_sae writes
    cfg = json.loads((S.zoo_sae_path(name) / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == model_name and cfg["metadata"]["hook_name"] == sae.cfg.metadata.hook_name


def test_zoo_saes_is_a_deprecated_alias_of_the_zoo_recipe():
    """`lenslab.probes.zoo_saes` moved to `lenslab.zoo.train_saes`; importing the old module warns, for one release."""
    from lenslab.zoo import train_saes

    sys.modules.pop("lenslab.probes.zoo_saes", None)  # a fresh import, so that it warns again
    with pytest.warns(DeprecationWarning, match="lenslab.probes.zoo_saes is deprecated; use lenslab.zoo.train_saes"):
        old = importlib.import_module("lenslab.probes.zoo_saes")
    assert old.build_zoo_sae is train_saes.build_zoo_sae and old.rebuild_zoo_saes is train_saes.rebuild_zoo_saes
    assert old.recipe is train_saes.recipe and old.RECIPES is train_saes.RECIPES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = old.nope


def test_hook_z_reshaping_sae_equals_the_flat_one(tiny_model):
    """An SAE that reshapes hook_z itself (sae-lens reshape_activations='hook_z', fed [.., heads, d_head])
    gives the same metrics as the same weights fed the flattened activation, and the splice keeps the shape."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    flat = _random_sae(32, 48, "blocks.1.attn.hook_z", seed=5)
    meta = SAEMetadata(hook_name="blocks.1.attn.hook_z", model_name="test")
    shaped = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=4, reshape_activations="hook_z", metadata=meta))
    shaped.load_state_dict(flat.state_dict())
    tokens = S.corpus_tokens(tiny_model, ["t1 t2 t3 t4 t5", "t7 t7 t8 t1 t2 t3"])
    a, b = S.sae_metrics(tiny_model, flat, tokens), S.sae_metrics(tiny_model, shaped, tokens)
    for f in ("mse", "explained_variance", "ce_loss_spliced", "l0", "dead_fraction"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6, abs=1e-9), f
    act = torch.randn(2, 3, 4, 8)
    ((name, fn),) = S.splice_hooks(shaped)
    assert name == "blocks.1.attn.hook_z" and fn(act).shape == act.shape
    assert torch.allclose(fn(act).flatten(-2), flat.decode(flat.encode(act.flatten(-2))), atol=1e-6)
