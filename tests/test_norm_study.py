"""Pre-LN, Peri-LN and Post-LN (lenslab.zoo.norm_variants) against a hand-written forward pass, their
save/load round trip, and the committed norm study (lenslab.probes.norm_study) re-measured."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes import atlas, sinks
from lenslab.zoo import load_hooked, norm_variants, save_hooked, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _tiny(variant: str, attn_only: bool = False, normalization_type: str = "LN", seed: int = 0):
    """A 2-layer model with every parameter random (norm weights and biases included)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = word_tokenizer([f"t{i}" for i in range(20)])
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        n_ctx=12,
        d_vocab=len(tok),
        act_fn="relu",
        normalization_type=normalization_type,
        attn_only=attn_only,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok)
    norm_variants.apply_norm_variant(model, variant)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(".w") else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith(".w") else 0.0))
    return model.eval()


def _ln(x, w, b, eps):
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w + b


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attn(x, a):
    """Causal multi-head attention from the weights of TransformerLens's `Attention` `a`."""
    q = torch.einsum("pd,hde->hpe", x, a.W_Q) + a.b_Q[:, None]
    k = torch.einsum("pd,hde->hpe", x, a.W_K) + a.b_K[:, None]
    v = torch.einsum("pd,hde->hpe", x, a.W_V) + a.b_V[:, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = x.shape[0]
    scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    z = scores.softmax(-1) @ v  # [head, pos, d_head]
    return torch.einsum("hpe,hed->pd", z, a.W_O) + a.b_O


def _mlp(x, m):
    return torch.relu(x @ m.W_in + m.b_in) @ m.W_out + m.b_out


def _reference(model, tokens: torch.Tensor, variant: str) -> torch.Tensor:
    """The logits `[pos, vocab]` of one row, written out from the weights (no TransformerLens forward)."""
    eps = model.cfg.eps
    rms = model.cfg.normalization_type == "RMS"

    def norm(x, mod):
        return _rms(x, mod.w, eps) if rms else _ln(x, mod.w, mod.b, eps)

    x = model.embed.W_E[tokens] + model.pos_embed.W_pos[: len(tokens)]
    for blk in model.blocks:
        subs = [(_attn, blk.attn, "ln1")] + ([] if model.cfg.attn_only else [(_mlp, blk.mlp, "ln2")])
        for i, (f, mod, ln) in enumerate(subs):
            if variant == "pre":
                x = x + f(norm(x, getattr(blk, ln)), mod)
            elif variant == "peri":
                x = x + norm(f(norm(x, getattr(blk, ln)), mod), getattr(blk, f"{ln}_post"))
            else:  # post
                site = "ln_resid_post" if i == len(subs) - 1 else "ln_resid_mid"
                x = norm(x + f(x, mod), getattr(blk, site))
    if variant != "post":
        x = norm(x, model.ln_final)
    return x @ model.unembed.W_U + model.unembed.b_U


@pytest.mark.parametrize("variant", norm_variants.VARIANTS)
@pytest.mark.parametrize(("attn_only", "normalization_type"), [(False, "LN"), (True, "LN"), (False, "RMS")])
def test_variant_forward_equals_the_hand_written_one(variant, attn_only, normalization_type):
    model = _tiny(variant, attn_only, normalization_type)
    tokens = torch.randint(4, model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(tokens)
        for row in range(3):
            ref = _reference(model, tokens[row], variant)
            assert (logits[row] - ref).abs().max().item() < TOL
    assert norm_variants.norm_variant(model) == variant


def test_the_variants_differ_and_their_hooks_see_what_the_block_uses():
    tokens = torch.randint(4, 24, (2, 12), generator=torch.Generator().manual_seed(5))
    outs = {v: _tiny(v)(tokens) for v in norm_variants.VARIANTS}
    assert (outs["pre"] - outs["peri"]).abs().max() > 0.1 and (outs["pre"] - outs["post"]).abs().max() > 0.1
    peri, post = _tiny("peri"), _tiny("post")
    _, c = peri.run_with_cache(tokens)
    # Peri-LN: hook_attn_out is the normed output that is added: resid_mid = resid_pre + attn_out
    assert torch.allclose(
        c["blocks.0.hook_resid_mid"], c["blocks.0.hook_resid_pre"] + c["blocks.0.hook_attn_out"], atol=TOL
    )
    lnp = peri.blocks[0].ln1_post
    centred = c["blocks.0.hook_attn_out"] - lnp.b
    assert torch.allclose((centred / lnp.w).pow(2).mean(-1), torch.ones(2, 12), atol=1e-3)  # unit-variance rows
    _, c = post.run_with_cache(tokens)
    # Post-LN: every layer output is normed; the next block reads it as is
    x = c["blocks.0.hook_resid_post"]
    ln = post.blocks[0].ln_resid_post
    assert torch.allclose(((x - ln.b) / ln.w).pow(2).mean(-1), torch.ones(2, 12), atol=1e-3)
    assert torch.equal(c["blocks.1.hook_resid_pre"], x)
    assert "ln_final.hook_scale" not in c and "blocks.0.ln1.hook_scale" not in c


def test_a_patching_hook_replaces_the_normed_output():
    """A hook on a normed hook point runs after the norm: what it returns is what the block adds."""
    model = _tiny("peri")
    tokens = torch.randint(4, 24, (1, 12), generator=torch.Generator().manual_seed(5))
    zero = lambda t, hook: torch.zeros_like(t)
    _, c = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero)]):
        _, c2 = model.run_with_cache(tokens)
    assert torch.allclose(c2["blocks.0.hook_resid_mid"], c["blocks.0.hook_resid_pre"], atol=TOL)


@pytest.mark.parametrize("variant", ["peri", "post"])
def test_variant_survives_save_and_load(tmp_path, variant):
    model = _tiny(variant)
    save_hooked(model, model.tokenizer, tmp_path, summary="tiny", card="tiny\n", weights_dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["norm_variant"] == variant
    back = lenslab.load_model(str(tmp_path), device="cpu")
    assert norm_variants.norm_variant(back) == variant
    tokens = torch.randint(4, 24, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    # the atlas and the sink probes run on it unchanged
    a = atlas.activation_atlas(back, tokens, kinds=["resid_pre", "attn_out", "mlp_out"])
    assert len(a.hooks) == 6
    assert sinks.massive_activations(back, tokens).layers == [0, 1]
    # a Pre-LN folder has no norm_variant key and loads as before
    pre = _tiny("pre")
    save_hooked(pre, pre.tokenizer, tmp_path / "pre", summary="tiny", card="tiny\n")
    assert "norm_variant" not in json.loads((tmp_path / "pre" / "config.json").read_text())
    assert norm_variants.norm_variant(load_hooked(tmp_path / "pre", torch.device("cpu"), torch.float32)) == "pre"


def test_variants_share_their_initial_weights():
    """Applying a variant draws no random numbers: a seed gives every variant the same shared weights."""
    from lenslab.probes import norm_study

    cfg = norm_study.StudyConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, n_ctx=8)
    tok = word_tokenizer([f"t{i}" for i in range(20)])
    states = {v: norm_study.build(cfg, tok, v).state_dict() for v in norm_variants.VARIANTS}
    shared = set(states["pre"]) & set(states["peri"]) & set(states["post"])
    assert "blocks.1.mlp.W_in" in shared and "embed.W_E" in shared
    assert all(torch.equal(states["pre"][k], states[v][k]) for k in shared for v in ("peri", "post"))


def test_bad_variants_are_refused():
    with pytest.raises(LenslabError, match="is not one of pre, peri, post"):
        norm_variants.apply_norm_variant(_tiny("pre"), "sandwich")
    with pytest.raises(LenslabError, match="already 'peri'"):
        norm_variants.apply_norm_variant(_tiny("peri"), "post")
    with pytest.raises(LenslabError, match="normalization_type 'LN' or 'RMS'"):
        _tiny("peri", normalization_type=None)


# --- the committed study (lenslab/zoo/norm-study/, `python -m lenslab.probes.norm_study`) ------------
SERIES = "zoo/norm-study/pre-2l"


@pytest.fixture(scope="module")
def study():
    from lenslab.zoo import ZOO_DIR

    return json.loads((ZOO_DIR / "norm-study" / "results.json").read_text())


@pytest.fixture(scope="module")
def series_rows(study):
    from lenslab.probes import norm_study
    from lenslab.zoo import checkpoints

    first = lenslab.load_model(str(checkpoints.series_path(SERIES) / "step0"), device="cpu")
    c = study["series_config"]
    return norm_study.eval_rows(first.tokenizer, c["n_eval_rows"], c["n_ctx"])


def test_the_committed_series_remeasures_to_the_results(study, series_rows):
    """The committed checkpoints, re-measured on the committed held-out text, give the stored trajectory."""
    from lenslab.probes import norm_study, trajectory
    from lenslab.zoo import checkpoints

    folder = checkpoints.series_path(SERIES)
    stored = study["series"]
    series = trajectory.measure_checkpoints(folder, series_rows)
    assert series.steps == stored["series"]["steps"] == stored["steps"]
    assert len(series.steps) == study["series_config"]["n_checkpoints"]
    assert series.top_magnitude == pytest.approx(stored["series"]["top_magnitude"], abs=1e-4)
    assert series.sink_rate == pytest.approx(stored["series"]["sink_rate"], abs=1e-6)
    assert series.top_layer == stored["series"]["top_layer"] and series.top_dim == stored["series"]["top_dim"]
    last = lenslab.load_model(str(folder / f"step{series.steps[-1]}"), device="cpu")
    assert norm_study.hidden_variance(last, series_rows) == pytest.approx(
        stored["variance_by_layer"][str(series.steps[-1])], rel=1e-5
    )


def test_study_results_are_consistent(study):
    """What docs/norms.md states of the study follows from results.json (the numbers are checked there)."""
    v = study["variants"]
    assert set(v) == set(norm_variants.VARIANTS)
    steps = {name: r["steps"] for name, r in v.items()}
    assert steps["pre"] == steps["peri"] == steps["post"]  # equal budgets, one schedule
    for r in v.values():
        assert len(r["training"]["grad_norm"]) == study["config"]["steps"]
        var = r["variance_by_layer"][str(r["steps"][-1])]
        assert r["variance_growth"] == pytest.approx(var[-1] / var[0])


def test_cli_norms_trajectory_on_the_committed_series(tmp_path, capsys):
    from lenslab.cli import main
    from lenslab.probes import trajectory
    from lenslab.zoo import checkpoints, default_prompt

    out = tmp_path / "series.json"
    assert main(["norms", "trajectory", "--checkpoints", SERIES, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    folder = checkpoints.series_path(SERIES)
    prompt = default_prompt(str(folder / "step0"))
    assert prompt  # the series' checkpoints carry the English default prompt
    lib = trajectory.measure_checkpoints(folder, [prompt])
    assert d["kind"] == "CheckpointSeries" and d["steps"] == lib.steps
    assert d["top_magnitude"] == pytest.approx(lib.top_magnitude, abs=1e-6)
    assert "fit of the top massive activation |a|: A " in printed and "R² " in printed
    assert f"{lib.steps[-1]}" in printed


def test_cli_norms_trajectory_bad_folder(tmp_path, capsys):
    from lenslab.cli import main

    assert main(["norms", "trajectory", "--checkpoints", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: ") and "does not exist" in err and "Traceback" not in err
    assert main(["norms", "trajectory", "--checkpoints", "zoo/no-such-series"]) == 2
    assert "zoo/norm-study/pre-2l" in capsys.readouterr().err  # the error names the zoo's series
