"""Attribution graphs over many prompts: one `attribution_graph` per prompt, as shards of a job.

A graph depends on its own prompt only (its forward, its frozen replacement and its backward
passes run on that prompt alone), so `attribution_graphs(model, prompts, transcoders)` gives,
prompt by prompt, the graph `attribution_graph(model, prompt, transcoders)` gives, bit for bit,
wherever each prompt runs: in this process (the default), or on a Ray cluster
(`cluster="local" | "auto" | "host:port"`, `lenslab.jobs.run_job`), where each worker holds one
copy of the model and of the transcoders (shipped once through Ray's object store). With
`resume=folder` each finished graph is kept there as it arrives, and a rerun with the same folder
computes only the missing ones.

>>> import lenslab
>>> from lenslab import labels
>>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
>>> prompts = ["When Mary and John went to the store, John gave a drink to",
...            "When Tom and Anna went to the park, Anna gave a ball to"]
>>> graphs = attribution_graphs(model, prompts, "zoo/ioi-4l/per-layer", max_feature_nodes=8, progress=False)
>>> [model.to_string([labels.parse(g.nodes[-1]).index]) for g in graphs]   # each graph's logit target: the IO name
['Mary', 'Tom']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.jobs import Shard, run_job, share_model, worker_model
from lenslab.probes.attribution_graph import AttributionGraph, attribution_graph, resolve_transcoders
from lenslab.toolbox import model_name

__all__ = ["attribution_graphs"]


def _graph_work(payload: dict) -> AttributionGraph:
    """A job's work function: the graph of one prompt, with the worker's model and transcoders."""
    model = worker_model(payload["model"])
    tc = worker_model(payload["transcoders"]) if payload["transcoders"] is not None else None
    return attribution_graph(model, payload["prompt"], tc, **payload["kwargs"])


def _prompt_key(prompt) -> str | list[int]:
    return prompt if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(-1).tolist()


def _fingerprint(model, prompts: list, transcoders, tc, kwargs: dict) -> str:
    """What a resume folder must match: the model's name, the prompts, the transcoders (their
    name, or their weights) and the graph options."""
    h = hashlib.sha1()
    h.update(model_name(model).encode())
    h.update(json.dumps([_prompt_key(p) for p in prompts]).encode())
    if isinstance(transcoders, (str, Path)):
        h.update(str(transcoders).encode())
    elif tc is not None:
        for name, t in sorted(tc.state_dict().items()):
            h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(sorted(kwargs.items(), key=lambda kv: kv[0])).encode())
    return h.hexdigest()


def attribution_graphs(
    model,
    prompts: Sequence[str | Sequence[int] | Tensor],
    transcoders,
    *,
    cluster: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    **graph_kwargs,
) -> list[AttributionGraph]:
    """The attribution graph of every prompt: `[attribution_graph(model, p, transcoders, **graph_kwargs) for p in prompts]`,
    one shard per prompt.

    Args:
        model: a lenslab model.
        prompts: strings or rows of token ids (one graph each, in this order).
        transcoders: a `TranscoderSet`, a `CrossLayerTranscoder`, a name for `load_transcoders`
            (loaded here, once), or None for an attention-only model.
        cluster: None (this process, one prompt after another), "local", "auto" or a Ray address.
        resume: a folder that keeps finished graphs; a rerun with the same folder (same model
            name, prompts, transcoders and options) computes only the rest.
        progress: one bar counting graphs across workers.
        graph_kwargs: `attribution_graph`'s options (`targets`, `max_feature_nodes`,
            `max_n_logits`, `desired_logit_prob`, `batch_size`, `rule`), the same for every prompt.

    Returns:
        One `AttributionGraph` per prompt, in prompt order.
    """
    if isinstance(prompts, (str, Tensor)) and not (isinstance(prompts, Tensor) and prompts.ndim == 2):
        raise LenslabError(
            "prompts must be a list of prompts (strings or token-id rows); for one prompt use attribution_graph"
        )
    prompts = list(prompts)
    if not prompts:
        raise LenslabError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if p is None or (isinstance(p, str) and not p.strip()):
            raise LenslabError(f"prompt {i} is empty: give a string or a row of token ids")
    if "prompt" in graph_kwargs:
        raise LenslabError("pass the prompts as the second argument, not prompt=")
    tc = resolve_transcoders(model, transcoders)
    fp = _fingerprint(model, prompts, transcoders, tc, graph_kwargs)
    handle = share_model(model, cluster)
    tc_handle = share_model(tc, cluster) if tc is not None else None
    width = len(str(len(prompts) - 1))
    shards = [
        Shard(
            key=f"prompt{i:0{width}d}",
            payload={"model": handle, "transcoders": tc_handle, "prompt": p, "kwargs": dict(graph_kwargs)},
        )
        for i, p in enumerate(prompts)
    ]
    return run_job(
        _graph_work, shards, cluster=cluster, resume=resume, desc="graphs", progress=progress, fingerprint=fp
    )
