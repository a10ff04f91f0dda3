"""LinEAS: linear end-to-end activation steering.

Rodriguez, Klein, Gualdoni, Maiorca, Blaas, Zappella, Cuturi, Suau (Apple), LinEAS
(arXiv:2503.10679, NeurIPS 2025).
At each steered hook `l` a coordinate-wise affine map `T_l(z) = omega_l * z + b_l` (one scale and
one shift per unit, initialised to the identity) is applied at every position, with strength
`lambda` as `z <- lambda T_l(z) + (1 - lambda) z` (lenslab's `affine` edit). All maps are trained
*jointly*, with one loss, from a handful of unpaired source and target prompts:

1. Targets `V_l` `[m, d_l]`: the unsteered model on the target prompts, each prompt's activation
   mean-pooled over its tokens; no gradient.
2. Sources `Z_l` `[n, d_l]`: the model with **all** maps active (strength 1) on a batch of source
   prompts, read at each hook *after* its own map (and so after every earlier map), mean-pooled.
3. Loss: `C = mean_l W(Z_l, V_l)`, with `W` the per-unit 1-D Wasserstein-2 distance (squared)
   averaged over units: sort each unit's samples and compare quantiles (`wasserstein_1d`).
   Gradients flow through the frozen network into the earlier maps: the "end-to-end" part
   (Linear-AcT fits each layer on its own instead).
4. Adam (lr 1e-3, betas (0.9, 0.9)), 1000 steps, cosine schedule down to lr * 1e-3; after every
   Adam step an optional proximal step with `tau` = the step's learning rate selects units and
   hooks: a soft threshold on `omega - 1` and on `b`, then a shrink of each hook's whole vector
   (sparse group lasso, groups = hooks; `proximal_step`).

As in Apple's code (apple/ml-lineas: `lineas/estimators/intervention_estimator.py::End2EndEstimator`,
`lineas/utils/proximal.py`, `lineas/hooks/backprop_transport.py::BPHook`). Where lenslab differs
from it is listed in `docs/steering.md` (section LinEAS).

>>> import lenslab
>>> from lenslab import steering
>>> from lenslab.data import sentiment
>>> from lenslab.steering import fit_lineas, LineasConfig
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> negative, positive = sentiment.prompts(8, "negative"), sentiment.prompts(8, "positive")
>>> iv = fit_lineas(model, negative, positive, config=LineasConfig(steps=100, lr=1e-2, progress=False))
>>> round(iv.provenance["loss_initial"], 2), round(iv.provenance["loss_final"], 2)   # moved onto the positive side
(0.96, 0.06)
>>> with steering.apply(model, iv.with_strength(0.7)):
...     logits = model("the day was awful . the movie was")
>>> logits.shape
torch.Size([1, 9, 86])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenslab._errors import LenslabError
from lenslab.results import provenance
from lenslab.steering.edit_hooks import apply, validate
from lenslab.steering.intervention import Edit, Intervention
from lenslab.toolbox import check_prompts, hook_unit_sizes, model_device

PROXIMALS = (None, "l1", "sparse-group")
MIN_BATCH = 4  # the reference refuses smaller source batches ("unstable training")
DEFAULT_SITES = ("blocks.{layer}.hook_attn_out", "blocks.{layer}.hook_mlp_out")


@dataclass(frozen=True, kw_only=True)
class LineasConfig:
    """How `fit_lineas` trains the maps. Defaults follow Apple's `lineas.yaml` where known.

    Attributes:
        steps: optimiser steps (reference: 1000).
        lr: Adam learning rate (reference: 1e-3).
        betas: Adam betas (reference: (0.9, 0.9)).
        dampen_lr: the cosine schedule ends at `lr * dampen_lr` (reference: 1e-3).
        batch_size: source prompts per step; None uses all of them every step. At least 4, as in
            the reference; smaller batches are refused.
        proximal: None (no sparsity), "l1" (soft threshold only) or "sparse-group" (soft threshold
            then a per-hook group shrink; "sparse", the reference's name, is accepted too).
        lambda_1: L1 weight on `omega - 1` (the soft threshold is `tau * lambda_1`). Adam moves a
            unit by about `lr` per step and `tau` is `lr`, so the lambdas act on a scale of 1:
            `lambda_1 >= 1` resets every map (docs/steering.md, LinEAS, measures the range).
        lambda_G: group weight on `omega - 1` (a hook's vector shrinks by `tau * lambda_G * sqrt(d)`).
        lambda_1_bias, lambda_G_bias: the same for the shift `b`; None copies the `omega` value
            (as the reference does).
        support_threshold: a unit counts as steered when `|omega - 1|` or `|b|` exceeds it.
        seed: seeds the order of source batches (the only randomness).
        progress: show a tqdm progress bar over the steps.
    """

    steps: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9)
    dampen_lr: float = 1e-3
    batch_size: int | None = None
    proximal: str | None = None
    lambda_1: float = 0.01
    lambda_G: float = 0.001
    lambda_1_bias: float | None = None
    lambda_G_bias: float | None = None
    support_threshold: float = 1e-5
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.proximal == "sparse":
            object.__setattr__(self, "proximal", "sparse-group")
        if self.proximal not in PROXIMALS:
            raise LenslabError(f"proximal {self.proximal!r} must be None, 'l1' or 'sparse-group'")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise LenslabError(f"steps must be a non-negative integer, got {self.steps!r}")
        for name in ("lr", "dampen_lr", "lambda_1", "lambda_G", "lambda_1_bias", "lambda_G_bias", "support_threshold"):
            v = getattr(self, name)
            if v is None and name.endswith("_bias"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise LenslabError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise LenslabError(f"lr must be positive, got {self.lr!r}")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise LenslabError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
                raise LenslabError(f"batch_size must be an integer or None, got {self.batch_size!r}")
            if self.batch_size < MIN_BATCH:
                raise LenslabError(
                    f"batch_size {self.batch_size} is too small: LinEAS needs a source batch of at least "
                    f"{MIN_BATCH} prompts (the reference refuses smaller ones, training is unstable); "
                    f"pass batch_size >= {MIN_BATCH} or None"
                )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# --- the pieces -------------------------------------------------------------------------------


def wasserstein_1d(z: Tensor, v: Tensor) -> Tensor:
    """Per-unit 1-D Wasserstein-2 distance (squared), averaged over units: a scalar.

    `z` `[n, d]` and `v` `[m, d]` are samples (rows) of `d` units. For each unit the two empirical
    distributions (uniform weights) are compared through their quantile functions,
    `W_2^2 = int_0^1 (F_z^-1(u) - F_v^-1(u))^2 du`, integrated exactly. For `n == m` this is
    LinEAS's "sort, then mean squared difference": `mean_i (sort(z)_i - sort(v)_i)^2`. It is not
    `scipy.stats.wasserstein_distance`, which is W_1 (mean absolute difference, not squared).
    Differentiable in both arguments (through the sort).

    >>> wasserstein_1d(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0], [2.0]]))
    tensor(0.5000)
    """
    if z.ndim == 1:
        z = z[:, None]
    if v.ndim == 1:
        v = v[:, None]
    if z.ndim != 2 or v.ndim != 2 or z.shape[1] != v.shape[1]:
        raise LenslabError(f"wasserstein_1d needs [n, d] and [m, d] samples, got {tuple(z.shape)} and {tuple(v.shape)}")
    n, m = z.shape[0], v.shape[0]
    if n == 0 or m == 0:
        raise LenslabError("wasserstein_1d needs at least one sample on each side")
    zs = z.sort(dim=0).values
    vs = v.to(z.dtype).sort(dim=0).values
    if n == m:
        return ((zs - vs) ** 2).mean()
    # Quantile breakpoints i/n and j/m, as integers over n*m; each interval between two
    # consecutive breakpoints maps to one sorted sample on each side.
    bp = torch.unique(torch.cat([torch.arange(n + 1) * m, torch.arange(m + 1) * n]))  # sorted
    left = bp[:-1]
    width = (bp[1:] - left).to(z.dtype) / (n * m)  # [k]
    iz, iv = (left // m).to(z.device), (left // n).to(z.device)
    return (width.to(z.device)[:, None] * (zs[iz] - vs[iv]) ** 2).sum(0).mean()


def _soft_threshold(x: Tensor, t: float) -> Tensor:
    return torch.sign(x) * torch.relu(x.abs() - t)


def _group_shrink(x: Tensor, t: float) -> Tensor:
    norm = torch.linalg.vector_norm(x)
    if norm == 0:
        return torch.zeros_like(x)
    return torch.relu(1.0 - t / norm) * x


@torch.no_grad()
def proximal_step(
    omegas: Sequence[Tensor],
    shifts: Sequence[Tensor],
    tau: float,
    *,
    proximal: str | None = "sparse-group",
    lambda_1: float = 0.0,
    lambda_G: float = 0.0,
    lambda_1_bias: float | None = None,
    lambda_G_bias: float | None = None,
) -> float:
    """One proximal step of LinEAS's sparsity penalty, in place; returns the penalty after it.

    One `omega` `[d_l]` and one shift `b` `[d_l]` per hook `l` (a group). As in
    `lineas/utils/proximal.py`: for `x = omega - 1` (and separately `x = b`, with the bias
    lambdas), first the soft threshold `x <- sign(x) max(|x| - tau lambda_1, 0)` on every entry,
    then (`"sparse-group"` only) the group shrink `x <- max(0, 1 - tau lambda_G sqrt(d_l) / ||x||_2) x`
    on each hook's vector, so a whole hook can fall back to the identity. The penalty is
    `sum_l lambda_1 ||x_l||_1 + lambda_G sqrt(d_l) ||x_l||_2` over both parameters (the
    reference's logged "reg").

    Args:
        omegas, shifts: the per-hook scales and shifts (modified in place).
        tau: the step size, the current learning rate in `fit_lineas`.
        proximal: None (nothing), "l1" or "sparse-group".
        lambda_1, lambda_G: weights for `omega - 1`; the `_bias` ones default to them.

    >>> w, b = [torch.tensor([1.5, 1.0])], [torch.tensor([0.25, -2.0])]
    >>> _ = proximal_step(w, b, 1.0, proximal="l1", lambda_1=0.5)
    >>> w[0].tolist(), b[0].tolist()
    ([1.0, 1.0], [0.0, -1.5])
    """
    if proximal == "sparse":
        proximal = "sparse-group"
    if proximal not in PROXIMALS:
        raise LenslabError(f"proximal {proximal!r} must be None, 'l1' or 'sparse-group'")
    if len(omegas) != len(shifts):
        raise LenslabError(f"proximal_step needs one shift per scale, got {len(omegas)} and {len(shifts)}")
    if proximal is None:
        return 0.0
    l1b = lambda_1 if lambda_1_bias is None else lambda_1_bias
    lgb = lambda_G if lambda_G_bias is None else lambda_G_bias
    group = proximal == "sparse-group"
    reg = 0.0
    for w, b in zip(omegas, shifts):
        for p, offset, l1, lg in ((w, 1.0, lambda_1, lambda_G), (b, 0.0, l1b, lgb)):
            x = _soft_threshold(p - offset, tau * l1)
            d = x.shape[-1]
            if group:
                x = _group_shrink(x, tau * lg * math.sqrt(d))
            p.copy_(x + offset)
            reg += l1 * float(x.abs().sum())
            if group:
                reg += lg * math.sqrt(d) * float(torch.linalg.vector_norm(x))
    return reg


def _edit_support(e: Edit, threshold: float) -> tuple[int, int]:
    moved = ((e.vector - 1).abs() > threshold) | (e.shift.abs() > threshold)
    return int(moved.sum()), moved.numel()


def support(intervention: Intervention, threshold: float = 1e-5) -> float:
    """Fraction of the affine units that a LinEAS intervention changes, in [0, 1].

    A unit counts when `|omega - 1| > threshold` or `|b| > threshold` (the reference's support,
    threshold 1e-5); the denominator is every unit of every `affine` edit.
    """
    affine = [e for e in intervention.edits if e.op == "affine"]
    if not affine:
        raise LenslabError("support() needs an intervention with affine edits (as fit_lineas returns)")
    moved = total = 0
    for e in affine:
        k, n = _edit_support(e, threshold)
        moved, total = moved + k, total + n
    return moved / total


def default_hooks(model) -> list[str]:
    """LinEAS's default sites: every layer's attention and MLP outputs (`hook_attn_out`, `hook_mlp_out`).

    These are the sublayer outputs before they join the residual stream, the modules Apple's
    config steers on Gemma-2 (`post_attention_layernorm`, `post_feedforward_layernorm`). Hooks a
    model lacks (attention-only models have no MLP) are skipped.
    """
    names = set(model.hook_dict)
    return [
        t.format(layer=layer)
        for layer in range(model.cfg.n_layers)
        for t in DEFAULT_SITES
        if t.format(layer=layer) in names
    ]


def _resolve_hooks(model, hooks: Sequence[str] | str | None) -> list[str]:
    if hooks is None:
        hs = default_hooks(model)
        if not hs:
            raise LenslabError("this model has no hook_attn_out / hook_mlp_out hooks; pass hooks=[...] explicitly")
    elif isinstance(hooks, str):
        if "{layer}" not in hooks:
            hs = [hooks]
        else:
            hs = [hooks.format(layer=layer) for layer in range(model.cfg.n_layers)]
    else:
        hs = list(hooks)
    if not hs or any(not isinstance(h, str) or not h for h in hs):
        raise LenslabError("hooks must be a non-empty list of hook names, e.g. ['blocks.0.hook_resid_post']")
    if len(set(hs)) != len(hs):
        raise LenslabError(f"hooks lists a hook twice ({hs}); list each once")
    points = [id(model.hook_dict[h]) for h in hs if h in model.hook_dict]
    if len(set(points)) != len(points):
        raise LenslabError(f"two of the hooks {hs} are aliases of one hook point; keep one of them")
    validate(model, Intervention(edits=tuple(Edit(hook=h, op="zero") for h in hs)))  # names, position axis
    return hs


def _tokenize(model, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Right-padded tokens `[n, max_len]` (BOS included, as `to_tokens` does) and lengths `[n]`.

    Padding sits after every real token, so under causal attention it never changes a real
    token's activations; pooling reads real tokens only.
    """
    toks = [model.to_tokens(p)[0] for p in prompts]
    lengths = torch.tensor([len(t) for t in toks])
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    out = torch.full((len(toks), int(lengths.max())), pad, dtype=torch.long)
    for i, t in enumerate(toks):
        out[i, : len(t)] = t.cpu()
    return out, lengths


class _Stop(Exception):
    """Raised after the last read hook: the rest of the forward pass is not needed."""


def _pooled(
    model,
    tokens: Tensor,
    lengths: Tensor,
    hooks: list[str],
    maps: dict[str, tuple[Tensor, Tensor]] | None,
    last: str | None = None,
    order: list[str] | None = None,
) -> dict[str, Tensor]:
    """Mean over real tokens of each hook's activation `[batch, d]` (float32), after its map.

    `maps[h] = (omega, b)` applies `omega * x + b` at every position (strength 1) before reading;
    gradients flow when they require grad. `last`: stop the forward pass after that hook fires.
    `order`: filled with the hooks in the order they fire.
    """
    device = model_device(model)
    tokens = tokens.to(device)
    mask = (torch.arange(tokens.shape[1], device=device)[None, :] < lengths.to(device)[:, None]).float()  # [batch, pos]
    count = mask.sum(1, keepdim=True)
    out: dict[str, Tensor] = {}

    def make(h: str):
        def fn(act: Tensor, hook) -> Tensor:
            b, p = act.shape[:2]
            flat = act.reshape(b, p, -1)
            if maps is not None:
                w, s = maps[h]
                flat = (flat.float() * w + s).to(act.dtype)
                act = flat.reshape(act.shape)
            out[h] = (flat.float() * mask[:, :, None]).sum(1) / count  # [batch, d]
            if order is not None:
                order.append(h)
            if h == last:
                raise _Stop
            return act

        return fn

    try:
        with model.hooks(fwd_hooks=[(h, make(h)) for h in hooks]):
            model(tokens)
    except _Stop:
        pass
    missing = [h for h in hooks if h not in out]
    if missing:
        raise LenslabError(f"hooks {missing} did not fire on a forward pass of this model; pick other hooks")
    return out


def _loss(z: dict[str, Tensor], v: dict[str, Tensor], hooks: list[str]) -> Tensor:
    return sum(wasserstein_1d(z[h], v[h]) for h in hooks) / len(hooks)


def lineas_loss(
    model,
    intervention: Intervention | None,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    hooks: Sequence[str] | None = None,
) -> float:
    """LinEAS's objective for `intervention`, read through `apply` and `run_with_cache`.

    Mean over `hooks` (default: the intervention's hooks) of `wasserstein_1d` between the source
    prompts' activations under the intervention (read after every edit) and the target prompts'
    unsteered activations, both mean-pooled over each prompt's tokens. `None` gives the loss
    before any steering.
    """
    src = check_prompts(source_prompts, "source_prompts")
    tgt = check_prompts(target_prompts, "target_prompts")
    if hooks is None:
        if intervention is None or not intervention.edits:
            raise LenslabError("lineas_loss needs hooks= when the intervention is None or empty")
        hooks = list(dict.fromkeys(e.hook for e in intervention.edits))
    hooks = list(hooks)
    names = set(hooks)

    def pooled(prompts, iv) -> dict[str, Tensor]:
        rows: dict[str, list[Tensor]] = {h: [] for h in hooks}
        with torch.no_grad(), apply(model, iv):
            for p in prompts:  # one at a time: no padding question at all
                _, cache = model.run_with_cache(model.to_tokens(p), names_filter=lambda n: n in names)
                for h in hooks:
                    rows[h].append(cache[h][0].reshape(cache[h].shape[1], -1).float().mean(0).cpu())
        return {h: torch.stack(r) for h, r in rows.items()}

    return float(_loss(pooled(src, intervention), pooled(tgt, None), hooks))


# --- the fit ----------------------------------------------------------------------------------


def _batches(n: int, size: int, seed: int):
    """Reshuffled cycle over `range(n)` in batches of `size`, dropping the last partial batch."""
    if size >= n:
        while True:
            yield torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def _curve(losses: list[float], k: int = 50) -> list[list[float]]:
    if not losses:
        return []
    idx = sorted({round(i * (len(losses) - 1) / max(k - 1, 1)) for i in range(min(k, len(losses)))})
    return [[int(i), float(losses[i])] for i in idx]


def fit_lineas(
    model,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    hooks: Sequence[str] | str | None = None,
    config: LineasConfig | None = None,
    strength: float = 1.0,
    name: str = "",
) -> Intervention:
    """Train LinEAS maps that move the source prompts' activations onto the target prompts'.

    Args:
        source_prompts: prompts with the behaviour to remove (e.g. toxic sentences); at least 4
            (a batch of fewer is refused, as in the reference); 32 or fewer is the paper's regime.
        target_prompts: prompts with the wanted behaviour; need not be paired with the sources,
            nor equally many.
        hooks: hook names to steer (and to read the loss at); a template with `{layer}`
            (e.g. `"blocks.{layer}.hook_resid_post"`) expands over every layer. Default: every
            layer's `hook_attn_out` and `hook_mlp_out` (`default_hooks`).
        config: a `LineasConfig` (steps, lr, proximal sparsity, seed, ...).
        strength: the returned edits' strength `lambda`.

    Returns:
        An `Intervention` with one `affine` edit per hook, in the order given (`vector = omega`
        `[d]`, `shift = b` `[d]`, all units, all positions). Provenance: the config, hooks, prompts,
        the loss before training and after it (`loss_initial`, `loss_final`, on all source
        prompts), per-step batch losses (`loss_first`, `loss_min`, `loss_curve` of up to 50
        `[step, loss]` points), and the support (fraction of units moved, overall and per hook).

    Raises:
        LenslabError: too few source prompts, an unknown hook, a bad config.

    >>> from lenslab.data import sentiment
    >>> source, target = sentiment.prompts(8, "negative"), sentiment.prompts(8, "positive")
    >>> cfg = LineasConfig(steps=50, lr=1e-2, proximal="sparse-group", progress=False)
    >>> iv = fit_lineas(model, source, target, config=cfg)
    >>> [e.hook for e in iv.edits[:2]], len(iv.edits)   # default hooks: every attn_out and mlp_out
    (['blocks.0.hook_attn_out', 'blocks.0.hook_mlp_out'], 6)
    >>> round(iv.provenance["loss_initial"], 2), round(iv.provenance["loss_final"], 2)
    (0.96, 0.15)
    """
    cfg = LineasConfig() if config is None else config
    if not isinstance(cfg, LineasConfig):
        raise LenslabError(f"config must be a LineasConfig, got {type(cfg).__name__}")
    src = check_prompts(source_prompts, "source_prompts")
    tgt = check_prompts(target_prompts, "target_prompts")
    batch = len(src) if cfg.batch_size is None else cfg.batch_size
    if batch < MIN_BATCH:
        raise LenslabError(
            f"LinEAS needs a source batch of at least {MIN_BATCH} prompts (the reference refuses smaller "
            f"batches: training is unstable); got {len(src)} source prompts; pass {MIN_BATCH} or more"
        )
    if batch > len(src):
        raise LenslabError(f"batch_size {batch} is larger than the {len(src)} source prompts; lower it or add prompts")
    hs = _resolve_hooks(model, hooks)
    dims = hook_unit_sizes(model, hs)
    device = model_device(model)

    src_tokens, src_len = _tokenize(model, src)
    tgt_tokens, tgt_len = _tokenize(model, tgt)
    order: list[str] = []
    with torch.no_grad():
        targets = _pooled(model, tgt_tokens, tgt_len, hs, None, order=order)  # [m, d] each
    last = order[-1]  # the hook that fires last: nothing after it is needed

    omegas = [torch.ones(dims[h], device=device, requires_grad=True) for h in hs]
    shifts = [torch.zeros(dims[h], device=device, requires_grad=True) for h in hs]
    maps = {h: (w, b) for h, w, b in zip(hs, omegas, shifts)}
    params = [*omegas, *shifts]

    def loss_on(idx: Tensor) -> Tensor:
        z = _pooled(model, src_tokens[idx], src_len[idx], hs, maps, last=last)
        return _loss(z, targets, hs)

    everyone = torch.arange(len(src))
    with torch.no_grad():
        loss_initial = float(loss_on(everyone))
    losses: list[float] = []
    if cfg.steps > 0:
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr * cfg.dampen_lr)
        batches = _batches(len(src), batch, cfg.seed)
        bar = tqdm(range(cfg.steps), desc="LinEAS", disable=not cfg.progress, leave=False)
        with torch.enable_grad():
            for step in bar:
                loss = loss_on(next(batches))
                grads = torch.autograd.grad(loss, params)  # maps only; model weights get no grad
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                tau = sched.get_last_lr()[0]  # the lr of the step just taken
                proximal_step(
                    omegas,
                    shifts,
                    tau,
                    proximal=cfg.proximal,
                    lambda_1=cfg.lambda_1,
                    lambda_G=cfg.lambda_G,
                    lambda_1_bias=cfg.lambda_1_bias,
                    lambda_G_bias=cfg.lambda_G_bias,
                )
                sched.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
    with torch.no_grad():
        loss_final = float(loss_on(everyone))

    edits = tuple(
        Edit(
            hook=h,
            op="affine",
            vector=w.detach().float().cpu(),
            shift=b.detach().float().cpu(),
            positions="all",
            strength=strength,
        )
        for h, w, b in zip(hs, omegas, shifts)
    )
    per_hook = {}
    for e in edits:
        k, n = _edit_support(e, cfg.support_threshold)
        per_hook[e.hook] = k / n
    n_units = sum(dims[h] for h in hs)
    iv = Intervention(
        edits=edits,
        name=name or f"lineas {len(hs)} hooks",
        provenance=provenance(
            model,
            method="lineas",
            timestamp=False,
            config=cfg.to_dict(),
            hooks=hs,
            source=src,
            target=tgt,
            loss_initial=loss_initial,
            loss_final=loss_final,
            loss_first=losses[0] if losses else None,
            loss_min=min(losses) if losses else None,
            loss_curve=_curve(losses),
            support=sum(per_hook[h] * dims[h] for h in hs) / n_units,
            support_per_hook=per_hook,
            n_units=n_units,
        ),
    )
    return iv
