"""Results: `Result`, the contract every analysis's return value keeps, and `PatchResult`.

One `to_json` / `from_json` / `table` / `figure` for every analysis, so the app, the CLI and the
notebooks render and export the same way; `provenance` builds the record each result carries.
`PatchResult` is what patching and attribution return: scores with named axes and labels.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import lenslab
from lenslab import figures
from lenslab._errors import LenslabError
from lenslab.toolbox import model_name


def provenance(model, task=None, *, timestamp: bool = True, **extra) -> dict:
    """Model name, versions, the time (unless `timestamp=False`: records two equal runs must
    share, such as an `Intervention`'s) and the task, plus `extra`, for a result's record."""
    import transformer_lens  # deferred: transformer_lens loads only when a model is built

    out = {
        "model": model_name(model),
        "lenslab_version": lenslab.__version__,
        "torch_version": torch.__version__,
        "transformer_lens_version": getattr(transformer_lens, "__version__", "unknown"),
    }
    if timestamp:
        out["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if task is not None:
        out["task"] = task.name
        out["task_batch"] = task.batch
        out["task_seq_len"] = task.seq_len
        if task.clean_prompts:
            out["clean_prompts"] = list(task.clean_prompts)
            out["corrupt_prompts"] = list(task.corrupt_prompts or [])
        out["clean_tokens"] = task.clean_tokens.tolist()
        out["corrupt_tokens"] = task.corrupt_tokens.tolist()
        out["answer_tokens"] = task.answer_tokens.tolist()
    out.update(extra)
    return out


class Result:
    """What every lenslab analysis returns: data with provenance, one contract for all of them.

    A subclass sets `KIND` (its JSON tag) and provides `to_dict()` (JSON-able, with
    `"kind": KIND`), `from_dict(d)`, `table()` (a pandas DataFrame, one row per entry) and
    `figure()` (a plotly Figure). From these it gets `to_json` / `from_json`, `to_markdown` and
    export through `lenslab.figures.export` (JSON, SVG, PNG, PDF, HTML). Tensors are stored as
    nested lists (results are small). `RESULT_KINDS` maps each `KIND` to its class.
    """

    KIND = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("KIND"):
            RESULT_KINDS[cls.KIND] = cls

    def to_dict(self) -> dict:
        """The result as JSON-able data, with `"kind": KIND`."""
        raise NotImplementedError(f"{type(self).__name__} must define to_dict()")

    @classmethod
    def from_dict(cls, d: dict):
        """The result `to_dict` wrote."""
        raise NotImplementedError(f"{cls.__name__} must define from_dict()")

    def table(self):
        """The result as a pandas DataFrame, one row per entry."""
        raise NotImplementedError(f"{type(self).__name__} must define table()")

    def figure(self):
        """The result drawn as a plotly Figure."""
        raise NotImplementedError(f"{type(self).__name__} must define figure()")

    def to_markdown(self, digits: int = 4) -> str:
        """`table()` as a Markdown table, floats to `digits` significant digits."""
        return markdown_table(self.table(), digits)

    def to_dataframe(self):
        """Deprecated: use `table()`, which every result has."""
        warnings.warn(
            f"{type(self).__name__}.to_dataframe() is deprecated; use .table()", DeprecationWarning, stacklevel=2
        )
        return self.table()

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Read a result from JSON text or a .json file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls.from_dict(d)


RESULT_KINDS: dict[str, type[Result]] = {}
JsonResult = Result  # the former name of the base class


def markdown_table(df, digits: int = 4) -> str:
    """A pandas DataFrame as a Markdown table; floats to `digits` significant digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


@dataclass(frozen=True, kw_only=True, eq=False)
class PatchResult(Result):
    """Scores of one site under one method.

    Attributes:
        scores: float tensor, one axis per name in `axes` (e.g. `[layer, pos]`, `[layer, head]`,
            `[layer, pos, head]`); for exact patching, the metric of the patched run.
        axes: axis names, e.g. ("layer", "pos").
        labels: for each axis, one label per index (token strings for `pos`, "L3H1"-style heads...).
        site: the site name (e.g. "resid_pre", "z", "z_by_pos").
        method: "exact", "atp", "atp*", "relp", "ig", ...
        metric: the metric's name.
        direction: "denoise" (clean patched into corrupt) or "noise" (corrupt into clean).
        clean_value / corrupt_value: the metric on the unpatched clean and corrupt runs.
        provenance: model, task, versions, time (see `provenance`).
    """

    scores: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    site: str
    method: str
    metric: str
    direction: str = "denoise"
    clean_value: float | None = None
    corrupt_value: float | None = None
    provenance: dict = field(default_factory=dict)
    KIND = "PatchResult"

    def __post_init__(self) -> None:
        if self.scores.ndim != len(self.axes):
            raise LenslabError(f"scores have {self.scores.ndim} axes but {len(self.axes)} names {self.axes}")
        for i, ax in enumerate(self.axes):
            if ax in self.labels and len(self.labels[ax]) != self.scores.shape[i]:
                raise LenslabError(f"axis {ax!r} has {self.scores.shape[i]} entries but {len(self.labels[ax])} labels")

    @property
    def baseline(self) -> float | None:
        """The unpatched value of the run being patched (corrupt for denoise, clean for noise)."""
        return self.corrupt_value if self.direction == "denoise" else self.clean_value

    def normalized(self) -> Tensor:
        """Scores rescaled so the corrupt run is 0 and the clean run is 1."""
        if self.clean_value is None or self.corrupt_value is None or self.clean_value == self.corrupt_value:
            raise LenslabError("normalized() needs distinct clean and corrupt metric values")
        return (self.scores - self.corrupt_value) / (self.clean_value - self.corrupt_value)

    def to_dict(self) -> dict:
        return {
            "kind": "PatchResult",
            "scores": self.scores.detach().cpu().float().tolist(),
            "shape": list(self.scores.shape),
            "axes": list(self.axes),
            "labels": self.labels,
            "site": self.site,
            "method": self.method,
            "metric": self.metric,
            "direction": self.direction,
            "clean_value": self.clean_value,
            "corrupt_value": self.corrupt_value,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PatchResult:
        if d.get("kind") != "PatchResult":
            raise LenslabError(f"not a PatchResult JSON (kind={d.get('kind')!r})")
        scores = torch.tensor(d["scores"], dtype=torch.float32).reshape(d["shape"])
        return cls(
            scores=scores,
            axes=tuple(d["axes"]),
            labels={k: list(v) for k, v in d["labels"].items()},
            site=d["site"],
            method=d["method"],
            metric=d["metric"],
            direction=d.get("direction", "denoise"),
            clean_value=d.get("clean_value"),
            corrupt_value=d.get("corrupt_value"),
            provenance=d.get("provenance") or {},
        )

    def table(self):
        """Long format: one row per cell, a column per axis (index and label) and `score`."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        idx = (
            torch.cartesian_prod(*[torch.arange(n) for n in self.scores.shape])
            if self.scores.ndim > 1
            else torch.arange(self.scores.shape[0])[:, None]
        )
        rows = {}
        for i, ax in enumerate(self.axes):
            col = idx[:, i].tolist()
            rows[ax] = col
            if ax in self.labels:
                rows[f"{ax}_label"] = [self.labels[ax][j] for j in col]
        rows["score"] = self.scores.detach().cpu().float().flatten().tolist()
        return pd.DataFrame(rows)

    def title(self) -> str:
        p = self.provenance
        return (
            f"{self.method} patching: {self.site} ({self.direction}) · model {p.get('model', '?')} · "
            f"task {p.get('task', '?')} · metric {self.metric}"
        )

    def figure(self, normalize: bool = False):
        """A plotly heatmap (colour scale centred at the unpatched baseline, or at 0 for attributions)."""

        return figures.result_heatmap(self, normalize=normalize)
