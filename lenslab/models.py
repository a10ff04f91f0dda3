"""Model loading: one entry point, `load_model`, for zoo models, local checkpoints and HF ids.

Every model comes back as a TransformerLens model with TransformerLens hook names
(`blocks.3.attn.hook_z`, `run_with_cache`, `run_with_hooks`): a `HookedTransformer` where
TransformerLens supports the architecture, a `TransformerBridge` where only the bridge does
(e.g. OLMoE, Qwen-MoE). See docs/design.md for why and how the two are handled together.

Hub models load at a revision too (`load_model("EleutherAI/pythia-70m", revision="step1000")`,
or by name, `"EleutherAI/pythia-70m@step1000"`), and checkpoints in the published LN-free format
(`apollo-research/gpt2_noLN`, `schaeff/gpt2-*_LNFree*`) come back without norms (docs/norms.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lenslab import _hf, _offload, zoo
from lenslab._device import resolve_device, resolve_dtype
from lenslab._errors import LenslabError
from lenslab.toolbox import name_model

checkpoint_revision = _hf.checkpoint_revision  # the hub revision of a checkpoint index or step (Pythia: step1000)


@dataclass(frozen=True)
class ModelInfo:
    """A model `load_model` can open right now."""

    name: str
    source: str  # "zoo", "local" or "hf-cache"
    summary: str = ""


def load_model(
    name: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    revision: str | None = None,
    checkpoint_index: int | None = None,
    checkpoint_value: int | None = None,
):
    """Load a model by name as a TransformerLens model, in eval mode.

    Args:
        name: a zoo model (`"zoo/induction-2l"`), a Hugging Face id (`"gpt2"`,
            `"EleutherAI/pythia-70m"`, `"allenai/OLMoE-1B-7B-0924"`; needs the network or the
            local HF cache) or a local directory holding an HF config and safetensors (or a
            lenslab zoo-format folder). `"<hub id>@<revision>"` names a revision of a hub model.
            A checkpoint in the published LN-free format (every norm's epsilon 1e12:
            `apollo-research/gpt2_noLN`, `schaeff/gpt2-small_LNFree300`, ...) comes back as a
            `HookedTransformer` without norms (`cfg.normalization_type` None), its neutralised
            norms folded into the weights (docs/norms.md).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", ...
        dtype: None (float32), "float32", "float16", "bfloat16" or a torch dtype.
        device_map: split a Hugging Face model across devices (docs/devices.md): "auto" (or
            "balanced", "sequential") lets accelerate place the layers, a dict names a device
            per module (`{"model.embed_tokens": 0, "model.layers": 1, ...}`, values a GPU
            index, "cuda:N", "cpu" or "disk"). The model comes back as a `TransformerBridge`.
            Leave `device` at "auto". Zoo models do not take one.
        max_memory: accelerate's budget per device, e.g. `{0: "20GiB", "cpu": "60GiB"}`; what
            does not fit goes to the next device, then to disk.
        offload_folder: where weights placed on "disk" are kept (needed when any are).
        revision: a branch, tag or commit of a Hugging Face hub model (Pythia's training
            checkpoints: "step0" ... "step143000"); downloaded when online, else read from the
            cache. Not for zoo models or local folders.
        checkpoint_index, checkpoint_value: a training checkpoint by position in the model's
            checkpoint list or by step, as TransformerLens's `from_pretrained` takes them
            (Pythia, Stanford CRFM GPT-2); they name the revision (`checkpoint_revision`).

    Returns:
        A `HookedTransformer` (or `TransformerBridge`) whose `model.cfg.model_name` is `name`
        (read it with `lenslab.model_name(model)`), `"<name>@<revision>"` for a revision.

    >>> model = load_model("zoo/induction-2l", device="cpu")
    >>> model.cfg.n_layers
    2
    """
    if not isinstance(name, str) or not name.strip():
        names = zoo.zoo_names()
        hint = f"; try {names[0]!r}" if names else ""
        raise LenslabError(f"model name must be a non-empty string, got {name!r}{hint}")
    name = name.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    _offload.check_placement(device_map, max_memory, offload_folder)
    placement = None if device_map is None else (device_map, max_memory, offload_folder)
    if placement is not None and device not in ("auto", None):
        raise LenslabError(f"pass either device={device!r} or device_map, not both: device_map places every module")
    pinned = revision is not None or checkpoint_index is not None or checkpoint_value is not None
    if pinned and (name.startswith(zoo.PREFIX) or Path(name).expanduser().exists()):
        kind = "a zoo model" if name.startswith(zoo.PREFIX) else "a local folder"
        raise LenslabError(
            f"revision/checkpoint_index/checkpoint_value select a revision of a Hugging Face hub model, but {name!r} "
            f"is {kind}: load each checkpoint's folder by its path (trajectory.measure_checkpoints takes a folder of them)"
        )
    if name.startswith(zoo.PREFIX):
        model = _load_folder(zoo.zoo_path(name), dev, dt, placement)
    elif Path(name).expanduser().is_dir():
        model = _load_folder(Path(name).expanduser(), dev, dt, placement)
    elif Path(name).expanduser().is_file():
        raise LenslabError(f"{name!r} is a file, not a model directory; pass the folder that holds config.json")
    elif name.startswith(("/", "./", "../", "~")):
        raise LenslabError(f"local model directory {name!r} does not exist; check the path")
    else:
        repo, rev = _split_revision(name, revision, checkpoint_index, checkpoint_value)
        model = _hf.load_hf_id(repo, dev, dt, placement, revision=rev)
        name = repo if rev is None else f"{repo}@{rev}"
    name_model(model, name)
    model.lenslab_name = name  # deprecated alias of model.cfg.model_name, kept for one release; lenslab never reads it
    return model


def _split_revision(
    name: str, revision: str | None, checkpoint_index: int | None, checkpoint_value: int | None
) -> tuple[str, str | None]:
    """(hub id, revision or None) from `"id@revision"` and the keyword arguments; one source only."""
    repo, at, in_name = name.partition("@")
    if at and not (repo and in_name):
        raise LenslabError(
            f"{name!r}: write a revision as '<hub id>@<revision>', e.g. 'EleutherAI/pythia-70m@step1000'"
        )
    given = {
        k: v
        for k, v in [
            ("@revision in the name", in_name or None),
            ("revision", revision),
            ("checkpoint_index", checkpoint_index),
            ("checkpoint_value", checkpoint_value),
        ]
        if v is not None
    }
    if len(given) > 1:
        raise LenslabError(f"{name!r}: give one of {', '.join(given)}, not several (they all pick the revision)")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise LenslabError(f"revision must be a branch, tag or commit name, got {revision!r}")
    if checkpoint_index is not None or checkpoint_value is not None:
        return repo, _hf.checkpoint_revision(repo, index=checkpoint_index, value=checkpoint_value)
    rev = in_name or revision
    return repo, None if rev is None else rev.strip()


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, placement: tuple | None = None):
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise LenslabError(
            f"{folder} has no config.json: a local model directory needs a Hugging Face config and "
            "safetensors weights (save one with `model.save_pretrained(dir)`)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("lenslab_format") == "hooked_transformer":
        if placement is not None:
            raise LenslabError(
                f"{str(folder)!r} is a zoo (HookedTransformer) model: device_map applies to Hugging Face checkpoints "
                "only; zoo models are small, so load them on one device with device='cuda' or 'cpu'"
            )
        return zoo.load_hooked(folder, device, dtype)

    return _hf.load_hf_dir(folder, device, dtype, placement)


def list_models() -> list[ModelInfo]:
    """Zoo models and Hugging Face models already in the local cache (usable offline)."""
    out = [ModelInfo(e.name, "zoo", e.summary) for e in zoo.zoo_entries()]

    out += [ModelInfo(n, "hf-cache") for n in _hf.cached_model_ids()]
    return out
