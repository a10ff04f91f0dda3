"""Sparse autoencoders (SAEs) with sae-lens: load, check against a model, train offline, measure.

An SAE (Bricken et al. 2023, "Towards Monosemanticity"; Cunningham et al. 2023,
arXiv:2309.08600) reads one activation `x` `[d_in]` at a hook point and writes it as a sparse,
non-negative code `f = encode(x)` `[d_sae]` (the *features*) and a reconstruction
`x_hat = f @ W_dec + b_dec`. A TopK SAE (Gao et al. 2024, arXiv:2406.04093) keeps the `k` largest
pre-activations per token; a standard SAE uses a ReLU and an L1 penalty on `f`.

lenslab does not re-implement any of it: SAEs are sae-lens `SAE` objects (`StandardSAE`,
`TopKSAE`, ...), loaded with `SAE.from_pretrained` / `SAE.load_from_disk` and trained with
sae-lens's `LanguageModelSAETrainingRunner`. This module adds what a workbench needs around them:

- `load_sae`: one entry point for a sae-lens release + SAE id (real `SAE.from_pretrained`: works
  online or from the local Hugging Face cache), a folder saved by sae-lens, or a zoo SAE
  (`"zoo/ioi-4l/blocks.2.hook_resid_post"`); with `model=`, `check_sae` runs first.
- `check_sae`: the SAE's hook point exists in the model and `d_in` equals that hook's width.
- `list_saes` / `read_sae_card`: the zoo's shipped SAEs (`lenslab/zoo/<model>/saes/<hook>/`).
- `train_sae`: sae-lens's runner on an in-memory `datasets.Dataset` of token ids made locally
  (no hub dataset, no wandb), deterministic for a seed; writes the sae-lens folder, `card.md` and
  `metrics.json`.
- `sae_metrics`: MSE, explained variance, next-token loss clean / with the SAE spliced in /
  with the activation zero-ablated, the loss recovered, L0 and the dead-feature fraction.
- `splice_hooks`: TransformerLens forward hooks that replace the activation by the SAE's
  reconstruction (what `sae_metrics` uses; usable with `model.run_with_hooks` / `model.hooks`).
- The recipes and corpora of the shipped zoo SAEs are `lenslab.probes.zoo_saes`
  (`lenslab sae train --model zoo/ioi-4l --hook blocks.2.hook_resid_post --out DIR`).

>>> import lenslab
>>> from lenslab.probes.sae import load_sae
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
>>> sae.cfg.d_in, sae.cfg.d_sae
(64, 1024)
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.results import JsonResult, provenance

__all__ = [
    "SaeMetrics",
    "check_sae",
    "corpus_tokens",
    "list_saes",
    "load_sae",
    "read_sae_card",
    "read_metrics",
    "sae_metrics",
    "splice_hooks",
    "train_sae",
    "zoo_sae_path",
]

SAES_DIR = "saes"  # zoo SAEs live in lenslab/zoo/<model>/saes/<hook name>/
_CFG = "cfg.json"  # sae-lens's config file name in a saved SAE folder


# --- loading -----------------------------------------------------------------------------------
def load_sae(source: str | Path, sae_id: str | None = None, *, model=None, device: str = "cpu"):
    """Load an SAE as a sae-lens `SAE` (inference class: `StandardSAE`, `TopKSAE`, ...).

    Args:
        source: one of
            - a zoo SAE, `"zoo/<model>/<hook>"` (see `list_saes`);
            - a folder saved by sae-lens (`SAE.save_model`, `lenslab sae train`): `SAE.load_from_disk`;
            - a sae-lens release, with `sae_id` or as `"<release>/<sae id>"`
              (e.g. `"gpt2-small-res-jb/blocks.8.hook_resid_pre"`): `SAE.from_pretrained`, which
              downloads from the Hugging Face Hub or reads the local cache.
        sae_id: the SAE id inside the release `source`.
        model: when given, `check_sae(model, sae)` runs before the SAE is returned.
        device: where the SAE's weights go ("cpu", "cuda", ...).

    Raises:
        LenslabError: unknown zoo SAE, release or id (with the closest names), a folder that is not
            a saved SAE, a release that is neither cached nor downloadable (offline), or an SAE that
            does not fit `model`.

    >>> sae = load_sae("zoo/ioi-4l/blocks.2.hook_resid_post")
    >>> sae.cfg.d_in, sae.cfg.metadata.hook_name
    (128, 'blocks.2.hook_resid_post')
    """
    if sae_id is not None:
        sae = _load_pretrained(str(source), sae_id, device)
    else:
        text = str(source).strip()
        path = Path(text).expanduser()
        if text.startswith("zoo/") and not path.is_dir():
            sae = _load_folder(zoo_sae_path(text), device)
        elif path.is_dir():
            sae = _load_folder(path, device)
        elif isinstance(source, Path) or text.startswith(("/", "./", "../", "~")):
            raise LenslabError(f"SAE folder {text!r} does not exist; pass a folder saved by sae-lens (it holds {_CFG})")
        elif "/" in text and text.split("/", 1)[0] in _releases():
            release, sid = text.split("/", 1)
            sae = _load_pretrained(release, sid, device)
        else:
            names = [*_all_zoo_saes(), *_releases()]
            raise LenslabError(
                f"SAE {text!r} is not a zoo SAE ('zoo/<model>/<hook>'), an existing folder saved by sae-lens, or a "
                f"sae-lens release ('<release>/<sae id>', or pass sae_id=){did_you_mean(text, names)}; "
                f"zoo SAEs: {', '.join(_all_zoo_saes()) or '(none)'}"
            )
    if model is not None:
        check_sae(model, sae)
    return sae


def _load_folder(folder: Path, device: str):
    from sae_lens import SAE

    if not (folder / _CFG).exists():
        raise LenslabError(
            f"{folder} has no {_CFG}: not a folder saved by sae-lens (save one with `sae.save_model(dir)` or "
            "`lenslab sae train ... --out DIR`)"
        )
    try:
        with _quiet():
            return SAE.load_from_disk(str(folder), device=device)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise LenslabError(f"could not load the SAE in {folder}: {exc}") from exc


def _releases() -> list[str]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return list(get_pretrained_saes_directory())


def _load_pretrained(release: str, sae_id: str, device: str):
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise LenslabError(
            f"{release!r} is not a sae-lens release{did_you_mean(release, directory)}; the releases are listed in "
            "sae-lens's pretrained_saes.yaml (https://decoderesearch.github.io/SAELens/latest/pretrained_saes/)"
        )
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        raise LenslabError(
            f"{sae_id!r} is not an SAE of release {release!r}{did_you_mean(sae_id, ids)}; "
            f"it has {len(ids)}: {', '.join(ids[:6])}{', ...' if len(ids) > 6 else ''}"
        )
    try:
        with _quiet():
            return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:  # the hub client raises many types; sort them into offline vs other
        if _is_offline_error(exc):
            zoo_saes = _all_zoo_saes()
            hint = f", or use a zoo SAE ({', '.join(zoo_saes)})" if zoo_saes else ""
            raise LenslabError(
                f"cannot load {release}/{sae_id}: it is not in the local Hugging Face cache and the Hub cannot be "
                f"reached ({type(exc).__name__}; HF_HUB_OFFLINE is set when offline). Connect to the internet and "
                f"load it once (it is cached afterwards), or pass a folder saved by sae-lens{hint}"
            ) from exc
        raise LenslabError(f"sae-lens could not load {release}/{sae_id}: {type(exc).__name__}: {exc}") from exc


def _is_offline_error(exc: BaseException) -> bool:

    names = {t.__name__ for e in _chain(exc) for t in type(e).__mro__}
    offline_types = {
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "ConnectionError",
        "ConnectError",
        "Timeout",
        "TimeoutError",
        "ProxyError",
        "NameResolutionError",
    }
    if names & offline_types:
        return True
    text = " ".join(str(e) for e in _chain(exc)).lower()
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return offline_env and ("offline" in text or "cannot find" in text or "cache" in text)


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


# --- the zoo's SAEs ----------------------------------------------------------------------------
def zoo_sae_path(name: str) -> Path:
    """Folder of zoo SAE `"zoo/<model>/<hook>"`, with a clear error when there is none."""

    text = name.strip()
    parts = text.removeprefix(zoo.PREFIX).split("/", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise LenslabError(
            f"zoo SAE names look like 'zoo/<model>/<hook>', got {name!r}; zoo SAEs: {', '.join(_all_zoo_saes()) or '(none)'}"
        )
    folder = zoo.ZOO_DIR / parts[0] / SAES_DIR / parts[1]
    if not (folder / _CFG).exists():
        have = list_saes(zoo.PREFIX + parts[0])
        others = have or _all_zoo_saes()
        raise LenslabError(
            f"there is no zoo SAE {text!r}{did_you_mean(text, others)}; "
            f"{'this model has' if have else 'the zoo has'}: {', '.join(others) or '(none)'} "
            "(train one with `lenslab sae train --model zoo/<model> --hook <hook> --out DIR`)"
        )
    return folder


def list_saes(model_name: str) -> list[str]:
    """Zoo SAEs of model `model_name` (`"zoo/ioi-4l"` or `"ioi-4l"`), e.g.
    `["zoo/ioi-4l/blocks.2.hook_resid_post"]`; `[]` for models without any (or outside the zoo).

    >>> list_saes("zoo/induction-2l")
    ['zoo/induction-2l/blocks.0.hook_resid_post']
    """

    short = str(model_name).strip().removeprefix(zoo.PREFIX)
    if not short or "/" in short:
        return []
    root = zoo.ZOO_DIR / short / SAES_DIR
    return sorted(f"{zoo.PREFIX}{short}/{p.parent.name}" for p in root.glob(f"*/{_CFG}"))


def read_sae_card(name: str) -> str:
    """The card (Markdown) of zoo SAE `name`, or of a saved SAE folder; '' when it has none."""
    folder = Path(name).expanduser() if Path(name).expanduser().is_dir() else zoo_sae_path(name)
    card = folder / "card.md"
    return card.read_text() if card.exists() else ""


def _all_zoo_saes() -> list[str]:

    return sorted(n for e in zoo.zoo_entries() for n in list_saes(e.name))


# --- checking ----------------------------------------------------------------------------------
def check_sae(model, sae) -> None:
    """Raise a LenslabError unless `sae` fits `model`: its hook point
    (`sae.cfg.metadata.hook_name`) is a hook of the model and `sae.cfg.d_in` equals that hook's
    width (`d_model` for the residual stream, `n_heads * d_head` for `hook_z`, one head's
    `d_head` when `hook_head_index` is set)."""
    hook = sae.cfg.metadata.hook_name
    trained_on = sae.cfg.metadata.model_name
    origin = f" (trained on {trained_on})" if trained_on else ""
    name = _model_name(model)
    if not hook:
        raise LenslabError(
            "the SAE's config names no hook point (sae.cfg.metadata.hook_name is empty); set it to the hook the SAE "
            "reads, e.g. sae.cfg.metadata.hook_name = 'blocks.2.hook_resid_post'"
        )
    hooks = list(getattr(model, "hook_dict", {}) or {})
    if hook not in hooks:
        raise LenslabError(
            f"the SAE reads hook {hook!r}{origin}, which model {name!r} does not have{did_you_mean(hook, hooks)}; "
            f"use an SAE trained on {name!r} (zoo SAEs: lenslab.probes.sae.list_saes) or train one with "
            f"`lenslab sae train --model {name} --hook <hook> --out DIR`"
        )
    width = _hook_width(model, hook, sae.cfg.metadata.hook_head_index)
    if width != sae.cfg.d_in:
        raise LenslabError(
            f"the SAE expects d_in={sae.cfg.d_in} at {hook!r}{origin}, but model {name!r} has width {width} there "
            f"(d_model={getattr(model.cfg, 'd_model', '?')}); the SAE belongs to another model: load one trained on "
            f"{name!r} or train one with `lenslab sae train --model {name} --hook {hook} --out DIR`"
        )


def _model_name(model) -> str:
    return getattr(model, "lenslab_name", None) or getattr(getattr(model, "cfg", None), "model_name", None) or "model"


@torch.no_grad()
def _hook_width(model, hook: str, head_index: int | None) -> int:
    """Width of one token's activation at `hook` (flattened over heads), from a 2-token forward."""
    tok = getattr(model, "tokenizer", None)
    first = getattr(tok, "bos_token_id", None) if tok is not None else None
    tokens = torch.tensor([[first if first is not None else 0, 0]], device=_device(model))
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    kwargs = {}
    stop = extract_stop_at_layer_from_tlens_hook_name(hook)  # blocks.L.* -> L + 1: no need to run further
    if stop is not None and type(model).__name__ == "HookedTransformer":
        kwargs["stop_at_layer"] = stop
    _, cache = model.run_with_cache(tokens, names_filter=[hook], **kwargs)
    act = cache[hook]
    if head_index is not None:
        return int(act.shape[-1])
    return int(math.prod(act.shape[2:]))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --- splicing ----------------------------------------------------------------------------------
def _sae_input(sae, act: Tensor) -> Tensor:
    """What `sae.encode` takes from a hook activation `[..., *hook dims]`: one head when
    `hook_head_index` is set, the heads as they are for SAEs that reshape `hook_z` themselves,
    else the last dimensions flattened to `d_in`."""
    head = sae.cfg.metadata.hook_head_index
    if head is not None:
        return act[..., head, :]
    if getattr(sae, "hook_z_reshaping_mode", False):
        return act
    if act.shape[-1] != sae.cfg.d_in and act.ndim >= 2 and act.shape[-2] * act.shape[-1] == sae.cfg.d_in:
        return act.flatten(-2)
    return act


def _encode_decode(sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`x` from `_sae_input` -> (x `[..., d_in]`, features `[..., d_sae]`, reconstruction `[..., d_in]`)."""
    f = sae.encode(x)
    x_hat = sae.decode(f)

    def flat(t: Tensor) -> Tensor:
        return t if t.shape[-1] == sae.cfg.d_in else t.flatten(-2)

    return flat(x), f, flat(x_hat)


def _reconstruct(sae, act: Tensor) -> Tensor:
    """Replacement for a hook activation: the SAE's reconstruction in the activation's own shape."""
    x = _sae_input(sae, act)
    x_hat = sae.decode(sae.encode(x)).to(act.dtype)
    head = sae.cfg.metadata.hook_head_index
    if head is not None:
        out = act.clone()
        out[..., head, :] = x_hat
        return out
    return x_hat.reshape(act.shape)


def splice_hooks(sae, hook_name: str | None = None) -> list[tuple[str, object]]:
    """Forward hooks `[(hook_name, fn)]` that replace the activation at the SAE's hook point with
    the SAE's reconstruction `decode(encode(x))` at every position.

    >>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
    >>> tokens = model.to_tokens("t5 t6 t7 t5 t6 t7")
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(sae))
    >>> logits.shape   # [batch, pos, d_vocab]
    torch.Size([1, 7, 304])
    """
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise LenslabError("the SAE names no hook point: pass hook_name= or set sae.cfg.metadata.hook_name")

    def hook(act, hook=None):
        return _reconstruct(sae, act)

    return [(name, hook)]


def _zero_hooks(sae, hook_name: str) -> list[tuple[str, object]]:
    head = sae.cfg.metadata.hook_head_index

    def hook(act, hook=None):
        if head is None:
            return torch.zeros_like(act)
        out = act.clone()
        out[..., head, :] = 0
        return out

    return [(hook_name, hook)]


# --- corpora -----------------------------------------------------------------------------------
def _pad_id(model) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return None


def corpus_tokens(model, corpus: list[str] | list[list[int]] | Tensor, context_size: int | None = None) -> Tensor:
    """Token rows `[n, context_size]` for SAE training or measurement.

    A token tensor `[n, pos]` is used as is (cut to `context_size`); token-id lists are cut and
    right-padded like documents. A list of documents gives one
    row per document: the model's tokens (with `<bos>` when the model prepends it), cut to
    `context_size` (default: the longest document, at most `n_ctx`) and right-padded with the
    tokenizer's pad token; `train_sae` and `sae_metrics` skip pad positions.
    """
    if isinstance(corpus, Tensor):
        toks = corpus[None] if corpus.ndim == 1 else corpus
        if toks.ndim != 2 or toks.shape[0] == 0 or toks.shape[1] < 2 or toks.dtype.is_floating_point:
            raise LenslabError(
                f"a token corpus must be an integer [n, pos] tensor with pos >= 2, got {tuple(corpus.shape)} {corpus.dtype}"
            )
        return toks[:, :context_size].long().cpu() if context_size else toks.long().cpu()
    if isinstance(corpus, str):
        corpus = [corpus]
    if corpus and all(isinstance(d, (list, tuple)) for d in corpus):  # token-id lists: pad them
        ids = [[int(t) for t in d] for d in corpus if len(d)]
        pad = _pad_id(model)
        if not ids or pad is None:
            raise LenslabError("token-id lists need at least one non-empty list and a tokenizer with a pad token")
        width = min(context_size or max(map(len, ids)), int(getattr(model.cfg, "n_ctx", 0) or 10**9))
        return torch.tensor([d[:width] + [pad] * (width - len(d[:width])) for d in ids], dtype=torch.long)
    docs = [d for d in (corpus or []) if isinstance(d, str) and d.strip()]
    if not docs:
        raise LenslabError(
            "the corpus is empty: pass documents (a list of non-empty strings) or a [n, pos] token tensor"
        )
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError("the model has no tokenizer: pass the corpus as a [n, pos] token tensor")
    pad = _pad_id(model)
    if pad is None:
        raise LenslabError(
            "the model's tokenizer has no pad or eos token to pad documents with: pass a [n, pos] token tensor"
        )
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0) or None
    rows = [model.to_tokens(d, truncate=False)[0].tolist() for d in docs]
    width = context_size or max(len(r) for r in rows)
    if n_ctx:
        width = min(width, n_ctx)
    if width < 2:
        raise LenslabError(f"context_size must be at least 2 tokens, got {width}")
    return torch.tensor([r[:width] + [pad] * (width - len(r[:width])) for r in rows], dtype=torch.long)


def _exclude(model, exclude_tokens: list[int] | None) -> list[int]:
    """Token ids whose positions are left out: `exclude_tokens`, else the pad token (which is also
    `<bos>` for tokenizers such as GPT-2's that have no pad token of their own)."""
    if exclude_tokens is not None:
        return [int(t) for t in exclude_tokens]
    pad = _pad_id(model)
    return [] if pad is None else [pad]


def _keep(tokens: Tensor, exclude: list[int]) -> Tensor:
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for t in exclude:
        keep &= tokens != t
    return keep


# --- metrics -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class SaeMetrics(JsonResult):
    """How well an SAE stands in for the activation it reads, measured on a set of tokens.

    Attributes:
        hook_name, d_in, d_sae, architecture: the SAE.
        n_tokens: activations measured (positions whose token is not excluded, e.g. not padding).
        n_predictions: next-token predictions in the losses.
        mse: mean over tokens of the squared error summed over `d_in`, `||x - x_hat||^2` (sae-lens's
            convention; divide by `d_in` for the per-dimension MSE).
        explained_variance: `1 - E||x - x_hat||^2 / E||x - E[x]||^2` over all measured tokens
            (sae-lens's `explained_variance`).
        ce_loss_clean / ce_loss_spliced / ce_loss_zero: mean next-token cross-entropy (nats) of the
            model as is, with the SAE's reconstruction spliced in at the hook, and with the
            activation set to zero there.
        loss_recovered: `(zero - spliced) / (zero - clean)`: 1 when splicing the SAE in costs
            nothing, 0 when it is as bad as deleting the activation (sae-lens's `ce_loss_score`).
        l0: mean number of active features per token.
        dead_fraction: share of the `d_sae` features that never fire on these tokens.
        provenance: model, hook, SAE, versions.
    """

    hook_name: str
    d_in: int
    d_sae: int
    architecture: str
    n_tokens: int
    n_predictions: int
    mse: float
    explained_variance: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero: float
    loss_recovered: float
    l0: float
    dead_fraction: float
    provenance: dict = field(default_factory=dict)
    KIND = "SaeMetrics"

    _FIELDS = (
        "hook_name",
        "d_in",
        "d_sae",
        "architecture",
        "n_tokens",
        "n_predictions",
        "mse",
        "explained_variance",
        "ce_loss_clean",
        "ce_loss_spliced",
        "ce_loss_zero",
        "loss_recovered",
        "l0",
        "dead_fraction",
    )

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **{k: getattr(self, k) for k in self._FIELDS}, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> SaeMetrics:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(**{k: d[k] for k in cls._FIELDS}, provenance=d.get("provenance") or {})

    def table(self) -> str:
        """The metrics as a two-column Markdown table."""
        rows = [
            ("tokens measured", f"{self.n_tokens:,}"),
            ("MSE, mean over tokens of ||x - x_hat||^2", f"{self.mse:.4g}"),
            ("explained variance", f"{self.explained_variance:.3f}"),
            ("L0 (active features per token)", f"{self.l0:.2f}"),
            ("dead features (never active here)", f"{self.dead_fraction:.1%} of {self.d_sae}"),
            ("next-token loss, clean", f"{self.ce_loss_clean:.4f}"),
            ("next-token loss, SAE spliced in", f"{self.ce_loss_spliced:.4f}"),
            ("next-token loss, activation zeroed", f"{self.ce_loss_zero:.4f}"),
            ("loss recovered", f"{self.loss_recovered:.3f}"),
        ]
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


@torch.no_grad()
def sae_metrics(
    model,
    sae,
    tokens: Tensor | list[str],
    *,
    loss_mask: Tensor | None = None,
    exclude_tokens: list[int] | None = None,
    batch_size: int = 64,
    check: bool = True,
) -> SaeMetrics:
    """Reconstruction, sparsity and spliced-in loss of `sae` on `model` over `tokens`.

    Args:
        tokens: `[batch, pos]` token ids, or documents (see `corpus_tokens`).
        loss_mask: `[batch, pos - 1]` bool: which next-token predictions count in the losses
            (prediction `t` is of `tokens[:, t + 1]`); default all whose target is not excluded.
        exclude_tokens: token ids whose positions are left out of everything (default: the pad
            token). Excluded positions still run through the model (they are right padding, so
            they do not change the other positions' activations).
        batch_size: rows per forward pass.
        check: run `check_sae` first.

    Returns:
        `SaeMetrics` (see its attributes for the definitions).

    >>> from lenslab import tasks
    >>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
    >>> tokens = tasks.induction(model, n=16, seq_len=16, seed=0).clean_tokens   # [16, 32]
    >>> m = sae_metrics(model, sae, tokens)
    >>> round(m.explained_variance, 2), round(m.loss_recovered, 2), m.l0
    (0.95, 1.0, 16.0)
    """
    if check:
        check_sae(model, sae)
    toks = corpus_tokens(model, tokens).to(_device(model))
    exclude = _exclude(model, exclude_tokens)
    keep = _keep(toks, exclude)
    pred = keep[:, 1:]
    if loss_mask is not None:
        if tuple(loss_mask.shape) != (toks.shape[0], toks.shape[1] - 1):
            raise LenslabError(
                f"loss_mask must be [batch, pos - 1] = {[toks.shape[0], toks.shape[1] - 1]}, got {list(loss_mask.shape)}"
            )
        pred = pred & loss_mask.to(pred.device).bool()
    if not keep.any() or not pred.any():
        raise LenslabError("no tokens left to measure: every position is excluded (padding?) or masked out")
    hook = sae.cfg.metadata.hook_name
    splice, zero = splice_hooks(sae), _zero_hooks(sae, hook)

    sum_x = None
    sum_sq = sq_err = 0.0
    n_tok = 0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    nll = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_pred = 0
    for i in range(0, toks.shape[0], batch_size):
        t, k, p = toks[i : i + batch_size], keep[i : i + batch_size], pred[i : i + batch_size]
        logits, cache = model.run_with_cache(t, names_filter=[hook])
        x, f, x_hat = _encode_decode(
            sae, _sae_input(sae, cache[hook][k]).to(sae.device, sae.dtype)
        )  # [n, d_in], [n, d_sae]
        x64, xh64 = x.double().cpu(), x_hat.double().cpu()
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        sum_sq += float(x64.pow(2).sum())
        sq_err += float((x64 - xh64).pow(2).sum())
        n_tok += x.shape[0]
        active = (f != 0).cpu()
        l0_sum += float(active.sum())
        fired |= active.any(0)
        nll["clean"] += _nll_sum(logits, t, p)
        nll["spliced"] += _nll_sum(model.run_with_hooks(t, fwd_hooks=splice), t, p)
        nll["zero"] += _nll_sum(model.run_with_hooks(t, fwd_hooks=zero), t, p)
        n_pred += int(p.sum())
    total_var = sum_sq / n_tok - float(sum_x.div(n_tok).pow(2).sum())
    mse = sq_err / n_tok
    clean, spliced, zero_l = (nll[k] / n_pred for k in ("clean", "spliced", "zero"))
    denom = zero_l - clean
    return SaeMetrics(
        hook_name=hook,
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        architecture=sae.cfg.architecture(),
        n_tokens=n_tok,
        n_predictions=n_pred,
        mse=mse,
        explained_variance=1.0 - mse / total_var if total_var > 1e-12 else float("nan"),
        ce_loss_clean=clean,
        ce_loss_spliced=spliced,
        ce_loss_zero=zero_l,
        loss_recovered=(zero_l - spliced) / denom if abs(denom) > 1e-12 else float("nan"),
        l0=l0_sum / n_tok,
        dead_fraction=float((~fired).float().mean()),
        provenance=provenance(
            model,
            method="sae_metrics",
            hook_name=hook,
            sae_model=sae.cfg.metadata.model_name,
            exclude_tokens=exclude,
            loss_mask=loss_mask is not None,
        ),
    )


def _nll_sum(logits: Tensor, tokens: Tensor, pred: Tensor) -> float:
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return float(nll[pred].double().sum())


# --- training ----------------------------------------------------------------------------------
def train_sae(
    model,
    hook: str,
    *,
    corpus: list[str] | Tensor,
    d_sae: int | None = None,
    training_tokens: int = 300_000,
    lr: float = 4e-3,
    k: int | None = None,
    l1: float | None = None,
    context_size: int | None = None,
    batch_size_tokens: int = 512,
    seed: int = 0,
    out_dir: str | Path | None = None,
    eval_corpus: list[str] | Tensor | None = None,
    threads: int | None = 1,
    card_extra: str = "",
):
    """Train an SAE on `model`'s activations at `hook` with sae-lens's trainer, fully offline.

    The corpus becomes token rows (`corpus_tokens`) in an in-memory `datasets.Dataset` that
    sae-lens's `LanguageModelSAETrainingRunner` reads with the already-loaded model; pad positions
    are excluded from training (`exclude_special_tokens`), wandb is off, and the run is
    deterministic for `seed` (the global torch RNG is forked and seeded). sae-lens shows a
    progress bar. Learning rate: linear warm-up over the first 5% of steps, constant, then linear
    decay to 0 over the last 20%.

    Args:
        model: a TransformerLens model (e.g. `lenslab.load_model("zoo/ioi-4l")`).
        hook: the hook point, e.g. `"blocks.2.hook_resid_post"`.
        corpus: documents (one row each) or a `[n, pos]` token tensor.
        d_sae: number of features (default: 4 x the hook's width).
        training_tokens: activations the SAE sees (the corpus is repeated when it is shorter).
        lr: Adam learning rate.
        k: TopK SAE with `k` active features per token (the default when `l1` is None: 16, at most `d_sae`).
        l1: a standard (ReLU + L1) SAE with this L1 coefficient instead.
        context_size: tokens per row (default: the longest document, at most `n_ctx`).
        batch_size_tokens: activations per optimiser step.
        seed: seeds SAE initialisation and the activation shuffling.
        out_dir: where to write sae-lens's folder (`cfg.json`, `sae_weights.safetensors`,
            `sparsity.safetensors`, `runner_cfg.json`) plus `card.md` and `metrics.json`.
        eval_corpus: rows for the card's metrics (default: the last 10% of the corpus's rows,
            which are then held out of training).
        threads: torch threads while training (None: leave as is).
        card_extra: Markdown appended to the card.

    Returns:
        The trained SAE, as loaded back from `out_dir` (a sae-lens inference `SAE`).

    >>> from lenslab import tasks
    >>> tokens = tasks.induction(model, n=64, seq_len=16, seed=0).clean_tokens
    >>> sae = train_sae(model, "blocks.0.hook_resid_post", corpus=tokens, d_sae=256,
    ...                 training_tokens=20_000, out_dir="my_sae")
    >>> sae.cfg.d_sae, sorted(p.name for p in Path("my_sae").iterdir())
    (256, ['card.md', 'cfg.json', 'metrics.json', 'runner_cfg.json', 'sae_weights.safetensors', 'sparsity.safetensors'])
    """
    if k is not None and l1 is not None:
        raise LenslabError("pass k= (TopK SAE) or l1= (standard L1 SAE), not both")
    hooks = list(model.hook_dict)
    if hook not in hooks:
        raise LenslabError(
            f"model {_model_name(model)!r} has no hook {hook!r}{did_you_mean(hook, hooks)}; "
            "hook names look like 'blocks.1.hook_resid_post'"
        )
    d_in = _hook_width(model, hook, None)
    if d_sae is None:
        d_sae = 4 * d_in
    if k is None and l1 is None:
        k = min(16, d_sae)
    for nm, v in (("d_sae", d_sae), ("training_tokens", training_tokens), ("batch_size_tokens", batch_size_tokens)):
        if not isinstance(v, int) or v < 1:
            raise LenslabError(f"{nm} must be a positive int, got {v!r}")
    if k is not None and not 1 <= k <= d_sae:
        raise LenslabError(f"k must be between 1 and d_sae={d_sae}, got {k}")
    if l1 is not None and l1 < 0:
        raise LenslabError(f"l1 must be >= 0, got {l1}")
    if not lr > 0:
        raise LenslabError(f"lr must be positive, got {lr}")
    if training_tokens < batch_size_tokens:
        raise LenslabError(
            f"training_tokens ({training_tokens}) must be at least batch_size_tokens ({batch_size_tokens})"
        )

    rows = corpus_tokens(model, corpus, context_size)
    if eval_corpus is None and rows.shape[0] >= 2:
        n_eval = max(1, rows.shape[0] // 10)
        rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    else:
        eval_rows = rows if eval_corpus is None else corpus_tokens(model, eval_corpus, rows.shape[1])
    ctx = int(rows.shape[1])
    exclude = _exclude(model, None)

    out = Path(out_dir) if out_dir is not None else None

    with _threads(threads), tempfile.TemporaryDirectory() as tmp:
        target = out if out is not None else Path(tmp) / "sae"
        t0 = time.time()
        _run_sae_lens(
            model,
            hook,
            rows,
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            l1=l1,
            lr=lr,
            ctx=ctx,
            training_tokens=training_tokens,
            batch_size_tokens=batch_size_tokens,
            seed=seed,
            exclude=exclude,
            out=target,
        )
        minutes = (time.time() - t0) / 60
        for name in (
            _CFG,
            "runner_cfg.json",
        ):  # sae-lens writes keys in set order: sort them, so a rebuild is byte-equal
            f = target / name
            if f.exists():
                d = json.loads(f.read_text())
                if "output_path" in d:
                    d["output_path"] = target.name  # not this machine's absolute path
                f.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        sae = _load_folder(target, str(_device(model)))
        if out is not None:
            metrics = sae_metrics(model, sae, eval_rows, check=False)
            _write_metrics_set(out / "metrics.json", {"all next-token predictions": metrics})
            settings = dict(
                d_sae=d_sae,
                k=k,
                l1=l1,
                lr=lr,
                training_tokens=training_tokens,
                batch_size_tokens=batch_size_tokens,
                context_size=ctx,
                seed=seed,
            )
            (out / "card.md").write_text(
                _card(
                    _model_name(model),
                    hook,
                    sae,
                    settings,
                    {"all next-token predictions": metrics},
                    corpus=f"{rows.shape[0]} rows of {ctx} tokens (metrics on {eval_rows.shape[0]} further rows)",
                    minutes=minutes,
                    extra=card_extra,
                )
            )
    return sae


def _run_sae_lens(
    model,
    hook,
    rows: Tensor,
    *,
    d_in,
    d_sae,
    k,
    l1,
    lr,
    ctx,
    training_tokens,
    batch_size_tokens,
    seed,
    exclude,
    out: Path,
) -> None:
    """sae-lens's `LanguageModelSAETrainingRunner` on `rows` (`[n, ctx]` token ids) in memory."""
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    steps = training_tokens // batch_size_tokens
    warm = steps // 20
    decay = steps // 5
    sae_cfg = (
        TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
        if k is not None
        else StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1, l1_warm_up_steps=warm)
    )
    # The mixing buffer holds n_batches_in_buffer * context_size activations and must hold at
    # least one training batch (sae-lens requires it): keep four.
    n_in_buffer = max(8, math.ceil(4 * batch_size_tokens / ctx))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=_model_name(model),
        hook_name=hook,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        prepend_bos=False,  # rows already start with <bos> where the model uses one
        n_batches_in_buffer=n_in_buffer,
        store_batch_size_prompts=min(16, rows.shape[0]),
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warm,
        lr_decay_steps=decay,
        dead_feature_window=max(50, min(1000, steps // 10)),
        feature_sampling_window=max(1, steps),
        exclude_special_tokens=list(exclude) or False,
        device=str(_device(model)),
        seed=seed,
        dtype="float32",
        model_from_pretrained_kwargs={},
        checkpoint_path=None,
        n_checkpoints=0,
        output_path=str(out),
        verbose=False,
    )
    cfg.logger.log_to_wandb = False
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), _quiet(), _keep_signal_handlers():
            torch.manual_seed(seed)
            runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
            runner.run()
    finally:
        model.train(was_training)


def _write_metrics_set(path: Path, metrics: dict[str, SaeMetrics]) -> None:
    out = {}
    for name, m in metrics.items():
        d = m.to_dict()
        d["provenance"] = {k: v for k, v in d["provenance"].items() if k != "time"}  # a rebuild writes the same file
        out[name] = d
    path.write_text(json.dumps(out, indent=1) + "\n")


def read_metrics(name: str | Path) -> dict[str, SaeMetrics]:
    """The metrics an SAE folder (or zoo SAE) was saved with (`metrics.json`): `{predictions: SaeMetrics}`,
    e.g. `{"all next-token predictions": ..., "objective: ...": ...}`; `{}` when it has none."""
    path = Path(name).expanduser()
    folder = path if path.is_dir() else zoo_sae_path(str(name))
    f = folder / "metrics.json"
    if not f.exists():
        return {}
    return {k: SaeMetrics.from_dict(v) for k, v in json.loads(f.read_text()).items()}


def _card(
    model_name: str,
    hook: str,
    sae,
    settings: dict,
    metrics: dict[str, SaeMetrics],
    *,
    corpus: str,
    minutes: float,
    extra: str = "",
    title: str | None = None,
    rebuild: str | None = None,
) -> str:
    import sae_lens

    arch = sae.cfg.architecture()
    kind = f"TopK (k={settings['k']})" if settings.get("k") is not None else f"standard ReLU + L1 (l1={settings['l1']})"
    first = next(iter(metrics.values()))
    losses = "\n".join(
        f"| {name} | {m.n_predictions:,} | {m.ce_loss_clean:.4f} | {m.ce_loss_spliced:.4f} | {m.ce_loss_zero:.4f} "
        f"| {m.loss_recovered:.3f} |"
        for name, m in metrics.items()
    )
    rebuild = rebuild or f"`lenslab sae train --model {model_name} --hook {hook} ...` with the settings above"
    return f"""# {title or f"SAE on {model_name} at {hook}"}

A {kind} sparse autoencoder (sae-lens architecture `{arch}`) reading `{hook}` of `{model_name}`:
`d_in={sae.cfg.d_in}`, `d_sae={sae.cfg.d_sae}` features. Trained with sae-lens {sae_lens.__version__}'s
`LanguageModelSAETrainingRunner` on token ids generated locally (an in-memory `datasets.Dataset`).
Load it with `lenslab.probes.sae.load_sae(...)` or `sae_lens.SAE.load_from_disk(folder)`.

## Training
- Corpus: {corpus}; padding excluded.
- {settings["training_tokens"]:,} activations, {settings["batch_size_tokens"]} per step, Adam lr {settings["lr"]}
  (warm-up 5%, constant, linear decay over the last 20%), context {settings["context_size"]}, seed {settings["seed"]}.
- {minutes:.1f} min on CPU. Rebuild: {rebuild}.

## Metrics
Measured by `lenslab.probes.sae.sae_metrics` on the saved weights ({first.n_tokens:,} activations;
`metrics.json` holds the same numbers).

| metric | value |
|---|---|
| MSE, mean over tokens of ‖x − x̂‖² | {first.mse:.4g} |
| explained variance | {first.explained_variance:.3f} |
| L0 (active features per token) | {first.l0:.2f} |
| dead features (never active on these tokens) | {first.dead_fraction:.1%} of {first.d_sae} |

Next-token loss (nats) with the SAE's reconstruction spliced in at `{hook}` and with the
activation zero-ablated there; loss recovered = (zero − spliced) / (zero − clean):

| predictions | count | clean | SAE spliced in | zero-ablated | loss recovered |
|---|---|---|---|---|---|
{losses}
{extra}"""


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _quiet():
    """Silence sae-lens's notices that do not apply here (overridden dataset/model, epochs, ...)."""
    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for msg in (
                "The training dataset contains fewer",
                "All samples in the training dataset",
                "To copy construct from a tensor",
                "pretokenized dataset has context_size",
                "This SAE has non-empty model_from_pretrained_kwargs",
            ):
                warnings.filterwarnings("ignore", message=msg)
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _keep_signal_handlers():
    """sae-lens's runner installs SIGINT/SIGTERM handlers for checkpointing; put ours back after."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
