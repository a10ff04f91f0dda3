"""The published LN-free GPT-2 checkpoints' format, loaded without norms (lenslab._noln).

Heimersheim (2024; `apollo-research/gpt2_noLN`) and Baroni et al. (2025; `schaeff/gpt2-*_LNFree*`,
code submarat/removing-layer-norm) publish `GPT2LMHeadModel` checkpoints whose LayerNorms are
neutralised: epsilon 1e12 in every norm and in config.json, the norm weights multiplied by 1e6.
The hub is unreachable here, so a tiny random GPT-2 (random LayerNorm weights and biases) is put
into that format exactly as the authors do it and saved with `save_pretrained`:

- "baroni": submarat/removing-layer-norm `utils.remove_layernorm_by_scaling`: each norm's weight
  times 1e6 / its fixed scale (`std_dict`: the average std of the norm's input, which their
  fine-tuning measures; measured here on the random model), biases kept, every eps and
  `config.layer_norm_epsilon` set to 1e12;
- "apollo": as the `apollo-research/gpt2_noLN` model card describes it: ln_1/ln_2 weights 1e6 and
  biases 0, the final norm's weight times 1e6 / its scale with its bias kept, eps 1e12.

Oracle: the Hugging Face model itself (float32, eager attention) on the same tokens; lenslab's
model must have no norm at all and reproduce its logits within ATOL.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import _noln
from lenslab._errors import LenslabError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ATOL = 1e-5  # float32 logits of a tiny model (|logit| < ~1); the folding reorders sums only
EPS, SCALE = 1e12, 1e6  # the authors' epsilon and weight factor


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def tokens(batch: int = 3, pos: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, pos), generator=torch.Generator().manual_seed(1))


def norm_input_stds(model, ids: torch.Tensor) -> dict[str, float]:
    """The average std of each LayerNorm's input (the scale the authors' fine-tuning fixes)."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, a, name=name: seen.__setitem__(name, a[0].std(-1, unbiased=False))
                )
            )
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: float(s.mean()) for n, s in seen.items()}


def make_ln_free(model, fmt: str) -> None:
    """Put a GPT2LMHeadModel into the published LN-free format, in place (see the module docstring)."""
    std = norm_input_stds(model, tokens())
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            for ln in (block.ln_1, block.ln_2):
                name = f"transformer.h.{i}.{'ln_1' if ln is block.ln_1 else 'ln_2'}"
                if fmt == "baroni":
                    ln.weight.data *= SCALE / std[name]
                else:  # apollo: the scale and the norm's weight live in the weights that read it
                    ln.weight.data.fill_(SCALE)
                    ln.bias.data.zero_()
                ln.eps = EPS
        model.transformer.ln_f.weight.data *= SCALE / std["transformer.ln_f"]
        model.transformer.ln_f.eps = EPS
    model.config.layer_norm_epsilon = EPS


def build(tiny_moe_dir, randomize_params, out: Path, fmt: str | None, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """A tiny random GPT-2 (random LayerNorm weights and biases) saved to `out`, LN-free if `fmt`."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_moe_dir.config("gpt2")).eval()
    model.config.architectures = ["GPT2LMHeadModel"]
    randomize_params(model, seed=seed)
    if fmt is not None:
        make_ln_free(model, fmt)
    model.save_pretrained(out)
    if tokenizer:
        tiny_moe_dir.gpt2_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tiny_moe_dir, randomize_params, tmp_path_factory):
    root = tmp_path_factory.mktemp("noln")
    return {fmt: build(tiny_moe_dir, randomize_params, root / f"gpt2-{fmt}", fmt) for fmt in ("baroni", "apollo")}


@pytest.fixture(scope="module")
def loaded(folders):
    return {fmt: (lenslab.load_model(str(d), device="cpu"), hf_model(d)) for fmt, d in folders.items()}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("fmt", ["baroni", "apollo"])
def test_checkpoint_is_in_the_published_format(folders, fmt):
    """What the loader detects: eps 1e12 in config.json and in every norm, weights ~1e6."""
    hf = hf_model(folders[fmt])
    assert hf.config.layer_norm_epsilon == EPS
    norms = [m for m in hf.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == EPS for m in norms)
    assert all(float(m.weight.detach().abs().median()) > 1e5 for m in norms)
    assert _noln.detect(hf.config) == _noln.NoLNFormat("layer_norm_epsilon", EPS)


@pytest.mark.parametrize("fmt", ["baroni", "apollo"])
def test_loads_without_norms_and_matches_hf(loaded, fmt):
    model, hf = loaded[fmt]
    assert type(model).__name__ == "HookedTransformer"
    assert model.cfg.normalization_type is None
    assert [n for n, _ in model.named_parameters() if ".ln" in n or n.startswith("ln_final")] == []
    ids = tokens()
    ours, ref = logits(model, ids), logits(hf, ids)
    assert ref.abs().max() > 0.05 and ref.std() > 0.01  # logits with a scale the tolerance can resolve
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["baroni", "apollo"])
def test_the_norm_biases_are_folded_not_dropped(loaded, fmt):
    """The final norm's bias (and, for "baroni", every norm's) moves the logits by far more than
    ATOL, so the parity above would catch a loader that dropped them."""
    model, hf = loaded[fmt]
    ids = tokens()
    ref = logits(hf, ids)
    with torch.no_grad():
        saved = hf.transformer.ln_f.bias.clone()
        hf.transformer.ln_f.bias.zero_()
        try:
            dropped = logits(hf, ids)
        finally:
            hf.transformer.ln_f.bias.copy_(saved)
    assert (dropped - ref).abs().max() > 100 * ATOL


def test_direct_logit_attribution_is_exact(loaded):
    """No final norm: the logit is the sum of the components' direct contributions
    (`direct_logit_attribution(norm="none")`), equal to the HF model's own logit."""
    from lenslab.probes.dla import direct_logit_attribution

    model, hf = loaded["baroni"]
    ids = tokens()
    answer = 50256
    res = direct_logit_attribution(model, ids, answer=answer, norm="none")
    ref = logits(hf, ids)[:, -1, answer]
    torch.testing.assert_close(res.total.reshape(-1), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.scores.sum(-1).reshape(-1), ref, atol=ATOL, rtol=0)
    # and the residual stream at the end is unembedded as it is: logits = resid @ W_U + b_U
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(resid @ model.W_U + model.b_U, logits(hf, ids), atol=ATOL, rtol=0)


def test_ordinary_gpt2_keeps_its_layernorms(tiny_moe_dir, randomize_params, tmp_path):
    """A normal GPT-2 folder is not LN-free, even when named so: the format is read from the
    checkpoint (eps 1e-5), not the name; and its norms stay LayerNorms (DLA needs norm="frozen")."""
    from lenslab.probes.dla import direct_logit_attribution

    folder = build(tiny_moe_dir, randomize_params, tmp_path / "gpt2_noLN", None)
    hf = hf_model(folder)
    assert _noln.detect(hf.config) is None
    model = lenslab.load_model(str(folder), device="cpu")
    assert model.cfg.normalization_type == "LN"
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=0)
    with pytest.raises(LenslabError, match="norm"):
        direct_logit_attribution(model, ids, answer=50256, norm="none")


def test_format_is_detected_whatever_the_folder_is_called(folders, tmp_path):
    folder = shutil.copytree(folders["apollo"], tmp_path / "my-finetune")
    assert lenslab.load_model(str(folder), device="cpu").cfg.normalization_type is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_folded_in_float32(folders, loaded, dtype):
    """The 1e6-scaled norm weights overflow float16 (max 65504): the folding runs in float32 and
    only the folded model is cast. Logits are finite and near the float32 ones."""
    model = lenslab.load_model(str(folders["baroni"]), device="cpu", dtype=dtype)
    assert model.cfg.normalization_type is None
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    ids = tokens()
    ours = logits(model, ids).float()
    ref = logits(loaded["baroni"][1], ids)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() < 0.02 * ref.abs().max()


def test_device_map_is_refused_naming_the_format(folders):
    with pytest.raises(LenslabError, match=r"LN-free checkpoint \(layer_norm_epsilon=1e\+12.*device_map"):
        lenslab.load_model(str(folders["baroni"]), device_map="auto")


def test_detection_thresholds():
    from types import SimpleNamespace

    assert _noln.detect(SimpleNamespace(layer_norm_epsilon=1e-5)) is None
    assert _noln.detect(SimpleNamespace(layer_norm_eps=1e5)) is None
    assert _noln.detect(SimpleNamespace(layer_norm_eps=1e12)) == _noln.NoLNFormat("layer_norm_eps", 1e12)
    assert _noln.detect(SimpleNamespace(rms_norm_eps=1e10)).field == "rms_norm_eps"
    assert _noln.detect(SimpleNamespace()) is None


# --- the hub ids, through a local Hugging Face cache (the published repos ship no tokenizer) -------
def cache_repo(cache: Path, repo_id: str, files: Path, revision: str = "main", skip=()) -> Path:
    """Place `files` in `cache` as Hugging Face's cache holds repo `repo_id` at `revision`."""
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = shutil.copytree(files, repo / "snapshots" / sha, ignore=shutil.ignore_patterns(*skip))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snap


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_loads_with_gpt2_tokenizer_and_revision(
    folders, loaded, hub_cache, tiny_moe_dir, randomize_params, tmp_path
):
    """`load_model("apollo-research/gpt2_noLN")` as an online user gets it: the repo (no tokenizer
    files, like the published one) and GPT-2's tokenizer repo in the HF cache. A second revision
    (the repo has v1 ... v5 branches) loads its own weights."""
    cache_repo(hub_cache, "apollo-research/gpt2_noLN", folders["apollo"], skip=TOKENIZER_FILES)
    other = build(tiny_moe_dir, randomize_params, tmp_path / "v1", "apollo", tokenizer=False, seed=1)
    cache_repo(hub_cache, "apollo-research/gpt2_noLN", other, revision="v1")
    tok = tmp_path / "gpt2-tok"
    tiny_moe_dir.gpt2_tokenizer().save_pretrained(tok)
    cache_repo(hub_cache, _noln.TOKENIZER_REPO, tok)

    model = lenslab.load_model("apollo-research/gpt2_noLN", device="cpu")
    assert model.cfg.normalization_type is None and lenslab.model_name(model) == "apollo-research/gpt2_noLN"
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(loaded["apollo"][1], ids), atol=ATOL, rtol=0)
    assert model.to_tokens(" Hello world", prepend_bos=False)[0].tolist() == [18435, 995]  # GPT-2's BPE ids

    v1 = lenslab.load_model("apollo-research/gpt2_noLN", device="cpu", revision="v1")
    assert lenslab.model_name(v1) == "apollo-research/gpt2_noLN@v1" and v1.cfg.normalization_type is None
    torch.testing.assert_close(logits(v1, ids), logits(hf_model(other), ids), atol=ATOL, rtol=0)
    assert (logits(v1, ids) - logits(model, ids)).abs().max() > 100 * ATOL


def test_missing_gpt2_tokenizer_offline_is_explained(folders, hub_cache):
    cache_repo(hub_cache, "schaeff/gpt2-small_LNFree300", folders["baroni"], skip=TOKENIZER_FILES)
    with pytest.raises(LenslabError) as err:
        lenslab.load_model("schaeff/gpt2-small_LNFree300", device="cpu")
    msg = str(err.value)
    assert "LN-free checkpoint (layer_norm_epsilon=1e+12" in msg and _noln.TOKENIZER_REPO in msg
    assert "save a GPT-2 tokenizer beside the weights" in msg
