"""Page "Scale & norms": the activation-maxima atlas of the sidebar model on the sidebar prompts
(max |a| per hook and layer, the top entries, the INT8 check), compared across zoo models, the
five-parameter fit of a massive-activation trajectory over training, and the LN-free papers' claims
on a zoo model and its norm-free twin. Numerics live in `lenslab.probes.atlas`,
`lenslab.probes.trajectory` and `lenslab.zoo.noln`."""

from __future__ import annotations

import warnings

import streamlit as st

import lenslab
from lenslab import zoo
from lenslab.app import _shell
from lenslab.probes import atlas, trajectory
from lenslab.zoo import checkpoints, noln

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Scale & norms · {name}")
prompts = [p for p in ctx.prompt.splitlines() if p.strip()]
atlas_tab, fit_tab, noln_tab = st.tabs(["Activation atlas", "Trajectory fit", "LN-free vs original"])

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


def fit_and_keep(fit, *args, **kwargs) -> None:
    """Run a trajectory fit; keep it and its `FitWarning`s (a fit that did not converge) for the fit view."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", trajectory.FitWarning)
        ss["fit_res"] = _shell.call("Fitting", fit, *args, **kwargs)
    ss["fit_warnings"] = [str(w.message) for w in caught if issubclass(w.category, trajectory.FitWarning)]


with fit_tab:
    st.caption(
        "Fit the five-parameter exponentially-modulated logarithmic function of \u201cHidden Dynamics of Massive "
        "Activations in Transformer Training\u201d to a quantity measured at training checkpoints (e.g. the top "
        "massive-activation magnitude): paste or upload step,value rows."
    )
    series_names = checkpoints.series_names()
    with st.expander("Measure a checkpoint series", expanded=bool(series_names)):
        st.caption(
            "The top massive-activation |a| and the attention-sink rate at every checkpoint of a series (a folder "
            "of step{N}/ checkpoints, or one the zoo ships), on the sidebar prompts, then the fit of the top |a|."
        )
        pick = st.selectbox("Series", [*series_names, "a folder…"], key="traj_series")
        folder = st.text_input("Folder of step{N}/ checkpoints", key="traj_folder") if pick == "a folder…" else pick
        if st.button("Measure", key="traj_go", disabled=not folder):
            path = _shell.call("Finding the series", checkpoints.series_path, folder)
            series = path and _shell.call(
                "Measuring every checkpoint", trajectory.measure_checkpoints, path, prompts, device="cpu"
            )
            ss["traj_series_res"] = series
            if series and len(series.steps) >= trajectory.MIN_POINTS:
                fit_and_keep(series.fit)
            elif series:
                st.info(f"{len(series.steps)} checkpoints: the five-parameter fit needs {trajectory.MIN_POINTS}.")
        series = ss.get("traj_series_res")
        if series:
            st.plotly_chart(series.figure(), key="traj_fig")
            st.dataframe(series.table(), hide_index=True)
            _shell.downloads(series, "checkpoint_series")
    up = st.file_uploader("CSV of step,value rows", type=["csv", "txt"], key="fit_upload")
    text = st.text_area("… or paste them", key="fit_text", height=150)
    source = up.getvalue().decode() if up else text
    if st.button("Fit", type="primary", key="fit_go", disabled=not source.strip()):
        series = _shell.call("Reading the series", trajectory.read_series, source, up.name if up else "the pasted rows")
        if series:
            steps, values, header = series
            fit_and_keep(trajectory.fit_trajectory, steps, values, label=header or "value")
    fit = ss.get("fit_res")
    if fit:
        for w in ss.get("fit_warnings", []):
            st.warning(w)
        st.plotly_chart(fit.figure(), key="fit_fig")
        st.dataframe(fit.table(), hide_index=True)
        _shell.downloads(fit, "trajectory_fit")

with noln_tab:
    st.caption(
        "The claims of \u201cTransformers Don't Need LayerNorm at Inference Time\u201d on a zoo model and its twin "
        "with every norm removed by fine-tuning: (a) DLA equals the exact direct effect (path patching into the "
        "logits) without norms, not with them; (b) AtP vs exact patching; (c) the planted mechanism still works."
    )
    pairs = [n for n in zoo.zoo_names() if noln.twin_of(n)]
    if not pairs:
        st.info("No zoo model has a norm-free twin here: build one with `lenslab zoo train steer-sentiment-noln`.")
    else:
        here = next((p for p in pairs if name in (p, noln.twin_of(p))), pairs[0])
        parent = st.selectbox("Model with norms", pairs, index=pairs.index(here), key="noln_parent")
        twin = noln.twin_of(parent)
        if st.button("Measure again", key="noln_go"):
            ss[f"noln_{parent}"] = _shell.call(f"Measuring {parent} and {twin}", noln.claims, parent, twin)
        claims = ss.get(f"noln_{parent}") or noln.stored_claims(parent)
        if claims:
            st.caption(
                f"Task of (a) and (b): {claims.task}; "
                + ("measured now." if ss.get(f"noln_{parent}") else f"as measured when {twin} was built (its card).")
            )
            st.dataframe(claims.table(), hide_index=True)
            st.plotly_chart(claims.figure(), key="noln_fig")
            _shell.downloads(claims, f"ln_free_{parent.removeprefix(zoo.PREFIX)}")
        else:
            st.info(f"{twin} has no stored table: press \u201cMeasure again\u201d.")
