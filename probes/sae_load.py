"""Loading and checking SAEs: one entry point for zoo SAEs, folders saved by sae-lens and sae-lens releases.

- `load_sae`: a sae-lens release + SAE id (real `SAE.from_pretrained`: works online or from the
  local Hugging Face cache), a folder saved by sae-lens, or a zoo SAE
  (`"zoo/ioi-4l/blocks.2.hook_resid_post"`); with `model=`, `check_sae` runs first.
- `check_sae`: the SAE's hook point exists in the model and `d_in` equals that hook's width.
- `list_saes` / `read_sae_card` / `zoo_sae_path`: the zoo's shipped SAEs (`lenslab/zoo/<model>/saes/<hook>/`).
- `model_name`, `model_device`, `hook_width`, `load_folder`, `quiet_sae_lens`: the pieces training
  (`lenslab.probes.sae_train`) and the zoo recipes (`lenslab.zoo.train_saes`) share with loading.

Everything here is re-exported by `lenslab.probes.sae`, the public face of the SAE modules.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.toolbox import model_device, model_name

__all__ = [
    "CFG_FILE",
    "SAES_DIR",
    "check_sae",
    "hook_width",
    "list_saes",
    "load_folder",
    "load_sae",
    "quiet_sae_lens",
    "read_sae_card",
    "zoo_sae_path",
]

SAES_DIR = "saes"  # zoo SAEs live in lenslab/zoo/<model>/saes/<hook name>/
CFG_FILE = "cfg.json"  # sae-lens's config file name in a saved SAE folder


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
            sae = load_folder(zoo_sae_path(text), device)
        elif path.is_dir():
            sae = load_folder(path, device)
        elif isinstance(source, Path) or text.startswith(("/", "./", "../", "~")):
            raise LenslabError(
                f"SAE folder {text!r} does not exist; pass a folder saved by sae-lens (it holds {CFG_FILE})"
            )
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


def load_folder(folder: Path, device: str):
    """The SAE in `folder` (saved by sae-lens: it holds `cfg.json`) via `SAE.load_from_disk`, on `device`."""
    from sae_lens import SAE  # deferred: sae-lens pulls in transformers and datasets; loaded on first SAE use

    if not (folder / CFG_FILE).exists():
        raise LenslabError(
            f"{folder} has no {CFG_FILE}: not a folder saved by sae-lens (save one with `sae.save_model(dir)` or "
            "`lenslab sae train ... --out DIR`)"
        )
    try:
        with quiet_sae_lens():
            return SAE.load_from_disk(str(folder), device=device)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise LenslabError(f"could not load the SAE in {folder}: {exc}") from exc


def _releases() -> list[str]:
    from sae_lens.loading.pretrained_saes_directory import (  # deferred: sae-lens is heavy, loaded on first SAE use
        get_pretrained_saes_directory,
    )

    return list(get_pretrained_saes_directory())


def _load_pretrained(release: str, sae_id: str, device: str):
    from sae_lens import SAE  # deferred: sae-lens is heavy, loaded on first SAE use
    from sae_lens.loading.pretrained_saes_directory import (  # deferred: as above
        get_pretrained_saes_directory,
    )

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
        with quiet_sae_lens():
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
    if not (folder / CFG_FILE).exists():
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
    return sorted(f"{zoo.PREFIX}{short}/{p.parent.name}" for p in root.glob(f"*/{CFG_FILE}"))


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
    name = model_name(model)
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
    width = hook_width(model, hook, sae.cfg.metadata.hook_head_index)
    if width != sae.cfg.d_in:
        raise LenslabError(
            f"the SAE expects d_in={sae.cfg.d_in} at {hook!r}{origin}, but model {name!r} has width {width} there "
            f"(d_model={getattr(model.cfg, 'd_model', '?')}); the SAE belongs to another model: load one trained on "
            f"{name!r} or train one with `lenslab sae train --model {name} --hook {hook} --out DIR`"
        )


@torch.no_grad()
def hook_width(model, hook: str, head_index: int | None) -> int:
    """Width of one token's activation at `hook` (the hook's `[batch, pos, ...]` activation flattened
    over the dimensions after `pos`, e.g. `n_heads * d_head` for `hook_z`; one head's `d_head` when
    `head_index` is set), from a forward pass on a `[1, 2]` token batch."""
    tok = getattr(model, "tokenizer", None)
    first = getattr(tok, "bos_token_id", None) if tok is not None else None
    tokens = torch.tensor([[first if first is not None else 0, 0]], device=model_device(model))
    from sae_lens.util import (  # deferred: sae-lens is heavy, loaded on first SAE use
        extract_stop_at_layer_from_tlens_hook_name,
    )

    kwargs = {}
    stop = extract_stop_at_layer_from_tlens_hook_name(hook)  # blocks.L.* -> L + 1: no need to run further
    if stop is not None and type(model).__name__ == "HookedTransformer":
        kwargs["stop_at_layer"] = stop
    _, cache = model.run_with_cache(tokens, names_filter=[hook], **kwargs)
    act = cache[hook]
    if head_index is not None:
        return int(act.shape[-1])
    return int(math.prod(act.shape[2:]))


# --- sae-lens's notices ------------------------------------------------------------------------
@contextmanager
def quiet_sae_lens():
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
