"""Checkpoints of a zoo training run on a log-spaced schedule (`lenslab zoo train NAME --checkpoints DIR`).

The zoo's training scripts take `checkpoints=DIR`: the weights after `N` optimiser steps are
written to `DIR/step{N}/` (the zoo format, `zoo.save_hooked`, with `"step": N` in config.json) at
every `N` of `log_spaced_steps(steps, n)`, step 0 (the initialisation) and the last step included.
`lenslab.probes.trajectory.measure_checkpoints(DIR, prompts)` reads such a folder back.

The schedule is log-spaced throughout, like Pythia's early checkpoints (0, 1, 2, 4, ..., 512):
a small run has no long linear tail worth sampling evenly, and the quantities followed over
training (massive activations, sinks) move fastest early. At the low end, where a geometric grid
would round two points to one step, the next integer is taken instead, so the early steps are
consecutive (0, 1, 2, 3, 5, 8, ...) and there are always exactly `n` distinct steps.

Saving reads the weights and writes files only: it consumes no random numbers and changes no
tensor, so a run with checkpoints ends with the same weights as one without
(`tests/test_zoo_checkpoints.py` checks it on a short run).

>>> log_spaced_steps(1600, 16)
[0, 1, 2, 3, 5, 8, 14, 24, 41, 69, 117, 197, 333, 562, 948, 1600]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenslab._errors import LenslabError

__all__ = ["DEFAULT_N", "CheckpointSaver", "log_spaced_steps", "series_names", "series_path"]

DEFAULT_N = 16
"""Checkpoints a zoo training run saves by default (`--checkpoints DIR`)."""


def log_spaced_steps(total_steps: int, n: int = DEFAULT_N) -> list[int]:
    """`n` distinct integer steps from 0 to `total_steps`, log-spaced (0, 1, then a geometric
    grid to `total_steps`, each next step at least one after the last); all of `0..total_steps`
    when `n > total_steps`.

    Each step after 1 is the previous one times `(total_steps / previous) ** (1 / remaining)`,
    rounded, with `remaining` the points still to place: the geometric ratio of what is left,
    so the grid ends exactly on `total_steps`.
    """
    for name, v in (("total_steps", total_steps), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LenslabError(f"{name} must be an integer, got {v!r}")
    if total_steps < 1:
        raise LenslabError(f"total_steps must be at least 1, got {total_steps}")
    if n < 2:
        raise LenslabError(f"n must be at least 2 (step 0 and the last step), got {n}")
    if n > total_steps:
        return list(range(total_steps + 1))
    if n == 2:
        return [0, total_steps]
    out = [0, 1]
    while len(out) < n:
        left = n - len(out)  # points still to place, the last of them `total_steps`
        prev = out[-1]
        nxt = round(prev * (total_steps / prev) ** (1.0 / left))
        out.append(min(max(nxt, prev + 1), total_steps - left + 1))
    return out


@dataclass
class CheckpointSaver:
    """Save a training run's weights at the steps of a schedule (`save(model, step)` in the loop).

    Attributes:
        folder: where `step{N}/` folders go; None saves nothing (every call is a no-op).
        steps: the steps to save at (`log_spaced_steps(total, n)`).
        tokenizer: saved beside every checkpoint (`zoo.save_hooked`).
        summary: the checkpoints' `lenslab_summary` (their card says which step they are).
        extra: more config.json keys for every checkpoint (`"step"` is added).
        weights_dtype: how the weights are stored (float16 halves a series).
        prepare: a function of the model returning what to save (e.g. a copy with training-only
            parameters folded in); it must not change the model it is given.
    """

    folder: Path | None
    steps: list[int]
    tokenizer: object
    summary: str
    extra: dict = field(default_factory=dict)
    weights_dtype: torch.dtype = torch.float32
    prepare: Callable | None = None
    saved: list[Path] = field(default_factory=list)

    @classmethod
    def for_run(
        cls, folder, total_steps: int, tokenizer, summary: str, n: int = DEFAULT_N, **kwargs
    ) -> CheckpointSaver:
        """A saver of `n` log-spaced checkpoints over `total_steps` into `folder` (None: none)."""
        return cls(
            folder=None if folder is None else Path(folder),
            steps=log_spaced_steps(total_steps, n),
            tokenizer=tokenizer,
            summary=summary,
            **kwargs,
        )

    def __call__(self, model, step: int) -> Path | None:
        """Save `model` as `folder/step{step}/` when `step` (optimiser steps taken so far) is on
        the schedule; returns the folder written, else None."""
        from lenslab.zoo import save_hooked  # deferred: lenslab.zoo imports nothing of this module at load

        if self.folder is None or step not in self.steps:
            return None
        out = self.folder / f"step{step}"
        target = self.prepare(model) if self.prepare is not None else model
        card = (
            f"# {self.summary}: checkpoint at step {step}\n\nThe weights after {step} optimiser steps "
            f"(one of {len(self.steps)} log-spaced checkpoints, lenslab.zoo.checkpoints).\n"
        )
        with torch.no_grad():
            save_hooked(
                target,
                self.tokenizer,
                out,
                summary=f"{self.summary} (step {step})",
                card=card,
                extra={**self.extra, "step": step},
                weights_dtype=self.weights_dtype,
            )
        self.saved.append(out)
        return out


# --- the zoo's committed checkpoint series ----------------------------------------------------------
def _is_series(folder: Path) -> bool:
    return any((p / "config.json").is_file() for p in folder.glob("step*"))


def series_names() -> list[str]:
    """The zoo's checkpoint series: folders under `lenslab/zoo/` (at most two levels down) whose
    `step{N}/` sub-folders are checkpoints, as names `series_path` takes (e.g. 'zoo/norm-study/pre-2l')."""
    from lenslab.zoo import PREFIX, ZOO_DIR  # deferred: lenslab.zoo imports nothing of this module at load

    found = [p for pattern in ("*", "*/*") for p in ZOO_DIR.glob(pattern) if p.is_dir() and _is_series(p)]
    return sorted(PREFIX + p.relative_to(ZOO_DIR).as_posix() for p in found)


def series_path(name: str | Path) -> Path:
    """The folder of a checkpoint series: a zoo series name ('zoo/norm-study/pre-2l', `series_names`)
    or a folder of `step{N}/` checkpoints."""
    from lenslab.zoo import PREFIX, ZOO_DIR  # deferred: lenslab.zoo imports nothing of this module at load

    text = str(name)
    if text.startswith(PREFIX):
        folder = ZOO_DIR / text.removeprefix(PREFIX)
        if not folder.is_dir() or not _is_series(folder):
            raise LenslabError(
                f"zoo checkpoint series {text!r} does not exist; the zoo has: {', '.join(series_names()) or '(none)'}"
            )
        return folder
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise LenslabError(
            f"checkpoint folder {text!r} does not exist; pass a folder of step{{N}}/ checkpoints "
            f"or a zoo series ({', '.join(series_names()) or 'none committed'})"
        )
    return folder
