"""Page "Scale & norms": the activation-maxima atlas of the sidebar model on the sidebar prompts
(max |a| per hook and layer, the top entries, the INT8 check), compared across zoo models, and the
five-parameter fit of a massive-activation trajectory over training. Numerics live in
`lenslab.probes.atlas` and `lenslab.probes.trajectory`."""

from __future__ import annotations

import warnings

import streamlit as st

import lenslab
from lenslab import zoo
from lenslab.app import _shell
from lenslab.probes import atlas, trajectory

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Scale & norms · {name}")
prompts = [p for p in ctx.prompt.splitlines() if p.strip()]
atlas_tab, fit_tab = st.tabs(["Activation atlas", "Trajectory fit"])

with atlas_tab:
    st.caption(
        "The same hooks on every model (embeddings, residual stream, attention and MLP/MoE outputs, gates, "
        "final norm): the largest |a| and where it occurs, its ratio to the median, and the per-tensor absmax "
        "INT8 error (\u201cMeasuring Maximum Activations in Open LLMs\u201d). Prompts: the sidebar's, one per line."
    )
    view = st.radio("View", ["layers", "top", "int8"], horizontal=True, key="atlas_view")
    res = _shell.call("Activation atlas", atlas.activation_atlas, model, prompts)
    if res:
        top = _shell.call("Global maximum", res.global_max)
        c = res.correlation or {}
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        if top:
            st.caption(
                f"Global max |a| {top['max_abs']:.4g} at {top['hook']}; max |a| vs INT8 error across "
                f"{c.get('n_hooks', 0)} hooks: Pearson {fmt(c.get('pearson'))}, Spearman {fmt(c.get('spearman'))}"
            )
        st.plotly_chart(res.figure(view=view), key="atlas_fig")
        st.dataframe(res.table(), hide_index=True, height=300)
        _shell.downloads(res, "atlas")
        others = st.multiselect(
            "Compare with (each on its own default prompt)",
            [m for m in zoo.zoo_names() if m != name],
            key="atlas_compare",
        )
        if others:
            results = [res]
            for other in others:
                m = _shell.call(f"Loading {other}", lenslab.load_model, other, device="cpu")
                r = m and _shell.call(
                    f"Atlas of {other}", atlas.activation_atlas, m, [zoo.default_prompts(other).prompt]
                )
                if r:
                    results.append(r)
            fig = _shell.call("Comparing", atlas.AtlasResult.compare, results, relative_depth=True)
            if fig:
                st.plotly_chart(fig, key="atlas_compare_fig")

with fit_tab:
    st.caption(
        "Fit the five-parameter exponentially-modulated logarithmic function of \u201cHidden Dynamics of Massive "
        "Activations in Transformer Training\u201d to a quantity measured at training checkpoints (e.g. the top "
        "massive-activation magnitude): paste or upload step,value rows."
    )
    up = st.file_uploader("CSV of step,value rows", type=["csv", "txt"], key="fit_upload")
    text = st.text_area("… or paste them", key="fit_text", height=150)
    source = up.getvalue().decode() if up else text
    if st.button("Fit", type="primary", key="fit_go", disabled=not source.strip()):
        series = _shell.call("Reading the series", trajectory.read_series, source, up.name if up else "the pasted rows")
        if series:
            steps, values, header = series
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", trajectory.FitWarning)
                ss["fit_res"] = _shell.call(
                    "Fitting", trajectory.fit_trajectory, steps, values, label=header or "value"
                )
            ss["fit_warnings"] = [str(w.message) for w in caught if issubclass(w.category, trajectory.FitWarning)]
    fit = ss.get("fit_res")
    if fit:
        for w in ss.get("fit_warnings", []):
            st.warning(w)
        st.plotly_chart(fit.figure(), key="fit_fig")
        st.dataframe(fit.table(), hide_index=True)
        _shell.downloads(fit, "trajectory_fit")
