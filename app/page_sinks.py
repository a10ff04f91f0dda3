"""Page "Sinks": attention sinks (per-head attention to the first token, sink rate) and massive
activations (largest residual entries per layer) on the sidebar prompt, with an ablation that
sets the massive activations to zero or their mean. Numerics live in `lenslab.probes.sinks`."""
from __future__ import annotations

import streamlit as st

from lenslab.app import _shell
from lenslab.probes import sinks

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Sinks · {name}")
st.caption("Attention sinks (Gu et al. 2025) and massive activations (Sun et al. 2024) on the sidebar prompt "
           "(one prompt per line). Super experts (MoE) are still to come.")
prompts = [p for p in ctx.prompt.splitlines() if p.strip()]


c1, c2, c3, c4 = st.columns(4)
threshold = c1.number_input("Sink threshold ε", 0.01, 0.99, 0.3, 0.05, key="sinks_eps")
view = c2.selectbox("Heatmap", ["attention", "value_weighted", "fraction"], key="sinks_view")
absolute = c3.number_input("Massive if |a| > (0: off)", 0.0, 1e6, 100.0, key="sinks_abs")
ratio = c4.number_input("... and ≥ × median (0: off)", 0.0, 1e6, 1000.0, key="sinks_ratio",
                        help="Sun et al.: 100 and 1000. Small models: set |a| to 0 and a ratio like 20.")

st.subheader("Attention sinks")
sres = _shell.call("Attention sinks", sinks.attention_sinks, model, prompts, threshold=float(threshold))
if sres:
    st.metric("Sink rate", f"{100 * sres.sink_rate:.1f}%", help="share of (prompt, layer, head) with α₀ > ε")
    st.caption(f"Sink heads: {', '.join(f'L{l}H{h}' for l, h in sres.sink_heads()) or 'none'}")
    st.plotly_chart(sres.figure(view), key="sinks_fig")
    _shell.downloads(sres, "attention_sinks")

st.subheader("Massive activations")
rule = _shell.call("Massive-activation rule", sinks.MassiveRule, absolute=float(absolute) or None, ratio=float(ratio) or None)
mres = rule and _shell.call("Massive activations", sinks.massive_activations, model, prompts, rule=rule)
if mres:
    st.caption(f"Massive dims: {mres.massive_dims or 'none'} · positions {mres.massive_positions or 'none'}")
    st.dataframe(mres.table(), hide_index=True)
    st.plotly_chart(mres.figure(), key="massive_fig")
    _shell.downloads(mres, "massive_activations")

    mode = st.radio("Set the massive activations to", ["mean", "zero"], horizontal=True, key="sinks_mode")
    if st.button("Ablate", type="primary", key="sinks_ablate", disabled=not mres.massive):
        ss["sinks_ablation"] = _shell.call("Ablation", sinks.ablate_massive, model, prompts, mode=mode, massive=mres,
                                           threshold=float(threshold))
    ab = ss.get("sinks_ablation")
    if ab:
        st.plotly_chart(ab.figure(), key="ablation_fig")
        _shell.downloads(ab, "ablation")
