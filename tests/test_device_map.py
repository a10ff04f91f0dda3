"""Models split across devices (`load_model(..., device_map=..., max_memory=..., offload_folder=...)`).

This machine has one device, so the split under test is CPU plus disk offload: a tiny random Llama
(random biases and norm weights, from the session's `tiny_moe_dir` factory, tests/conftest.py) is
loaded twice, whole and with some modules' weights on disk, and every analysis must agree within
1e-5. The GPU test does the same across cuda:0 and CPU (accelerate offloads CPU entries beside a GPU).
"""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab import tasks
from lenslab._errors import LenslabError
from lenslab.circuits import attribute, patch
from lenslab.probes.sinks import attention_sinks
from lenslab.steering import generate, mean_difference
from lenslab.toolbox import model_device

TOL = 1e-5
HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_z",
    "blocks.1.attn.hook_pattern",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
]
# layer 1, the final norm and the unembedding on disk; the rest in CPU RAM
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama_dir(tiny_moe_dir):
    return tiny_moe_dir("llama")


@pytest.fixture(scope="module")
def plain(llama_dir):
    return lenslab.load_model(str(llama_dir), device="cpu")


@pytest.fixture(scope="module")
def split(llama_dir, tmp_path_factory):
    return lenslab.load_model(str(llama_dir), device_map=DISK_MAP, offload_folder=tmp_path_factory.mktemp("offload"))


def tokens(model, batch=2, pos=10):
    return torch.randint(4, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(1))


def close(a, b):
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max()) <= TOL


def test_weights_really_offloaded(split):
    assert type(split).__name__ == "TransformerBridge"
    assert split.lenslab_device_map["model.layers.1"] == "disk"
    meta = [n for n, p in split.named_parameters() if p.device.type == "meta"]
    assert meta and all(("layers.1" in n or "norm" in n or "lm_head" in n) for n in meta)
    assert model_device(split) == torch.device("cpu")  # not 'meta'


def test_logits_and_cache(plain, split):
    ids = tokens(plain)
    a, ca = plain.run_with_cache(ids)
    b, cb = split.run_with_cache(ids)
    assert close(a, b)
    for h in HOOKS:
        assert close(ca[h], cb[h]), h
    # weights go back to disk after each forward
    assert any(p.device.type == "meta" for p in split.parameters())


def test_auto_map_with_small_max_memory(llama_dir, plain, tmp_path):
    model = lenslab.load_model(str(llama_dir), device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path)
    assert "disk" in model.lenslab_device_map.values()
    ids = tokens(plain)
    assert close(plain(ids), model(ids))


@pytest.fixture(scope="module")
def task(plain):
    return tasks.induction(plain, n=4, seq_len=6)


def test_patch_reference(plain, split, task):
    a = patch(plain, task, "resid_pre", engine="reference", progress=False)
    b = patch(split, task, "resid_pre", engine="reference", progress=False)
    assert a.scores.shape == b.scores.shape
    assert close(a.scores, b.scores)


def test_patch_auto_engine(plain, split, task):
    """'auto' picks whichever engine covers the split model; the numbers agree either way."""
    a = patch(plain, task, "attn_out", engine="reference", progress=False)
    b = patch(split, task, "attn_out", progress=False)
    assert close(a.scores, b.scores)


def test_attribute_atp(plain, split, task):
    a = attribute(plain, task, "atp", ["resid_pre", "z"], progress=False)
    b = attribute(split, task, "atp", ["resid_pre", "z"], progress=False)
    for site in ("resid_pre", "z"):
        assert close(a[site].scores, b[site].scores), site


def test_steering_generate(plain, split):
    pos, neg = ["w1 w2 w3", "w1 w4 w5"], ["w9 w8 w7", "w9 w6 w5"]
    ia = mean_difference(plain, pos, neg, layers=1, strength=4.0)
    ib = mean_difference(split, pos, neg, layers=1, strength=4.0)
    for ea, eb in zip(ia.edits, ib.edits):
        assert close(ea.vector, eb.vector)
    assert generate(plain, "w3 w4 w5", ia, max_new_tokens=6) == generate(split, "w3 w4 w5", ib, max_new_tokens=6)


def test_attention_sinks(plain, split):
    ids = tokens(plain, batch=3, pos=12)
    a = attention_sinks(plain, ids)
    b = attention_sinks(split, ids)
    assert close(a.key_attention, b.key_attention)
    assert close(a.sink_fraction, b.sink_fraction)


def test_sae_splice(plain, split):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from lenslab.probes.sae_splice import splice_hooks

    cfg = StandardSAEConfig(d_in=plain.cfg.d_model, d_sae=16, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    ids = tokens(plain)
    a = plain.run_with_hooks(ids, fwd_hooks=splice_hooks(sae))
    b = split.run_with_hooks(ids, fwd_hooks=splice_hooks(sae))
    assert not close(a, plain(ids))  # the splice changes the output ...
    assert close(a, b)  # ... the same way on both


# --- bad input ---------------------------------------------------------------------------------


def test_map_leaving_a_layer_nowhere(llama_dir):
    bad = {k: v for k, v in DISK_MAP.items() if k != "model.layers.1"}
    with pytest.raises(LenslabError, match=r"model\.layers\.1.*add an entry"):
        lenslab.load_model(str(llama_dir), device_map=bad)


def test_offload_without_folder_reads_the_checkpoint(llama_dir, plain):
    """With a safetensors checkpoint and no offload_folder, transformers reads offloaded weights
    straight from the checkpoint's files: even a budget below one layer (everything on disk) works."""
    model = lenslab.load_model(str(llama_dir), device_map="auto", max_memory={"cpu": 100})
    assert set(model.lenslab_device_map.values()) == {"disk"}
    assert model_device(model) == torch.device("cpu")
    ids = tokens(plain)
    assert close(plain(ids), model(ids))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device_map="everywhere"), "is not one of"),
        (dict(device_map={"": "meta"}), "holds no weights"),
        (dict(max_memory={"cpu": "1GiB"}), "only apply with a device_map"),
        (dict(device_map="auto", device="cpu"), "not both"),
    ],
)
def test_bad_placements(llama_dir, kwargs, match):
    with pytest.raises(LenslabError, match=match):
        lenslab.load_model(str(llama_dir), **kwargs)


def test_zoo_model_takes_no_device_map(tiny_zoo_dir):
    with pytest.raises(LenslabError, match="HookedTransformer.*Hugging Face checkpoints only"):
        lenslab.load_model(str(tiny_zoo_dir), device_map="auto")


def test_fused_qkv_with_offload_is_a_clear_error(tiny_moe_dir, tmp_path):
    """GPT-2's bridge splits c_attn when built: offloaded weights cannot be split."""
    with pytest.raises(LenslabError, match="fused QKV"):
        lenslab.load_model(
            str(tiny_moe_dir("gpt2")), device_map="auto", max_memory={"cpu": 2_000_000}, offload_folder=tmp_path
        )


@pytest.mark.gpu
def test_gpu_and_cpu_split(llama_dir, plain, task):
    gmap = {**DISK_MAP, "model.layers.1": "cpu", "model.norm": 0, "lm_head": 0, "model.embed_tokens": 0}
    gmap["model.rotary_emb"] = 0
    model = lenslab.load_model(str(llama_dir), device_map=gmap)
    assert model_device(model).type == "cuda"
    ids = tokens(plain)
    a, ca = plain.run_with_cache(ids)
    b, cb = model.run_with_cache(ids)
    assert close(a, b)
    for h in HOOKS:
        assert close(ca[h], cb[h]), h
    pa = patch(plain, task, "resid_pre", engine="reference", progress=False)
    pb = patch(model, task, "resid_pre", engine="reference", progress=False)
    assert close(pa.scores, pb.scores)
    aa = attribute(plain, task, "atp", "z", progress=False)
    ab = attribute(model, task, "atp", "z", progress=False)
    assert close(aa["z"].scores, ab["z"].scores)
