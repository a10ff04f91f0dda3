"""Transcoders: sparse stand-ins for a model's MLPs, the nodes of an attribution graph.

A *transcoder* reads an MLP's input and predicts its output through sparse features:
`y_hat = act(x @ W_enc.T + b_enc) @ W_dec + b_dec (+ x @ W_skip.T)`, with `x` the MLP's input
(`blocks.{l}.ln2.hook_normalized`) and `y` the MLP's output (`blocks.{l}.hook_mlp_out`).

- `Transcoder`: one layer's (ReLU, JumpReLU or TopK; optional linear skip `W_skip`).
- `TranscoderSet`: one `Transcoder` per layer (a per-layer transcoder, PLT).
- `CrossLayerTranscoder` (CLT): an encoder per layer; the features read at layer `l` write to the
  MLP outputs of `l` and of every later layer.
- `train_transcoders` / `train_clt`: fit them on a model's activations over a corpus.
- `replacement_hooks`: TransformerLens hooks that splice them in place of the MLPs, with or
  without the error term (with it, the forward pass is the original one).
- `transcoder_metrics` -> `TranscoderMetrics`: reconstruction (MSE, explained variance), L0,
  dead features per layer, and the replacement model's next-token loss and KL to the original.
- `load_transcoders` / `save_transcoders`: circuit-tracer's on-disk layouts (per-layer
  `layer_{l}.safetensors`; cross-layer `W_enc_{l}.safetensors` + `W_dec_{l}.safetensors`), plus a
  `transcoder.json` with lenslab's metadata; zoo transcoders load as `"zoo/<model>/<name>"`.

**Why lenslab's own trainer.** sae-lens 6.54 ships transcoder *inference* classes (`Transcoder`,
`SkipTranscoder`, `JumpReLUTranscoder`, `JumpReLUSkipTranscoder`) but no way to train them: its
`LanguageModelSAERunnerConfig` reads one hook (`hook_name`), it has no training-SAE class for a
transcoder and no TopK transcoder, and it has no cross-layer transcoder at all. So this module
trains with a small trainer of its own (Adam, MSE plus an L1 (ReLU) or L0 (JumpReLU,
straight-through) sparsity penalty, none for TopK; seeded and deterministic; a progress bar).

Attention-only models (zoo/induction-2l) have no MLPs: every entry point raises a `LenslabError`
for them (their attribution graph has token, attention and logit nodes only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lenslab import figures, zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.sae_measure import corpus_tokens, excluded_tokens, keep_mask
from lenslab.results import Result, provenance
from lenslab.toolbox import check_layers, model_device, model_name, progress_reporter, torch_threads

__all__ = [
    "ACTIVATIONS",
    "INPUT_HOOK",
    "OUTPUT_HOOK",
    "TRANSCODERS_DIR",
    "CrossLayerTranscoder",
    "Transcoder",
    "TranscoderMetrics",
    "TranscoderSet",
    "check_mlps",
    "check_transcoders",
    "collect_mlp_io",
    "list_transcoders",
    "load_transcoders",
    "replacement_hooks",
    "save_transcoders",
    "train_clt",
    "train_transcoders",
    "transcoder_metrics",
]

INPUT_HOOK = "blocks.{l}.ln2.hook_normalized"  # the MLP's normalised input, before ln2's weight and bias (TransformerLens hooks it there): still an affine image of the MLP's input
OUTPUT_HOOK = "blocks.{l}.hook_mlp_out"  # the MLP's output, written to the residual stream
ACTIVATIONS = ("relu", "jumprelu", "topk")
TRANSCODERS_DIR = "transcoders"  # zoo transcoders: lenslab/zoo/<model>/transcoders/<name>/
META_FILE = "transcoder.json"


# --- activations -------------------------------------------------------------------------------
class _JumpReLU(torch.autograd.Function):
    """`x * (x > threshold)`; the threshold's gradient is the straight-through estimate with a
    rectangle kernel of width `bandwidth` (as circuit-tracer and Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        rect = ((x - threshold).abs() < bw / 2).to(x.dtype)
        g_thr = (-(threshold / bw) * rect * grad).reshape(-1, x.shape[-1]).sum(0)
        return (x > threshold).to(x.dtype) * grad, g_thr.reshape(threshold.shape), None


class _Step(torch.autograd.Function):
    """`(x > threshold)` as a float, with the straight-through gradient to the threshold (the L0 penalty)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        rect = ((x - threshold).abs() < bw / 2).to(x.dtype)
        g_thr = (-(1.0 / bw) * rect * grad).reshape(-1, x.shape[-1]).sum(0)
        return None, g_thr.reshape(threshold.shape), None


def _activate(pre: Tensor, activation: str, k: int | None, threshold: Tensor | None, bandwidth: float) -> Tensor:
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jumprelu":
        return _JumpReLU.apply(pre, threshold, bandwidth)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def _check_activation(activation: str, k: int | None, d_transcoder: int) -> None:
    if activation not in ACTIVATIONS:
        raise LenslabError(
            f"activation must be one of {ACTIVATIONS}, got {activation!r}{did_you_mean(activation, ACTIVATIONS)}"
        )
    if activation == "topk" and (not isinstance(k, int) or not 1 <= k <= d_transcoder):
        raise LenslabError(f"a TopK transcoder needs k between 1 and d_transcoder={d_transcoder}, got {k!r}")


# --- the modules --------------------------------------------------------------------------------
class Transcoder(nn.Module):
    """One layer's transcoder, in circuit-tracer's `SingleLayerTranscoder` layout.

    Parameters: `W_enc [d_transcoder, d_model]`, `b_enc [d_transcoder]`, `W_dec [d_transcoder, d_model]`,
    `b_dec [d_model]`, optional `W_skip [d_model, d_model]` (applied as `x @ W_skip.T`), and for
    JumpReLU `threshold [d_transcoder]`. `activation`: "relu", "jumprelu" or "topk" (with `k`).
    """

    def __init__(
        self,
        d_model: int,
        d_transcoder: int,
        *,
        layer: int,
        activation: str = "relu",
        k: int | None = None,
        skip: bool = False,
        bandwidth: float = 0.1,
    ):
        super().__init__()
        _check_activation(activation, k, d_transcoder)
        self.d_model, self.d_transcoder, self.layer = int(d_model), int(d_transcoder), int(layer)
        self.activation, self.k, self.bandwidth = activation, k, bandwidth
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if skip else None
        self.threshold = nn.Parameter(torch.zeros(d_transcoder)) if activation == "jumprelu" else None

    def encode(self, x: Tensor, apply_activation: bool = True) -> Tensor:
        """Features `[..., d_transcoder]` of the MLP input `x [..., d_model]`."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc
        return _activate(pre, self.activation, self.k, self.threshold, self.bandwidth) if apply_activation else pre

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """The MLP output predicted from features `f` (plus the skip term from `x` when there is one)."""
        out = f @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise LenslabError("this transcoder has a skip connection: decode needs the input x too")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)


class TranscoderSet(nn.Module):
    """Per-layer transcoders (`{layer: Transcoder}`) and the hooks they read and write
    (`input_hook` / `output_hook` templates with `{l}`)."""

    kind = "per-layer"

    def __init__(
        self, transcoders: dict[int, Transcoder], *, input_hook: str = INPUT_HOOK, output_hook: str = OUTPUT_HOOK
    ):
        super().__init__()
        if not transcoders:
            raise LenslabError("a TranscoderSet needs at least one transcoder")
        self.transcoders = nn.ModuleDict({str(layer): tc for layer, tc in sorted(transcoders.items())})
        self.input_hook, self.output_hook = input_hook, output_hook
        self.model_name = ""

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.transcoders]

    @property
    def d_model(self) -> int:
        return next(iter(self.transcoders.values())).d_model

    @property
    def d_transcoder(self) -> int:
        return next(iter(self.transcoders.values())).d_transcoder

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[str(layer)]

    def features(self, layer: int, x: Tensor) -> Tensor:
        return self[layer].encode(x)

    def output(self, layer: int, feats: dict[int, Tensor], xs: dict[int, Tensor]) -> Tensor:
        return self[layer].decode(feats[layer], xs[layer])


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder, in circuit-tracer's `CrossLayerTranscoder` layout.

    Parameters: `W_enc [n_layers, d_transcoder, d_model]`, `b_enc [n_layers, d_transcoder]`,
    `W_dec[i] [d_transcoder, n_layers - i, d_model]` (layer i's features writing to layers i..n-1),
    `b_dec [n_layers, d_model]`, optional `W_skip [n_layers, d_model, d_model]` (applied as
    `x @ W_skip[l]`, circuit-tracer's convention for CLTs) and for JumpReLU `threshold [n_layers, d_transcoder]`.
    The output at layer `l` is `sum_{i <= l} f_i @ W_dec[i][:, l - i] + b_dec[l]`.
    """

    kind = "cross-layer"

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_transcoder: int,
        *,
        activation: str = "relu",
        k: int | None = None,
        skip: bool = False,
        bandwidth: float = 0.1,
        input_hook: str = INPUT_HOOK,
        output_hook: str = OUTPUT_HOOK,
    ):
        super().__init__()
        _check_activation(activation, k, d_transcoder)
        self.n_layers, self.d_model, self.d_transcoder = int(n_layers), int(d_model), int(d_transcoder)
        self.activation, self.k, self.bandwidth = activation, k, bandwidth
        self.input_hook, self.output_hook = input_hook, output_hook
        self.model_name = ""
        self.W_enc = nn.Parameter(torch.zeros(n_layers, d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_transcoder))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_transcoder, n_layers - i, d_model)) for i in range(n_layers)]
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if skip else None
        self.threshold = nn.Parameter(torch.zeros(n_layers, d_transcoder)) if activation == "jumprelu" else None

    @property
    def layers(self) -> list[int]:
        return list(range(self.n_layers))

    def features(self, layer: int, x: Tensor) -> Tensor:
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]
        thr = self.threshold[layer] if self.threshold is not None else None
        return _activate(pre, self.activation, self.k, thr, self.bandwidth)

    def output(self, layer: int, feats: dict[int, Tensor], xs: dict[int, Tensor]) -> Tensor:
        out = self.b_dec[layer]
        for i in range(layer + 1):
            out = out + feats[i] @ self.W_dec[i][:, layer - i]
        if self.W_skip is not None:
            out = out + xs[layer].to(self.W_skip.dtype) @ self.W_skip[layer]
        return out

    def forward(self, xs: Tensor) -> Tensor:
        """`xs [n_layers, ..., d_model]` (every layer's MLP input) -> predicted MLP outputs, same shape."""
        x = dict(enumerate(xs))
        f = {layer: self.features(layer, x[layer]) for layer in self.layers}
        return torch.stack([self.output(layer, f, x) for layer in self.layers])


# --- checks -------------------------------------------------------------------------------------
def check_mlps(model) -> None:
    """A `LenslabError` when `model` has no MLPs to replace (attention-only, like zoo/induction-2l)."""
    if getattr(model.cfg, "attn_only", False):
        raise LenslabError(
            f"model {model_name(model)!r} is attention-only: it has no MLPs, so there is nothing for a transcoder to "
            "read or replace (its attribution graph has token, attention and logit nodes only)"
        )


def check_transcoders(model, tc) -> None:
    """`tc`'s layers exist in `model`, its width is `d_model`, its hooks fire; else a clear `LenslabError`."""
    check_mlps(model)
    n = int(model.cfg.n_layers)
    if isinstance(tc, CrossLayerTranscoder) and tc.n_layers != n:
        raise LenslabError(
            f"this cross-layer transcoder spans {tc.n_layers} layers but model {model_name(model)!r} has {n}"
        )
    if tc.d_model != int(model.cfg.d_model):
        raise LenslabError(
            f"the transcoders read d_model={tc.d_model} but model {model_name(model)!r} has d_model={model.cfg.d_model}: "
            "they were trained on another model"
        )
    bad = [layer for layer in tc.layers if not 0 <= layer < n]
    if bad:
        raise LenslabError(
            f"transcoder layer(s) {bad} out of range: model {model_name(model)!r} has {n} layers (0..{n - 1})"
        )
    for layer in tc.layers:
        for h in (tc.input_hook.format(l=layer), tc.output_hook.format(l=layer)):
            if h not in model.hook_dict:
                raise LenslabError(
                    f"model {model_name(model)!r} has no hook {h!r}{did_you_mean(h, list(model.hook_dict))}"
                )


# --- activations for training -------------------------------------------------------------------
@torch.no_grad()
def collect_mlp_io(
    model,
    tokens: Tensor,
    layers: list[int],
    *,
    input_hook: str = INPUT_HOOK,
    output_hook: str = OUTPUT_HOOK,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Every non-pad position's MLP inputs and outputs: `(X, Y)`, each `[len(layers), n_tokens, d_model]` (CPU float32)."""
    check_mlps(model)
    keep = keep_mask(tokens, excluded_tokens(model, None))
    names = [input_hook.format(l=layer) for layer in layers] + [output_hook.format(l=layer) for layer in layers]
    xs, ys = [], []
    for i in range(0, tokens.shape[0], batch_size):
        t, k = tokens[i : i + batch_size].to(model_device(model)), keep[i : i + batch_size]
        _, cache = model.run_with_cache(t, names_filter=names)
        xs.append(torch.stack([cache[input_hook.format(l=layer)][k.to(t.device)].float().cpu() for layer in layers]))
        ys.append(torch.stack([cache[output_hook.format(l=layer)][k.to(t.device)].float().cpu() for layer in layers]))
    return torch.cat(xs, 1), torch.cat(ys, 1)


# --- training -----------------------------------------------------------------------------------
def _init(w_enc: Tensor, w_dec: Tensor, gen: torch.Generator, scale: float) -> None:
    """Decoder rows random with norm `scale`; encoder = decoder transposed (Conerly et al. 2024)."""
    d = torch.randn(w_dec.shape, generator=gen)
    d = d / d.norm(dim=-1, keepdim=True) * scale
    w_dec.copy_(d)
    w_enc.copy_(d.reshape(d.shape[0], -1, d.shape[-1])[:, 0])


def _sparsity(f: Tensor, pre: Tensor | None, dec_norm: Tensor, tc) -> Tensor:
    if tc.activation == "relu":  # L1 weighted by decoder norms (so shrinking the decoder cannot cheat)
        return (f * dec_norm).sum(-1).mean()
    if tc.activation == "jumprelu":  # L0 through the straight-through step
        return _Step.apply(pre, tc.threshold, tc.bandwidth).sum(-1).mean()
    return f.new_zeros(())


def _train_loop(
    params, loss_fn: Callable[[Tensor], tuple[Tensor, Tensor]], n: int, *, steps, batch_size, lr, seed, progress, desc
):
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(params, lr=lr)
    report = progress_reporter(progress, steps, desc)
    warm, decay = max(1, steps // 20), max(1, steps // 5)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warm, (steps - step) / decay)
        for g in opt.param_groups:
            g["lr"] = lr * scale
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        mse, sparse = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        (mse + sparse).backward()
        opt.step()
        report()
    report(close=True)


def _prepare(model, corpus, layers, threads):
    check_mlps(model)
    layers = check_layers(model, layers)
    tokens = corpus_tokens(model, corpus)
    return layers, tokens


def train_transcoders(
    model,
    corpus: list[str] | Tensor,
    *,
    layers: int | list[int] | None = None,
    d_transcoder: int | None = None,
    activation: str = "topk",
    k: int | None = 16,
    sparsity: float = 1e-3,
    skip: bool = True,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    input_hook: str = INPUT_HOOK,
    output_hook: str = OUTPUT_HOOK,
    progress: bool | Callable[[int, int], None] = True,
    threads: int | None = 1,
) -> TranscoderSet:
    """Fit one transcoder per layer of `model` on its MLP inputs and outputs over `corpus`.

    Each layer's transcoder minimises `E||y - y_hat||^2 / E||y - E y||^2` (the MSE normalised by the
    output's variance) plus `sparsity` times an L1 penalty (`relu`: `sum_i f_i ||W_dec_i||`) or an L0
    penalty (`jumprelu`: straight-through, bandwidth 0.1); `topk` keeps the `k` largest features and
    has no penalty. Adam with `lr` (warm-up 5%, linear decay over the last 20%), `steps` batches of
    `batch_size` activations drawn with replacement; deterministic for `seed` (one torch thread by
    default). The corpus is documents or a `[n, pos]` token tensor (pads are left out).

    Raises:
        LenslabError: for an attention-only model, bad layers or settings.

    >>> import lenslab
    >>> from lenslab.zoo.corpora import corpus_for
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> tcs = train_transcoders(model, corpus_for(model, 32), layers=[0], d_transcoder=64, k=8, steps=20, progress=False)
    >>> tcs.layers, tcs[0].W_dec.shape
    ([0], torch.Size([64, 96]))
    """
    layers, tokens = _prepare(model, corpus, layers, threads)
    d_model = int(model.cfg.d_model)
    d_transcoder = d_transcoder or 4 * d_model
    _check_activation(activation, k, d_transcoder)
    for nm, v in (("steps", steps), ("batch_size", batch_size), ("d_transcoder", d_transcoder)):
        if not isinstance(v, int) or v < 1:
            raise LenslabError(f"{nm} must be a positive int, got {v!r}")
    with torch_threads(threads):
        X, Y = collect_mlp_io(model, tokens, layers, input_hook=input_hook, output_hook=output_hook)
        out = {}
        for j, layer in enumerate(layers):
            gen = torch.Generator().manual_seed(seed * 1000 + layer)
            tc = Transcoder(
                d_model,
                d_transcoder,
                layer=layer,
                activation=activation,
                k=k if activation == "topk" else None,
                skip=skip,
            )
            x, y = X[j], Y[j]
            var = float((y - y.mean(0)).pow(2).sum(-1).mean()) or 1.0
            with torch.no_grad():
                _init(tc.W_enc, tc.W_dec, gen, 0.1)
                tc.b_dec.copy_(y.mean(0))
                if tc.threshold is not None:
                    tc.threshold.fill_(0.05)

            def loss_fn(idx, tc=tc, x=x, y=y, var=var):
                xb, yb = x[idx], y[idx]
                pre = tc.encode(xb, apply_activation=False)
                f = _activate(pre, tc.activation, tc.k, tc.threshold, tc.bandwidth)
                mse = (tc.decode(f, xb) - yb).pow(2).sum(-1).mean() / var
                return mse, sparsity * _sparsity(f, pre, tc.W_dec.norm(dim=-1), tc)

            _train_loop(
                list(tc.parameters()), loss_fn, x.shape[0], steps=steps, batch_size=batch_size, lr=lr, seed=seed * 1000 + layer,
                progress=progress, desc=f"transcoder L{layer}",
            )  # fmt: skip
            tc.requires_grad_(False)
            out[layer] = tc
    tcs = TranscoderSet(out, input_hook=input_hook, output_hook=output_hook)
    tcs.model_name = model_name(model)
    return tcs


def train_clt(
    model,
    corpus: list[str] | Tensor,
    *,
    d_transcoder: int | None = None,
    activation: str = "topk",
    k: int | None = 16,
    sparsity: float = 1e-3,
    skip: bool = False,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    input_hook: str = INPUT_HOOK,
    output_hook: str = OUTPUT_HOOK,
    progress: bool | Callable[[int, int], None] = True,
    threads: int | None = 1,
) -> CrossLayerTranscoder:
    """Fit a cross-layer transcoder over every layer of `model`: the loss is the sum over layers of
    each MLP output's normalised MSE, plus the sparsity penalty summed over the layers' features
    (settings as in `train_transcoders`; `k` is per layer)."""
    check_mlps(model)
    tokens = corpus_tokens(model, corpus)
    n, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    d_transcoder = d_transcoder or 2 * d_model
    _check_activation(activation, k, d_transcoder)
    with torch_threads(threads):
        X, Y = collect_mlp_io(model, tokens, list(range(n)), input_hook=input_hook, output_hook=output_hook)
        clt = CrossLayerTranscoder(
            n, d_model, d_transcoder, activation=activation, k=k if activation == "topk" else None, skip=skip,
            input_hook=input_hook, output_hook=output_hook,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        var = (Y - Y.mean(1, keepdim=True)).pow(2).sum(-1).mean(1).clamp_min(1e-12)  # [n_layers]
        with torch.no_grad():
            for i in range(n):
                _init(clt.W_enc[i], clt.W_dec[i], gen, 0.1 / math.sqrt(n - i))
            clt.b_dec.copy_(Y.mean(1))
            if clt.threshold is not None:
                clt.threshold.fill_(0.05)

        def loss_fn(idx):
            xs = {layer: X[layer, idx] for layer in range(n)}
            pres = {layer: xs[layer] @ clt.W_enc[layer].T + clt.b_enc[layer] for layer in range(n)}
            feats = {}
            sparse = X.new_zeros(())
            for layer in range(n):
                thr = clt.threshold[layer] if clt.threshold is not None else None
                feats[layer] = _activate(pres[layer], clt.activation, clt.k, thr, clt.bandwidth)
                if clt.activation == "relu":
                    sparse = sparse + (feats[layer] * clt.W_dec[layer].norm(dim=-1).sum(-1)).sum(-1).mean()
                elif clt.activation == "jumprelu":
                    sparse = sparse + _Step.apply(pres[layer], thr, clt.bandwidth).sum(-1).mean()
            mse = sum(
                (clt.output(layer, feats, xs) - Y[layer, idx]).pow(2).sum(-1).mean() / var[layer] for layer in range(n)
            )
            return mse, sparsity * sparse

        _train_loop(
            list(clt.parameters()),
            loss_fn,
            X.shape[1],
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
            desc="CLT",
        )
        clt.requires_grad_(False)
    clt.model_name = model_name(model)
    return clt


# --- splicing -----------------------------------------------------------------------------------
def replacement_hooks(model, tc, *, error: bool = False, check: bool = True) -> list[tuple[str, Callable]]:
    """Forward hooks that replace each covered MLP's output by the transcoders' prediction.

    The inputs are read in the same pass (so with `error=False` the replacement's own outputs feed
    the later layers: the *replacement model*). With `error=True` the error term `y - y_hat` is
    added back at each layer, so the pass is the original one (to float rounding).

    >>> import lenslab
    >>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    >>> tcs = load_transcoders("zoo/ioi-4l/per-layer", model=model)
    >>> toks = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    >>> same = model.run_with_hooks(toks, fwd_hooks=replacement_hooks(model, tcs, error=True))
    >>> bool((same - model(toks)).abs().max() < 1e-4)
    True
    """
    if check:
        check_transcoders(model, tc)
    xs: dict[int, Tensor] = {}
    feats: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable]] = []
    for layer in tc.layers:

        def read(act, hook=None, layer=layer):
            xs[layer] = act
            feats[layer] = tc.features(layer, act)

        def write(act, hook=None, layer=layer):
            y_hat = tc.output(layer, feats, xs).to(act.dtype)
            return y_hat + (act - y_hat) if error else y_hat

        hooks += [(tc.input_hook.format(l=layer), read), (tc.output_hook.format(l=layer), write)]
    return hooks


# --- metrics ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class TranscoderMetrics(Result):
    """How well transcoders stand in for a model's MLPs, measured on a set of tokens.

    Attributes:
        kind_of: "per-layer" or "cross-layer"; architecture: "relu", "jumprelu" or "topk[k]";
        d_transcoder: features per layer; layers: the layers covered.
        n_tokens / n_predictions: positions measured (pads left out) / next-token predictions.
        mse: per layer, mean over tokens of `||y - y_hat||^2` (y: the MLP output, y_hat predicted
            from the clean run's inputs).
        explained_variance: per layer, `1 - E||y - y_hat||^2 / E||y - E y||^2`.
        l0: per layer, mean active features per token; dead_fraction: per layer, share of
            features never active on these tokens.
        ce_loss_clean / ce_loss_replaced / ce_loss_zero: mean next-token loss (nats) of the model,
            of the replacement model (every covered MLP replaced, no error term), and with those
            MLPs' outputs zero-ablated. loss_recovered = (zero - replaced) / (zero - clean).
        kl: mean over predictions of KL(original || replacement), nats.
        provenance: model, versions.
    """

    kind_of: str
    architecture: str
    d_transcoder: int
    layers: list[int]
    n_tokens: int
    n_predictions: int
    mse: list[float]
    explained_variance: list[float]
    l0: list[float]
    dead_fraction: list[float]
    ce_loss_clean: float
    ce_loss_replaced: float
    ce_loss_zero: float
    loss_recovered: float
    kl: float
    provenance: dict = field(default_factory=dict)
    KIND = "TranscoderMetrics"

    _FIELDS = (
        "kind_of", "architecture", "d_transcoder", "layers", "n_tokens", "n_predictions", "mse", "explained_variance",
        "l0", "dead_fraction", "ce_loss_clean", "ce_loss_replaced", "ce_loss_zero", "loss_recovered", "kl",
    )  # fmt: skip

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **{k: getattr(self, k) for k in self._FIELDS}, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> TranscoderMetrics:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(**{k: d[k] for k in cls._FIELDS}, provenance=d.get("provenance") or {})

    def table(self):
        """One row per layer: `layer`, `mse`, `explained_variance`, `l0`, `dead_fraction`."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            {
                "layer": self.layers,
                "mse": self.mse,
                "explained_variance": self.explained_variance,
                "l0": self.l0,
                "dead_fraction": self.dead_fraction,
            }
        )

    def figure(self):
        """Bars: explained variance and L0 per layer, and the next-token loss clean / replaced / MLPs zeroed."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: as above

        fig = make_subplots(rows=1, cols=3, subplot_titles=["explained variance", "L0", "next-token loss (nats)"])
        labels = [f"MLP{layer}" for layer in self.layers]
        fig.add_trace(
            go.Bar(x=labels, y=self.explained_variance, marker_color="#3b6ea8", showlegend=False), row=1, col=1
        )
        fig.add_trace(go.Bar(x=labels, y=self.l0, marker_color="#e6550d", showlegend=False), row=1, col=2)
        fig.add_trace(
            go.Bar(
                x=["clean", "replacement", "MLPs zeroed"],
                y=[self.ce_loss_clean, self.ce_loss_replaced, self.ce_loss_zero],
                marker_color="#31a354",
                showlegend=False,
            ),
            row=1,
            col=3,
        )
        fig.update_layout(height=420, width=1000)
        return figures.style(
            fig,
            f"transcoders ({self.kind_of}, {self.architecture}, d={self.d_transcoder}) · model "
            f"{self.provenance.get('model', '?')} · KL {self.kl:.3g} · loss recovered {self.loss_recovered:.3f}",
        )


def _arch(tc) -> str:
    t = tc if isinstance(tc, CrossLayerTranscoder) else tc[tc.layers[0]]
    return f"topk[{t.k}]" if t.activation == "topk" else t.activation


@torch.no_grad()
def transcoder_metrics(model, tc, tokens: Tensor | list[str], *, batch_size: int = 64) -> TranscoderMetrics:
    """Reconstruction, sparsity and replacement loss of `tc` (a `TranscoderSet` or a
    `CrossLayerTranscoder`) on `model` over `tokens` (`[n, pos]` ids or documents; pads left out).

    >>> import lenslab
    >>> from lenslab.zoo.corpora import corpus_for
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> tcs = load_transcoders("zoo/steer-sentiment/per-layer", model=model)
    >>> m = transcoder_metrics(model, tcs, corpus_for(model, 16, seed=5))
    >>> m.layers, m.ce_loss_clean <= m.ce_loss_replaced < m.ce_loss_zero
    ([0, 1, 2], True)
    """
    check_transcoders(model, tc)
    toks = corpus_tokens(model, tokens).to(model_device(model))
    keep = keep_mask(toks, excluded_tokens(model, None))
    pred = keep[:, 1:]
    layers = tc.layers
    ins = [tc.input_hook.format(l=layer) for layer in layers]
    outs = [tc.output_hook.format(l=layer) for layer in layers]
    L = len(layers)
    sum_y = [None] * L
    sum_sq, sq_err, l0 = [0.0] * L, [0.0] * L, [0.0] * L
    fired = [torch.zeros(tc.d_transcoder, dtype=torch.bool) for _ in layers]
    n_tok = n_pred = 0
    nll = {"clean": 0.0, "replaced": 0.0, "zero": 0.0}
    kl = 0.0
    repl = replacement_hooks(model, tc, check=False)
    zero = [(h, lambda act, hook=None: torch.zeros_like(act)) for h in outs]
    for i in range(0, toks.shape[0], batch_size):
        t, k, p = toks[i : i + batch_size], keep[i : i + batch_size], pred[i : i + batch_size]
        logits, cache = model.run_with_cache(t, names_filter=ins + outs)
        xs = {layer: cache[h][k].float() for layer, h in zip(layers, ins)}
        feats = {layer: tc.features(layer, xs[layer]) for layer in layers}
        for j, layer in enumerate(layers):
            y = cache[outs[j]][k].double().cpu()
            y_hat = tc.output(layer, feats, xs).double().cpu()
            sum_y[j] = y.sum(0) if sum_y[j] is None else sum_y[j] + y.sum(0)
            sum_sq[j] += float(y.pow(2).sum())
            sq_err[j] += float((y - y_hat).pow(2).sum())
            active = (feats[layer] != 0).cpu()
            l0[j] += float(active.sum())
            fired[j] |= active.any(0)
        n_tok += int(k.sum())
        rep_logits = model.run_with_hooks(t, fwd_hooks=repl)
        nll["clean"] += _nll_sum(logits, t, p)
        nll["replaced"] += _nll_sum(rep_logits, t, p)
        nll["zero"] += _nll_sum(model.run_with_hooks(t, fwd_hooks=zero), t, p)
        lp, lq = logits[:, :-1].double().log_softmax(-1), rep_logits[:, :-1].double().log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum(-1)[p].sum())
        n_pred += int(p.sum())
    if n_tok == 0 or n_pred == 0:
        raise LenslabError("no tokens left to measure: every position is padding")
    mse = [e / n_tok for e in sq_err]
    var = [s / n_tok - float(sy.div(n_tok).pow(2).sum()) for s, sy in zip(sum_sq, sum_y)]
    clean, replaced, zero_l = (nll[x] / n_pred for x in ("clean", "replaced", "zero"))
    denom = zero_l - clean
    return TranscoderMetrics(
        kind_of=tc.kind,
        architecture=_arch(tc),
        d_transcoder=int(tc.d_transcoder),
        layers=list(layers),
        n_tokens=n_tok,
        n_predictions=n_pred,
        mse=mse,
        explained_variance=[1.0 - m / v if v > 1e-12 else float("nan") for m, v in zip(mse, var)],
        l0=[x / n_tok for x in l0],
        dead_fraction=[float((~f).float().mean()) for f in fired],
        ce_loss_clean=clean,
        ce_loss_replaced=replaced,
        ce_loss_zero=zero_l,
        loss_recovered=(zero_l - replaced) / denom if abs(denom) > 1e-12 else float("nan"),
        kl=kl / n_pred,
        provenance=provenance(model, method="transcoder_metrics", transcoders=tc.kind),
    )


def _nll_sum(logits: Tensor, tokens: Tensor, pred: Tensor) -> float:
    logp = logits[:, :-1].double().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None])[..., 0][pred].sum())


# --- saving and loading (circuit-tracer's layouts) ---------------------------------------------
def save_transcoders(tc, folder: str | Path) -> Path:
    """Write `tc` in circuit-tracer's layout plus `transcoder.json` (lenslab's metadata).

    Per-layer (`TranscoderSet`): `layer_{l}.safetensors` with `W_enc [d_transcoder, d_model]`,
    `W_dec [d_transcoder, d_model]`, `b_enc`, `b_dec`, optional `W_skip [d_model, d_model]` and
    `activation_function.threshold` (JumpReLU). Cross-layer: `W_enc_{l}.safetensors` with
    `W_enc_{l} [d_transcoder, d_model]`, `b_enc_{l}`, `b_dec_{l}`, optional `threshold_{l}`, and
    `W_dec_{l}.safetensors` with `W_dec_{l} [d_transcoder, n_layers - l, d_model]` (circuit-tracer
    keeps no CLT skip on disk; lenslab adds `W_skip_{l}` to the encoder file when there is one).
    """
    from safetensors.torch import save_file  # deferred: safetensors loads only when transcoders are saved

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    c = lambda t: t.detach().cpu().float().contiguous()
    if isinstance(tc, CrossLayerTranscoder):
        for i in range(tc.n_layers):
            enc = {f"W_enc_{i}": c(tc.W_enc[i]), f"b_enc_{i}": c(tc.b_enc[i]), f"b_dec_{i}": c(tc.b_dec[i])}
            if tc.threshold is not None:
                enc[f"threshold_{i}"] = c(tc.threshold[i])
            if tc.W_skip is not None:
                enc[f"W_skip_{i}"] = c(tc.W_skip[i])
            save_file(enc, str(out / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": c(tc.W_dec[i])}, str(out / f"W_dec_{i}.safetensors"))
        meta = dict(kind="cross-layer", activation=tc.activation, k=tc.k, n_layers=tc.n_layers)
    else:
        for layer in tc.layers:
            t = tc[layer]
            d = {"W_enc": c(t.W_enc), "W_dec": c(t.W_dec), "b_enc": c(t.b_enc), "b_dec": c(t.b_dec)}
            if t.W_skip is not None:
                d["W_skip"] = c(t.W_skip)
            if t.threshold is not None:
                d["activation_function.threshold"] = c(t.threshold)
            save_file(d, str(out / f"layer_{layer}.safetensors"))
        first = tc[tc.layers[0]]
        meta = dict(kind="per-layer", activation=first.activation, k=first.k, layers=tc.layers)
    meta.update(model=tc.model_name, input_hook=tc.input_hook, output_hook=tc.output_hook, d_transcoder=tc.d_transcoder)
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def _read(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # deferred: safetensors loads only when transcoders are loaded

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise LenslabError(f"could not read transcoder weights {path}: {exc}") from exc


def _single(d: dict[str, Tensor], layer: int, activation: str | None, k: int | None, path: Path) -> Transcoder:
    missing = [x for x in ("W_enc", "W_dec", "b_enc", "b_dec") if x not in d]
    if missing:
        raise LenslabError(f"{path} is not a circuit-tracer transcoder: it lacks {missing} (has {sorted(d)})")
    d_t, d_model = d["b_enc"].shape[0], d["b_dec"].shape[0]
    w_enc, w_dec = d["W_enc"], d["W_dec"]
    if tuple(w_enc.shape) == (d_model, d_t) and d_model != d_t:  # older layout: W_enc [d_model, d_transcoder]
        w_enc = w_enc.T
    if tuple(w_dec.shape) == (d_model, d_t) and d_model != d_t:  # older relu layout: W_dec stored [d_model, d_sae]
        w_dec = w_dec.T
    if tuple(w_enc.shape) != (d_t, d_model) or tuple(w_dec.shape) != (d_t, d_model):
        raise LenslabError(
            f"{path}: W_enc {tuple(d['W_enc'].shape)} / W_dec {tuple(d['W_dec'].shape)} do not fit b_enc [{d_t}] and b_dec [{d_model}]"
        )
    thr = d.get("activation_function.threshold", d.get("threshold"))
    act = activation or ("jumprelu" if thr is not None else "relu")
    t = Transcoder(d_model, d_t, layer=layer, activation=act, k=k, skip=d.get("W_skip") is not None)
    with torch.no_grad():
        t.W_enc.copy_(w_enc)
        t.W_dec.copy_(w_dec)
        t.b_enc.copy_(d["b_enc"])
        t.b_dec.copy_(d["b_dec"])
        if t.W_skip is not None:
            t.W_skip.copy_(d["W_skip"])
        if t.threshold is not None:
            t.threshold.copy_(thr.reshape(-1))
    return t.requires_grad_(False)


def _load_folder(folder: Path):
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).exists() else {}
    hooks = dict(input_hook=meta.get("input_hook", INPUT_HOOK), output_hook=meta.get("output_hook", OUTPUT_HOOK))
    activation, k = meta.get("activation"), meta.get("k")
    enc = sorted(folder.glob("W_enc_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
    if enc:  # circuit-tracer's cross-layer layout
        n = len(enc)
        if [int(p.stem.split("_")[-1]) for p in enc] != list(range(n)):
            raise LenslabError(f"{folder}: cross-layer files must be W_enc_0 .. W_enc_{n - 1}.safetensors")
        e = [_read(folder / f"W_enc_{i}.safetensors") for i in range(n)]
        dec = [_read(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n)]
        d_t, d_model = e[0]["W_enc_0"].shape
        thr = [x.get(f"threshold_{i}") for i, x in enumerate(e)]
        act = activation or ("jumprelu" if thr[0] is not None else "relu")
        clt = CrossLayerTranscoder(n, d_model, d_t, activation=act, k=k, skip="W_skip_0" in e[0], **hooks)
        with torch.no_grad():
            for i in range(n):
                if tuple(dec[i].shape) != (d_t, n - i, d_model):
                    raise LenslabError(
                        f"{folder}: W_dec_{i} has shape {tuple(dec[i].shape)}, expected {(d_t, n - i, d_model)}"
                    )
                clt.W_enc[i].copy_(e[i][f"W_enc_{i}"])
                clt.b_enc[i].copy_(e[i][f"b_enc_{i}"])
                clt.b_dec[i].copy_(e[i][f"b_dec_{i}"])
                clt.W_dec[i].copy_(dec[i])
                if clt.threshold is not None:
                    clt.threshold[i].copy_(thr[i].reshape(-1))
                if clt.W_skip is not None:
                    clt.W_skip[i].copy_(e[i][f"W_skip_{i}"])
        clt.model_name = meta.get("model", "")
        return clt.requires_grad_(False)
    files = sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
    if not files:
        raise LenslabError(
            f"{folder} holds no transcoders: expected circuit-tracer's layer_<l>.safetensors (per-layer) or "
            "W_enc_<l>.safetensors + W_dec_<l>.safetensors (cross-layer)"
        )
    tcs = TranscoderSet(
        {int(p.stem.split("_")[-1]): _single(_read(p), int(p.stem.split("_")[-1]), activation, k, p) for p in files},
        **hooks,
    )
    tcs.model_name = meta.get("model", "")
    return tcs


def list_transcoders() -> list[str]:
    """The zoo's shipped transcoders, as `"zoo/<model>/<name>"`."""
    return sorted(
        f"{zoo.PREFIX}{p.parent.parent.name}/{p.name}" for p in zoo.ZOO_DIR.glob(f"*/{TRANSCODERS_DIR}/*") if p.is_dir()
    )


def load_transcoders(source: str | Path, *, model=None):
    """Load transcoders: a zoo name (`"zoo/ioi-4l/per-layer"`, see `list_transcoders`) or a folder in
    circuit-tracer's layout (see `save_transcoders`; `transcoder.json` is optional: without it the
    hooks default to `INPUT_HOOK` / `OUTPUT_HOOK` and the activation is JumpReLU when a threshold is
    stored, else ReLU). Returns a `TranscoderSet` or a `CrossLayerTranscoder`; with `model=`,
    `check_transcoders` runs first.

    >>> tcs = load_transcoders("zoo/ioi-4l/per-layer")
    >>> tcs.layers, tcs.d_transcoder, tcs[0].activation
    ([0, 1, 2, 3], 256, 'topk')
    """
    text = str(source).strip()
    path = Path(text).expanduser()
    if not path.is_dir() and text.startswith(zoo.PREFIX):
        parts = text.removeprefix(zoo.PREFIX).split("/")
        name = parts[0]
        cfg = zoo.ZOO_DIR / name / "config.json"
        if cfg.exists() and json.loads(cfg.read_text()).get("cfg", {}).get("attn_only"):
            raise LenslabError(
                f"zoo/{name} is attention-only: it has no MLPs, so it has no transcoders (its attribution graph "
                "has token, attention and logit nodes only)"
            )
        path = zoo.ZOO_DIR / name / TRANSCODERS_DIR / (parts[1] if len(parts) > 1 else "per-layer")
        if len(parts) != 2 or not path.is_dir():
            known = list_transcoders()
            raise LenslabError(
                f"no zoo transcoders {text!r}{did_you_mean(text, known)}; shipped: {', '.join(known) or '(none)'}"
            )
    elif not path.is_dir():
        raise LenslabError(
            f"transcoder folder {text!r} does not exist (or name a zoo transcoder: {', '.join(list_transcoders())})"
        )
    tc = _load_folder(path)
    if model is not None:
        check_transcoders(model, tc)
    return tc
