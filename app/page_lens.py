"""Page "Lens": what each layer knows. The logit and tuned lenses as a layer × position grid of
top tokens, with the tuned lens's KL per layer; direct logit attribution (DLA) by layer × head and
by position; linear probes per layer with their control task. Numerics live in
`lenslab.probes.lenses`, `lenslab.probes.dla` and `lenslab.probes.linear`."""

from __future__ import annotations

import streamlit as st

from lenslab import tasks, zoo
from lenslab.app import _shell
from lenslab.probes import dla, lenses, linear
from lenslab.zoo import corpora

ctx = _shell.context()
model, prompt, name = ctx.model, ctx.prompt, ctx.name
ss = st.session_state
defaults = zoo.default_prompts(name)
st.title(f"Lens · {name}")
lens_tab, dla_tab, probe_tab = st.tabs(["Lenses", "Direct logit attribution", "Linear probes"])

# --- Lenses ------------------------------------------------------------------------------------
with lens_tab:
    c1, c2, c3 = st.columns([1, 2, 1])
    which = c1.radio("Lens", ["logit", "tuned"], key="lens_which", horizontal=True)
    source = c2.text_input(
        "Tuned lens",
        value=name if name in corpora.BUILT_IN else "",
        key=f"lens_source::{name}",
        help="a zoo model name (its shipped lens), a folder (lenslab's or tuned-lens's layout), or a "
        "tuned-lens id on the Hugging Face Hub (online)",
        disabled=which == "logit",
    )
    k = int(c3.number_input("Top k", 1, 20, 5, key="lens_k"))
    colour = st.radio(
        "Colour by",
        ["top", "final"],
        key="lens_tab_colour",
        horizontal=True,
        format_func=lambda v: {"top": "layer's top token", "final": "final prediction"}[v],
    )
    if which == "logit":
        res = _shell.call("Computing the logit lens", lenses.logit_lens, model, prompt, k=k)
    else:
        res = _shell.call("Computing the tuned lens", lenses.tuned_lens, model, prompt, source or None, k=k)
    if res:
        st.caption(
            "Rows read the residual stream before each block (`0_pre` is the embedding) through the final "
            "norm and the unembedding; the tuned lens first applies that layer's trained affine translator. "
            "Cells: the top next-token guess at each position (hover: the top k with probabilities)."
        )
        st.plotly_chart(res.figure(value=colour), key="lens_grid_fig")
        _shell.downloads(res, f"{which}_lens")
    if which == "tuned":
        st.subheader("KL to the model's output, per layer")
        n_docs = int(st.number_input("Held-out documents", 8, 512, 64, 8, key="lens_kl_n"))
        if st.button("Measure", key="lens_kl_go", disabled=name not in corpora.BUILT_IN):
            docs = _shell.call("Held-out text", corpora.corpus_for, model, n=n_docs, seed=1)
            if docs is not _shell.FAILED:
                ss["lens_kl"] = _shell.call("Lens KL", lenses.lens_kl, model, source or None, docs)
        if name not in corpora.BUILT_IN:
            st.caption("Held-out text is built in for the zoo models; use `lenses.lens_kl` with your own text.")
        kl = ss.get("lens_kl")
        if kl:
            st.dataframe(kl.table(), hide_index=True)
            st.plotly_chart(kl.figure(), key="lens_kl_fig")
            _shell.downloads(kl, "lens_kl")

# --- Direct logit attribution ------------------------------------------------------------------
with dla_tab:
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    on = c1.radio("On", ["the sidebar prompt", "the built-in task"], key="dla_on", horizontal=True)
    answer = c2.text_input(
        "Answer token", defaults.answer, key=f"dla_answer::{name}", disabled=on != "the sidebar prompt"
    )
    wrong = c3.text_input(
        "minus token (optional)", defaults.wrong, key=f"dla_wrong::{name}", disabled=on != "the sidebar prompt"
    )
    view = c4.selectbox("View", ["head", "position"], key="dla_view")
    norm = "frozen" if dla.final_norm(model)[0] is not None else "none"
    if on == "the sidebar prompt":
        pos = "all" if view == "position" else -1
        res = _shell.call(
            "Direct logit attribution",
            dla.direct_logit_attribution,
            model,
            prompt,
            answer,
            wrong or None,
            pos=pos,
            norm=norm,
        )
    else:
        task = _shell.call("Building the task", tasks.from_spec, model, defaults.task, n=16)
        res = task and _shell.call(
            "Direct logit attribution", dla.direct_logit_attribution, model, task=task, norm=norm
        )
        if view == "position":
            st.caption("The built-in task is read at its answer position; the position view needs the sidebar prompt.")
            view = "head"
    if res:
        st.caption(
            f"Final norm: {norm} ({'its scale frozen at this run' if norm == 'frozen' else 'the model has none'}); "
            f"the components sum to the model's own value, {float(res.total.mean()):.4g}."
        )
        st.plotly_chart(res.figure(view=view), key="dla_fig")
        st.dataframe(res.table(), hide_index=True, height=300)
        _shell.downloads(res, "dla")

# --- Linear probes -----------------------------------------------------------------------------
# the zoo model each built-in probe dataset is written for (`linear.dataset`)
PROBE_DATA = {"zoo/steer-sentiment": "sentiment", "zoo/moe-refusal": "refusal", "zoo/ioi-4l": "ioi"}
with probe_tab:
    st.caption(
        "A logistic-regression probe per layer (scikit-learn), split by prompt, next to the same probe on a "
        "control task (each prompt a random label; Hewitt & Liang 2019): selectivity = test − control test."
    )
    builtin = PROBE_DATA.get(name)
    c1, c2, c3, c4 = st.columns(4)
    data = c1.selectbox(
        "Data",
        ([builtin] if builtin else []) + ["my prompts"],
        key=f"probe_data::{name}",
        help="built-in: the zoo model's planted property; my prompts: one `label<TAB>prompt` per line below",
    )
    site = c2.selectbox("Site", ["resid_post", "resid_pre", "attn_out", "mlp_out"], key="probe_site")
    position = c3.selectbox("Read at", ["last", "mean"], key="probe_pos")
    n = int(c4.number_input("Prompts per class", 4, 256, 32, 4, key="probe_n", disabled=data == "my prompts"))
    text = st.text_area(
        "Labelled prompts (label<TAB>prompt)",
        key=f"probe_text::{name}",
        height=120,
        disabled=data != "my prompts",
    )
    if st.button("Train probes", type="primary", key="probe_go"):
        if data == "my prompts":
            pairs = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
            labels, prompts = [p[0].strip() for p in pairs], [p[-1].strip() for p in pairs]
        else:
            got = _shell.call("Building the dataset", linear.dataset, model, data, n=n)
            prompts, labels = got if got else ([], [])
        bar, cb = _shell.progress_bar("Training probes")
        ss["probe_res"] = _shell.call(
            "Training probes", linear.train_probes, model, prompts, labels, site=site, position=position, progress=cb
        )
        bar.empty()
    pres = ss.get("probe_res")
    if pres:
        st.plotly_chart(pres.figure(), key="probe_fig")
        st.dataframe(pres.table(), hide_index=True)
        _shell.downloads(pres, "probes")
