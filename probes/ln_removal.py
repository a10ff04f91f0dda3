"""Removing every LayerNorm / RMSNorm of a model by fine-tuning (Heimersheim 2024, "You can remove
GPT2's LayerNorm by fine-tuning", arXiv 2409.13710; Baroni et al. 2025, "Transformers Don't Need
LayerNorm at Inference Time", arXiv 2507.02559, code: github.com/submarat/removing-layer-norm).

A norm divides each token's vector by its own scale (the standard deviation, or the RMS). Here each
norm's per-token scale is replaced by one fixed number, the scale averaged over the training data,
one norm at a time in the order of the authors' schedule (`stages`: `ln2` of block 0, 1, ..., then
`ln1` of block 0, 1, ..., then `ln_final`), with a few fine-tuning steps on the model's own loss
after each. Once every scale is fixed, the model is linear in each norm: `fold_fixed_scales` writes
the centring (LayerNorm), the norm's weight divided by the fixed scale and its bias into the
weights that read the norm (`W_Q/W_K/W_V` and their biases, `W_in`/`W_gate` and `b_in`, `W_U` and
`b_U`) and returns a `HookedTransformer` with `cfg.normalization_type = None`: no norm module at
all, so `probes.dla.direct_logit_attribution(..., norm="none")` is the exact decomposition of its
logits.

`remove_norms(model, train, heldout)` does the whole procedure and returns the LN-free model and an
`LNRemovalResult` (the held-out loss before and after each stage, the fixed scales, the tokens used).
Data are `LMData`: token rows, a mask of the positions whose next-token loss counts, a mask of the
real (non-pad) positions. `lm_data` builds them from text or token lists; `task_data` from a
`Task` (the answer token appended and only it scored: the zoo IOI model's training loss).

Where this differs from the authors, read in their code (train.py and config.py of
submarat/removing-layer-norm at a15a638, the last commit before their 2026 LoRA variant; train.py's
`FakeLayerNorm` and schedule are unchanged at 583a9e6):

- Order. Their `finetune` runs `LNRemover`s in this order: `disable_ln_2` block by block,
  `disable_ln_1qk` (ln_1 on the query/key path) block by block, `disable_ln_1v` (ln_1 on the value
  path; they split GPT-2's `c_attn` to feed it separately) block by block, `disable_ln_f`, then
  `disable_eot_std` and (with `EXP_CORRECT_BOS=1`) `disable_bos_std` in every block at once.
  lenslab fixes `ln1` in one stage per block (TransformerLens's `ln1` is one module).
- Steps between removals, in optimizer steps of about 2^19 tokens (config.py `make_gpt2_standard`
  and siblings): GPT-2 Small and Medium fine-tune 20 steps before the first removal, then remove one
  ln_2 every 2 steps, one ln_1 q/k every 2, one ln_1 v every 3, ln_f 3 steps after the last, and
  keep fine-tuning to step 300 (Small) or 500 (Medium); Large starts at 30 with gaps 4/4/6, XL at
  20 with 2/2/3, both to 1200. lenslab fine-tunes `steps` steps (default 20) after every stage,
  none before the first.
- Optimiser. Theirs: the Hugging Face `Trainer`'s AdamW, lr 6e-4 (Large 3e-4, XL 1e-4) after a
  10-20 step linear warm-up, cosine-decayed to a floor (`cosine_with_min_lr`, 3e-4; Large 4e-5,
  XL 2e-5), weight decay 0.01, gradients clipped at 1, bf16, each step `base_batch_size` rows of
  1024 OpenWebText tokens times `gradient_accumulation_steps` = 512 // base_batch_size (Small:
  40 x 12 rows, 491,520 tokens). lenslab: AdamW at a constant `lr` (1e-4), weight decay 0.01,
  clipping at 1, `batch_size` rows (32).
- The fixed scale. `FakeLayerNorm` divides by the buffer `average_std_buffer`, initialised from
  `<model>_std_dicts.json` (`generate_std_dict.py`: on the original model, the standard deviation
  of all activations at positions 1..1023 of one random 1024-token training row, at
  `hook_resid_pre`/`hook_resid_mid`, and the last block's `hook_resid_post` for ln_f).
  `recompute_average_std` keeps an exponential moving average of the batch-mean per-token standard
  deviation (eps 1e-5 inside) on every forward pass (momentum 0.9; Large and XL
  0.9 ** (base_batch_size / 32)), but it reaches the buffer only through environment flags:
  `EXP_RECOMPUTE_STD_ON_REAL=1` copies it in while the norm is real (so the value frozen at
  removal is the moving average then), `EXP_RECOMPUTE_STD_ON_FAKE=1` keeps copying after removal;
  with neither, the JSON value is used throughout. (ln_1's q/k and value paths share one buffer,
  so under the first flag the q/k path's scale keeps moving until the value path is removed.)
  The repository does not record which flags the paper's runs set (their later `train_lora.py`
  sets both to 1). lenslab measures the mean per-token scale (eps included) over every real
  position of the training data, once, right before fixing the norm, with the earlier norms
  fixed: the first flag's value, from all the data instead of a moving average.
- Position 0 and end-of-text. `FakeLayerNorm` can give position 0 its own scale
  (`bos_special_treatment`, per-position buffers under `EXP_CORRECT_BOS=1`) and the value input
  of end-of-text tokens (id 50256) the position-0 scale (`std_type="bos"` in the patched block
  forward), undone by `disable_eot_std` / `disable_bos_std`; but
  `replace_layernorm_with_fake_layernorm` never sets `bos_special_treatment`, which defaults to
  False (since commit 2fb9930), and then every buffer holds the one average scale: every position
  gets the same fixed scale and those last stages change nothing. lenslab: one scale for all
  positions, as there. Their rows are packed OpenWebText with end-of-text between documents and
  no BOS; `lm_data` tokenizes each text with the model's BOS default (a BOS first, in
  TransformerLens's default).
- Auxiliary loss. `CustomTrainer` adds weight x mean over positions of (sigma - target)^2, sigma
  each position's standard deviation at the input of ln_f, target the mean sigma over positions
  that are neither 0 nor end-of-text (no gradient). The weight is 0 in the configs `gpt2`,
  `gpt2-medium_fasttune`, `gpt2-large`, `gpt2-xl` and 0.1, 0.1, 0.03, 0.01 in their `_aux`
  variants; the README does not say which trained the released models. lenslab has none.
- The result. They keep the `FakeLayerNorm` modules (weight and bias trained) and export a
  Hugging Face GPT-2 whose LayerNorms divide by the fixed scale (`utils.remove_layernorm_by_scaling`:
  eps 1e12, weight times 1e6 / scale); lenslab folds the fixed scales into the weights that read
  each norm and drops the norm modules.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.results import Result, provenance
from lenslab.tasks import Task
from lenslab.toolbox import model_device, progress_reporter

__all__ = [
    "NORM_KINDS",
    "LMData",
    "LNRemovalResult",
    "fold_fixed_scales",
    "fixed_scale_hooks",
    "lm_data",
    "lm_loss",
    "measure_scales",
    "norm_names",
    "remove_norms",
    "stages",
    "task_data",
]

NORM_KINDS = ("LN", "LNPre", "RMS", "RMSPre")


# --- data -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMData:
    """Token rows for fine-tuning or evaluation.

    tokens `[n, pos]`; `targets[i, p]` True where the prediction of token p (from position p - 1)
    counts in the loss (column 0 is never a target); `valid[i, p]` True at real (non-pad) positions,
    where the norms' scales are measured.
    """

    tokens: Tensor
    targets: Tensor
    valid: Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.targets.shape or self.tokens.shape != self.valid.shape:
            raise LenslabError(
                f"LMData needs tokens, targets and valid of one shape [n, pos]; got {tuple(self.tokens.shape)}, "
                f"{tuple(self.targets.shape)}, {tuple(self.valid.shape)}"
            )
        if len(self.tokens) == 0 or not bool(self.targets[:, 1:].any()):
            raise LenslabError("LMData has no target token: give at least one row of two or more tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, idx: Tensor) -> LMData:
        return LMData(self.tokens[idx], self.targets[idx], self.valid[idx])

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.valid.sum())


def _pad(rows: Sequence[Sequence[int]], pad_id: int, score: str | Sequence[int] = "all") -> LMData:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    targets = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        valid[i, : len(r)] = True
        if score == "all":
            targets[i, 1 : len(r)] = True
        else:
            targets[i, len(r) - 1] = True  # the last token only
    return LMData(tokens, targets, valid)


def lm_data(model, texts: Sequence[str] | Tensor | Sequence[Sequence[int]]) -> LMData:
    """Next-token language-model data: every token after the first is a target.

    `texts`: strings (tokenized with the model's tokenizer, its BOS default), token-id lists, or a
    token tensor `[n, pos]` (all positions real).
    """
    if isinstance(texts, Tensor):
        if texts.ndim != 2 or texts.shape[1] < 2:
            raise LenslabError(f"token rows must be [n, pos] with pos >= 2, got {tuple(texts.shape)}")
        rows = texts.tolist()
    else:
        texts = list(texts)
        if not texts:
            raise LenslabError("no text to fine-tune or evaluate on: pass at least one prompt")
        rows = [model.to_tokens(t)[0].tolist() if isinstance(t, str) else list(t) for t in texts]
    if max(len(r) for r in rows) < 2:
        raise LenslabError("every row is a single token: a language-model loss needs rows of two or more tokens")
    return _pad(rows, _pad_id(model), "all")


def task_data(model, task: Task | Sequence[Task]) -> LMData:
    """A task's (or several tasks') clean prompts with their correct answer token appended; only the
    answer is scored."""
    rows = [
        [*row.tolist(), int(a)]
        for t in ([task] if isinstance(task, Task) else task)
        for row, a in zip(t.clean_tokens, t.answer_tokens[:, 0])
    ]
    if not rows:
        raise LenslabError("no task prompts to build data from")
    return _pad(rows, _pad_id(model), "last")


def _pad_id(model) -> int:
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def lm_loss(model, data: LMData, *, batch_size: int = 64, fwd_hooks=()) -> float:
    """Mean cross-entropy over the target tokens of `data` (no gradients)."""
    total, count = 0.0, 0
    device = model_device(model)
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            part = data.rows(torch.arange(i, min(i + batch_size, len(data))))
            s, c = _loss_sum(model, part, device, list(fwd_hooks))
            total += float(s)
            count += c
    return total / count


def _loss_sum(model, data: LMData, device, hooks) -> tuple[Tensor, int]:
    tokens = data.tokens.to(device)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model(tokens)
    mask = data.targets[:, 1:].to(device)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return nll[mask].sum(), int(mask.sum())


# --- the norms ----------------------------------------------------------------------------------------
def _check_model(model) -> str:
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    if not isinstance(model, HookedTransformer):
        raise LenslabError(
            f"norm removal needs a HookedTransformer (its weights are rewritten); got {type(model).__name__}"
        )
    ntype = getattr(model.cfg, "normalization_type", None)
    if ntype is None:
        raise LenslabError(
            "this model has no LayerNorm or RMSNorm to remove (cfg.normalization_type is None): it is "
            "already norm-free; DLA with norm='none' is exact on it"
        )
    if ntype not in NORM_KINDS:
        raise LenslabError(f"normalization_type {ntype!r} is not one of {', '.join(NORM_KINDS)}")
    for flag in ("use_qk_norm", "use_normalization_before_and_after", "post_embedding_ln", "use_split_qkv_input"):
        if getattr(model.cfg, flag, False):
            raise LenslabError(f"norm removal does not support models with cfg.{flag} (extra or split norms)")
    if getattr(model.cfg, "num_experts", None) and ntype.startswith("LN"):
        raise LenslabError(
            "a LayerNorm's bias cannot be folded into a mixture-of-experts layer's bias-free expert and router "
            "weights (RMSNorm MoE models are supported)"
        )
    if getattr(model.cfg, "positional_embedding_type", None) == "shortformer":
        # TransformerLens adds shortformer positions after ln1 (ln1(x) + pos, queries and keys only), so
        # a folded ln1 would scale each layer's positions by its own w / s: one shared W_pos cannot
        # carry that, and the fold would not be exact (zoo/induction-2l: held-out loss 0.67 -> 8.8)
        raise LenslabError(
            "norm removal cannot fold ln1 of a shortformer model exactly: its positions are added after ln1 "
            "(to queries and keys), with one W_pos shared by every layer; use a model with standard or "
            "rotary positions"
        )
    if ntype == "LN" and getattr(model.cfg, "gated_mlp", False):
        raise LenslabError("a LayerNorm bias cannot be folded into a gated MLP's bias-free W_gate")
    return ntype


def norm_names(model) -> list[str]:
    """The model's norms in removal order: `blocks.{l}.ln2` for every block (none in an
    attention-only model), then `blocks.{l}.ln1`, then `ln_final`."""
    _check_model(model)
    n = int(model.cfg.n_layers)
    ln2 = [] if getattr(model.cfg, "attn_only", False) else [f"blocks.{l}.ln2" for l in range(n)]
    return [*ln2, *[f"blocks.{l}.ln1" for l in range(n)], "ln_final"]


def stages(model) -> list[list[str]]:
    """The removal stages: one norm each, in the order of `norm_names` (the authors' schedule:
    ln2 block by block, ln1 block by block, then the final norm; they take ln1's query/key input
    in every block before its value input)."""
    return [[n] for n in norm_names(model)]


def fixed_scale_hooks(scales: dict[str, float]) -> list[tuple[str, Callable]]:
    """Forward hooks that replace each named norm's per-token scale by its fixed value."""

    def make(value: float):
        def hook(scale, hook):
            return torch.full_like(scale, value)

        return hook

    return [(f"{name}.hook_scale", make(float(v))) for name, v in scales.items()]


def measure_scales(
    model, data: LMData, names: Sequence[str], *, fixed: dict[str, float] | None = None, batch_size: int = 64
) -> dict[str, float]:
    """The mean scale (std or RMS, eps included) of each norm in `names` over the real positions of
    `data`, with the norms in `fixed` already held at their fixed scales."""
    sums = {n: 0.0 for n in names}
    count = 0
    hooks = fixed_scale_hooks(fixed or {})
    device = model_device(model)
    want = {f"{n}.hook_scale" for n in names}
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            part = data.rows(torch.arange(i, min(i + batch_size, len(data))))
            valid = part.valid.to(device)
            seen: dict[str, Tensor] = {}

            def keep(scale, hook, seen=seen):
                # ln1 fires once per attention input (q, k, v): the same value each time
                seen[hook.name] = scale[..., 0]

            model.run_with_hooks(part.tokens.to(device), fwd_hooks=hooks + [(n, keep) for n in sorted(want)])
            for n in names:
                sums[n] += float(seen[f"{n}.hook_scale"][valid].double().sum())
            count += int(valid.sum())
    return {n: sums[n] / count for n in names}


# --- folding ----------------------------------------------------------------------------------------
def fold_fixed_scales(model, scales: dict[str, float]):
    """A copy of `model` without norms (`cfg.normalization_type = None`) that computes exactly what
    `model` computes with every norm's scale held at `scales[name]` (every norm of `norm_names`).

    Each norm `x -> (x - mean x) / s * w + b` (LayerNorm; RMSNorm: `x / s * w`) is linear once `s`
    is fixed; it is folded into the weights that read it: `W <- C diag(w / s) W`, `bias <- bias + b W`
    (C centres over d_model, LayerNorm only).
    """
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    ntype = _check_model(model)
    names = norm_names(model)
    missing = [n for n in names if n not in scales]
    if missing:
        raise LenslabError(f"no fixed scale for {missing}: fold needs one for every norm ({', '.join(names)})")
    bad = [n for n in names if not (math.isfinite(scales[n]) and scales[n] > 0)]
    if bad:
        raise LenslabError(f"fixed scales must be positive numbers; got {[(n, scales[n]) for n in bad]}")
    centre = ntype.startswith("LN")
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def norm_params(name: str) -> tuple[Tensor, Tensor | None]:
        w = state.pop(f"{name}.w", None)
        b = state.pop(f"{name}.b", None)
        d = int(model.cfg.d_model)
        w = torch.ones(d) if w is None else w
        return w / float(scales[name]), b

    def fold(w_key: str, b_key: str | None, ws: Tensor, b: Tensor | None) -> None:
        w = state[w_key]  # [..., d_model, out]
        if b is not None:
            if b_key is None:
                raise LenslabError(f"{w_key} has no bias to take the norm's bias")
            state[b_key] = state[b_key] + torch.einsum("d,...do->...o", b, w)
        w = w * ws[:, None]
        if centre:
            w = w - w.mean(-2, keepdim=True)
        state[w_key] = w

    n_layers = int(model.cfg.n_layers)
    for l in range(n_layers):
        ws, b = norm_params(f"blocks.{l}.ln1")
        pre = f"blocks.{l}.attn."
        for m in ("Q", "K", "V"):
            w_key = next(k for k in (f"{pre}W_{m}", f"{pre}_W_{m}") if k in state)
            b_key = next((k for k in (f"{pre}b_{m}", f"{pre}_b_{m}") if k in state), None)
            fold(w_key, b_key, ws, b)
        if f"blocks.{l}.ln2" in names:
            ws, b = norm_params(f"blocks.{l}.ln2")
            if getattr(model.cfg, "num_experts", None):
                # RMSNorm only (no bias, no centring): every expert's W_in / W_gate and the router read
                # the norm; they are nn.Linear weights [out, d_model]
                for key in [k for k in state if k.startswith(f"blocks.{l}.mlp.") and k.endswith(".weight")]:
                    if not key.endswith("W_out.weight"):
                        state[key] = state[key] * ws[None, :]
                continue
            fold(f"blocks.{l}.mlp.W_in", f"blocks.{l}.mlp.b_in", ws, b)
            if f"blocks.{l}.mlp.W_gate" in state:
                fold(f"blocks.{l}.mlp.W_gate", None, ws, b)
    ws, b = norm_params("ln_final")
    fold("unembed.W_U", "unembed.b_U", ws, b)
    state = {k: v for k, v in state.items() if not (".ln" in k or k.startswith("ln_final"))}

    cfg = copy.deepcopy(model.cfg)
    cfg.normalization_type = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (see docs/design.md)
        out = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    dtype = next(model.parameters()).dtype
    missing, unexpected = out.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("IGNORE", "mask"))]
    if missing or unexpected:  # pragma: no cover - a TransformerLens layout this code does not know
        raise LenslabError(f"could not fold the norms: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.to(dtype, print_details=False)
    out.to(model_device(model), print_details=False)
    out.eval()
    return out


# --- the procedure ------------------------------------------------------------------------------------
def remove_norms(
    model,
    train: LMData,
    heldout: LMData,
    *,
    steps: int = 20,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
    freeze: Sequence[str] = (),
    progress: bool | Callable[[int, int], None] = True,
):
    """Remove every norm of `model` (a `HookedTransformer`) by fixing its scales and fine-tuning.

    For each stage (`stages(model)`): measure the norm's mean scale on `train` (earlier norms already
    fixed), fix it, measure the held-out loss, fine-tune `steps` steps (AdamW, `lr`, batches of
    `batch_size` rows drawn from `train` by a generator seeded with `seed`, gradient norm clipped at 1)
    and measure the held-out loss again. Then fold the fixed scales into the weights.

    Args:
        freeze: parameter-name prefixes not fine-tuned (e.g. `("embed.", "unembed.")`).
        steps: fine-tuning steps after each stage; 0 folds the measured scales with no fine-tuning.

    Returns:
        `(ln_free_model, LNRemovalResult)`; `model` itself is not changed.
    """
    _check_model(model)
    if steps < 0 or batch_size < 1:
        raise LenslabError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    work = copy.deepcopy(model)
    work.eval()  # no dropout in TransformerLens models; eval keeps it that way
    device = model_device(work)
    params = [p for n, p in work.named_parameters() if not any(n.startswith(f) for f in freeze)]
    for p in work.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if steps else None
    gen = torch.Generator().manual_seed(seed)
    plan = stages(work)
    loss_original = lm_loss(work, heldout)
    fixed: dict[str, float] = {}
    rows, tokens_used = [], 0
    report = progress_reporter(progress, len(plan) * max(steps, 1), "removing norms")
    for stage in plan:
        loss_before = lm_loss(work, heldout, fwd_hooks=fixed_scale_hooks(fixed))
        fixed.update(measure_scales(work, train, stage, fixed=fixed))
        hooks = fixed_scale_hooks(fixed)
        loss_fixed = lm_loss(work, heldout, fwd_hooks=hooks)
        stage_tokens = 0
        for _ in range(steps):
            idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)
            part = train.rows(idx)
            s, c = _loss_sum(work, part, device, hooks)
            opt.zero_grad(set_to_none=True)
            (s / c).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            stage_tokens += part.n_tokens
            report()
        if not steps:
            report()
        tokens_used += stage_tokens
        rows.append(
            {
                "stage": ", ".join(stage),
                "scales": {n: fixed[n] for n in stage},
                "loss_before": loss_before,
                "loss_fixed": loss_fixed,
                "loss_after": lm_loss(work, heldout, fwd_hooks=hooks),
                "steps": steps,
                "tokens": stage_tokens,
            }
        )
    report(close=True)
    for p in work.parameters():
        p.requires_grad_(True)
    free = fold_fixed_scales(work, fixed)
    loss_final = lm_loss(free, heldout)
    result = LNRemovalResult(
        stages=rows,
        loss_original=loss_original,
        loss_final=loss_final,
        tokens_used=tokens_used,
        heldout_tokens=int(heldout.targets.sum()),
        provenance=provenance(
            model,
            steps_per_stage=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            freeze=list(freeze),
            normalization_type=str(model.cfg.normalization_type),
        ),
    )
    return free, result


# --- the result ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class LNRemovalResult(Result):
    """What `remove_norms` did: per stage, the held-out loss before the norm was fixed, right after
    (no fine-tuning yet) and after fine-tuning, the fixed scales and the fine-tuning tokens.

    Attributes:
        stages: one dict per stage: stage, scales, loss_before, loss_fixed, loss_after, steps, tokens.
        loss_original: held-out loss of the model with its norms.
        loss_final: held-out loss of the folded, norm-free model.
        tokens_used: fine-tuning tokens (real tokens of the rows drawn), all stages.
        heldout_tokens: target tokens in the held-out loss.
    """

    KIND = "LNRemovalResult"
    stages: list[dict]
    loss_original: float
    loss_final: float
    tokens_used: int
    heldout_tokens: int
    provenance: dict = field(default_factory=dict)

    @property
    def loss_gap(self) -> float:
        """Held-out loss of the norm-free model minus the original's."""
        return self.loss_final - self.loss_original

    def table(self):
        """One row per stage, then one for the folded model."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        rows = [
            {
                "stage": s["stage"],
                "scale": next(iter(s["scales"].values())) if len(s["scales"]) == 1 else None,
                "loss_before": s["loss_before"],
                "loss_fixed": s["loss_fixed"],
                "loss_after": s["loss_after"],
                "steps": s["steps"],
                "tokens": s["tokens"],
            }
            for s in self.stages
        ]
        rows.append(
            {
                "stage": "folded (no norms)",
                "scale": None,
                "loss_before": self.loss_original,
                "loss_fixed": self.loss_final,
                "loss_after": self.loss_final,
                "steps": 0,
                "tokens": self.tokens_used,
            }
        )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "stages": [dict(s, scales=dict(s["scales"])) for s in self.stages],
            "loss_original": self.loss_original,
            "loss_final": self.loss_final,
            "tokens_used": self.tokens_used,
            "heldout_tokens": self.heldout_tokens,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LNRemovalResult:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(
            stages=[dict(s) for s in d["stages"]],
            loss_original=float(d["loss_original"]),
            loss_final=float(d["loss_final"]),
            tokens_used=int(d["tokens_used"]),
            heldout_tokens=int(d["heldout_tokens"]),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Held-out loss through the stages: right after fixing each norm, and after fine-tuning."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        x = [s["stage"] for s in self.stages]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x, y=[s["loss_fixed"] for s in self.stages], mode="lines+markers", name="fixed"))
        fig.add_trace(
            go.Scatter(x=x, y=[s["loss_after"] for s in self.stages], mode="lines+markers", name="fine-tuned")
        )
        fig.add_hline(y=self.loss_original, line_dash="dot", annotation_text="with norms")
        fig.update_layout(xaxis_title="stage (norm fixed)", yaxis_title="held-out loss", height=420)
        p = self.provenance
        return figures.style(
            fig,
            f"Norm removal · model {p.get('model', '?')} · loss {self.loss_original:.4f} -> {self.loss_final:.4f} "
            f"({self.loss_gap:+.4f}), {self.tokens_used} fine-tuning tokens",
        )
