"""Page "Sinks": attention sinks (per-head attention to the first token, sink rate) and massive
activations (largest residual entries per layer) on the sidebar prompt, with an ablation that
sets the massive activations to zero or their mean; on MoE models, super experts (profile
heatmap, the flagged experts, prune-and-compare). Numerics live in `lenslab.probes.sinks` and
`lenslab.probes.super_experts`."""

from __future__ import annotations

import streamlit as st

from lenslab.app import _shell
from lenslab.probes import routers, sinks, super_experts

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Sinks · {name}")
st.caption(
    "Attention sinks (Gu et al. 2025) and massive activations (Sun et al. 2024) on the sidebar prompt "
    "(one prompt per line); on MoE models also super experts (Su et al. 2025)."
)
prompts = [p for p in ctx.prompt.splitlines() if p.strip()]


c1, c2, c3, c4 = st.columns(4)
threshold = c1.number_input("Sink threshold ε", 0.01, 0.99, 0.3, 0.05, key="sinks_eps")
view = c2.selectbox("Heatmap", ["attention", "value_weighted", "fraction"], key="sinks_view")
absolute = c3.number_input("Massive if |a| > (0: off)", 0.0, 1e6, 100.0, key="sinks_abs")
ratio = c4.number_input(
    "... and ≥ × median (0: off)",
    0.0,
    1e6,
    1000.0,
    key="sinks_ratio",
    help="Sun et al.: 100 and 1000. Small models: set |a| to 0 and a ratio like 20.",
)

st.subheader("Attention sinks")
sres = _shell.call("Attention sinks", sinks.attention_sinks, model, prompts, threshold=float(threshold))
if sres:
    st.metric("Sink rate", f"{100 * sres.sink_rate:.1f}%", help="share of (prompt, layer, head) with α₀ > ε")
    st.caption(f"Sink heads: {', '.join(f'L{l}H{h}' for l, h in sres.sink_heads()) or 'none'}")
    st.plotly_chart(sres.figure(view), key="sinks_fig")
    _shell.downloads(sres, "attention_sinks")

st.subheader("Massive activations")
rule = _shell.call(
    "Massive-activation rule", sinks.MassiveRule, absolute=float(absolute) or None, ratio=float(ratio) or None
)
mres = rule and _shell.call("Massive activations", sinks.massive_activations, model, prompts, rule=rule)
if mres:
    st.caption(f"Massive dims: {mres.massive_dims or 'none'} · positions {mres.massive_positions or 'none'}")
    st.dataframe(mres.table(), hide_index=True)
    st.plotly_chart(mres.figure(), key="massive_fig")
    _shell.downloads(mres, "massive_activations")

    mode = st.radio("Set the massive activations to", ["mean", "zero"], horizontal=True, key="sinks_mode")
    if st.button("Ablate", type="primary", key="sinks_ablate", disabled=not mres.massive):
        ss["sinks_ablation"] = _shell.call(
            "Ablation", sinks.ablate_massive, model, prompts, mode=mode, massive=mres, threshold=float(threshold)
        )
    ab = ss.get("sinks_ablation")
    if ab:
        st.plotly_chart(ab.figure(), key="ablation_fig")
        _shell.downloads(ab, "ablation")

if routers.has_moe(model):
    st.subheader("Super experts")
    st.caption(
        "Su et al. 2025: per expert, the largest |down_proj output| over the prompts; super experts are the "
        "outliers among the first layers (rule su: above P99.5 and above ⌊max / 10⌋). Pruning zeroes their "
        "down_proj (the router is unchanged), compared with pruning as many random experts."
    )
    e1, e2, e3 = st.columns(3)
    se_rule = e1.selectbox("Rule", super_experts.RULES, key="se_rule")
    include = e2.number_input(
        "Include layers (share)",
        0.05,
        1.0,
        0.75,
        0.05,
        key="se_include",
        help="rules consider layers l < round(share × n_layers) (Su et al.: 0.75)",
    )
    draws = e3.number_input("Random draws", 0, 20, 3, key="se_draws")
    profile = _shell.call(
        "Expert profile", super_experts.profile_experts, model, prompts, include_layers=float(include)
    )
    found = profile and _shell.call("Super experts", profile.super_experts, se_rule)
    if found:
        st.caption(
            f"Super experts ({se_rule}): {', '.join(found.labels) or 'none'} · bars "
            + ", ".join(f"{k} {v:.4g}" for k, v in found.thresholds.items())
        )
        st.dataframe(found.table(), hide_index=True)
        st.plotly_chart(found.figure(), key="se_fig")
        _shell.downloads(found, "super_experts")
        if st.button("Prune and compare", type="primary", key="se_prune", disabled=not found.experts):
            ss["se_ablation"] = _shell.call(
                "Pruning super experts",
                super_experts.ablate_super_experts,
                model,
                prompts,
                found,
                random_draws=int(draws),
                threshold=float(threshold),
                massive_rule=rule or None,
            )
        sab = ss.get("se_ablation")
        if sab:
            st.dataframe(sab.table(), hide_index=True)
            st.plotly_chart(sab.figure(), key="se_ablation_fig")
            _shell.downloads(sab, "super_expert_ablation")
