"""Triton kernels equal their pure-torch twins; run on CPU under TRITON_INTERPRET=1 in a subprocess.

TRITON_INTERPRET must be set before anything imports triton (TransformerLens does), so the
interpreted checks run in a fresh process that sets it at start. Shapes stay tiny: each program
instance costs about a millisecond in the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lenslab.kernels import triton_ops


@pytest.mark.parametrize("norm", ["LN", "RMS", None])
def test_torch_twin_equals_final_norm_and_full_unembedding(norm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(
            HookedTransformerConfig(
                n_layers=1,
                d_model=24,
                n_ctx=8,
                d_head=6,
                n_heads=4,
                d_vocab=37,
                act_fn="gelu",
                normalization_type=norm,
                attn_only=True,
                seed=0,
            )
        )
    torch.manual_seed(0)
    for p in model.parameters():  # non-trivial LN weights and unembedding bias
        p.data.normal_()
    x = torch.randn(5, 24) * 3
    cols = torch.randint(0, 37, (5, 2))
    w = getattr(model.ln_final, "w", None) if norm else None
    b = getattr(model.ln_final, "b", None) if norm == "LN" else None
    got = triton_ops.ln_unembed_pair_torch(
        x, w, b, model.unembed.W_U, model.unembed.b_U, cols, norm=norm, eps=model.cfg.eps
    )
    with torch.no_grad():
        h = model.ln_final(x[:, None]) if norm else x[:, None]
        full = model.unembed(h)[:, 0]
    assert (got - full.gather(1, cols)).abs().max() <= 1e-5


def test_kernel_refuses_cpu_without_interpreter():
    if triton_ops.interpreted():
        pytest.skip("this process runs the interpreter")
    x = torch.randn(2, 8)
    with pytest.raises(Exception, match="triton is not installed|CUDA GPU"):
        triton_ops.ln_unembed_pair_triton(
            x, None, None, torch.randn(8, 5), torch.zeros(5), torch.zeros(2, 2).long(), norm=None, eps=1e-5
        )


SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, warnings
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from lenslab.kernels import triton_ops
    torch.manual_seed(0)
    worst = {}
    for norm in ["LN", "RMS", None]:
        for dtype in [torch.float32, torch.bfloat16]:
            x = (torch.randn(4, 20) * 3).to(dtype)
            w = torch.randn(20).to(dtype) if norm else None
            b = torch.randn(20).to(dtype) if norm == "LN" else None
            W_U, b_U = torch.randn(20, 11).to(dtype), torch.randn(11).to(dtype)
            cols = torch.randint(0, 11, (4, 2))
            k = triton_ops.ln_unembed_pair_triton(x, w, b, W_U, b_U, cols, norm=norm, eps=1e-5)
            t = triton_ops.ln_unembed_pair_torch(x, w, b, W_U, b_U, cols, norm=norm, eps=1e-5)
            assert k.dtype == torch.float32 and k.shape == (4, 2)
            worst[(norm, str(dtype))] = float((k - t).abs().max())
    # strided (non-contiguous) W_U, as TransformerLens may hold it
    W = torch.randn(11, 20).T
    x, cols = torch.randn(3, 20), torch.randint(0, 11, (3, 2))
    k = triton_ops.ln_unembed_pair_triton(x, None, None, W, torch.zeros(11), cols, norm=None, eps=1e-5)
    worst["strided"] = float((k - triton_ops.ln_unembed_pair_torch(x, None, None, W, torch.zeros(11), cols,
                                                                    norm=None, eps=1e-5)).abs().max())
    # the engine with triton=True (interpreted) equals the reference engine
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from lenslab import circuits, kernels, tasks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4,
                                  d_mlp=32, d_vocab=23, act_fn="gelu", normalization_type="LN", seed=0)).eval()
    # random biases, b_U and LayerNorm weights (tests/_random_params.py): the kernel must read them all
    spec = importlib.util.spec_from_file_location("random_params", os.environ["LENSLAB_RANDOM_PARAMS"])
    random_params = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_params)
    assert {"unembed.b_U", "ln_final.w", "ln_final.b"} <= set(random_params.randomize_params(model, seed=0))
    clean = torch.randint(0, 23, (2, 4)); corrupt = clean.clone(); corrupt[:, 1] = (clean[:, 1] + 1) % 23
    task = tasks.from_tokens(clean, corrupt, torch.randint(0, 23, (2, 2)))
    ref = circuits.patch(model, task, "resid_pre", engine="reference", progress=False)
    fast = kernels.batched_patch(model, task, "resid_pre", progress=False, triton=True)
    assert fast.provenance["engine_details"]["triton"] is True
    worst["engine"] = float((fast.scores - ref.scores).abs().max())
    spread = float(ref.scores.max() - ref.scores.min())
    print("WORST", worst, "SPREAD", spread)
    assert worst["engine"] <= 1e-4 <= spread / 100, (worst, spread)  # effects far above the tolerance
    for key, val in worst.items():
        assert val <= 2e-5, (key, val)  # both upcast bf16 to float32; only the summation order differs
    print("OK")
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed in this environment (pip install triton); the torch path is the "
    "default and the interpreted kernel tests need it",
)
def test_kernels_interpreted_on_cpu():
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        LENSLAB_RANDOM_PARAMS=str(Path(__file__).resolve().parents[1] / "_random_params.py"),
    )
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["LN", "RMS", None])
def test_kernel_on_cuda_equals_torch_twin(norm, dtype):
    """The compiled kernel on a GPU against its torch twin, at GPT-2-small width (d_model 768,
    vocab 50257). Both read the same (half or float32) values, compute in float32 and differ only
    in summation order: float32 round-off over 768 terms, ~1e-6 relative; tolerance 1e-4 x max|logit|."""
    torch.manual_seed(0)
    d, v, rows = 768, 50257, 96
    x = (torch.randn(rows, d, device="cuda") * 3).to(dtype)
    w = torch.randn(d, device="cuda").to(dtype) if norm else None
    b = torch.randn(d, device="cuda").to(dtype) if norm == "LN" else None
    W_U = (torch.randn(d, v, device="cuda") / d**0.5).to(dtype)
    b_U = torch.randn(v, device="cuda").to(dtype)
    cols = torch.randint(0, v, (rows, 2), device="cuda")
    k = triton_ops.ln_unembed_pair_triton(x, w, b, W_U, b_U, cols, norm=norm, eps=1e-5)
    t = triton_ops.ln_unembed_pair_torch(x, w, b, W_U, b_U, cols, norm=norm, eps=1e-5)
    assert k.dtype == torch.float32 and k.shape == (rows, 2)
    assert (k - t).abs().max() <= 1e-4 * max(1.0, float(t.abs().max()))
