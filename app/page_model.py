"""Page "Model": the model card, the prompt's tokens, attention patterns, the logit lens and the
next-token predictions. Analyses and their figures live in `lenslab.inspection`."""

from __future__ import annotations

import streamlit as st

from lenslab import inspection
from lenslab.app import _shell

ctx = _shell.context()
model, prompt, name = ctx.model, ctx.prompt, ctx.name
cfg = model.cfg

st.title(f"Model · {name}")

left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Model card")
    card = _shell.call("Reading the model card", inspection.model_card, model)
    with st.container(height=380, border=True):
        st.markdown(card or "(no card)")
with right:
    st.subheader("Tokenization")
    tok = _shell.call("Tokenizing", inspection.tokenize, model, prompt)
    if not tok:
        st.stop()  # the message says why (e.g. empty or too long prompt)
    st.markdown(
        " ".join(f"`{_shell.token_text(t)}`<sub>{i}</sub>" for t, i in zip(tok.str_tokens, tok.ids.tolist())),
        unsafe_allow_html=True,
    )
    st.caption(f"{len(tok)} tokens as the model reads them (with its BOS token, if it prepends one)")
    st.dataframe(
        {"pos": list(range(len(tok))), "token": [_shell.token_text(t) for t in tok.str_tokens], "id": tok.ids.tolist()},
        hide_index=True,
        width="stretch",
        height=min(250, 35 * len(tok) + 40),
    )

st.header("Attention patterns")
patterns = _shell.call("Computing attention patterns", inspection.attention_patterns, model, prompt)
if patterns is not _shell.FAILED:
    c1, c2, _ = st.columns([1, 1, 3])
    layer = c1.selectbox("Layer", list(range(cfg.n_layers)), key=f"attn_layer::{name}")
    head = c2.selectbox(
        "Head",
        ["all", *range(cfg.n_heads)],
        key=f"attn_head::{name}",
        format_func=lambda h: "all heads" if h == "all" else str(h),
    )
    if head == "all":
        fig = _shell.call("Drawing", inspection.attention_heads, patterns, tok.str_tokens, layer=layer, model=name)
    else:
        fig = _shell.call(
            "Drawing", inspection.attention_heatmap, patterns, tok.str_tokens, layer=layer, head=head, model=name
        )
    if fig:
        st.plotly_chart(fig, key="attention_fig")

st.header("Logit lens")
colour = st.radio(
    "Colour by",
    ["top", "final"],
    key="lens_colour",
    horizontal=True,
    format_func=lambda v: {"top": "layer's top token", "final": "final prediction"}[v],
)
ll = _shell.call("Computing the logit lens", inspection.logit_lens, model, prompt, k=5)
if ll:
    st.caption(
        "Each row reads the residual stream before that block (final LayerNorm re-applied, then the "
        "unembedding); cells show the top next-token guess at each position."
    )
    st.plotly_chart(ll.figure(value=colour), key="lens_fig")

st.header("Top next-token predictions")
k = st.columns([1, 4])[0].number_input("How many", min_value=1, max_value=50, value=10, step=1, key="top_k")
preds = _shell.call("Predicting the next token", inspection.top_predictions, model, prompt, k=int(k))
if preds:
    c1, c2 = st.columns([2, 3])
    c1.dataframe(
        {
            "token": [_shell.token_text(p.token) for p in preds],
            "id": [p.id for p in preds],
            "prob": [round(p.prob, 4) for p in preds],
            "logit": [round(p.logit, 3) for p in preds],
        },
        hide_index=True,
        key="preds_table",
    )
    c2.plotly_chart(preds.figure(), key="preds_fig")
