"""Direct logit attribution (lenslab.probes.dla).

- equal to TransformerLens's own DLA (`cache.logit_attrs` on `stack_head_results`,
  `decompose_resid` and `stack_neuron_results`, and `apply_ln_to_stack` times the norm weight) to
  1e-5, on tiny models with random biases and norm weights: LayerNorm and RMSNorm, norm weights
  folded into the unembedding or not;
- the terms sum to the model's real logit difference (`model(tokens)`) to 1e-4, on those models,
  a model without a final norm (`norm="none"`), a Llama-style gated MLP and a TransformerBridge;
- the planted mechanism: on zoo/ioi-4l with the IOI task the four heads of the largest DLA are
  the name movers its card names (L1H0-L1H3), and docs/dla.md's numbers are measured;
- the result keeps the contract (JSON, table, the three figure views), bad input is a clear
  LenslabError, and `lenslab dla` writes what it says.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import LenslabError, labels, tasks
from lenslab.cli import main
from lenslab.probes import dla

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
IOI = "zoo/ioi-4l"
NAME_MOVERS = {"L1H0", "L1H1", "L1H2", "L1H3"}  # lenslab/zoo/ioi-4l/card.md, "Mechanism"
PROMPT = "When Mary and John went to the store, John gave a drink to"
VOCAB, BATCH, POS = 50, 3, 7


def tiny(randomize_params, norm: str | None, positions: str = "standard", gated: bool = False, seed: int = 0):
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=VOCAB,
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        normalization_type=norm,
        positional_embedding_type=positions,
        seed=seed,
    )
    model = HookedTransformer(cfg)
    changed = randomize_params(model, seed=seed)
    assert norm is None or "ln_final.w" in changed  # the final norm's weight is not all ones
    return model.eval()


def folded(model):
    """A copy with the LayerNorm / RMSNorm weights folded into the next weights (`fold_ln`), as
    TransformerLens's DLA needs; no centring and no value-bias folding, so each head's output and
    each bias stay what they are."""
    f = copy.deepcopy(model)
    f.load_and_process_state_dict(
        f.state_dict(), fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return f


def inputs():
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, VOCAB, (BATCH, POS), generator=g)
    good, bad = torch.tensor([3, 4, 5]), torch.tensor([7, 8, 9])
    return toks, good, bad


def real_diff(model, toks, good, bad) -> torch.Tensor:
    """`[batch, pos]`: logit(good) - logit(bad) of the model's own forward pass, per prompt."""
    with torch.no_grad():
        logits = model(toks)
    rows = torch.arange(len(toks))[:, None]
    return logits[rows, :, good[:, None]][:, 0] - logits[rows, :, bad[:, None]][:, 0]


# --- equal to TransformerLens ------------------------------------------------------------------------
@pytest.mark.parametrize("norm,positions", [("LN", "standard"), ("RMS", "rotary"), ("RMS", "standard")])
@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
def test_frozen_norm_equals_transformer_lens(randomize_params, norm, positions, fold):
    model = tiny(randomize_params, norm, positions)
    ref = folded(model)  # TransformerLens's logit_attrs reads W_U alone: it needs ln_final.w folded in
    assert ref.cfg.normalization_type == norm + "Pre"
    run = ref if fold else model
    toks, good, bad = inputs()
    res = dla.direct_logit_attribution(run, toks, good.tolist(), bad.tolist(), pos="all")
    res_n = dla.direct_logit_attribution(run, toks, good.tolist(), bad.tolist(), pos="all", neurons=True)
    ours = lambda r, label: r.scores[..., r.index(label)]  # [batch, pos]

    _, cache = ref.run_with_cache(toks)
    tg, tb = good[:, None].expand(BATCH, POS), bad[:, None].expand(BATCH, POS)
    heads, head_labels = cache.stack_head_results(layer=-1, return_labels=True)
    for label, tl in zip(head_labels, cache.logit_attrs(heads, tg, tb), strict=True):
        torch.testing.assert_close(ours(res, label), tl, atol=1e-5, rtol=0)
    stack, stack_labels = cache.decompose_resid(layer=-1, return_labels=True)
    for label, tl in zip(stack_labels, cache.logit_attrs(stack, tg, tb), strict=True):
        if label in ("embed", "pos_embed"):
            mine = ours(res, label)
        elif label.endswith("_attn_out"):  # the layer's heads plus its b_O
            l = int(label.split("_")[0])
            mine = sum(ours(res, f"L{l}H{h}") for h in range(4)) + ours(res, labels.attn_bias(l))
        else:
            mine = ours(res, f"MLP{int(label.split('_')[0])}")
        torch.testing.assert_close(mine, tl, atol=1e-5, rtol=0)
    neurons, neuron_labels = cache.stack_neuron_results(layer=-1, return_labels=True)
    tl_neurons = cache.logit_attrs(neurons, tg, tb)
    for i in range(0, len(neuron_labels), 7):
        torch.testing.assert_close(ours(res_n, neuron_labels[i]), tl_neurons[i], atol=1e-5, rtol=0)
    # the final bias is the folded model's b_U (ln_final.b folded into it)
    torch.testing.assert_close(ours(res, dla.FINAL_BIAS)[:, 0], ref.b_U[good] - ref.b_U[bad], atol=1e-5, rtol=0)

    # and on the unfolded model's own cache: TransformerLens's apply_ln_to_stack, times ln_final.w
    if not fold:
        _, own = model.run_with_cache(toks)
        d = (model.W_U[:, good] - model.W_U[:, bad]).T[:, None]  # [batch, 1, d_model]
        scaled = own.apply_ln_to_stack(own.stack_head_results(layer=-1), layer=-1) * model.ln_final.w
        for label, tl in zip(head_labels, (scaled * d).sum(-1), strict=True):
            torch.testing.assert_close(ours(res, label), tl, atol=1e-5, rtol=0)


# --- the terms sum to the real logit difference ------------------------------------------------------------
@pytest.mark.parametrize(
    "norm,positions,gated,mode",
    [
        ("LN", "standard", False, "frozen"),
        ("RMS", "rotary", True, "frozen"),
        (None, "standard", False, "none"),
        (None, "rotary", False, "frozen"),
    ],
)
def test_components_sum_to_the_real_logit_difference(randomize_params, norm, positions, gated, mode):
    model = tiny(randomize_params, norm, positions, gated)
    toks, good, bad = inputs()
    real = real_diff(model, toks, good, bad)
    for neurons in (False, True):
        res = dla.direct_logit_attribution(
            model, toks, good.tolist(), bad.tolist(), pos="all", norm=mode, neurons=neurons
        )
        assert res.scores.shape == (BATCH, POS, len(res.components))
        torch.testing.assert_close(res.total, real, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.scores.sum(-1), real, atol=1e-4, rtol=0)
    assert real.abs().max() > 0.5  # the check has something to check
    # a single logit: final_bias holds b_U[good] (+ ln_final.b . W_U[:, good])
    one = dla.direct_logit_attribution(model, toks, good.tolist(), pos=[0, -1], norm=mode)
    with torch.no_grad():
        logits = model(toks)
    want = logits[torch.arange(BATCH)[:, None], torch.tensor([0, POS - 1]), good[:, None]]
    torch.testing.assert_close(one.scores.sum(-1), want, atol=1e-4, rtol=0)


def test_norm_none_is_the_exact_decomposition_without_a_final_norm(randomize_params):
    """Without a final norm the two modes agree; every term is the component's vector @ (W_U[A] - W_U[B])."""
    model = tiny(randomize_params, None)
    toks, good, bad = inputs()
    none = dla.direct_logit_attribution(model, toks, good.tolist(), bad.tolist(), pos="all", norm="none")
    frozen = dla.direct_logit_attribution(model, toks, good.tolist(), bad.tolist(), pos="all")
    torch.testing.assert_close(none.scores, frozen.scores)
    _, cache = model.run_with_cache(toks)
    d = (model.W_U[:, good] - model.W_U[:, bad]).T[:, None]
    torch.testing.assert_close(none.scores[..., none.index("pos_embed")], (cache["hook_pos_embed"] * d).sum(-1))
    torch.testing.assert_close(none.scores[..., none.index("MLP1")], (cache["blocks.1.hook_mlp_out"] * d).sum(-1))


def test_a_transformer_bridge_sums_too(tiny_moe_dir):
    model = lenslab.load_model(str(tiny_moe_dir("qwen3_moe")), device="cpu")
    assert type(model).__name__ == "TransformerBridge"
    toks = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    good, bad = torch.tensor([10, 12]), torch.tensor([11, 13])
    res = dla.direct_logit_attribution(model, toks, good.tolist(), bad.tolist(), pos="all")
    torch.testing.assert_close(res.scores.sum(-1), real_diff(model, toks, good, bad), atol=1e-4, rtol=0)
    with pytest.raises(LenslabError, match="Mixture-of-Experts"):
        dla.direct_logit_attribution(model, toks, good.tolist(), neurons=True)


def test_a_direction_is_the_logit_difference_without_b_U(randomize_params):
    model = tiny(randomize_params, "LN")
    toks, good, bad = inputs()
    diff = dla.direct_logit_attribution(model, toks, good.tolist(), bad.tolist())
    u = (model.W_U[:, good] - model.W_U[:, bad]).T.detach()  # [batch, d_model]: one per prompt
    proj = dla.direct_logit_attribution(model, toks, direction=u)
    fb = proj.index(dla.FINAL_BIAS)
    torch.testing.assert_close(proj.scores[..., :fb], diff.scores[..., :fb])
    b_u = (model.b_U[good] - model.b_U[bad]).detach()
    torch.testing.assert_close(proj.scores[..., fb, None] + b_u[:, None, None], diff.scores[..., fb, None])
    one = dla.direct_logit_attribution(model, toks[:1], direction=u[0])  # a [d_model] vector
    torch.testing.assert_close(one.scores[0], proj.scores[0])


# --- the planted mechanism: zoo/ioi-4l's name movers ------------------------------------------------------
@pytest.fixture(scope="module")
def ioi(zoo_models):
    return zoo_models(IOI)


@pytest.mark.parametrize("heldout", [False, True], ids=["train-distribution", "heldout"])
def test_top_heads_on_ioi_are_the_name_movers(ioi, heldout):
    task = tasks.ioi(ioi, n=32, seed=3, heldout=heldout)
    res = dla.direct_logit_attribution(ioi, task=task)
    top = res.top(4)
    assert {label for label, _ in top} == NAME_MOVERS, top
    grid = res.head_grid()
    others = torch.cat([grid[0], grid[2:].flatten()])
    assert float(grid[1].min()) > 2 * float(others.max()), grid  # each name mover > twice any other head
    real = tasks.logit_diff_per_prompt(ioi(task.clean_tokens)[:, -1], task.answer_tokens)
    torch.testing.assert_close(res.scores.sum(-1)[:, 0], real, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.total[:, 0], real, atol=1e-4, rtol=0)


def test_docs_numbers_are_measured(ioi, doc_numbers):
    """docs/dla.md's example (16 IOI prompts, seed 0): its layer x head table, the other terms,
    the total, and its claim that each name mover writes > 3x any layer-2/3 head."""
    text = (ROOT / "docs" / "dla.md").read_text()
    res = dla.direct_logit_attribution(ioi, task=tasks.ioi(ioi, n=16, seed=0))
    grid, extra = res.head_grid(), res.by_layer()
    rows = doc_numbers.table(text, "| layer | H0 |")
    assert [r[0] for r in rows] == ["L0", "L1", "L2", "L3"]
    for l, row in enumerate(rows):
        measured = [*grid[l].tolist(), extra["attn bias"][l], extra["MLP"][l]]
        for m, printed in zip(measured, row[1:], strict=True):
            assert doc_numbers.close(m, printed), (l, m, printed)
    assert doc_numbers.close(float(res.total.mean()), "18.25") and "logit difference (IO minus S) is 18.25" in text
    for label, printed in (("embed", "-0.02"), ("pos_embed", "+0.02"), ("final_bias", "+0.03")):
        assert f"`{label}` {printed}" in text and doc_numbers.close(res.score(label), printed)
    assert float(grid[1].min()) > 3 * float(grid[2:].max()) and "more than three" in text


# --- the result -------------------------------------------------------------------------------------
def test_result_round_trips_and_draws(ioi, tmp_path):
    res = dla.direct_logit_attribution(ioi, PROMPT, "Mary", "John", pos="all", neurons=True)
    assert res.position_labels[0] == "0:<bos>" and res.position_labels[-1] == "14:to"
    assert res.answers == ["logit('Mary') - logit('John')"] and res.direction == res.answers[0]
    back = dla.DLAResult.from_json(res.to_json())
    assert json.loads(back.to_json()) == json.loads(res.to_json())
    torch.testing.assert_close(back.scores, res.scores)
    table = res.table()
    assert list(table.columns) == ["position", "position_label", "component", "kind", "layer", "index", "score"]
    assert len(table) == len(res.positions) * len(res.components)
    assert len(res.table(per_prompt=True)) == len(table)  # one prompt
    names, coarse = res.coarse()
    assert "MLP2" in names and "L2N7" not in names
    torch.testing.assert_close(coarse.sum(-1), res.mean.sum(-1), atol=1e-4, rtol=0)
    for view in dla.VIEWS:
        fig = res.figure(view=view)
        assert len(fig.data) == 1
    heat = res.figure().data[0]
    assert list(heat.x) == ["H0", "H1", "H2", "H3", "attn bias", "MLP"] and list(heat.y) == ["L0", "L1", "L2", "L3"]
    assert res.score("L1H2", pos=-1) == pytest.approx(heat.z[1][2])
    assert dla.component_kind("L3.b_O") == ("attn_bias", 3, None)
    assert dla.component_kind("MLP2.b_out") == ("mlp_bias", 2, None)
    assert dla.component_kind("L2N117") == ("neuron", 2, 117)
    with pytest.raises(LenslabError, match="view must be one of head, position, neuron"):
        res.figure(view="heads")
    coarse_res = dla.direct_logit_attribution(ioi, PROMPT, "Mary", "John")
    with pytest.raises(LenslabError, match="neurons=True"):
        coarse_res.figure(view="neuron")
    with pytest.raises(LenslabError, match="position 3 is not among"):
        coarse_res.score("L1H2", pos=3)


# --- bad input ------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(ioi):
    task = tasks.ioi(ioi, n=4, seed=0)
    call = lambda *a, **k: dla.direct_logit_attribution(ioi, *a, **k)
    cases = [
        (lambda: call(PROMPT, "Zzyzx"), "answer 'Zzyzx' is not in the model's vocabulary"),
        (lambda: call(PROMPT, "Mary", "store drink"), "wrong 'store drink' is 2 tokens"),
        (lambda: call(PROMPT, 400), r"answer token id 400 is outside the vocabulary \[0, 332\)"),
        (lambda: call(PROMPT, ["Mary", "John"]), "answer has 2 entries for 1 prompts"),
        (lambda: call(PROMPT, direction=torch.ones(64)), "direction has shape \\(64,\\) but .* d_model=128"),
        (lambda: call(PROMPT, "Mary", direction=torch.ones(128)), "exactly one of answer"),
        (lambda: call(PROMPT, "Mary", pos=15), r"position 15 is out of range for prompt 0, which has 15 tokens"),
        (lambda: call(PROMPT, "Mary", pos=-16), "position -16 is out of range"),
        (lambda: call([PROMPT, "When Mary left"], "Mary", pos="all"), "pos='all' needs prompts of one token length"),
        (lambda: call(PROMPT, "Mary", pos="last"), "pos must be an int"),
        (lambda: call(PROMPT, "Mary", norm="none"), "norm='none' .* ends in a LayerNorm .* use norm='frozen'"),
        (
            lambda: call(PROMPT, "Mary", norm="frozn"),
            r"norm must be one of frozen, none, got 'frozn' \(did you mean 'frozen'\?\)",
        ),
        (lambda: call(task=task, answer="Mary"), "pass either task"),
        (lambda: call(), "pass prompts"),
        (lambda: call(task="ioi"), "task must be a lenslab.tasks.Task"),
    ]
    mismatched = tasks.from_tokens(
        torch.zeros(2, 5, dtype=torch.long),
        torch.zeros(2, 5, dtype=torch.long),
        torch.ones(2, 2, dtype=torch.long),
        d_vocab=50,
    )
    cases.append((lambda: call(task=mismatched), "vocabulary of 50 tokens but this model has 332"))
    too_big = tasks.from_tokens(torch.full((1, 5), 400), torch.full((1, 5), 400), torch.tensor([[1, 2]]), name="big")
    cases.append((lambda: call(task=too_big), r"holds clean tokens up to id 400, outside this model's vocabulary"))
    for make, message in cases:
        with pytest.raises(LenslabError, match=message):
            make()


# --- the command line --------------------------------------------------------------------------------
def test_cli_writes_the_result_and_prints_the_top(tmp_path, capsys):
    out = tmp_path / "dla.json"
    assert main(["dla", "--model", IOI, "--task", "ioi", "--n", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = dla.DLAResult.from_json(out)
    assert res.provenance["task"] == "ioi" and res.scores.shape[:2] == (8, 1)
    top = res.top(8, kinds=("head", "mlp"))
    assert f"top heads and MLPs: {top[0][0]} {top[0][1]:+.3g}" in printed
    assert f"(correct - incorrect): {float(res.total.mean()):+.4g}" in printed

    html = tmp_path / "pos.html"
    argv = ["dla", "--model", IOI, "--prompt", PROMPT, "--answer", "Mary", "--wrong", "John", "--by", "position"]
    assert main([*argv, "--out", str(html)]) == 0
    assert "plotly" in html.read_text() and "14:to" in html.read_text()
    assert main(["dla", "--model", IOI, "--by", "neuron", "--out", str(tmp_path / "n.json")]) == 0  # default prompt
    assert "top neurons: L" in capsys.readouterr().out
    assert dla.DLAResult.from_json(tmp_path / "n.json").neurons

    for args, message in (
        (["--prompt", PROMPT], "--prompt needs --answer"),
        (["--task", "ioi", "--answer", "Mary"], "pass either --task T or --prompt P"),
        (["--task", "ioi", "--norm", "none"], "use norm='frozen'"),
        (["--task", "ioi", "--pos", "40"], "position 40 is out of range"),
        (["--task", "ioi", "--out", "x.txt"], "--out 'x.txt'"),
    ):
        outs = [] if "--out" in args else ["--out", str(tmp_path / "e.json")]
        assert main(["dla", "--model", IOI, *args, *outs]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lenslab: error: ") and message in err and "Traceback" not in err, err
