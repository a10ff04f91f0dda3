"""What every area asks of a model: its name and device, checked layer lists, prompts batched by
token length, and a progress reporter.

One home for these, so that circuits, probes, steering and the engine agree on them (the same
error text for a layer out of range, the same name in every provenance record).

>>> import lenslab
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> model_name(model), model_device(model).type, check_layers(model, None)
('zoo/induction-2l', 'cpu', [0, 1])
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenslab._errors import LenslabError

__all__ = [
    "by_length",
    "check_layers",
    "check_prompts",
    "hook_unit_sizes",
    "length_batches",
    "model_device",
    "model_name",
    "name_model",
    "progress_reporter",
]


def name_model(model, name: str):
    """Record `name` (what `load_model` was given) as the model's name, on `model.cfg.model_name`.

    The name travels with the config (copies and pickles keep it); provenance records and figure
    titles read it back with `model_name`. Returns `model`.
    """
    model.cfg.model_name = str(name)
    return model


def model_name(model) -> str:
    """The name a model was loaded by (`"zoo/ioi-4l"`, `"gpt2"`, a folder), else `"model"`."""
    return str(getattr(getattr(model, "cfg", None), "model_name", None) or "model")


def model_device(model) -> torch.device:
    """Where the model's inputs go: the device of its first parameter (CPU for a model without
    parameters), or, for a model split across devices (`load_model(..., device_map=...)`), the
    execution device of its input embedding, which `cfg.device` holds (its weights may be
    offloaded, that is on 'meta'). Outputs come back there too."""
    if getattr(model, "lenslab_device_map", None):
        return torch.device(model.cfg.device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def check_layers(model, layers: int | Sequence[int] | None) -> list[int]:
    """`layers` as a list of valid layer indices, in the order given; None means every layer.

    Raises:
        LenslabError: for an empty list, a non-integer or an index outside `0..n_layers-1`.
    """
    n = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n))
    ls = [layers] if isinstance(layers, int) else list(layers)
    if not ls:
        raise LenslabError("layers is empty; pass one layer index or a list")
    for layer in ls:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise LenslabError(f"layer {layer!r} is out of range: the model has {n} layers (layers 0..{n - 1})")
    return [int(layer) for layer in ls]


def by_length(seqs: Sequence[Tensor]) -> dict[int, list[int]]:
    """Indices of `seqs` (token rows `[pos]`) grouped by length; groups in first-seen order.

    Rows of one length stack into a `[batch, pos]` batch with no padding, so no attention mask.
    """
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(seqs):
        groups.setdefault(int(t.shape[0]), []).append(i)
    return groups


def length_batches(seqs: Sequence[Tensor], batch_size: int | None = None) -> Iterator[list[int]]:
    """Chunks of indices into `seqs`, each of one length and at most `batch_size` long (None: no cap)."""
    for members in by_length(seqs).values():
        step = batch_size or len(members)
        for start in range(0, len(members), step):
            yield members[start : start + step]


def progress_reporter(progress: bool | Callable[[int, int], None], total: int, desc: str) -> Callable[..., None]:
    """A reporter for `total` steps: `report()` after each step, `report(close=True)` at the end.

    `progress=True` draws a tqdm bar, a callable receives `(done, total)`, False reports nothing.
    """
    bar = tqdm(total=total, desc=desc, leave=False) if progress is True else None
    done = [0]

    def report(close: bool = False) -> None:
        if close:
            if bar is not None:
                bar.close()
            return
        done[0] += 1
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(done[0], total)

    return report


_UNIT_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_unit_sizes(model, hooks: Sequence[str]) -> dict[str, int]:
    """Size of each hook's unit axis: its activation's dimensions after `[batch, pos]`, flattened
    (`[head, d_head]` counts `n_heads * d_head`). Read once per model from a 2-token `run_with_cache`.

    Raises:
        LenslabError: for a hook that does not fire, or one without a position axis.
    """
    cache = _UNIT_SIZES.setdefault(model, {})
    missing = [h for h in hooks if h not in cache]
    if missing:
        toks = torch.zeros((1, 2), dtype=torch.long, device=model_device(model))
        with torch.no_grad():
            _, acts = model.run_with_cache(toks, names_filter=lambda n: n in missing)
        for h in missing:
            if h not in acts:
                raise LenslabError(f"hook {h!r} did not fire on a forward pass of this model; pick another hook")
            a = acts[h]
            if a.ndim < 3 or a.shape[1] != 2:
                raise LenslabError(
                    f"hook {h!r} has shape {tuple(a.shape)}, not [batch, pos, ...]; steering edits need a hook "
                    "whose second axis is the position (e.g. hook_resid_post, attn.hook_z, mlp.hook_post)"
                )
            cache[h] = math.prod(a.shape[2:])
    return {h: cache[h] for h in hooks}


def check_prompts(prompts: str | Sequence[str], what: str) -> list[str]:
    """`prompts` (one string or a sequence) as a list; a `LenslabError` naming `what` when it is
    empty or holds an empty or non-string entry."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ps = list(prompts)
    if not ps or any(not isinstance(p, str) or not p for p in ps):
        raise LenslabError(f"{what} must be a non-empty list of non-empty strings")
    return ps


@contextmanager
def torch_threads(n: int | None):
    """Run the block with at most `n` torch threads (None: unchanged), restoring the count after:
    training on one thread is bit-reproducible on a machine and often faster on a busy one."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, min(int(n), old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def save_spec(path: str | Path, spec: dict, tensors: dict[str, Tensor], what: str) -> Path:
    """Write `spec` to `path` (.json) and `tensors` to `<stem>.safetensors` beside it (named in the
    JSON as "tensors"); returns the JSON path. `what` names the thing in errors ("preset", "probe")."""
    from safetensors.torch import save_file  # deferred: safetensors loads only when a file is read or written

    path = Path(path)
    if path.suffix != ".json":
        raise LenslabError(f"{what} path {str(path)!r} must end in .json (its tensors go in a .safetensors beside it)")
    tpath = path.with_suffix(".safetensors")
    spec = {**spec, "tensors": tpath.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tpath))
    return path


def load_spec(
    path: str | Path, what: str, hint: str, *, tensors_required: bool = True
) -> tuple[dict, dict[str, Tensor]]:
    """Read what `save_spec` wrote: `(spec, tensors)` (never pickle). A missing file says `hint`
    (how to make one); the tensors file must sit beside the JSON (optional when not
    `tensors_required` and the JSON names none)."""
    from safetensors.torch import load_file  # deferred: safetensors loads only when a file is read or written

    path = Path(path)
    if not path.is_file():
        raise LenslabError(f"{what} {str(path)!r} does not exist; {hint}")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LenslabError(f"{what} {str(path)!r} is not valid JSON ({err}); re-save it") from None
    tname = spec.get("tensors")
    if not tname and not tensors_required:
        return spec, {}
    tpath = path.parent / str(tname)
    if not tname or not tpath.is_file():
        raise LenslabError(
            f"{what} {path.name} needs {tname or '<stem>.safetensors'} beside it, which is missing; copy both files"
        )
    return spec, load_file(str(tpath))
