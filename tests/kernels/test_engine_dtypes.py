"""Both patching engines in float16/bfloat16 against a float32 reference, on zoo models (CPU and GPU).

Oracle: `circuits.patch(..., engine="reference")` of the float32 model (one full forward per patch,
itself tested equal to TransformerLens `patching`). The half-precision model is the same weights
loaded with `lenslab.load_model(name, dtype=...)`.

Tolerance, derived per grid (u = unit roundoff: 2**-8 for bfloat16, 2**-11 for float16; Lambda =
the largest |last-position logit| of the float32 model on the clean and corrupt prompts; n = layers):

* `e_ref = max |reference_half - reference_f32|` is what the precision itself costs on this grid.
  It must stay under the first-order forward-error bound `2 (2n + 2) u Lambda`: each of the 2n + 2
  roundings of the residual stream (embedding, two sublayer outputs per block, the unembedding)
  perturbs a logit by at most about u Lambda, and logit_diff is a difference of two logits.
* The batched engine runs a different but equivalent sequence of half-precision ops (positions
  sliced off, cached keys/values, other batch shapes), so its rounding errors have the same size
  but are not the same numbers: `|batched_half - reference_f32| <= 2 e_ref + u Lambda`, the second
  term because the batched engine computes the two answer logits in float32 while the reference
  rounds them to the half type first (at most u/2 Lambda each).
* That tolerance must be below 10% of the float32 scores' range, so that a wrong patch (an error
  of the order of the range) cannot pass.
Measured on CPU (2026-11-23): e_ref 0.005-0.093 (6-45x under the bound), the batched error
0.93-1.14 e_ref, tolerance 0.1-4.9% of the range.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
CASES = [
    ("zoo/induction-2l", "resid_pre"),
    ("zoo/induction-2l", "z_by_pos"),
    ("zoo/ioi-4l", "resid_pre"),
    ("zoo/ioi-4l", "z"),
]


def _load(name: str, device: str, dtype=None):
    """A zoo model (trained biases and norm weights). The zoo ships with the repository: a load
    failure fails the test, it does not skip it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lenslab.load_model(name, device=device, dtype=dtype)


def _task(model, name: str):
    return tasks.ioi(model, n=4, seed=0) if "ioi" in name else tasks.induction(model, n=4, seq_len=6, seed=0)


def check_half_against_float32(name: str, site: str, dtype: torch.dtype, device: str) -> dict:
    m32 = _load(name, device)
    task = _task(m32, name).to(device)
    n = int(m32.cfg.n_layers)
    layers = [0, n - 1]
    with torch.no_grad():
        lam = max(float(m32(task.clean_tokens)[:, -1].abs().max()), float(m32(task.corrupt_tokens)[:, -1].abs().max()))
    ref32 = circuits.patch(m32, task, site, engine="reference", progress=False, layers=layers)
    half = _load(name, device, dtype)
    assert next(half.parameters()).dtype == dtype and half.cfg.dtype == dtype
    ref_half = circuits.patch(half, task, site, engine="reference", progress=False, layers=layers)
    fast = circuits.patch(half, task, site, engine="batched", progress=False, layers=layers)
    assert fast.provenance["engine"] == "batched" and fast.provenance["engine_details"]["dtype"] == str(dtype)
    assert fast.scores.dtype == torch.float32 and fast.scores.shape == ref32.scores.shape

    u = UNIT_ROUNDOFF[dtype]
    e_ref = float((ref_half.scores - ref32.scores).abs().max())
    bound = 2 * (2 * n + 2) * u * lam
    tol = 2 * e_ref + u * lam
    err = float((fast.scores - ref32.scores).abs().max())
    spread = float(ref32.scores.max() - ref32.scores.min())
    info = dict(e_ref=e_ref, bound=bound, err=err, tol=tol, range=spread)
    assert 0 < e_ref <= bound, info  # half precision really ran, and is as accurate as it should be
    assert err <= tol, info
    assert tol <= 0.1 * spread, info  # the comparison can fail for a wrong patch
    return info


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,site", CASES)
def test_half_precision_cpu(name, site, dtype):
    check_half_against_float32(name, site, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,site", CASES)
def test_half_precision_cuda(name, site, dtype):
    """The same check on CUDA (the batched engine uses the Triton metric kernel there when triton is installed)."""
    info = check_half_against_float32(name, site, dtype, "cuda")
    print(name, site, dtype, info)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_gpt2_small_shape_cuda(randomize_params, dtype):
    """A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 50257) on CUDA in half precision:
    the batched engine against the float32 reference, tolerance derived as above (2 e_ref + u Lambda)."""

    def build(dt):
        cfg = HookedTransformerConfig(
            n_layers=12,
            d_model=768,
            n_heads=12,
            d_head=64,
            d_mlp=3072,
            d_vocab=50257,
            n_ctx=1024,
            act_fn="gelu_new",
            normalization_type="LN",
            seed=0,
            device="cuda",
            dtype=dt,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HookedTransformer(cfg).eval()

    m32 = build(torch.float32)
    randomize_params(m32, seed=0)  # random biases, b_U and LayerNorm weights (copied into the half model)
    half = build(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in m32.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1000, 40000, (8, 15), generator=g)
    corrupt = clean.clone()
    corrupt[:, 9] = torch.randint(1000, 40000, (8,), generator=g)
    task = tasks.from_tokens(clean, corrupt, clean[:, [2, 4]]).to("cuda")
    with torch.no_grad():
        lam = max(float(m32(task.clean_tokens)[:, -1].abs().max()), float(m32(task.corrupt_tokens)[:, -1].abs().max()))
    u = UNIT_ROUNDOFF[dtype]
    for site in ("resid_pre", "z"):
        ref32 = circuits.patch(m32, task, site, engine="reference", progress=False)
        ref_half = circuits.patch(half, task, site, engine="reference", progress=False)
        fast = circuits.patch(half, task, site, engine="batched", progress=False)
        e_ref = float((ref_half.scores - ref32.scores).abs().max())
        err = float((fast.scores - ref32.scores).abs().max())
        print(site, dtype, dict(e_ref=e_ref, err=err, lam=lam, triton=fast.provenance["engine_details"]["triton"]))
        assert err <= 2 * e_ref + u * lam
