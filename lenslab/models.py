"""Model loading: one entry point, `load_model`, for zoo models, local checkpoints and HF ids.

Every model comes back as a TransformerLens model with TransformerLens hook names
(`blocks.3.attn.hook_z`, `run_with_cache`, `run_with_hooks`): a `HookedTransformer` where
TransformerLens supports the architecture, a `TransformerBridge` where only the bridge does
(e.g. OLMoE, Qwen-MoE). See docs/design.md for why and how the two are handled together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lenslab import _hf, zoo
from lenslab._device import resolve_device, resolve_dtype
from lenslab._errors import LenslabError
from lenslab.toolbox import name_model


@dataclass(frozen=True)
class ModelInfo:
    """A model `load_model` can open right now."""

    name: str
    source: str  # "zoo", "local" or "hf-cache"
    summary: str = ""


def load_model(name: str, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None):
    """Load a model by name as a TransformerLens model, in eval mode.

    Args:
        name: a zoo model (`"zoo/induction-2l"`), a Hugging Face id (`"gpt2"`,
            `"EleutherAI/pythia-70m"`, `"allenai/OLMoE-1B-7B-0924"`; needs the network or the
            local HF cache) or a local directory holding an HF config and safetensors (or a
            lenslab zoo-format folder).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", ...
        dtype: None (float32), "float32", "float16", "bfloat16" or a torch dtype.

    Returns:
        A `HookedTransformer` (or `TransformerBridge`) whose `model.cfg.model_name` is `name`
        (read it with `lenslab.model_name(model)`).

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
    if name.startswith(zoo.PREFIX):
        model = _load_folder(zoo.zoo_path(name), dev, dt)
    elif Path(name).expanduser().is_dir():
        model = _load_folder(Path(name).expanduser(), dev, dt)
    elif Path(name).expanduser().is_file():
        raise LenslabError(f"{name!r} is a file, not a model directory; pass the folder that holds config.json")
    elif name.startswith(("/", "./", "../", "~")):
        raise LenslabError(f"local model directory {name!r} does not exist; check the path")
    else:
        model = _hf.load_hf_id(name, dev, dt)
    name_model(model, name)
    model.lenslab_name = name  # deprecated alias of model.cfg.model_name, kept for one release; lenslab never reads it
    return model


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype):
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise LenslabError(
            f"{folder} has no config.json: a local model directory needs a Hugging Face config and "
            "safetensors weights (save one with `model.save_pretrained(dir)`)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("lenslab_format") == "hooked_transformer":
        return zoo.load_hooked(folder, device, dtype)

    return _hf.load_hf_dir(folder, device, dtype)


def list_models() -> list[ModelInfo]:
    """Zoo models and Hugging Face models already in the local cache (usable offline)."""
    out = [ModelInfo(e.name, "zoo", e.summary) for e in zoo.zoo_entries()]

    out += [ModelInfo(n, "hf-cache") for n in _hf.cached_model_ids()]
    return out
