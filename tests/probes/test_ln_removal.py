"""lenslab.probes.ln_removal: folding fixed norm scales is exact, the procedure runs, bad input is a
LenslabError, and the shipped zoo/ioi-4l-noln keeps its card and the papers' interpretability claim
(DLA with norm="none" equals the exact direct effect)."""

from __future__ import annotations

import json

import pytest
import torch

import lenslab
from lenslab import circuits, tasks, zoo
from lenslab._errors import LenslabError
from lenslab.probes import dla
from lenslab.probes import ln_removal as R

pytestmark = pytest.mark.usefixtures("one_thread")
NOLN = "zoo/ioi-4l-noln"


def _tiny(randomize_params, ntype: str, gated: bool = False):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    tok = zoo.word_tokenizer([f"t{i}" for i in range(64)])
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tok),
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        normalization_type=ntype,
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tok)
    randomize_params(model, seed=0)
    return model.eval()


@pytest.mark.parametrize("ntype, gated", [("LN", False), ("RMS", True)])
def test_fold_with_the_actual_scale_reproduces_the_logits(randomize_params, ntype, gated):
    model = _tiny(randomize_params, ntype, gated)
    # a one-prompt, one-position batch: the mean scale of each norm is that token's actual scale
    one = R.LMData(torch.tensor([[7, 9]]), torch.tensor([[False, True]]), torch.tensor([[True, False]]))
    scales = R.measure_scales(model, one, R.norm_names(model))
    free = R.fold_fixed_scales(model, scales)
    assert free.cfg.normalization_type is None and not any(".ln" in k for k in free.state_dict())
    t = torch.tensor([[7]])
    assert (free(t) - model(t)).abs().max() < 1e-5
    # on any batch, the folded model is the model with every scale held fixed
    toks = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(1))
    held = model.run_with_hooks(toks, fwd_hooks=R.fixed_scale_hooks(scales))
    assert (free(toks) - held).abs().max() < 1e-5


def test_remove_norms_runs_and_reports(randomize_params):
    model = _tiny(randomize_params, "LN")
    toks = torch.randint(4, 60, (8, 12), generator=torch.Generator().manual_seed(2))
    data = R.lm_data(model, toks)
    free, res = R.remove_norms(model, data, data, steps=2, batch_size=4, progress=False)
    assert [s["stage"] for s in res.stages] == R.norm_names(model)
    assert R.norm_names(model) == [
        "blocks.0.ln2",
        "blocks.1.ln2",
        "blocks.0.ln1",
        "blocks.1.ln1",
        "ln_final",
    ]
    assert res.tokens_used == sum(s["tokens"] for s in res.stages) > 0
    assert res.loss_final == pytest.approx(R.lm_loss(free, data), abs=1e-6)
    assert res.stages[-1]["loss_after"] == pytest.approx(res.loss_final, abs=1e-4)  # folding changes nothing
    assert model.cfg.normalization_type == "LN"  # the input model is untouched
    back = R.LNRemovalResult.from_json(res.to_json())
    assert back.to_dict() == res.to_dict() and len(res.table()) == len(res.stages) + 1
    # the norm-free model's DLA with norm="none" sums to its logits
    d = dla.direct_logit_attribution(free, toks[:2], answer=5, norm="none")
    assert (d.scores.sum(-1) - d.total).abs().max() < 1e-4


def test_a_model_without_norms_is_a_clear_error(randomize_params):
    model = _tiny(randomize_params, "LN")
    free = R.fold_fixed_scales(model, dict.fromkeys(R.norm_names(model), 1.0))
    data = R.lm_data(free, torch.randint(4, 60, (2, 6)))
    with pytest.raises(LenslabError, match="no LayerNorm or RMSNorm to remove"):
        R.remove_norms(free, data, data, steps=0, progress=False)
    with pytest.raises(LenslabError, match="no fixed scale for"):
        R.fold_fixed_scales(model, {"ln_final": 1.0})


# --- the shipped zoo/ioi-4l-noln ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(zoo_models):
    if NOLN not in zoo.zoo_names():
        pytest.skip("zoo/ioi-4l-noln is not built")
    meta = json.loads((zoo.zoo_path(NOLN) / "config.json").read_text())
    return zoo_models(NOLN), zoo_models("zoo/ioi-4l"), meta


def test_shipped_model_has_no_norms_and_its_card_numbers(shipped):
    from lenslab.zoo import train_ioi_4l as parent
    from lenslab.zoo import train_ioi_4l_noln as recipe

    free, orig, meta = shipped
    assert free.cfg.normalization_type is None
    removal = meta["ln_removal"]
    _, held = recipe.data(orig)
    assert R.lm_loss(orig, held) == pytest.approx(removal["loss_original"], rel=1e-3, abs=1e-6)
    assert R.lm_loss(free, held) == pytest.approx(removal["loss_final"], rel=1e-3, abs=1e-6)
    ev = meta["evaluation"]
    got = parent.evaluate(free, heldout=False)
    assert got["accuracy"] == pytest.approx(ev["ioi-4l-noln"]["train_distribution"]["accuracy"], abs=2e-3)
    # the planted mechanism still works: IOI accuracy within 1 point of the original's
    assert got["accuracy"] >= ev["ioi-4l"]["train_distribution"]["accuracy"] - 0.01
    card = zoo.read_card(NOLN)
    assert f"{removal['loss_final']:.5f}" in card and str(removal["tokens_used"]) in card
    # fine-tuning helps: the gap is a small fraction of the no-fine-tuning one (card: +0.00030 vs +0.00772)
    assert f"{removal['loss_no_finetuning']:.5f}" in card
    assert removal["loss_final"] - removal["loss_original"] < 0.1 * (
        removal["loss_no_finetuning"] - removal["loss_original"]
    )
    # held out (held-out names and templates): within 4 points of the original, logit diff as large
    held = parent.evaluate(free, heldout=True)
    assert held["accuracy"] == pytest.approx(ev["ioi-4l-noln"]["heldout"]["accuracy"], abs=2e-3)
    assert held["mean_logit_diff"] == pytest.approx(ev["ioi-4l-noln"]["heldout"]["mean_logit_diff"], abs=0.01)
    assert held["accuracy"] >= ev["ioi-4l"]["heldout"]["accuracy"] - 0.04
    assert held["mean_logit_diff"] >= ev["ioi-4l"]["heldout"]["mean_logit_diff"]


def _direct_effects(model, task, norm: str):
    """Per head: DLA on clean minus DLA on corrupt (clean answers), averaged; and path patching's
    exact direct effect on the logit difference (denoising: corrupt run, one head's output from clean
    to the logits only)."""
    swap = tasks.Task(
        clean_tokens=task.corrupt_tokens,
        corrupt_tokens=task.clean_tokens,
        answer_tokens=task.answer_tokens,
        d_vocab=task.d_vocab,
    )
    grid = lambda t: dla.direct_logit_attribution(model, task=t, norm=norm)
    a, b = grid(task), grid(swap)
    n_l, n_h = model.cfg.n_layers, model.cfg.n_heads
    heads = [a.index(f"L{l}H{h}") for l in range(n_l) for h in range(n_h)]
    d = (a.scores[:, -1, heads] - b.scores[:, -1, heads]).mean(0).reshape(n_l, n_h)
    pp = circuits.path_patch(model, task, "logits", progress=False)
    return d, pp.scores - pp.corrupt_value


def test_dla_is_the_exact_direct_effect_without_norms(shipped):
    free, orig, _ = shipped
    task = tasks.ioi(free, n=16, seed=5)
    d, exact = _direct_effects(free, task, "none")
    assert (d - exact).abs().max() < 1e-4
    # with LayerNorm, the frozen-norm DLA is not the direct effect: removing a head changes the scale
    task = tasks.ioi(orig, n=16, seed=5)
    d, exact = _direct_effects(orig, task, "frozen")
    assert (d - exact).abs().max() > 0.05


def test_cli_remove_writes_a_norm_free_model(tiny_zoo_dir, tmp_path, capsys):
    from lenslab.cli import main

    out = tmp_path / "noln"
    argv = ["norms", "remove", "--model", str(tiny_zoo_dir), "--prompts", "t1 t2 t3 t1 t2", "t4 t5 t6 t7"]
    assert main([*argv, "--steps", "2", "--seed", "1", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model = lenslab.load_model(str(out), device="cpu")
    assert model.cfg.normalization_type is None
    res = R.LNRemovalResult.from_json(out / "removal.json")
    assert len(res.stages) == 5 and f"{res.loss_final:.4f} without" in printed
    assert (out / "card.md").exists()
    assert main(["norms", "remove", "--model", str(out), "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
    assert "no LayerNorm or RMSNorm to remove" in capsys.readouterr().err


def test_rms_moe_folds_into_every_expert_and_the_router(zoo_models):
    """zoo/moe-refusal (RMSNorm, 8 experts): the folded model computes what the fixed-scale model does,
    routing included; a shortformer model is refused before any fine-tuning."""
    from lenslab.zoo import corpora

    model = zoo_models("zoo/moe-refusal")
    data = R.lm_data(model, corpora.corpus_for(model, n=8, seed=0))
    scales = R.measure_scales(model, data, R.norm_names(model))
    scales = {k: v * (1.3 if i % 2 else 0.8) for i, (k, v) in enumerate(scales.items())}  # not the real ones
    free = R.fold_fixed_scales(model, scales)
    assert free.cfg.normalization_type is None
    with torch.no_grad():
        want = model.run_with_hooks(data.tokens, fwd_hooks=R.fixed_scale_hooks(scales))
        got = free(data.tokens)
    assert float((want - got).abs().max()) < 1e-4 * float(want.abs().max())
    with pytest.raises(LenslabError, match="shortformer"):
        R.norm_names(zoo_models("zoo/induction-2l"))
