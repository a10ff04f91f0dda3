"""Feature dashboards for transcoder features: a transcoder layer seen as a sae-lens SAE, so the
feature store and dashboards of `lenslab.probes.features` work on it unchanged.

- `transcoder_as_sae(tc, layer)`: a sae-lens SAE whose encoder is exactly that layer's transcoder
  encoder (same input hook, `W_enc`, `b_enc`, activation) and whose decoder is the transcoder's
  decoder into that layer's MLP output (so a dashboard's logit panel is `W_dec[f] @ W_U`, the
  direct logit effect of what the feature writes).
- `feature_node_dashboard(model, tc, node_label)`: the `FeatureDashboard` of an attribution-graph
  feature node (`L2F195@3`), indexing the node's layer over a corpus once per process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lenslab import labels
from lenslab._errors import LenslabError
from lenslab.probes import features as F
from lenslab.probes import transcoders as T
from lenslab.probes.features.plumbing import check_feature
from lenslab.toolbox import model_name

__all__ = ["feature_node_dashboard", "transcoder_as_sae"]

_STORES: dict[tuple, Path] = {}  # (model, transcoders, layer, n_docs) -> a store folder, in this process
_TMP: list[tempfile.TemporaryDirectory] = []  # the folders behind _STORES, removed at exit


def _parts(tc, layer: int) -> tuple:
    """`(W_enc [d_tc, d_model], b_enc [d_tc], W_dec [d_tc, d_model], b_dec [d_model], threshold | None,
    activation, k)` of one layer."""
    if isinstance(tc, T.CrossLayerTranscoder):
        thr = tc.threshold[layer] if tc.threshold is not None else None
        return tc.W_enc[layer], tc.b_enc[layer], tc.W_dec[layer][:, 0], tc.b_dec[layer], thr, tc.activation, tc.k
    one = tc[layer]
    return one.W_enc, one.b_enc, one.W_dec, one.b_dec, one.threshold, one.activation, one.k


@torch.no_grad()
def transcoder_as_sae(tc, layer: int):
    """A sae-lens SAE reading `tc`'s input hook at `layer` whose `encode(x)` is the transcoder's
    features of `x [..., d_model]` -> `[..., d_transcoder]` (TopK -> `TopKSAE` with the same k,
    JumpReLU -> `JumpReLUSAE` with the same thresholds, ReLU -> `StandardSAE`; no input centring).

    `W_dec [d_transcoder, d_model]` is the decoder into this layer's MLP output (`b_dec` its bias);
    for a `CrossLayerTranscoder` it is the decoder of layer `layer`'s features into its own layer
    (`W_dec[layer][:, 0]`), not their writes to later layers. A skip connection is left out: it is
    not a feature's. `tc`: a `TranscoderSet` or `CrossLayerTranscoder` (`load_transcoders`).
    """
    from sae_lens import (  # deferred: sae-lens is heavy, loaded on first SAE use
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata  # deferred: as above

    if not isinstance(tc, (T.TranscoderSet, T.CrossLayerTranscoder)):
        raise LenslabError(
            f"tc must be a TranscoderSet or CrossLayerTranscoder (lenslab.probes.transcoders.load_transcoders), "
            f"got {type(tc).__name__}"
        )
    if isinstance(layer, bool) or int(layer) != layer or int(layer) not in tc.layers:
        raise LenslabError(f"these transcoders cover layers {tc.layers}, not layer {layer!r}")
    layer = int(layer)
    w_enc, b_enc, w_dec, b_dec, thr, activation, k = _parts(tc, layer)
    d_tc, d_model = w_enc.shape
    meta = SAEMetadata(hook_name=tc.input_hook.format(l=layer), model_name=getattr(tc, "model_name", "") or None)
    common = dict(d_in=int(d_model), d_sae=int(d_tc), apply_b_dec_to_input=False, metadata=meta)
    if activation == "topk":
        sae = TopKSAE(TopKSAEConfig(k=int(k), **common))
    elif activation == "jumprelu":
        if (thr < 0).any():  # sae-lens's JumpReLU is relu(pre) * (pre > t); the transcoder's is pre * (pre > t)
            raise LenslabError(
                f"layer {layer}'s JumpReLU thresholds include negative values: sae-lens's JumpReLUSAE would "
                "zero the negative activations the transcoder keeps; clamp the thresholds at 0 to use it"
            )
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        sae = StandardSAE(StandardSAEConfig(**common))
    sae.W_enc.copy_(w_enc.T.float())
    sae.b_enc.copy_(b_enc.float())
    sae.W_dec.copy_(w_dec.float())
    sae.b_dec.copy_(b_dec.float())
    if thr is not None:
        sae.threshold.copy_(thr.float())
    sae.eval()
    return sae


def _tc_name(tc) -> str:
    return str(getattr(tc, "lenslab_source", None) or f"{type(tc).__name__}-{id(tc)}")


def feature_node_dashboard(
    model, tc, node_label: str, corpus=None, n_docs: int = 64, *, n_contexts: int = 10
) -> F.FeatureDashboard:
    """The `FeatureDashboard` of an attribution-graph feature node (`"L2F195@3"`: layer 2's transcoder
    feature 195) over `corpus` (default: `features.corpus_for(model, n_docs)`).

    `tc`: a zoo name (`"zoo/ioi-4l/per-layer"`) or loaded transcoders. The node's layer is indexed
    once (`features.index` with `transcoder_as_sae`) into a temporary store kept for this process,
    per (model, transcoders, layer, `n_docs`); later nodes of that layer reuse it. A `corpus` of the
    caller's (texts or a `[n, pos]` token tensor) is indexed afresh each call, into a folder removed after.
    """
    source = tc if isinstance(tc, str) else None
    if source is not None:
        tc = T.load_transcoders(source, model=model)
        tc.lenslab_source = source
    node = labels.parse(str(node_label))
    if node.kind != "feature":
        raise LenslabError(
            f"node {node_label!r} is a {node.kind} node: only feature nodes (like 'L2F195@3') have a feature dashboard"
        )
    sae = transcoder_as_sae(tc, node.layer)
    check_feature(node.index, int(sae.cfg.d_sae))
    if corpus is not None:  # a corpus of the caller's: indexed afresh into a folder removed after
        with tempfile.TemporaryDirectory(prefix="lenslab-tc-features-") as tmp:
            path = Path(tmp) / f"layer{node.layer}.store"
            F.index(model, sae, corpus, path, sae_source=f"{_tc_name(tc)}@L{node.layer}", progress=False).close()
            return F.FeatureDashboard.from_store(path, node.index, model, sae, n_contexts=n_contexts)
    key = (model_name(model), _tc_name(tc), node.layer, int(n_docs))
    path = _STORES.get(key)
    if path is None or not F.is_store(path):
        tmp = tempfile.TemporaryDirectory(prefix="lenslab-tc-features-")
        _TMP.append(tmp)
        path = Path(tmp.name) / f"layer{node.layer}.store"
        docs = F.corpus_for(model, int(n_docs))
        F.index(model, sae, docs, path, sae_source=f"{_tc_name(tc)}@L{node.layer}", progress=False).close()
        _STORES[key] = path
    return F.FeatureDashboard.from_store(path, node.index, model, sae, n_contexts=n_contexts)
