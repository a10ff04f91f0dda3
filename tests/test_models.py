"""`lenslab.load_model` in general: zoo-format folders, names, devices, dtypes and their errors.

(The Hugging Face paths are tested in tests/test_models_hf.py.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lenslab
from lenslab import zoo
from lenslab._device import resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def zoo_format(tmp_path_factory, randomize_params):
    """(folder, original model): a tiny random HookedTransformer (random biases, b_U and LayerNorm
    weights too) saved with `zoo.save_hooked`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    tok = zoo.word_tokenizer([f"t{i}" for i in range(28)])
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="shortformer",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tok).eval()
    changed = randomize_params(model, seed=0)
    assert "unembed.b_U" in changed and "ln_final.w" in changed and "blocks.0.attn.b_Q" in changed
    folder = tmp_path_factory.mktemp("zoo_format") / "tiny-2l"
    zoo.save_hooked(model, tok, folder, summary="tiny random model", card="# tiny\n")
    return folder, model


def test_zoo_format_folder_round_trips_logits_exactly(zoo_format):
    folder, original = zoo_format
    model = lenslab.load_model(str(folder), device="cpu")
    assert type(model).__name__ == "HookedTransformer"
    assert model.cfg.model_name == str(folder)
    assert not model.training
    ids = torch.randint(4, 32, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = original(ids)
        got = model(ids)
    assert ref.abs().max() > 1e-2
    assert torch.equal(got, ref)
    assert model.to_str_tokens("t1 t2 t3") == ["<bos>", "t1", "t2", "t3"]
    assert model.cfg.positional_embedding_type == "shortformer"


def test_zoo_format_folder_in_bfloat16(zoo_format):
    folder, original = zoo_format
    model = lenslab.load_model(str(folder), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(4, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), original(ids), atol=0.1, rtol=0.05)


def test_loading_does_not_warn(zoo_format):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lenslab.load_model(str(zoo_format[0]), device="cpu")
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]


# --- names ---------------------------------------------------------------------------------


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(lenslab.LenslabError) as err:
        lenslab.load_model("zoo/no-such-model", device="cpu")
    msg = str(err.value)
    assert "'zoo/no-such-model' does not exist" in msg
    assert "the zoo has:" in msg and all(n in msg for n in zoo.zoo_names())


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_empty_or_non_string_name(name, monkeypatch):
    monkeypatch.setattr(zoo, "zoo_names", lambda: ["zoo/induction-2l"])  # the hint names the default
    with pytest.raises(lenslab.LenslabError, match="non-empty string"):
        lenslab.load_model(name, device="cpu")


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-lenslab-dir"])
def test_missing_local_directory(name):
    with pytest.raises(lenslab.LenslabError, match="does not exist; check the path"):
        lenslab.load_model(name, device="cpu")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(lenslab.LenslabError, match="has no config.json"):
        lenslab.load_model(str(tmp_path), device="cpu")


def test_file_instead_of_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(lenslab.LenslabError, match="is a file, not a model directory"):
        lenslab.load_model("model.safetensors", device="cpu")


@pytest.mark.parametrize("name", ["not a model!", "a/b/c"])
def test_invalid_name(name):
    with pytest.raises(lenslab.LenslabError) as err:
        lenslab.load_model(name, device="cpu")
    msg = str(err.value)
    assert (
        f"unknown model {name!r}" in msg
        and "not a zoo model, an existing local directory or a valid Hugging Face id" in msg
    )
    assert "zoo" in msg


def test_unknown_name_offline_says_so_and_lists_the_zoo():
    """HF_HUB_OFFLINE=1 (set by conftest): an uncached id fails with a clear message."""
    with pytest.raises(lenslab.LenslabError) as err:
        lenslab.load_model("lenslab-test/no-such-model", device="cpu")
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "network" in msg
    assert "the zoo (offline) has:" in msg and all(n in msg for n in zoo.zoo_names())


def test_zoo_name_without_prefix_is_suggested(monkeypatch):
    monkeypatch.setattr(zoo, "zoo_names", lambda: ["zoo/induction-2l", "zoo/ioi-4l"])
    with pytest.raises(lenslab.LenslabError, match=r"did you mean 'zoo/induction-2l'\?"):
        lenslab.load_model("induction-2l", device="cpu")


def test_list_models_has_the_zoo():
    models = lenslab.list_models()
    assert [m.name for m in models if m.source == "zoo"] == zoo.zoo_names()
    assert all(isinstance(m, lenslab.ModelInfo) for m in models)


# --- devices and dtypes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float8", "int32", "fp64x", torch.int64])
def test_bad_dtype(zoo_format, dtype):
    with pytest.raises(lenslab.LenslabError, match="is not supported; use one of float32, float16, bfloat16"):
        lenslab.load_model(str(zoo_format[0]), device="cpu", dtype=dtype)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_names(dtype, expected):
    assert resolve_dtype(dtype) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_gpu(zoo_format, device):
    with pytest.raises(lenslab.LenslabError, match="no CUDA GPU is available on this machine; use device='cpu'"):
        lenslab.load_model(str(zoo_format[0]), device=device)


@pytest.mark.parametrize("device", ["banana", "cuda-7", 3.5])  # (a param id "gpu" would be skipped as a gpu test)
def test_bad_device(zoo_format, device):
    with pytest.raises(lenslab.LenslabError, match="is not a torch device"):
        lenslab.load_model(str(zoo_format[0]), device=device)


def test_auto_device():
    dev = resolve_device("auto")
    assert dev == resolve_device(None)
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    else:
        assert dev.type in ("mps", "cpu")


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(device="cpu", dtype="int8"), "dtype 'int8' is not supported; use one of float32, float16, bfloat16"),
        (dict(device="banana"), "'banana' is not a torch device"),
    ],
)
def test_errors_come_before_loading(monkeypatch, kw, message):
    """Bad device/dtype fail before the hub or any weights are touched (fast, even for a big model):
    the hub and folder loaders are replaced by ones that fail the test if they are reached."""
    from lenslab import _hf, models

    def reached(*args, **kwargs):
        raise AssertionError("the loader was reached before the device/dtype check")

    monkeypatch.setattr(_hf, "load_hf_id", reached)
    monkeypatch.setattr(models, "_load_folder", reached)
    with pytest.raises(lenslab.LenslabError) as err:
        lenslab.load_model("EleutherAI/pythia-70m", **kw)
    assert message in str(err.value)


@pytest.mark.gpu
def test_cuda_load(zoo_format):
    folder, original = zoo_format
    model = lenslab.load_model(str(folder), device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    ids = torch.randint(4, 32, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).cpu(), original(ids), atol=1e-4, rtol=1e-4)
