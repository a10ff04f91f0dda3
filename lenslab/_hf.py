"""Hugging Face loading (hub ids and local checkpoints) into TransformerLens models.

Placeholder: filled in by the HF-loading work (HookedTransformer where TransformerLens
supports the architecture, TransformerBridge otherwise).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lenslab._errors import LenslabError


def load_hf_id(name: str, device: torch.device, dtype: torch.dtype):
    raise LenslabError(f"loading Hugging Face model {name!r} is not implemented yet")


def load_hf_dir(folder: Path, device: torch.device, dtype: torch.dtype):
    raise LenslabError(f"loading local Hugging Face checkpoint {folder} is not implemented yet")


def cached_model_ids() -> list[str]:
    """Model ids present in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache dir yet, or an unreadable one
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")
