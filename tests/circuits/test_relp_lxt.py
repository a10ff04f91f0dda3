"""RelP's LRP rules, rule by rule, against LXT's explicit reference implementations (lxt 2.1).

LXT works in relevance space (R = input x gradient); lenslab's rules are modified gradients.
For each rule, a random upstream gradient g on a TransformerLens component's output gives our
relevance R_in = x * (modified dL/dx), and LXT's rule applied to R_out = y * g gives its R_in.
`run.py test` installs lxt with --no-deps (its model patches need names transformers 5 removed,
and its dependencies pull in a CUDA torchvision); only `lxt.explicit` is used.
"""

from __future__ import annotations

# Plain imports: a missing LXT fails the run (it is pinned in requirements-lock.txt; `run.py test`
# installs it with --no-deps, which pyproject's extras cannot express).
import lxt.explicit.functional as lxt_f
import lxt.explicit.rules as lxt_r
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lenslab.circuits.attribution import _relp_hooks

TOL = 1e-4


def _model(**kw):
    cfg = dict(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=10, seed=0)
    cfg.update(kw)
    return HookedTransformer(HookedTransformerConfig(**cfg))


def _ours(model, module, x, g):
    """Our relevance at the input of `module` for upstream gradient g, with the RelP hooks on."""
    x = x.clone().requires_grad_(True)
    with model.hooks(fwd_hooks=_relp_hooks(model, None)):
        y = module(x)
        (grad,) = torch.autograd.grad(y, x, g)
    return y.detach(), x.detach() * grad


def test_layernorm_rule_matches_lxt():
    model = _model(normalization_type="LN")
    ln = model.blocks[0].ln1
    with torch.no_grad():
        ln.w.normal_(1.0, 0.3)
        ln.b.normal_(0.0, 0.3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    g = torch.randn(2, 5, 16, generator=gen)
    y, ours = _ours(model, ln, x, g)
    xr = x.clone().requires_grad_(True)
    y_lxt = lxt_f.layer_norm(xr, ln.w, ln.b, model.cfg.eps)
    (theirs,) = torch.autograd.grad(y_lxt, xr, y_lxt.detach() * g)
    assert torch.allclose(y, y_lxt, atol=1e-5)
    assert (ours - theirs).abs().max() <= TOL * max(1.0, float(theirs.abs().max()))


def test_rmsnorm_rule_matches_lxt_identity():
    model = _model(normalization_type="RMS")
    rms = model.blocks[0].ln1
    with torch.no_grad():
        rms.w.normal_(1.0, 0.3)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    y, ours = _ours(model, rms, x, g)
    xr = x.clone().requires_grad_(True)
    y_lxt = lxt_f.rms_norm_identity(xr, rms.w, model.cfg.eps)
    (theirs,) = torch.autograd.grad(y_lxt, xr, y_lxt.detach() * g)
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_activation_identity_rule_matches_lxt(act):
    model = _model(act_fn=act, normalization_type=None)
    mlp = model.blocks[0].mlp
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=gen)
    # relevance at the MLP's hidden pre-activation: run only W_in -> act -> hook_post
    pre = (x @ mlp.W_in + mlp.b_in).detach().requires_grad_(True)
    g_post = torch.randn(pre.shape, generator=gen)
    with model.hooks(fwd_hooks=_relp_hooks(model, None)):
        post = mlp.hook_post(mlp.act_fn(mlp.hook_pre(pre)))
        (grad,) = torch.autograd.grad(post, pre, g_post)
    ours = pre.detach() * grad
    pr = pre.detach().clone().requires_grad_(True)
    out = lxt_r.identity(mlp.act_fn, pr)
    (theirs,) = torch.autograd.grad(out, pr, out.detach() * g_post)
    assert (ours - theirs).abs().max() <= TOL


def test_gated_mlp_half_rule_matches_lxt_uniform_mul():
    model = _model(act_fn="silu", gated_mlp=True, normalization_type=None)
    mlp = model.blocks[0].mlp
    gen = torch.Generator().manual_seed(4)
    gate = torch.randn(2, 5, 32, generator=gen).requires_grad_(True)
    lin = torch.randn(2, 5, 32, generator=gen).requires_grad_(True)
    g = torch.randn(2, 5, 32, generator=gen)
    with model.hooks(fwd_hooks=_relp_hooks(model, None)):
        a = mlp.hook_pre(gate)
        l_ = mlp.hook_pre_linear(lin)
        post = mlp.hook_post(mlp.act_fn(a) * l_)
        g_gate, g_lin = torch.autograd.grad(post, (gate, lin), g)
    ours = (gate.detach() * g_gate, lin.detach() * g_lin)
    ga, li = gate.detach().clone().requires_grad_(True), lin.detach().clone().requires_grad_(True)
    act = lxt_r.identity(mlp.act_fn, ga)
    out = lxt_f.mul2(act, li)
    t_gate, t_lin = torch.autograd.grad(out, (ga, li), out.detach() * g)
    assert (ours[0] - t_gate).abs().max() <= TOL and (ours[1] - t_lin).abs().max() <= TOL


def test_linear_plain_gradient_is_lxt_epsilon_rule_in_the_limit():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, generator=gen).requires_grad_(True)
    w, b = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    g = torch.randn(3, 6, generator=gen)
    (grad,) = torch.autograd.grad(torch.nn.functional.linear(x, w, b), x, g)
    ours = x.detach() * grad
    xr = x.detach().clone().requires_grad_(True)
    y = lxt_f.linear_epsilon(xr, w, b, 1e-9)
    (theirs,) = torch.autograd.grad(y, xr, y.detach() * g)
    assert (ours - theirs).abs().max() <= 1e-3
