"""lenslab's Streamlit app: `lenslab app` (or `streamlit run app/main.py`).

The sidebar (model picker, prompt) is drawn here for every page; each page is a flat module
beside this file that reads the sidebar's choices with `_shell.context()`, calls one library
function per analysis and shows the result. Adding a page is one line in PAGES.
"""

from __future__ import annotations

import streamlit as st

from lenslab.app import _shell

st.set_page_config(page_title="lenslab", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("page_model.py", title="Model", icon=":material/info:", default=True),
    st.Page("page_circuits.py", title="Circuits", icon=":material/account_tree:"),
    st.Page("page_graph.py", title="Graph", icon=":material/share:"),
    st.Page("page_sinks.py", title="Sinks", icon=":material/vertical_align_bottom:"),
    st.Page("page_steer.py", title="Steer", icon=":material/tune:"),
    st.Page("page_experts.py", title="Experts", icon=":material/hub:"),
    st.Page("page_features.py", title="Features", icon=":material/scatter_plot:"),
    st.Page("page_lens.py", title="Lens", icon=":material/layers:"),
    st.Page("page_norms.py", title="Scale & norms", icon=":material/equalizer:"),
]

_shell.sidebar()
st.navigation(PAGES).run()
