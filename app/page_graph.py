"""Page "Graph": circuit-tracer's attribution graph of the sidebar prompt through the model's shipped
transcoders (direct effects among transcoder features, error nodes, token embeddings and the
target logits), pruned live by node and edge thresholds, with its replacement and completeness
scores, node and edge tables, pinned nodes, supernodes (pinned nodes grouped under a label and
drawn as one node: `lenslab.probes.graph_supernodes`), edges split by attention head, validation by
ablation, interventions from feature
nodes (one, or several as a labelled supernode: ablate, clamp or steer, with the logits before and
after and a side-by-side generation), a feature node's feature dashboard (chosen in a box or by a
click on the graph) and downloads. Numerics live in
`lenslab.probes.attribution_graph`, `lenslab.probes.transcoders`, `lenslab.probes.graph_heads`,
`lenslab.probes.graph_validation`, `lenslab.probes.graph_supernodes`,
`lenslab.probes.transcoder_features` (a feature node's dashboard) and
`lenslab.steering.graph_interventions`; this page only calls them.

The unpruned graph is kept in `st.session_state`, keyed by model, prompt, target, transcoders
and feature budget, so moving a threshold re-prunes it without recomputing."""

from __future__ import annotations

import json

import streamlit as st

import lenslab
from lenslab import zoo
from lenslab.app import _dashboard, _shell
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_files, graph_heads, graph_supernodes, graph_validation
from lenslab.probes import transcoder_features as TF
from lenslab.probes import transcoders as T
from lenslab.steering import graph_interventions as GI

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Graph · {name}")
st.caption(
    "An attribution graph (Ameisen et al. 2025, circuit-tracer): every MLP is replaced by its transcoder plus an "
    "error node, attention patterns and norm scales are frozen at the clean run, and each edge is the direct "
    "effect of a source (feature, error, token embedding) on a target (feature, logit) at the last position."
)

# --- which transcoders -----------------------------------------------------------------------------
try:
    T.check_mlps(model)
except lenslab.LenslabError as exc:
    st.info(
        f"{exc}. Attribution graphs through transcoders need MLPs; the Circuits page traces attention "
        "circuits (patching, edge attribution) on this model.",
        icon=":material/info:",
    )
    st.stop()
shipped = T.list_transcoders()
mine = [s for s in shipped if s.startswith(f"{name}/")]
if not mine:
    owners = sorted({s.rsplit("/", 1)[0] for s in shipped})
    st.info(
        f"No transcoders are shipped for {name}: the zoo has them for {', '.join(owners) or '(none)'} "
        f"({', '.join(shipped) or 'none'}). Pick one of those models in the sidebar to build its attribution graph.",
        icon=":material/info:",
    )
    st.stop()

# --- inputs ----------------------------------------------------------------------------------------
prompt = ctx.prompt.strip()
st.caption(f"Prompt (the sidebar's): `{prompt.replace('`', 'ˋ')}`")
c1, c2 = st.columns([1, 2])
if ss.get("ag_tc") not in mine:
    ss["ag_tc"] = next((s for s in mine if s.endswith("/per-layer")), mine[0])
tc_name = c1.selectbox(
    "Transcoders",
    mine,
    key="ag_tc",
    help="The zoo's transcoders trained on this model: per-layer (one per MLP) or clt (cross-layer: each layer's "
    "features write to that MLP's output and every later one's).",
)
max_nodes = c2.slider(
    "Feature nodes (max_feature_nodes)",
    8,
    1024,
    64,
    step=8,
    key="ag_max_nodes",
    help="The features kept, ranked by their influence on the targets (circuit-tracer's selection).",
)
c1, c2, c3 = st.columns([1, 1, 2])
kind = c1.radio("Target", ["Salient logits", "Answer tokens"], key="ag_target_kind")
if kind == "Salient logits":
    n_logits = c2.number_input("max_n_logits", 1, 50, 10, key="ag_n_logits")
    logit_prob = c3.slider("desired_logit_prob", 0.5, 1.0, 0.95, step=0.01, key="ag_logit_prob")
    targets, target_key = None, ("salient", int(n_logits), float(logit_prob))
    options = dict(max_n_logits=int(n_logits), desired_logit_prob=float(logit_prob))
else:
    d = zoo.default_prompts(name)
    answers = c2.text_input(
        "Answer tokens (comma-separated)",
        value=f"{d.answer},{d.wrong}",
        key="ag_answers",
        help="One token each; a leading space is kept (GPT-2 style ' Mary').",
    )
    targets = [a for a in answers.split(",") if a.strip()]
    target_key, options = ("tokens", tuple(targets)), {}
key = (name, prompt, target_key, tc_name, int(max_nodes))
graphs = ss.setdefault("ag_graphs", {})

if st.button("Compute graph", type="primary", key="ag_go", disabled=not prompt or targets == []):
    bar, cb = _shell.progress_bar("Backward passes (rows of the adjacency)")
    g = _shell.call(
        f"Computing the attribution graph ({int(max_nodes)} feature nodes, one backward pass per batch of targets)",
        AG.attribution_graph,
        model,
        prompt,
        tc_name,
        targets=targets,
        max_feature_nodes=int(max_nodes),
        progress=cb,
        **options,
    )
    bar.empty()
    if g:
        graphs.pop(key, None)
        graphs[key] = g
        while len(graphs) > 4:  # keep the last few graphs of this session
            graphs.pop(next(iter(graphs)))
graph = graphs.get(key)
if graph is None:
    st.info("Press **Compute graph** to build the graph for these inputs.", icon=":material/share:")
    st.stop()

# --- the graph -------------------------------------------------------------------------------------
c1, c2, c3, c4 = st.columns(4)
c1.metric("Replacement score", f"{graph.replacement_score:.6f}", help="circuit-tracer's replacement score (unpruned)")
c2.metric("Completeness score", f"{graph.completeness_score:.6f}", help="circuit-tracer's completeness (unpruned)")
n_box, e_box = c3.empty(), c4.empty()  # the pruned graph's size, filled below
st.caption(
    f"Unpruned: {len(graph.nodes)} nodes, {graph.provenance.get('n_active_features', '?')} active features, "
    f"transcoders {tc_name}."
)
c1, c2, c3 = st.columns(3)
node_t = c1.slider("Node threshold", 0.05, 1.0, 0.8, step=0.01, key="ag_node_t")
edge_t = c2.slider("Edge threshold", 0.05, 1.0, 0.98, step=0.01, key="ag_edge_t")
hide_err = c3.checkbox("Hide error nodes (tables)", key="ag_hide_err")
pruned = _shell.call("Pruning", AG.prune, graph, node_threshold=float(node_t), edge_threshold=float(edge_t))
if not pruned:
    st.stop()
nodes_df, edges_df = pruned.table("nodes"), pruned.table("edges")
n_box.metric("Nodes (pruned)", len(pruned.nodes))
e_box.metric("Edges (pruned)", len(edges_df))
st.caption(f"Pruned graph: replacement {pruned.replacement_score:.4f} · completeness {pruned.completeness_score:.4f}.")

supernodes = ss.setdefault("ag_supernodes", {}).setdefault(key, [])  # this graph's, over reruns
active = [s for s in supernodes if set(s.members) <= set(pruned.nodes)]  # members pruned away: not drawn
max_edges = st.slider("Edges drawn", 10, 1000, 300, step=10, key="ag_max_edges")
merged = _shell.call("Merging the supernodes", graph_supernodes.merge_supernodes, pruned, active)
fig = merged and _shell.call("Drawing the graph", merged.figure, max_edges=int(max_edges))
dash_nodes = [n for n, p in zip(pruned.nodes, pruned.parsed) if p.kind == "feature"]


def open_clicked(fig=fig, nodes=tuple(dash_nodes)) -> None:
    """Graph click: a feature node's point (its hover text starts with its label) opens its dashboard below."""
    try:
        pt = ss["ag_fig"]["selection"]["points"][0]
        label = str(fig.data[int(pt["curve_number"])].text[int(pt["point_index"])]).split(" ")[0]
    except (KeyError, IndexError, TypeError, ValueError):
        return
    if label in nodes:
        ss["ag_dash_node"] = label


if fig:
    st.plotly_chart(fig, key="ag_fig", on_select=open_clicked, selection_mode="points")
    st.caption(
        "The figure shows the whole pruned graph (error nodes in grey; supernodes as purple diamonds, each at the "
        "mean place of its members); the filters below apply to the tables. Click a feature node for its "
        "dashboard (Feature dashboard, below)."
    )

if hide_err:
    errors = set(nodes_df.loc[nodes_df["kind"] == "error", "node"])
    nodes_df = nodes_df[nodes_df["kind"] != "error"]
    edges_df = edges_df[~edges_df["source"].isin(errors) & ~edges_df["target"].isin(errors)]
choices = list(nodes_df["node"])
ss["ag_pin"] = [n for n in ss.get("ag_pin", []) if n in choices]  # nodes pruned away drop out
c1, c2 = st.columns([3, 1])
pinned = c1.multiselect("Pin nodes", choices, key="ag_pin", help="Show only these nodes and their edges.")
among = c2.radio("Edges", ["among pinned", "into / out of pinned"], key="ag_pin_edges", disabled=not pinned)
if pinned:
    nodes_df = nodes_df[nodes_df["node"].isin(pinned)]
    src, dst = edges_df["source"].isin(pinned), edges_df["target"].isin(pinned)
    edges_df = edges_df[(src & dst) if among == "among pinned" else (src | dst)]

c1, c2 = st.columns([3, 1])
sn_label = c1.text_input(
    "Supernode label",
    key="ag_sn_label",
    placeholder="say Mary",
    help="Group the pinned nodes (two or more) into one supernode with this label. The graph draws it as one "
    "node whose edges are the sums of its members' edges (the edges among its own members are left out); the "
    "circuit-tracer / Neuronpedia download keeps it in qParams.supernodes, and the pinned nodes in pinnedIds.",
)
if c2.button("Group pinned", key="ag_sn_add", disabled=len(pinned) < 2 or not sn_label.strip()):
    grown = _shell.call("Grouping the pinned nodes", graph_supernodes.add_supernode, pruned, active, sn_label, pinned)
    if grown:
        supernodes[:] = [s for s in supernodes if s not in active] + grown
        st.rerun()  # redraw the graph above with it
for i, sn in enumerate(supernodes):
    c1, c2 = st.columns([5, 1])
    note = "" if sn in active else " — not drawn: pruning dropped a member"
    c1.markdown(f"Supernode **{sn.label}**: {', '.join(sn.members)}{note}")
    if c2.button("Remove", key=f"ag_sn_rm_{i}"):
        supernodes.remove(sn)
        st.rerun()

tabs = st.tabs(["Nodes", "Top edges", *(["Supernode edges"] if active and merged else [])])
with tabs[0]:
    st.dataframe(nodes_df, hide_index=True, height=320)
with tabs[1]:
    st.dataframe(edges_df.head(200), hide_index=True, height=320)
    st.caption(f"{len(edges_df)} edges, strongest |weight| first (at most 200 shown).")
if len(tabs) > 2:
    with tabs[2]:
        merged_edges = merged.table("edges")
        st.dataframe(merged_edges.head(200), hide_index=True, height=320)
        st.caption(
            f"The drawn graph's {len(merged_edges)} edges: a supernode's are the sums of its members' edges "
            "(those among its own members left out)."
        )

st.subheader("Feature dashboard")
st.caption(
    "A feature node's transcoder feature as an SAE feature (`lenslab.probes.transcoder_features`): its layer is "
    "indexed once over the model's built-in corpus (64 prompts), then any of its features opens at once. The "
    "logit panel is the direct logit effect of what the feature writes to its MLP's output."
)
if ss.get("ag_dash_node") not in dash_nodes:
    ss["ag_dash_node"] = None  # a node pruned away (or another graph's) closes the dashboard
dash_node = st.selectbox(
    "Feature dashboard",
    dash_nodes,
    key="ag_dash_node",
    index=None,
    placeholder="Choose a feature node",
    help="Top contexts, activation histogram, density and logit effects of the node's transcoder feature "
    "(clicking a feature node in the graph above chooses it too).",
)
if dash_node:
    dash = _shell.call(
        f"Building the dashboard of {dash_node} (the first node of a layer indexes the corpus)",
        TF.feature_node_dashboard,
        model,
        tc_name,
        dash_node,
    )
    if dash:
        with st.expander(f"{dash_node}: transcoder feature {dash.feature}, reading {dash.hook}", expanded=True):
            _dashboard.render(dash, "ag_dash", f"feature_{dash_node.replace('@', '_at_')}")

st.subheader("Edges by attention head")
st.caption(
    "Each edge of the pruned graph split into the attention head each path crosses last plus its attention-free "
    "residual part; the parts sum to the edge (`lenslab.probes.graph_heads`)."
)
c1, c2 = st.columns([1, 3])
n_edges = c1.number_input("Strongest edges", 1, 500, 30, key="ag_heads_n")
heads_key = (key, float(node_t), float(edge_t), int(n_edges))
if c2.button("Split by head", key="ag_heads_go", disabled=any(n.startswith("target") for n in pruned.nodes)):
    split = _shell.call(
        "Splitting the edges by head", graph_heads.head_edges, model, pruned, tc_name, max_edges=int(n_edges)
    )
    ss["ag_heads"] = {heads_key: split} if split else {}
split = ss.get("ag_heads", {}).get(heads_key)
if split is not None:
    st.plotly_chart(split.figure(), key="ag_heads_fig")
    st.dataframe(split.table(top=3), hide_index=True, height=300)
    _shell.downloads(split, "graph_heads")

st.subheader("Validate by ablation")
st.caption(
    "Zero the pruned graph's features in the live model (attention and norms recomputed) and compare how the "
    "targets drop with zeroing random active features of the same number (`lenslab.probes.graph_validation`)."
)
c1, c2 = st.columns([1, 3])
n_random = c1.number_input("Random sets", 1, 200, 20, key="ag_n_random")
checks = ss.setdefault("ag_checks", {})
check_key = (key, float(node_t), float(edge_t), int(n_random))
if c2.button("Ablate", key="ag_ablate", disabled=any(n.startswith("target") for n in pruned.nodes)):
    res = _shell.call(
        "Ablating the graph's features and random ones",
        graph_validation.ablate_graph,
        model,
        pruned,
        tc_name,
        n_random=int(n_random),
    )
    if res:
        checks.clear()
        checks[check_key] = res
check = checks.get(check_key)
if check is not None:
    mean, std = check.random_effect()
    c1, c2 = st.columns(2)
    c1.metric(f"Target drop, the graph's {check.n_features} features ablated", f"{check.graph_effect():.4f}")
    c2.metric(f"Target drop, random sets of {check.n_features} (mean ± std)", f"{mean:.4f} ± {std:.4f}")
    st.plotly_chart(check.figure(), key="ag_check_fig")

st.subheader("Intervene from nodes")
st.caption(
    "Ablate, clamp or steer the transcoder features of feature nodes in the live model: one node, or several "
    "as a supernode with a label (`lenslab.steering.graph_interventions`). Shown: the next-token logits before "
    "and after, the graph's first-order prediction of the target's change (attention and norms frozen, as in "
    "the graph), and the continuation unsteered and steered side by side."
)
feature_nodes = [n for n, p in zip(pruned.nodes, pruned.parsed) if p.kind == "feature"]
ss["ag_iv_nodes"] = [n for n in ss.get("ag_iv_nodes", []) if n in feature_nodes]
c1, c2 = st.columns([3, 1])
iv_nodes = c1.multiselect(
    "Feature nodes", feature_nodes, key="ag_iv_nodes", help="Several nodes act together: a supernode."
)
iv_label = c2.text_input("Supernode label", key="ag_iv_name", help="Names the intervention (default: mode and nodes).")
c1, c2, c3, c4 = st.columns(4)
mode = c1.radio("Action", list(GI.MODES), key="ag_iv_mode")
clamp_by = c2.radio("Clamp to", ["× its activation", "a value"], key="ag_iv_clamp", disabled=mode != "clamp")
amount = c3.number_input(
    "Factor / value / amount",
    value=2.0,
    step=0.5,
    key="ag_iv_value",
    disabled=mode == "ablate",
    help="clamp: the factor or the activation held; steer: the amount of the decoder row added.",
)
where = c4.radio("Where", ["the nodes' positions", "every position"], key="ag_iv_where")
n_new = st.number_input("New tokens", 0, 100, 12, key="ag_iv_new_tokens")
factor = float(amount) if mode == "clamp" and clamp_by == "× its activation" else None
value = float(amount) if mode == "steer" or (mode == "clamp" and factor is None) else None
clicked = st.button("Intervene", key="ag_iv_go", disabled=not iv_nodes)
if clicked:
    ss.pop("ag_iv", None)
    iv = _shell.call(
        "Building the intervention",
        GI.node_intervention,
        tc_name,
        iv_nodes,
        mode,
        value,
        factor=factor,
        graph=graph,
        positions="node" if where == "the nodes' positions" else "all",
        name=iv_label.strip() or None,
    )
    effect = iv and _shell.call("Measuring the logits before and after", GI.intervention_effect, model, graph, iv)
    if effect:
        ss["ag_iv"] = {"key": key, "iv": iv, "effect": effect, "n_new": int(n_new), "texts": None}
done = ss.get("ag_iv")
if done and done["key"] == key:
    effect = done["effect"]
    c1, c2, c3 = st.columns(3)
    c1.metric(f"Target {effect.target_token!r}, before", f"{effect.target_before:.4f}", help="logit − mean logit")
    c2.metric(f"After: {effect.name}", f"{effect.target_after:.4f}", delta=f"{effect.target_change():+.4f}")
    c3.metric(
        "Graph's first-order change",
        "—" if effect.predicted is None else f"{effect.predicted:+.4f}",
        help="Sum over the nodes of edge × relative change of the activation (the graph's direct effects).",
    )
    st.dataframe(effect.table(), hide_index=True)
    st.plotly_chart(effect.figure(), key="ag_iv_fig")
    if done["n_new"]:
        left, right = st.columns(2)
        left.caption("Unsteered")
        right.caption(f"Steered: {effect.name}")
        if done["texts"] is None:  # just computed: stream both, one after the other
            kw = dict(max_new_tokens=done["n_new"])
            base = _shell.call("Generating", _shell.stream_into, left, model, prompt, None, **kw)
            steered = base is not _shell.FAILED and _shell.call(
                "Generating steered", _shell.stream_into, right, model, prompt, done["iv"], **kw
            )
            done["texts"] = (base or "", steered or "")  # a failed stream showed its error; not retried
        else:
            left.markdown(_shell.continuation_markdown(prompt, done["texts"][0]))
            right.markdown(_shell.continuation_markdown(prompt, done["texts"][1]))

st.subheader("Downloads")
st.download_button(
    "Unpruned graph (JSON)",
    graph.to_json(),
    file_name="attribution_graph.json",
    mime="application/json",
    key="ag_dl_full",
)
ct_file = _shell.call(
    "Writing the circuit-tracer graph file",
    graph_files.graph_file,
    pruned,
    model,
    slug="lenslab-graph",
    pinned=pinned,
    supernodes=active,
)
if ct_file:
    st.download_button(
        "Graph file for circuit-tracer / Neuronpedia (JSON)",
        json.dumps(ct_file),
        file_name="lenslab-graph.json",
        mime="application/json",
        key="ag_dl_ct",
    )
st.caption(
    "The graph file keeps the pinned nodes (qParams.pinnedIds) and the drawn supernodes (qParams.supernodes). "
    "Below: the pruned graph as shown: JSON (supernodes in its provenance), or its figure, supernodes merged, "
    "as SVG / PNG / PDF / HTML."
)
if merged:
    _shell.downloads(merged, "attribution_graph_pruned")
