"""lenslab.steering: interventions as data, applied through TransformerLens hooks.

`Intervention` (a list of `Edit`s) is what every steering method returns; `apply` steers a
model inside a `with` block (`hooks` gives the TransformerLens hooks, `validate` checks the edits); `save` / `load` read and write JSON presets with tensors in a
safetensors file beside them. Baselines: `mean_difference` (DiffMean / CAA) and `actadd`;
`austeer` steers a few atomic units multiplicatively (`austeer_scores` gives its score table);
`fit_lineas` trains per-unit affine maps at many hooks end to end (LinEAS, `LineasConfig`).
`switch_experts` switches MoE experts off or forces them on (MoTE, `lenslab.steering.experts`;
`hf_hooks` does it for a plain `transformers` model). `ablate_feature`, `clamp_feature` and
`add_feature` steer one SAE feature (`lenslab.steering.features`); `node_intervention` ablates,
clamps or steers the transcoder features of attribution-graph nodes (a supernode: several at
once) and `intervention_effect` gives the logits before and after (`lenslab.steering.graph_interventions`). `probe_steering` and
`probe_intervention` steer along a linear probe's direction, or project it out
(`lenslab.steering.probe_steering`, probes from `lenslab.probes.linear`).

>>> import lenslab
>>> from lenslab import steering
>>> from lenslab.data import sentiment
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
>>> iv = steering.mean_difference(model, pos, neg, layers=1)
>>> prompt = "the day was awful . the movie was"
>>> steering.generate(model, prompt, max_new_tokens=3), steering.generate(model, prompt, iv, max_new_tokens=3)
(' bitter. the', ' warm. the')
>>> with steering.apply(model, iv):
...     logits = model(prompt)   # steered
>>> logits.shape
torch.Size([1, 9, 86])
"""

from __future__ import annotations

if __name__ != "lenslab.steering":  # imported as top-level `steering`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `steering`, or a clear error
else:
    from lenslab.sites import SITES
    from lenslab.steering.austeer import AU_SITES, TIE_BREAKS, austeer, austeer_scores, select_units, tie_report
    from lenslab.steering.baselines import actadd, hook_name, mean_activations, mean_difference
    from lenslab.steering.edit_hooks import apply, hooks, validate
    from lenslab.steering.experts import hf_hooks, reroute, switch_experts
    from lenslab.steering.features import ablate_feature, add_feature, clamp_feature
    from lenslab.steering.generate import generate, stream
    from lenslab.steering.graph_interventions import intervention_effect, node_intervention
    from lenslab.steering.intervention import (
        EXPERT_OPS,
        FEATURE_KINDS,
        OPS,
        POSITION_WORDS,
        UNIT_OPS,
        Edit,
        FeatureRead,
        Intervention,
        compose,
        load,
        save,
    )
    from lenslab.steering.lineas import (
        LineasConfig,
        default_hooks,
        fit_lineas,
        lineas_loss,
        proximal_step,
        support,
        wasserstein_1d,
    )
    from lenslab.steering.probe_steering import probe_intervention, probe_steering

    __all__ = [
        "AU_SITES",
        "EXPERT_OPS",
        "FEATURE_KINDS",
        "OPS",
        "POSITION_WORDS",
        "SITES",
        "UNIT_OPS",
        "Edit",
        "FeatureRead",
        "Intervention",
        "ablate_feature",
        "actadd",
        "add_feature",
        "apply",
        "austeer",
        "austeer_scores",
        "clamp_feature",
        "compose",
        "generate",
        "hf_hooks",
        "hook_name",
        "hooks",
        "intervention_effect",
        "load",
        "mean_activations",
        "mean_difference",
        "node_intervention",
        "probe_intervention",
        "probe_steering",
        "reroute",
        "save",
        "select_units",
        "stream",
        "switch_experts",
        "tie_report",
        "validate",
        "TIE_BREAKS",
        "LineasConfig",
        "default_hooks",
        "fit_lineas",
        "lineas_loss",
        "proximal_step",
        "support",
        "wasserstein_1d",
    ]
