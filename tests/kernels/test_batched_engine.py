"""The batched engine equals the reference engine (one forward per patch) on every site it covers.

Oracle: `circuits.patch(..., engine="reference")`, itself tested equal to TransformerLens
`patching` in tests/circuits/test_patch.py. Tolerance 1e-4 in float32.
Every model has random biases, b_U and norm weights (`randomize_params`, tests/conftest.py), so an
engine that drops one of them (e.g. reads logits without b_U) gets different scores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities.activation_functions import gelu_new

import lenslab
from lenslab import circuits, kernels, tasks
from lenslab.circuits.patching import SITES
from lenslab.kernels import batched, config, triton_ops

TOL = 1e-4
# A comparison must be able to fail for a wrong patch: the engines may differ by at most REL of the
# reference grid's range (and never more than TOL), and the range must be far above float32 round-off
# (~1e-7 here). The probability metrics (answer_prob, kl_to_clean) on random models have ranges of
# 7e-4..2e-3, so a fixed 1e-4 alone would allow errors of 5-15% of every effect there.
REL, MIN_SPREAD = 1e-2, 5e-4


def _model(randomize_params, **kw) -> HookedTransformer:
    cfg = dict(
        n_layers=3,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=61,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    randomize_params(model, seed=cfg["seed"])
    return model


def _task(d_vocab: int, batch: int = 3, seq: int = 6, seed: int = 0) -> tasks.Task:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, d_vocab, (batch,), generator=g)
    return tasks.from_tokens(clean, corrupt, torch.randint(0, d_vocab, (batch, 2), generator=g))


def _both(model, task, site, **kw):
    ref = circuits.patch(model, task, site, engine="reference", progress=False, **kw)
    fast = circuits.patch(model, task, site, engine="batched", progress=False, **kw)
    return ref, fast


def _assert_same(ref, fast):
    assert fast.scores.shape == ref.scores.shape and fast.axes == ref.axes and fast.labels == ref.labels
    spread = float(ref.scores.max() - ref.scores.min())
    err = float((fast.scores - ref.scores).abs().max())
    assert spread >= MIN_SPREAD and err <= min(TOL, REL * spread), dict(err=err, spread=spread)
    assert fast.method == "exact" and fast.provenance["engine"] == "batched"
    assert fast.clean_value == ref.clean_value and fast.corrupt_value == ref.corrupt_value


@pytest.fixture(scope="module")
def ln_task(tiny_model):
    return tasks.induction(tiny_model, n=2, seq_len=3, seed=1)


@pytest.mark.parametrize("site", sorted(SITES))
def test_every_site_equals_reference(tiny_model, ln_task, site):
    """LayerNorm + MLP model (tests/conftest.py), every site of the reference engine."""
    kw = {"layer": 1} if site == "mlp_neuron" else {}
    ref, fast = _both(tiny_model, ln_task, site, **kw)
    _assert_same(ref, fast)
    skips = fast.provenance["engine_details"]
    assert skips["layer_skip"] and skips["position_skip"] == batched.SITE_PLAN[site][1]
    assert skips["metric_path"] == "pair"


@pytest.mark.parametrize(
    "site,direction",
    [
        ("resid_pre", "denoise"),
        ("resid_post", "noise"),
        ("attn_out", "denoise"),
        ("z_by_pos", "noise"),
        ("k_by_pos", "denoise"),
        ("pattern_by_pos", "noise"),
        ("v", "denoise"),
    ],
)
def test_attn_only_shortformer(randomize_params, site, direction):
    """Attention-only, shortformer positions (as zoo/induction-2l): position skipping passes the
    cached positional embeddings of the recomputed positions."""
    model = _model(
        randomize_params, attn_only=True, d_mlp=None, positional_embedding_type="shortformer", normalization_type=None
    )
    _assert_same(*_both(model, _task(61, batch=2, seq=5), site, direction=direction))


@pytest.mark.parametrize("site", ["resid_mid", "k_by_pos", "v"])
def test_rotary_gqa_rms_gated(randomize_params, site):
    """Rotary (keys cached before rotation), grouped-query attention, RMSNorm, gated SiLU MLP."""
    model = _model(
        randomize_params,
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        normalization_type="RMS",
        act_fn="silu",
        gated_mlp=True,
    )
    _assert_same(*_both(model, _task(61, batch=2, seq=5), site, direction="noise"))


@pytest.mark.parametrize("metric", ["logit_diff", "logit_diff_normalized", "answer_prob", "kl_to_clean", "callable"])
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_metrics(tiny_model, ln_task, site, metric):
    if metric == "callable":

        def metric(logits):  # reads every position, so skipped positions must come back from the base run
            return logits[:, 1:, 3].mean() - logits[:, -1, 5].mean()

    config._SAID.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ref, fast = _both(tiny_model, ln_task, site, metric=metric)
        circuits.patch(tiny_model, ln_task, site, engine="batched", progress=False, metric=metric)
    _assert_same(ref, fast)
    slow_notes = [w for w in seen if "callable on full logits" in str(w.message)]
    expected_path = {
        "logit_diff": "pair",
        "logit_diff_normalized": "pair",
        "answer_prob": "last_row",
        "kl_to_clean": "last_row",
    }.get(metric if isinstance(metric, str) else "", "callable")
    assert fast.provenance["engine_details"]["metric_path"] == expected_path
    assert len(slow_notes) == (1 if expected_path == "callable" else 0)  # said once, not per call


def test_layers_subset_chunking_and_position_skip_invariance(tiny_model, ln_task):
    full = circuits.patch(tiny_model, ln_task, "z_by_pos", engine="batched", progress=False)
    sub = circuits.patch(tiny_model, ln_task, "z_by_pos", engine="batched", progress=False, layers=[1])
    assert sub.labels["layer"] == ["L1"] and torch.allclose(sub.scores[0], full.scores[1], atol=1e-6)
    low = circuits.patch(
        tiny_model, ln_task, "z_by_pos", engine="batched", progress=False, layers=[0]
    )  # source run stops early
    assert torch.allclose(low.scores[0], full.scores[0], atol=1e-6)
    one = kernels.batched_patch(tiny_model, ln_task, "z_by_pos", progress=False, max_rows=1)
    no_skip = kernels.batched_patch(tiny_model, ln_task, "z_by_pos", progress=False, position_skip=False)
    tiny_budget = kernels.batched_patch(tiny_model, ln_task, "z_by_pos", progress=False, memory_budget="1kB")
    for other in (one, no_skip, tiny_budget):
        assert (other.scores - full.scores).abs().max() <= 1e-5
    unchanged = one.provenance["engine_details"]["unchanged_patches"]
    assert unchanged > 0  # the induction task's clean and corrupt prompts share their first token
    assert one.provenance["engine_details"]["chunks"] == full.scores.numel() - unchanged  # one experiment per chunk
    assert not no_skip.provenance["engine_details"]["position_skip"]
    assert full.provenance["engine_details"]["chunks"] < one.provenance["engine_details"]["chunks"]


def _prefix_task(d_vocab: int, first: tuple[int, ...], seq: int = 7, seed: int = 3) -> tasks.Task:
    """Prompt i's corrupt version differs from its clean one from position first[i] on (a shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (len(first), seq), generator=g)
    corrupt = clean.clone()
    for i, f in enumerate(first):
        corrupt[i, f:] = (clean[i, f:] + 1 + torch.randint(0, d_vocab - 1, (seq - f,), generator=g)) % d_vocab
    return tasks.from_tokens(clean, corrupt, torch.randint(0, d_vocab, (len(first), 2), generator=g))


@pytest.mark.parametrize("site", sorted(SITES))
def test_unchanged_patches_are_skipped_exactly(tiny_model, site):
    """Prompts that share a prefix: patches of unchanged values are scored as the base run, patches
    over all positions start at the first changed one; the scores stay the reference's and those of
    the engine without the shortcut (1e-5), and the counts are the prefix's."""
    first = (3, 5)  # the batch shares positions 0..2: one differing prompt makes a position changed
    task = _prefix_task(tiny_model.cfg.d_vocab, first)
    kw = {"layer": 1} if site == "mlp_neuron" else {}
    ref, fast = _both(tiny_model, task, site, **kw)
    _assert_same(ref, fast)
    with kernels.options(skip_unchanged=False):
        plain = circuits.patch(tiny_model, task, site, engine="batched", progress=False, **kw)
    assert float((plain.scores - fast.scores).abs().max()) <= 1e-5
    assert plain.provenance["engine_details"]["unchanged_patches"] == 0
    det = fast.provenance["engine_details"]
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    kind = circuits.patching.SITES[site].kind
    if kind == "pos":  # positions 0..2 of every layer write the base run's own values
        assert det["unchanged_patches"] == n_layers * min(first)
        assert torch.allclose(fast.scores[:, : min(first)], torch.tensor(fast.corrupt_value), atol=1e-6, rtol=0)
    elif kind in ("pos_head", "pattern_dest"):
        assert det["unchanged_patches"] == n_layers * n_heads * min(first)
    elif kind in ("head", "pattern"):  # every head changes; none is skipped, all start at position 3
        assert det["unchanged_patches"] == 0 and det["prefix_skipped_patches"] == fast.scores.numel()


@pytest.mark.parametrize("site", ["resid_pre", "z_by_pos", "pattern"])
def test_batch_invariance(tiny_model, site):
    """Batch score = mean of per-prompt scores (logit_diff is a batch mean); also equal to the reference."""
    task = tasks.induction(tiny_model, n=4, seq_len=4, seed=5)
    batch = circuits.patch(tiny_model, task, site, engine="batched", progress=False).scores
    single = torch.stack(
        [circuits.patch(tiny_model, task.subset([i]), site, engine="batched", progress=False).scores for i in range(4)]
    )
    assert (batch - single.mean(0)).abs().max() <= TOL


def test_progress_reports_patches_per_chunk(tiny_model, ln_task):
    seen = []
    res = circuits.patch(
        tiny_model, ln_task, "attn_out", engine="batched", layers=[1], progress=lambda d, t: seen.append((d, t))
    )
    det = res.provenance["engine_details"]
    assert seen[-1] == (ln_task.seq_len, ln_task.seq_len)
    assert len(seen) == det["chunks"] + 1 and seen[0][0] == det["unchanged_patches"] > 0  # the unchanged ones first


def test_auto_engine_and_explicit_fallback(tiny_model, ln_task, monkeypatch):
    auto = circuits.patch(tiny_model, ln_task, "resid_pre", engine="auto", progress=False)
    assert auto.provenance["engine"] == "batched"
    config._SAID.clear()
    monkeypatch.setattr(batched, "coverage", lambda model, site: "pretend this site is not covered")
    with pytest.warns(UserWarning, match="pretend this site is not covered; using the reference engine"):
        fell = circuits.patch(tiny_model, ln_task, "resid_pre", engine="auto", progress=False, layers=[1])
    assert fell.provenance["engine"] == "reference" and torch.allclose(fell.scores[0], auto.scores[1], atol=TOL)
    assert batched.coverage is not kernels.coverage  # the module-level check was patched, not the public name
    assert "HookedTransformer" in kernels.coverage(object(), SITES["resid_pre"])


def test_option_errors(tiny_model, ln_task):
    with pytest.raises(lenslab.LenslabError, match="memory_budget"):
        kernels.configure(memory_budget="lots")
    with pytest.raises(lenslab.LenslabError, match="max_rows"):
        with kernels.options(max_rows=0):
            pass
    assert kernels.parse_bytes("2GiB") == 2 * 2**30 and kernels.parse_bytes("512MB") == 512 * 10**6
    assert 0 < kernels.memory_budget(torch.device("cpu")) <= 2 * 2**30  # min(2 GiB, MemAvailable / 4)
    with kernels.options(memory_budget="3MB"):
        assert kernels.memory_budget(torch.device("cpu")) == 3 * 10**6
    if not triton_ops.interpreted():
        with pytest.raises(lenslab.LenslabError, match="triton=True was requested but"):
            kernels.batched_patch(tiny_model, ln_task, "resid_pre", progress=False, triton=True)


def test_nan_metric_is_an_error(tiny_model, ln_task):
    with pytest.raises(lenslab.LenslabError, match="returned nan"):
        circuits.patch(
            tiny_model,
            ln_task,
            "resid_pre",
            engine="batched",
            progress=False,
            metric=lambda logits: logits.mean() * float("nan"),
        )


@pytest.mark.parametrize(
    "name,sites",
    [("zoo/induction-2l", ["resid_pre", "z_by_pos", "pattern_by_pos"]), ("zoo/ioi-4l", ["resid_pre", "z", "mlp_out"])],
)
def test_zoo_models(name, sites):
    """The trained zoo models (trained biases and norm weights). They ship with the repository: a
    load failure is a failure, not a skip."""
    model = lenslab.load_model(name, device="cpu")
    task = tasks.ioi(model, n=4, seed=0) if "ioi" in name else tasks.induction(model, n=4, seq_len=6, seed=0)
    for site in sites:
        _assert_same(*_both(model, task, site, layers=[0, model.cfg.n_layers - 1]))


@pytest.mark.slow
def test_gpt2_small_shape(randomize_params):
    """A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 50257): the real widths."""
    torch.manual_seed(0)
    model = _model(
        randomize_params,
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
    )
    task = _task(50257, batch=2, seq=5, seed=3)
    _assert_same(*_both(model, task, "resid_pre", layers=[0, 6, 11]))
    _assert_same(*_both(model, task, "z", layers=[1, 11]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_on_gpu_against_float32_reference(randomize_params, dtype, rel):
    """float16/bfloat16 batched (with Triton when installed) vs a float32 reference of the same weights.

    Tolerance: |delta| <= rel * max|reference score| (half precision keeps ~3 significant digits
    through 3 layers)."""
    model = _model(randomize_params, seed=1).cuda()
    task = _task(61, batch=4, seq=8).to("cuda")
    ref = circuits.patch(model, task, "resid_pre", engine="reference", progress=False)
    half = _model(randomize_params, seed=1, dtype=dtype).cuda()
    half.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    fast = circuits.patch(half, task, "resid_pre", engine="batched", progress=False)
    assert (fast.scores - ref.scores).abs().max() <= rel * ref.scores.abs().max()


def test_gelu_new_runs_fused_and_is_restored(randomize_params):
    model = _model(randomize_params)
    assert model.blocks[0].mlp.act_fn is gelu_new
    ref, fast = _both(model, _task(61, batch=2, seq=5), "mlp_out")
    _assert_same(ref, fast)
    assert all(b.mlp.act_fn is gelu_new for b in model.blocks)


def test_left_padding_tokenizer_passes_the_attention_mask(tiny_model, ln_task):
    """A tokenizer that pads left makes TransformerLens mask pad tokens: the engine passes the same
    mask to every block (and then recomputes all positions)."""
    tok = tiny_model.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        ref, fast = _both(tiny_model, ln_task, "resid_pre")
    finally:
        tok.padding_side = old
    _assert_same(ref, fast)
    assert not fast.provenance["engine_details"]["position_skip"]
