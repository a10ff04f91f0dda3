"""Page "Experts": Mixture-of-Experts routing on the sidebar prompt, MoTE's fTRI expert ranking
from two prompt sets, and live generation with chosen experts switched off or forced on, next
to the unswitched baseline. Numerics live in `lenslab.probes.routers` and `lenslab.steering`."""

from __future__ import annotations

import streamlit as st

from lenslab import steering, zoo
from lenslab.app import _shell
from lenslab.probes import routers

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Experts · {name}")

if not routers.has_moe(model):
    st.info(
        "Pick a Mixture-of-Experts model in the sidebar, e.g. zoo/moe-refusal (Mixtral, OLMoE, Qwen2-MoE and "
        "Qwen3-MoE checkpoints work too)."
    )
    st.stop()
layers = routers.moe_layers(model)
m0 = layers[0]
st.caption(
    f"{len(layers)} MoE layers ({', '.join(f'L{m.layer}' for m in layers)}) · {m0.n_experts} experts · "
    f"top-{m0.top_k} routing · {'renormalised' if m0.norm_topk_prob else 'raw'} top-k weights"
)
prompts = [p for p in ctx.prompt.splitlines() if p.strip()]

route_tab, rank_tab, switch_tab = st.tabs(["Routing", "Find experts (fTRI)", "Switch experts"])

with route_tab:
    res = _shell.call("Routing", routers.route, model, prompts)
    if res:
        i = 0
        if len(prompts) > 1:
            i = st.selectbox("Prompt", range(len(prompts)), format_func=lambda j: prompts[j][:80], key="moe_prompt")
        st.plotly_chart(res.figure(i), key="moe_route_fig")
        rows = [
            {
                "pos": p,
                "token": _shell.token_text(tok),
                "layer": f"L{layer}",
                "experts (gate weight)": ", ".join(
                    f"e{int(e)} ({float(w):.2f})" for e, w in zip(res.indices[i][p, li], res.weights[i][p, li])
                ),
            }
            for p, tok in enumerate(res.tokens[i])
            for li, layer in enumerate(res.layers)
        ]
        with st.expander("Chosen experts per token and layer"):
            st.dataframe(rows, hide_index=True)
        st.plotly_chart(res.load_figure(), key="moe_load_fig")
        _shell.downloads(res, "routing")

with rank_tab:
    sets = zoo.prompt_sets(name)
    c1, c2 = st.columns(2)
    target = [
        p
        for p in c1.text_area(
            "Target prompts (the behaviour, e.g. refused), one per line",
            "\n".join(sets.get("target", prompts)),
            height=180,
            key="moe_target",
        ).splitlines()
        if p.strip()
    ]
    other = [
        p
        for p in c2.text_area(
            "Other prompts (e.g. answered), one per line", "\n".join(sets.get("other", [])), height=180, key="moe_other"
        ).splitlines()
        if p.strip()
    ]
    c1, c2 = st.columns(2)
    weights = c1.checkbox("Sum gate weights (instead of counting selections)", key="moe_weights")
    if c2.button("Rank experts", type="primary", key="moe_rank"):
        ss["moe_ranking"] = _shell.call("fTRI ranking", routers.ftri_rank, model, target, other, weights=weights)
    ranking = ss.get("moe_ranking")
    if ranking:
        view = st.radio(
            "Show",
            ["diff", "target", "other"],
            horizontal=True,
            key="moe_rank_view",
            format_func={"diff": "target − other", "target": "target usage", "other": "other usage"}.get,
        )
        st.plotly_chart(ranking.figure(view), key="moe_rank_fig")
        st.dataframe(
            [{"layer": l, "expert": e, "target − other": round(s, 4)} for l, e, s in ranking.top(10)], hide_index=True
        )
        _shell.downloads(ranking, "expert_ranking")

with switch_tab:
    ranking = ss.get("moe_ranking")
    if ranking and st.button("Switch off the top experts of the ranking", key="moe_use_top"):
        ss["moe_off"] = ", ".join(f"{l}:{e}" for l, e, _ in ranking.top(int(ss.get("moe_top_k", 4))))
    c1, c2, c3 = st.columns([2, 2, 1])
    off_text = c1.text_input("Experts off (LAYER:EXPERT, ...)", key="moe_off", placeholder="2:5, 3:1")
    on_text = c2.text_input("Experts forced on", key="moe_on", placeholder="1:0")
    c3.number_input("Top-k from ranking", 1, 64, 4, key="moe_top_k")
    c1, c2, c3, c4 = st.columns(4)
    mode = c1.radio(
        "Off means",
        ["drop", "mask"],
        horizontal=True,
        key="moe_mode",
        help="drop: leave the top-k and renormalise the rest (MoTE); mask: the next expert enters",
    )
    strength = c2.slider("Strength", 0.0, 1.0, 1.0, 0.05, key="moe_strength")
    n_new = c3.number_input("New tokens", 1, 200, 12, key="moe_n_new")
    seed = c4.number_input("Seed", 0, 10_000, 0, key="moe_seed")
    off = _shell.call("Reading the experts to switch off", routers.parse_experts, off_text)
    on = _shell.call("Reading the experts to force on", routers.parse_experts, on_text)
    if off is not _shell.FAILED and on is not _shell.FAILED:
        iv = _shell.call(
            "Building the switch",
            steering.switch_experts,
            off=off,
            on=on,
            mode=mode,
            strength=float(strength),
            name="expert switch",
        )
        if iv and _shell.call("Checking the experts", steering.validate, model, iv) is not _shell.FAILED:
            prompt = prompts[0] if prompts else ctx.prompt
            kw = dict(max_new_tokens=int(n_new), seed=int(seed))
            left, right = st.columns(2)
            left.subheader("Baseline")
            right.subheader(f"Switched ({len(off)} off, {len(on)} on)")
            if _shell.call("Generating", _shell.stream_into, left, model, prompt, None, **kw) is not _shell.FAILED:
                _shell.call("Generating with the switch", _shell.stream_into, right, model, prompt, iv, **kw)
