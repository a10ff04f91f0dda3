"""The batched engine's opt-in `torch.compile` path equals its eager path (float32, 1e-5).

Oracle: the same engine eager (itself tested equal to the reference engine in
test_batched_engine.py). Compiled code reorders float32 reductions, hence 1e-5 rather than 0.
A counting backend (dynamo capture, the captured FX graphs run as they are) keeps the fast test
honest: it asserts that graphs were really captured and ran. The inductor test generates and
compiles C++ (gcc) for two graphs: 20-90 s on the 2-core CI VM, hence `slow`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, kernels, tasks
from lenslab.kernels import config

TOL = 1e-5


def _model(randomize_params, device="cpu", **kw) -> HookedTransformer:
    cfg = dict(
        n_layers=2,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=61,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        device=device,
    )
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    randomize_params(model, seed=0)  # random biases, b_U and LayerNorm weights: compiled graphs must use them
    return model


def _task(d_vocab=61, batch=3, seq=5, device="cpu") -> tasks.Task:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (batch, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, d_vocab, (batch,), generator=g)
    return tasks.from_tokens(clean, corrupt, torch.randint(0, d_vocab, (batch, 2), generator=g)).to(device)


class CountingBackend:
    """A torch.compile backend that records each captured graph and runs it as captured."""

    def __init__(self):
        self.graphs, self.calls = 0, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("site", ["resid_pre", "pattern"])
def test_compiled_capture_equals_eager(randomize_params, site):
    """Join sites (resid_pre/post) and hook sites, with and without position skipping: the compiled
    block runner gives the eager scores. A block where rows join at a hook site runs eager (the
    patch is a hook), so chunks of two experiments (max_rows=6) leave later blocks to compile."""
    model, task = _model(randomize_params, n_layers=3), _task()
    backend = CountingBackend()
    eager = circuits.batched_patch(model, task, site, progress=False, max_rows=6)
    comp = circuits.batched_patch(model, task, site, progress=False, max_rows=6, compile=True, compile_backend=backend)
    assert comp.provenance["engine_details"]["compile"] == "default"
    assert eager.provenance["engine_details"]["compile"] is False
    assert backend.graphs >= 1 and backend.calls >= 1  # graphs were captured and ran
    assert backend.graphs <= 2  # one without and one with a cached prefix; size-1 calls run eager
    assert float(eager.scores.max() - eager.scores.min()) >= 100 * TOL  # effects far above the tolerance
    assert (comp.scores - eager.scores).abs().max() <= TOL


@pytest.mark.slow
def test_inductor_compile_equals_eager(randomize_params):
    """compile=True (inductor, C++ on CPU) on a position-skipping grid and a hook-site grid."""
    model, task = _model(randomize_params), _task()
    for site in ("resid_pre", "z_by_pos"):
        eager = circuits.batched_patch(model, task, site, progress=False)
        comp = circuits.batched_patch(model, task, site, progress=False, compile=True)
        assert comp.provenance["engine_details"]["compile"] == "default"
        assert (comp.scores - eager.scores).abs().max() <= TOL


def test_compile_under_inference_mode_runs_eager_and_says_so(randomize_params):
    model, task = _model(randomize_params), _task()
    eager = circuits.batched_patch(model, task, "resid_pre", progress=False)
    backend = CountingBackend()
    config._SAID.clear()
    with torch.inference_mode(), pytest.warns(UserWarning, match="not used under torch.inference_mode"):
        res = circuits.batched_patch(model, task, "resid_pre", progress=False, compile=True, compile_backend=backend)
    assert res.provenance["engine_details"]["compile"] is False and backend.graphs == 0
    assert (res.scores - eager.scores).abs().max() <= TOL


def test_compile_option_errors():
    with pytest.raises(lenslab.LenslabError, match="reduce-overhead"):
        kernels.configure(compile="reduce_overhead")
    with pytest.raises(lenslab.LenslabError, match="compile_backend"):
        with kernels.options(compile=True, compile_backend=""):
            pass
    assert kernels.current_options().compile is False  # the failed configure changed nothing


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_cuda_equals_eager(randomize_params, mode):
    """On CUDA, float32: inductor (Triton kernels) and "reduce-overhead" (CUDA graphs) equal eager."""
    model, task = (
        _model(randomize_params, "cuda", n_layers=4, d_model=128, d_head=32, d_mlp=512),
        _task(device="cuda", batch=4, seq=8),
    )
    for site in ("resid_pre", "z"):
        eager = circuits.batched_patch(model, task, site, progress=False)
        comp = circuits.batched_patch(model, task, site, progress=False, compile=mode)
        again = circuits.batched_patch(model, task, site, progress=False, compile=mode)  # graphs replayed
        assert comp.provenance["engine_details"]["compile"] == mode
        assert (comp.scores - eager.scores).abs().max() <= TOL
        assert (again.scores - eager.scores).abs().max() <= TOL
