"""Shared fixtures. Tests run offline (run.py sets HF_HUB_OFFLINE=1 and WANDB_MODE=disabled)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory):
    """A zoo-format folder with a tiny random 2-layer model over words t0..t63 (no training)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lenslab import zoo

    torch.manual_seed(0)
    tok = zoo.word_tokenizer([f"t{i}" for i in range(64)])
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tok),
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tok)
    out = tmp_path_factory.mktemp("tiny_zoo")
    zoo.save_hooked(model, tok, out, summary="tiny random test model", card="# tiny\n", extra={"default_prompt": "t1 t2 t3 t1 t2"})
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_zoo_dir):
    import lenslab

    return lenslab.load_model(str(tiny_zoo_dir), device="cpu")
