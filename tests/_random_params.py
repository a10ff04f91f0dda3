"""Seeded random values for the parameters that initialisation leaves constant.

TransformerLens and Hugging Face start every bias (b_Q ... b_out, b_U, LayerNorm b, q/k/v biases)
at 0 and every LayerNorm/RMSNorm weight at 1 (Gemma's offset-style norm weight at 0). A test model
left like that cannot tell a conversion or an engine that drops one of them from a correct one
(so each test model randomises them). `randomize_params` gives each such constant parameter `value + std * N(0, 1)` from a
seeded generator: biases ~ N(0, std), norm weights ~ 1 + N(0, std). std 0.2 keeps every norm
weight positive (5 sigma) and the numerics well conditioned while each bias moves activations by
far more than any comparison tolerance. Parameters that are already random (weight matrices,
embeddings, router weights) are left as they are, so the model keeps its usual scale.

Loaded by tests/conftest.py (fixture `randomize_params`) and, by path, by subprocess scripts.
"""

from __future__ import annotations

import torch


def randomize_params(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> list[str]:
    """Randomise, in place, every constant parameter of `module`; returns their names (for checks)."""
    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.detach().flatten()
            if flat.numel() == 0 or not bool((flat == flat[0]).all()):
                continue  # already random
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            p.add_(noise.to(device=p.device, dtype=p.dtype))
            changed.append(name)
    return changed
