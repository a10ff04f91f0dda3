"""One feature dashboard drawn on a page: the Features page's Dashboard tab and the Graph page's
feature nodes share it (the dashboard itself is `lenslab.probes.features.FeatureDashboard`)."""

from __future__ import annotations

import streamlit as st

from lenslab.app import _shell


def render(dash, key: str, file_stem: str) -> None:
    """Metrics (density, max and mean activation), top contexts with per-token highlighting, the
    activation histogram, the promoted and suppressed tokens, and downloads; widget keys start with `key`."""
    m1, m2, m3 = st.columns(3)
    m1.metric("Density", f"{dash.density:.3%}", help=f"{dash.n_fire} of {dash.total_tokens} tokens")
    m2.metric("Max activation", f"{dash.max_act:.4g}")
    m3.metric("Mean when firing", f"{dash.mean_act:.4g}")
    st.subheader("Top contexts")
    st.markdown(dash.contexts_html(), unsafe_allow_html=True)
    st.plotly_chart(dash.figure(), key=f"{key}_fig")
    a, b = st.columns(2)
    a.dataframe([{"promoted": _shell.token_text(t), "logit": v} for t, v in dash.pos_logits], hide_index=True)
    b.dataframe([{"suppressed": _shell.token_text(t), "logit": v} for t, v in dash.neg_logits], hide_index=True)
    st.download_button(
        "Dashboard HTML (standalone)",
        dash.to_html(),
        file_name=f"{file_stem}.html",
        mime="text/html",
        key=f"{key}_dl_html",
    )
    _shell.downloads(dash, file_stem)
