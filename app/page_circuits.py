"""Page "Circuits": exact activation patching, attribution (AtP, AtP*, RelP, IG), faithfulness and
circuit graphs on a task, with every figure and JSON downloadable. Numerics live in
`lenslab.circuits`, tasks in `lenslab.tasks`, export in `lenslab.figures`."""

from __future__ import annotations

import streamlit as st

from lenslab import circuits, tasks, zoo
from lenslab.app import _shell

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Circuits · {name}")

# --- the task --------------------------------------------------------------------------------
with st.expander("Task", expanded=True):
    kind = st.radio("Prompts", ["Built-in task", "My own prompts"], horizontal=True, key="circ_task_kind")
    if kind == "Built-in task":
        c1, c2, c3 = st.columns(3)
        spec = c1.selectbox(
            "Task",
            list(tasks.BUILTIN_TASKS),
            key="circ_task_spec",
            index=tasks.BUILTIN_TASKS.index(zoo.default_prompts(name).task),
        )
        n = c2.number_input("Prompts", 1, 256, 8, key="circ_n")
        seed = c3.number_input("Seed", 0, 10_000, 0, key="circ_seed")
        task = _shell.call("Building the task", tasks.from_spec, model, spec, n=int(n), seed=int(seed))
    else:
        d = zoo.default_prompts(name)  # a clean/corrupt pair and answers in the model's own vocabulary
        c1, c2 = st.columns(2)
        clean = c1.text_area("Clean prompts (one per line)", key="circ_clean", value=d.clean)
        corrupt = c2.text_area("Corrupt prompts (one per line, same token length)", key="circ_corrupt", value=d.corrupt)
        answers = st.text_input(
            "Answers: correct,incorrect per prompt, separated by ';'",
            key="circ_answers",
            value=f"{d.answer},{d.wrong}",
            help="A leading space is part of the token for BPE models (e.g. ' tree, ship'); it is kept.",
        )
        # leading spaces are kept: " tree" and "tree" are different tokens of a BPE vocabulary
        pairs = [tuple(a.lstrip("\n\r\t").rstrip() for a in p.split(",")) for p in answers.split(";") if p.strip()]
        task = _shell.call(
            "Building the task",
            tasks.from_prompts,
            model,
            [l for l in clean.splitlines() if l.strip()],
            [l for l in corrupt.splitlines() if l.strip()],
            pairs,
        )
    metric = st.selectbox("Metric", list(tasks.METRICS), key="circ_metric")
if not task:
    st.stop()
st.caption(f"Task **{task.name}**: {task.batch} prompts × {task.seq_len} tokens.")


sites = list(circuits.SITES)
tab_patch, tab_attr, tab_faith, tab_graph = st.tabs(["Exact patching", "Attribution", "Faithfulness", "Circuit graph"])

with tab_patch:
    c1, c2, c3 = st.columns(3)
    site = c1.selectbox(
        "Site", sites, key="patch_site", help="; ".join(f"{s.name}: {s.description}" for s in circuits.SITES.values())
    )
    direction = c2.radio("Direction", list(circuits.DIRECTIONS), horizontal=True, key="patch_dir")
    layer = (
        c3.number_input("MLP layer (mlp_neuron)", 0, model.cfg.n_layers - 1, 0, key="patch_layer")
        if site == "mlp_neuron"
        else None
    )
    if st.button("Run exact patching", type="primary", key="run_patch"):
        bar, cb = _shell.progress_bar(f"Patching {site}")
        ss["patch_result"] = _shell.call(
            "Exact patching",
            circuits.patch,
            model,
            task,
            site,
            direction=direction,
            metric=metric,
            layer=None if layer is None else int(layer),
            progress=cb,
        )
        bar.empty()
    res = ss.get("patch_result")
    if res:
        norm = st.toggle(
            "Normalise (corrupt = 0, clean = 1)", key="patch_norm", disabled=res.clean_value == res.corrupt_value
        )
        st.plotly_chart(res.figure(normalize=norm), key="patch_fig")
        st.caption(f"clean {res.metric} = {res.clean_value:.4g} · corrupt = {res.corrupt_value:.4g}")
        _shell.downloads(res, f"patch_{res.site}")

with tab_attr:
    c1, c2 = st.columns(2)
    methods = c1.multiselect("Methods", list(circuits.METHODS), default=["atp", "relp"], key="attr_methods")
    asites = c2.multiselect("Sites", sites, default=["resid_pre", "attn_out"], key="attr_sites")
    steps = st.slider("IG steps", 2, 50, 10, key="attr_steps")
    if st.button("Run attribution", type="primary", key="run_attr"):
        ss["attr_results"] = {
            m: _shell.call(
                f"{m} attribution",
                circuits.attribute,
                model,
                task,
                m,
                asites,
                metric=metric,
                steps=steps,
                progress=False,
            )
            for m in methods
        }
    for m, per_site in (ss.get("attr_results") or {}).items():
        if not per_site:
            continue
        st.subheader(m)
        for s, r in per_site.items():
            st.plotly_chart(r.figure(), key=f"attr_fig_{m}_{s}")
            _shell.downloads(r, f"{m.replace('*', 'star')}_{s}")

with tab_faith:
    c1, c2 = st.columns(2)
    fmethods = c1.multiselect("Methods", list(circuits.METHODS), default=["atp", "relp"], key="faith_methods")
    fsites = c2.multiselect("Sites", sites, default=["resid_pre", "attn_out"], key="faith_sites")
    if st.button("Compare with exact patching", type="primary", key="run_faith"):
        bar, cb = _shell.progress_bar("Exact patching and attribution")
        ss["faith_result"] = _shell.call(
            "Faithfulness", circuits.faithfulness, model, task, fmethods, fsites, metric=metric, progress=cb
        )
        bar.empty()
    fr = ss.get("faith_result")
    if fr:
        st.dataframe(fr.table(), hide_index=True)
        st.plotly_chart(fr.figure(), key="faith_fig")
        _shell.downloads(fr, "faithfulness")

with tab_graph:
    c1, c2, c3 = st.columns(3)
    gmethod = c1.selectbox("Edge method", ["eap-ig", "eap"], key="graph_method")
    top_k = c2.number_input("Edges (top-k)", 1, 500, 20, key="graph_k")
    gsteps = c3.number_input("EAP-IG steps", 1, 50, 5, key="graph_steps")
    if st.button("Build the circuit", type="primary", key="run_graph"):
        scores = _shell.call(
            "Edge attribution",
            circuits.attribute_edges,
            model,
            task,
            gmethod,
            metric=metric,
            steps=int(gsteps),
            progress=False,
        )
        ss["graph_result"] = scores and _shell.call(
            "Building the graph", circuits.CircuitGraph.from_edge_scores, scores, top_k=int(top_k)
        )
    g = ss.get("graph_result")
    if g:
        st.plotly_chart(g.figure(), key="graph_fig")
        _shell.downloads(g, "circuit")
