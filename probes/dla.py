"""Direct logit attribution (DLA): how much each component writes, directly, toward a logit.

The residual stream the unembedding reads is a sum of what every component wrote: the token and
position embeddings, each attention head, each layer's attention output bias `b_O`, each MLP
(or each of its neurons plus its output bias `b_out`). The final normalisation and the
unembedding are linear once the normalisation's scale is fixed, so the logit (or a logit
difference, or the projection on any direction) splits into one term per component plus a
constant: `ln_final.b` and `b_U` read through the direction (`final_bias`).

`direct_logit_attribution` returns a `DLAResult`: `scores[prompt, position, component]`, whose
sum over components equals the model's own value (`total`, from the model's own `ln_final` and
unembedding) at every prompt and position.

The final normalisation, two ways (`norm=`):

- `"frozen"`: the scale of the final LayerNorm / RMSNorm is frozen at the clean run's value for
  that prompt and position (`ln_final.hook_scale`); each component is centred (LayerNorm only),
  divided by that scale and multiplied by `ln_final.w`. This is TransformerLens's
  `cache.apply_ln_to_stack(..., layer=-1)` followed by `cache.logit_attrs`, with `ln_final.w`
  read through the direction where TransformerLens needs it folded into `W_U` first. The terms
  sum exactly to the real logit difference, but each says what the component adds *at this
  scale*: removing a component would change the scale too, which DLA does not see.
- `"none"`: no normalisation to freeze; the exact decomposition of a model without a final norm
  (`cfg.normalization_type` None). A model with a final norm raises a `LenslabError` that points
  to `"frozen"`.

Component labels are lenslab's node labels (`lenslab.labels`, parsed and printed there): `L3H1`,
`MLP3`, `L2N117`, and the terms only a decomposition has: `embed`, `pos_embed` (learned absolute
positions only), `L3.b_O` (layer 3's attention output bias: `attn_out` minus its heads),
`MLP3.b_out` (with `neurons=True`: the MLP output minus its neurons) and `final_bias`.

>>> import lenslab
>>> from lenslab import tasks
>>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
>>> res = direct_logit_attribution(model, task=tasks.ioi(model, n=8, seed=0))
>>> sorted(label for label, _ in res.top(4))  # the name movers of the model's card
['L1H0', 'L1H1', 'L1H2', 'L1H3']
>>> bool((res.scores.sum(-1) - res.total).abs().max() < 1e-3)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.results import Result, provenance
from lenslab.tasks import Task
from lenslab.toolbox import length_batches, model_device

__all__ = [
    "COMPONENT_KINDS",
    "EMBED",
    "FINAL_BIAS",
    "NORMS",
    "POS_EMBED",
    "VIEWS",
    "DLAResult",
    "component_kind",
    "direct_logit_attribution",
    "final_norm",
]

NORMS = ("frozen", "none")
VIEWS = ("head", "position", "neuron")
EMBED, POS_EMBED, FINAL_BIAS = labels.EMBED, labels.POS_EMBED, labels.FINAL_BIAS
COMPONENT_KINDS = ("embed", "pos_embed", "head", "attn_bias", "mlp", "neuron", "mlp_bias", "final_bias")


def component_kind(label: str) -> tuple[str, int | None, int | None]:
    """(kind, layer, index) of a DLA component label (`lenslab.labels.parse`); kind is one of
    `COMPONENT_KINDS`."""
    node = labels.parse(label)
    if node.kind not in COMPONENT_KINDS:
        raise LenslabError(f"{label!r} is not a DLA component label (kinds: {', '.join(COMPONENT_KINDS)})")
    return node.kind, node.layer, node.index


# --- the final normalisation --------------------------------------------------------------------
def final_norm(model) -> tuple[str | None, Tensor | None, Tensor | None]:
    """The model's final normalisation: (kind, weight, bias), kind "LN" (centres, then scales),
    "RMS" (scales) or None (no final norm); weight and bias are None where the norm has none
    (folded into the unembedding, or RMSNorm's bias)."""
    ntype = getattr(model.cfg, "normalization_type", None)
    ln = getattr(model, "ln_final", None)
    if ntype is None or ln is None:
        return None, None, None
    cls = type(ln).__name__
    if cls.startswith("RMSNorm"):
        kind = "RMS"
    elif cls.startswith("LayerNorm"):
        kind = "LN"
    else:  # a bridge's wrapper: the config says which
        kind = "RMS" if str(ntype).startswith("RMS") or getattr(model.cfg, "final_rms", False) else "LN"
    w = _param(ln, ("w", "weight"))
    b = _param(ln, ("b", "bias"))
    return kind, w, b


def _param(module, names: Sequence[str]) -> Tensor | None:
    for name in names:
        p = getattr(module, name, None)
        if isinstance(p, Tensor):
            return p.detach()
    inner = getattr(module, "original_component", None)
    if inner is not None and inner is not module:
        return _param(inner, names)
    return None


# --- inputs ---------------------------------------------------------------------------------------
def _token_id(model, tok, what: str) -> int:
    d_vocab = int(model.cfg.d_vocab)
    if isinstance(tok, Tensor) and tok.numel() == 1 and not tok.is_floating_point():
        tok = int(tok)
    if isinstance(tok, bool) or not isinstance(tok, (int, str)):
        raise LenslabError(f"{what} must be a token string or id, got {tok!r}")
    if isinstance(tok, int):
        if not 0 <= tok < d_vocab:
            raise LenslabError(f"{what} token id {tok} is outside the vocabulary [0, {d_vocab})")
        return tok
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError(f"this model has no tokenizer: pass {what} as a token id, not {tok!r}")
    ids = model.to_tokens(tok, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = model.to_str_tokens(tok, prepend_bos=False)
        raise LenslabError(
            f"{what} {tok!r} is {len(ids)} tokens {pieces}, not one token: name a single token "
            "(for BPE models mind the leading space, e.g. ' Mary')"
        )
    tid = int(ids[0])
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and tid == unk and unk != getattr(model.tokenizer, "bos_token_id", None):
        if tok != getattr(model.tokenizer, "unk_token", None):
            vocab = list(model.tokenizer.get_vocab())
            raise LenslabError(
                f"{what} {tok!r} is not in the model's vocabulary{did_you_mean(tok.strip(), vocab)}; "
                "name a token the model knows (see its card)"
            )
    return tid


def _token_ids(model, toks, n: int, what: str) -> list[int]:
    """One token id per prompt from a token (str/int) or a sequence of `n` of them."""
    if isinstance(toks, (str, int)) or (isinstance(toks, Tensor) and toks.numel() == 1):
        return [_token_id(model, toks, what)] * n
    toks = list(toks)
    if len(toks) != n:
        raise LenslabError(f"{what} has {len(toks)} entries for {n} prompts: give one token, or one per prompt")
    return [_token_id(model, t, f"{what} {i}") for i, t in enumerate(toks)]


def _prompt_tokens(model, prompts, prepend_bos: bool | None) -> tuple[list[Tensor], list[str] | None]:
    """Prompts (a string, a list of strings, or token ids `[batch, pos]` / `[pos]`) as token rows."""
    if isinstance(prompts, Tensor):
        toks = prompts[None] if prompts.ndim == 1 else prompts
        if toks.ndim != 2 or toks.numel() == 0 or toks.is_floating_point():
            raise LenslabError(f"tokens must be a non-empty integer [batch, pos] tensor, got {tuple(prompts.shape)}")
        return [t for t in toks.long()], None
    if isinstance(prompts, str):
        prompts = [prompts]
    ps = list(prompts or [])
    if not ps or any(not isinstance(p, str) or not p.strip() for p in ps):
        raise LenslabError("prompts must be a non-empty string, list of non-empty strings, or a token tensor")
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError("this model has no tokenizer: pass token ids as a [batch, pos] tensor instead of text")
    return [model.to_tokens(p, prepend_bos=prepend_bos)[0].cpu() for p in ps], ps


def _check_task(model, task) -> None:
    if not isinstance(task, Task):
        raise LenslabError(f"task must be a lenslab.tasks.Task, got {type(task).__name__}")
    d_vocab = int(model.cfg.d_vocab)
    if task.d_vocab is not None and int(task.d_vocab) != d_vocab:
        raise LenslabError(
            f"task {task.name!r} was built for a vocabulary of {task.d_vocab} tokens but this model has {d_vocab}: "
            "build the task with this model (e.g. tasks.from_spec(model, ...))"
        )
    for what, t in (("clean tokens", task.clean_tokens), ("answer tokens", task.answer_tokens)):
        if int(t.max()) >= d_vocab:
            raise LenslabError(
                f"task {task.name!r} holds {what} up to id {int(t.max())}, outside this model's vocabulary "
                f"[0, {d_vocab}): the task was built for another model"
            )
    n_ctx = int(model.cfg.n_ctx)
    if task.seq_len > n_ctx:
        raise LenslabError(f"task {task.name!r} has {task.seq_len} positions but the model's context is {n_ctx}")


def _positions(pos, lengths: list[int]) -> tuple[list[list[int]], list[int]]:
    """Per prompt, the positions read (non-negative), and the positions as given (for labels)."""
    if isinstance(pos, str):
        if pos != "all":
            raise LenslabError(f"pos must be an int, a list of ints or 'all', got {pos!r}")
        if len(set(lengths)) != 1:
            raise LenslabError(
                f"pos='all' needs prompts of one token length, got lengths {sorted(set(lengths))}: "
                "pass pos=-1 (the last position) or prompts of equal length"
            )
        given = list(range(lengths[0]))
    elif isinstance(pos, int) and not isinstance(pos, bool):
        given = [pos]
    else:
        try:
            given = list(pos)
        except TypeError as exc:
            raise LenslabError(f"pos must be an int, a list of ints or 'all', got {pos!r}") from exc
        if not given or any(isinstance(p, bool) or not isinstance(p, int) for p in given):
            raise LenslabError(f"pos must be an int, a non-empty list of ints or 'all', got {pos!r}")
    out = []
    for i, n in enumerate(lengths):
        row = []
        for p in given:
            if not -n <= p < n:
                raise LenslabError(
                    f"position {p} is out of range for prompt {i}, which has {n} tokens (positions {-n}..{n - 1})"
                )
            row.append(p % n)
        out.append(row)
    return out, given


# --- the analysis -----------------------------------------------------------------------------------
def direct_logit_attribution(
    model,
    prompts=None,
    answer=None,
    wrong=None,
    *,
    task: Task | None = None,
    direction: Tensor | None = None,
    pos: int | Sequence[int] | str = -1,
    norm: str = "frozen",
    neurons: bool = False,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
) -> DLAResult:
    """Direct logit attribution of every component toward a token, a logit difference, a task's
    answers or a direction, at the given positions.

    Args:
        model: a TransformerLens model (`HookedTransformer`, or a bridge with its hook names).
        prompts: a string, a list of strings, or token ids `[batch, pos]`; not with `task`.
        answer: the token whose logit is decomposed (a string or id), or one per prompt.
        wrong: with `answer`, the token subtracted: the logit difference `answer - wrong`.
        task: a `Task` instead of prompts and answers: its clean tokens, and per prompt its
            answer pair's logit difference (correct minus incorrect).
        direction: instead of answers, a vector `[d_model]` (or `[batch, d_model]`) in the space
            the unembedding reads (after the final norm): scores are projections on it.
        pos: the position(s) read: an int (default -1, the last), a list of ints, or "all".
        norm: "frozen" (the final norm's scale frozen at the run's value) or "none" (a model
            without a final norm); see the module docstring.
        neurons: one component per MLP neuron (`L2N117`) plus the MLP's output bias, instead of
            one per MLP.
        prepend_bos: passed to `model.to_tokens` for text prompts (None: the model's default).
        batch_size: prompts per forward pass (None: every prompt of one length at once).

    Returns:
        a `DLAResult`; its scores sum over components to `total`, the model's own value.

    Raises:
        LenslabError: for an unknown or multi-token answer, a direction of the wrong size, a task
            built for another model, a position out of range, or `norm="none"` on a model with a
            final norm.
    """
    if norm not in NORMS:
        raise LenslabError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}{did_you_mean(str(norm), NORMS)}")
    kind, w, b = final_norm(model)
    if norm == "none" and kind is not None:
        raise LenslabError(
            f"norm='none' is the exact decomposition of a model without a final normalisation, but this model "
            f"ends in a {'LayerNorm' if kind == 'LN' else 'RMSNorm'} (cfg.normalization_type="
            f"{model.cfg.normalization_type!r}): use norm='frozen', which freezes its scale at the run's value"
        )
    if neurons and (getattr(model.cfg, "num_experts", None) or model.cfg.attn_only):
        raise LenslabError("neurons=True needs dense MLPs; this model is attention-only or Mixture-of-Experts")

    # inputs: token rows, and per prompt the unembedding directions (plus, minus) or a raw direction
    if task is not None:
        if prompts is not None or answer is not None or wrong is not None or direction is not None:
            raise LenslabError("pass either task (its clean tokens and answer pairs) or prompts with answer/direction")
        _check_task(model, task)
        rows, texts = [t for t in task.clean_tokens.cpu()], list(task.clean_prompts) if task.clean_prompts else None
        plus, minus = task.answer_tokens[:, 0].tolist(), task.answer_tokens[:, 1].tolist()
        what = f"logit difference of task {task.name!r} (correct - incorrect)"
    else:
        if prompts is None:
            raise LenslabError("pass prompts (with answer, answer and wrong, or direction), or a task")
        rows, texts = _prompt_tokens(model, prompts, prepend_bos)
        n_ctx = int(model.cfg.n_ctx)
        for i, r in enumerate(rows):
            if len(r) > n_ctx:
                raise LenslabError(f"prompt {i} has {len(r)} tokens but the model's context is {n_ctx}")
            if int(r.max()) >= int(model.cfg.d_vocab) or int(r.min()) < 0:
                raise LenslabError(f"prompt {i} holds a token id outside the vocabulary [0, {model.cfg.d_vocab})")
        if (answer is None) == (direction is None):
            raise LenslabError("pass exactly one of answer (a token, with wrong for a difference) and direction")
        if direction is None:
            plus = _token_ids(model, answer, len(rows), "answer")
            minus = _token_ids(model, wrong, len(rows), "wrong") if wrong is not None else None
            what = _describe_tokens(model, plus, minus)
        else:
            if wrong is not None:
                raise LenslabError("wrong is for answer tokens; with a direction, subtract it into the direction")
            plus = minus = None
            what = "projection on a given direction"
    n = len(rows)
    lengths = [len(r) for r in rows]
    where, given = _positions(pos, lengths)
    dev = model_device(model)

    if direction is not None:
        d = torch.as_tensor(direction).detach().float()
        d_model = int(model.cfg.d_model)
        if d.shape not in ((d_model,), (n, d_model)):
            raise LenslabError(
                f"direction has shape {tuple(d.shape)} but this model's residual stream has d_model={d_model}: "
                f"pass a [{d_model}] vector (or [{n}, {d_model}], one per prompt)"
            )
        dirs = (d[None].expand(n, d_model) if d.ndim == 1 else d).to(dev)
        bias_u = torch.zeros(n, device=dev)
    else:
        W_U, b_U = model.W_U.detach().float(), _b_u(model)
        ip = torch.tensor(plus, device=W_U.device)
        dirs = W_U[:, ip].T
        bias_u = b_U[ip] if b_U is not None else torch.zeros(n, device=W_U.device)
        if minus is not None:
            im = torch.tensor(minus, device=W_U.device)
            dirs = dirs - W_U[:, im].T
            bias_u = bias_u - (b_U[im] if b_U is not None else 0.0)
        dirs, bias_u = dirs.to(dev), bias_u.to(dev)

    comps = _component_labels(model, neurons)
    scores = torch.zeros(n, len(given), len(comps))
    total = torch.zeros(n, len(given))
    for idx in length_batches(rows, batch_size):
        toks = torch.stack([rows[i] for i in idx]).to(dev)
        sel = torch.tensor([where[i] for i in idx], device=dev)
        s, t = _attribute(model, toks, sel, dirs[idx], bias_u[idx], kind, w, b, neurons)
        scores[idx] = s.cpu()
        total[idx] = t.cpu()

    str_toks = [_str_tokens(model, r) for r in rows]
    pos_labels = [f"{p}:{str_toks[0][p]}" for p in where[0]] if n == 1 else [str(p) for p in given]
    answers = (
        None
        if plus is None
        else [_describe_tokens(model, [a], None if minus is None else [minus[i]]) for i, a in enumerate(plus)]
    )
    return DLAResult(
        scores=scores,
        total=total,
        components=comps,
        positions=given,
        position_labels=pos_labels,
        prompts=texts if texts is not None else [_text(model, r) for r in rows],
        answers=answers,
        direction=what,
        norm=norm,
        neurons=neurons,
        n_layers=int(model.cfg.n_layers),
        n_heads=int(model.cfg.n_heads),
        provenance=provenance(model, task, final_norm=kind, n_prompts=n),
    )


def _b_u(model) -> Tensor | None:
    b = getattr(model, "b_U", None)
    if not isinstance(b, Tensor):
        b = _param(getattr(model, "unembed", None), ("b_U", "bias"))
    return None if b is None else b.detach().float()


def _text(model, row: Tensor) -> str:
    if getattr(model, "tokenizer", None) is None:
        return " ".join(str(int(t)) for t in row)
    return str(model.to_string(row))


def _str_tokens(model, row: Tensor) -> list[str]:
    if getattr(model, "tokenizer", None) is None:
        return [str(int(t)) for t in row]
    return [str(s) for s in model.to_str_tokens(row)]


def _describe_tokens(model, plus: list[int], minus: list[int] | None) -> str:
    def name(t: int) -> str:
        return repr(model.to_string([t])) if getattr(model, "tokenizer", None) is not None else str(t)

    if len(set(plus)) > 1 or (minus is not None and len(set(minus)) > 1):
        return "per-prompt answers" + (" (answer - wrong)" if minus is not None else "")
    out = f"logit({name(plus[0])})"
    return out if minus is None else f"{out} - logit({name(minus[0])})"


def _has_mlp(model) -> bool:
    return not model.cfg.attn_only


def _has_pos_embed(model) -> bool:
    return getattr(model.cfg, "positional_embedding_type", "standard") == "standard"


def _component_labels(model, neurons: bool) -> list[str]:
    out = [EMBED] + ([POS_EMBED] if _has_pos_embed(model) else [])
    for l in range(model.cfg.n_layers):
        out += [labels.head(l, h) for h in range(model.cfg.n_heads)] + [labels.attn_bias(l)]
        if _has_mlp(model):
            if neurons:
                out += [labels.neuron(l, i) for i in range(model.cfg.d_mlp)] + [labels.mlp_bias(l)]
            else:
                out.append(labels.mlp(l))
    return [*out, FINAL_BIAS]


def _attribute(model, toks, sel, dirs, bias_u, kind, w, b, neurons) -> tuple[Tensor, Tensor]:
    """Scores `[batch, n_pos, component]` and the model's own value `[batch, n_pos]` for one batch."""
    L = int(model.cfg.n_layers)
    want = {"blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post", "ln_final.hook_scale"}
    if _has_pos_embed(model):
        want.add("hook_pos_embed")
    for l in range(L):
        want |= {f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out"}
        if _has_mlp(model):
            want.add(f"blocks.{l}.hook_mlp_out")
            if neurons:
                want.add(f"blocks.{l}.mlp.hook_post")
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda name: name in want)
        rows = torch.arange(toks.shape[0], device=toks.device)[:, None]
        pick = lambda name: cache[name][rows, sel].float()  # [batch, n_pos, ...]

        # u: the direction the (centred, scaled) residual is read through: ln_final.w * d, centred for LN
        u = dirs.float() * (w.float().to(dirs.device) if w is not None else 1.0)
        if kind == "LN":
            u = u - u.mean(-1, keepdim=True)
        scale = pick("ln_final.hook_scale")[..., 0] if kind is not None else torch.ones(sel.shape, device=dirs.device)
        proj = lambda x: torch.einsum("bpd,bd->bp", x, u) / scale  # a [batch, n_pos, d_model] term

        cols = []
        pos_embed = pick("hook_pos_embed") if _has_pos_embed(model) else None
        resid0 = pick("blocks.0.hook_resid_pre")
        cols.append(proj(resid0 - pos_embed if pos_embed is not None else resid0)[..., None])
        if pos_embed is not None:
            cols.append(proj(pos_embed)[..., None])
        for l in range(L):
            attn = model.blocks[l].attn
            W_O = attn.W_O.detach().float()  # [head, d_head, d_model]
            z = pick(f"blocks.{l}.attn.hook_z")  # [batch, n_pos, head, d_head]
            heads = torch.einsum("bphe,hed,bd->bph", z, W_O, u) / scale[..., None]
            cols += [heads, (proj(pick(f"blocks.{l}.hook_attn_out")) - heads.sum(-1))[..., None]]
            if _has_mlp(model):
                mlp = proj(pick(f"blocks.{l}.hook_mlp_out"))
                if neurons:
                    W_out = model.blocks[l].mlp.W_out.detach().float()  # [d_mlp, d_model]
                    post = pick(f"blocks.{l}.mlp.hook_post")  # [batch, n_pos, d_mlp]
                    each = post * torch.einsum("nd,bd->bn", W_out, u)[:, None] / scale[..., None]
                    cols += [each, (mlp - each.sum(-1))[..., None]]
                else:
                    cols.append(mlp[..., None])
        fb = bias_u + (dirs.float() @ b.float().to(dirs.device) if b is not None else 0.0)
        cols.append(fb[:, None, None].expand(*sel.shape, 1))
        scores = torch.cat(cols, dim=-1)

        resid = cache[f"blocks.{L - 1}.hook_resid_post"][rows, sel]  # in the model's dtype, for its ln_final
        normed = (model.ln_final(resid) if kind is not None else resid).float()
        total = torch.einsum("bpd,bd->bp", normed, dirs.float()) + bias_u[:, None]
    return scores, total


# --- the result ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class DLAResult(Result):
    """Direct logit attribution: one score per prompt, position and component.

    Attributes:
        scores: `[prompt, position, component]`; summed over components it equals `total`.
        total: `[prompt, position]`: the model's own value (logit, logit difference or projection).
        components: one label per component (`embed`, `pos_embed`, `L0H1`, `L0.b_O`, `MLP0` or
            `L0N5` ... `MLP0.b_out`, `final_bias`; see `component_kind`).
        positions: the positions as asked (`-1`: each prompt's last).
        position_labels: one label per position (`"12:to"` for one prompt, else the position).
        prompts: the prompts' texts.
        answers: per prompt, the tokens read (`"logit(' Mary') - logit(' John')"`); None for a direction.
        direction: what is decomposed, in words.
        norm: "frozen" or "none".
        neurons: whether MLPs are split into neurons.
        n_layers, n_heads: the model's shape, for the layer x head view.
        provenance: model, task, versions, time.
    """

    scores: Tensor
    total: Tensor
    components: list[str]
    positions: list[int]
    position_labels: list[str]
    prompts: list[str]
    answers: list[str] | None = None
    direction: str = ""
    norm: str = "frozen"
    neurons: bool = False
    n_layers: int = 0
    n_heads: int = 0
    provenance: dict = field(default_factory=dict)
    KIND = "DLAResult"

    def __post_init__(self) -> None:
        n, p, c = self.scores.shape
        if len(self.components) != c or len(self.positions) != p or len(self.position_labels) != p:
            raise LenslabError(
                f"scores {tuple(self.scores.shape)} do not match {len(self.components)} components and "
                f"{len(self.positions)} positions"
            )
        if tuple(self.total.shape) != (n, p) or len(self.prompts) != n:
            raise LenslabError(f"total {tuple(self.total.shape)} and {len(self.prompts)} prompts must be [{n}, {p}]")

    # --- reading it
    @property
    def mean(self) -> Tensor:
        """`[position, component]`: the scores averaged over prompts."""
        return self.scores.mean(0)

    def position_index(self, pos: int) -> int:
        """The index into `positions` of `pos`: a position asked for (`-1` for the last), else an
        index into `positions` (so `-1` is always the last one read)."""
        npos = len(self.positions)
        if pos in self.positions:
            return self.positions.index(pos)
        if not -npos <= pos < npos:
            raise LenslabError(
                f"position {pos} is not among this result's positions {self.positions} "
                f"(or an index into them, -{npos}..{npos - 1})"
            )
        return pos % npos

    def index(self, label: str) -> int:
        """The index of component `label`."""
        if label not in self.components:
            raise LenslabError(f"no component {label!r} in this result{did_you_mean(label, self.components)}")
        return self.components.index(label)

    def score(self, label: str, pos: int = -1) -> float:
        """The mean score of component `label` at position `pos` (a position asked, or an index)."""
        return float(self.mean[self.position_index(pos), self.index(label)])

    def top(self, k: int = 10, pos: int = -1, kinds: Sequence[str] | None = ("head",)) -> list[tuple[str, float]]:
        """The `k` components of the largest mean score at `pos`, largest first, among `kinds`
        (component kinds, default heads; None for every component)."""
        row = self.mean[self.position_index(pos)]
        keep = [i for i, c in enumerate(self.components) if kinds is None or component_kind(c)[0] in kinds]
        order = sorted(keep, key=lambda i: -float(row[i]))[:k]
        return [(self.components[i], float(row[i])) for i in order]

    def head_grid(self, pos: int = -1) -> Tensor:
        """`[layer, head]`: the mean score of each head at `pos`."""
        row = self.mean[self.position_index(pos)]
        grid = torch.zeros(self.n_layers, self.n_heads)
        for i, c in enumerate(self.components):
            kind, l, h = component_kind(c)
            if kind == "head":
                grid[l, h] = row[i]
        return grid

    def by_layer(self, pos: int = -1) -> dict[str, list[float]]:
        """Per layer, the mean score of its attention bias and of its whole MLP (neurons and bias
        summed) at `pos`: `{"attn bias": [...], "MLP": [...]}`."""
        row = self.mean[self.position_index(pos)]
        out = {"attn bias": [0.0] * self.n_layers, "MLP": [0.0] * self.n_layers}
        for i, c in enumerate(self.components):
            kind, l, _ = component_kind(c)
            if kind == "attn_bias":
                out["attn bias"][l] += float(row[i])
            elif kind in ("mlp", "neuron", "mlp_bias"):
                out["MLP"][l] += float(row[i])
        return out

    def coarse(self) -> tuple[list[str], Tensor]:
        """Component labels with each MLP's neurons and bias summed into `MLP{l}`, and the mean
        scores `[position, component]` over them (the result itself when it has no neurons)."""
        if not self.neurons:
            return list(self.components), self.mean
        names: list[str] = []
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.components):
            kind, l, _ = component_kind(c)
            key = labels.mlp(l) if kind in ("neuron", "mlp_bias") else c
            if key not in groups:
                names.append(key)
                groups[key] = []
            groups[key].append(i)
        mean = self.mean
        return names, torch.stack([mean[:, groups[k]].sum(-1) for k in names], dim=-1)

    # --- the contract
    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "scores": self.scores.detach().cpu().float().tolist(),
            "shape": list(self.scores.shape),
            "total": self.total.detach().cpu().float().tolist(),
            "components": list(self.components),
            "positions": list(self.positions),
            "position_labels": list(self.position_labels),
            "prompts": list(self.prompts),
            "answers": None if self.answers is None else list(self.answers),
            "direction": self.direction,
            "norm": self.norm,
            "neurons": self.neurons,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DLAResult:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        shape = d["shape"]
        return cls(
            scores=torch.tensor(d["scores"], dtype=torch.float32).reshape(shape),
            total=torch.tensor(d["total"], dtype=torch.float32).reshape(shape[:2]),
            components=list(d["components"]),
            positions=[int(p) for p in d["positions"]],
            position_labels=list(d["position_labels"]),
            prompts=list(d["prompts"]),
            answers=None if d.get("answers") is None else list(d["answers"]),
            direction=d.get("direction", ""),
            norm=d.get("norm", "frozen"),
            neurons=bool(d.get("neurons", False)),
            n_layers=int(d.get("n_layers", 0)),
            n_heads=int(d.get("n_heads", 0)),
            provenance=d.get("provenance") or {},
        )

    def table(self, per_prompt: bool = False):
        """One row per (position, component) with its mean score over prompts (`per_prompt=True`:
        one row per prompt, position and component); columns position, position_label, component,
        kind, layer, index, score."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        parsed = [component_kind(c) for c in self.components]
        data = self.scores if per_prompt else self.mean[None]
        rows = []
        for b in range(data.shape[0]):
            for j, p in enumerate(self.positions):
                for i, c in enumerate(self.components):
                    kind, l, idx = parsed[i]
                    row = {"prompt": b} if per_prompt else {}
                    row.update(
                        position=p,
                        position_label=self.position_labels[j],
                        component=c,
                        kind=kind,
                        layer=l,
                        index=idx,
                        score=float(data[b, j, i]),
                    )
                    rows.append(row)
        df = pd.DataFrame(rows)
        return df.astype({"layer": "Int64", "index": "Int64"})  # None (embed, final_bias) stays <NA>

    def title(self) -> str:
        p = self.provenance
        task = f" · task {p['task']}" if p.get("task") else ""
        return f"Direct logit attribution ({self.norm} norm) · model {p.get('model', '?')}{task} · {self.direction}"

    def figure(self, view: str = "head", pos: int = -1, k: int = 20):
        """A plotly figure of the mean scores.

        `view="head"`: a layer x head heatmap at position `pos`, with a column for each layer's
        attention bias and one for its MLP; the embeddings, the final bias and the total are in
        the title. `view="position"`: components x positions. `view="neuron"`: the `k` neurons of
        the largest |score| at `pos` (a result with `neurons=True`).
        """
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        if view not in VIEWS:
            raise LenslabError(f"view must be one of {', '.join(VIEWS)}, got {view!r}{did_you_mean(str(view), VIEWS)}")
        j = self.position_index(pos)
        mean = self.mean
        heat = lambda z, x, y, title: go.Heatmap(
            z=z,
            x=x,
            y=y,
            colorscale="RdBu",
            zmid=0.0,
            colorbar=dict(title="DLA"),
            hovertemplate=f"%{{y}} · %{{x}}<br>{title}: %{{z:.4g}}<extra></extra>",
        )
        if view == "head":
            grid = self.head_grid(pos)
            extra = self.by_layer(pos)
            z = torch.cat([grid, torch.tensor([extra["attn bias"], extra["MLP"]]).T], dim=1)
            x = [f"H{h}" for h in range(self.n_heads)] + ["attn bias", "MLP"]
            y = [labels.layer(l) for l in range(self.n_layers)]
            fig = go.Figure(heat(z.tolist(), x, y, "DLA"))
            fig.update_layout(xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed")
            rest = [c for c in (EMBED, POS_EMBED, FINAL_BIAS) if c in self.components]
            sub = " · ".join(f"{c} {float(mean[j, self.index(c)]):+.3g}" for c in rest)
            sub += f" · total {float(self.total[:, j].mean()):+.4g} (position {self.position_labels[j]})"
        elif view == "position":
            names, coarse = self.coarse()
            fig = go.Figure(heat(coarse.T.tolist(), figures.unique_labels(self.position_labels), names, "DLA"))
            fig.update_layout(
                xaxis_title="position",
                yaxis_title="component",
                yaxis_autorange="reversed",
                height=max(420, 16 * len(names) + 160),
            )
            sub = f"mean over {len(self.prompts)} prompt{'s' * (len(self.prompts) != 1)}"
        else:
            idx = [i for i, c in enumerate(self.components) if component_kind(c)[0] == "neuron"]
            if not idx:
                raise LenslabError("this result has no neurons: run direct_logit_attribution(..., neurons=True)")
            idx = sorted(idx, key=lambda i: -abs(float(mean[j, i])))[:k]
            fig = go.Figure(
                go.Bar(x=[self.components[i] for i in idx], y=[float(mean[j, i]) for i in idx], marker_color="#3b6ea8")
            )
            fig.update_layout(xaxis_title="neuron", yaxis_title="DLA")
            sub = f"top {len(idx)} neurons by |DLA| at position {self.position_labels[j]}"
        return figures.style(fig, f"{self.title()}<br><sup>{sub}</sup>")
