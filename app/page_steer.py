"""Page "Steer": fit a steering intervention (mean difference, ActAdd, AUSteer, LinEAS) from
contrastive prompts, then stream the sidebar prompt's continuation unsteered and steered side by
side, token by token, with the same seed; measure concept rate against fluency across strengths
(trade-off). Presets are saved and loaded as JSON + safetensors. Numerics live in `lenslab.steering`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from lenslab import steering, zoo
from lenslab.app import _shell
from lenslab.data import sentiment_data
from lenslab.steering.tradeoff import tradeoff

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Steer · {name}")

METHODS = ("Mean difference", "ActAdd", "AUSteer", "LinEAS", "Linear probe")
STRENGTHS = (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0)

# The contrastive prompts default to the model's steering pair (`zoo.default_prompts`: for
# zoo/steer-sentiment its "positive" / "negative" prompt sets, for other zoo models prompts in
# their own vocabulary, else English sentiment sentences); they follow the model until the user
# edits them. A fitted intervention belongs to the model it was fitted on.
sets = zoo.prompt_sets(name)
steer_defaults = zoo.default_prompts(name)
defaults = ("\n".join(steer_defaults.positive), "\n".join(steer_defaults.negative))
changed = ss.get("_steer_model") != name
for key, new in zip(("steer_pos", "steer_neg"), defaults):
    if key not in ss or (changed and ss[key] == ss.get(f"_{key}_default")):
        ss[key] = new
    ss[f"_{key}_default"] = new
if changed:
    ss.pop("steer_iv", None)
    ss.pop("steer_tradeoff", None)
    ss["_steer_model"] = name

with st.expander("Fit", expanded=True):
    method = st.radio("Method", METHODS, horizontal=True, key="steer_method")
    c1, c2 = st.columns(2)
    pos = [p for p in c1.text_area("Positive prompts (one per line)", key="steer_pos").splitlines() if p.strip()]
    neg = [p for p in c2.text_area("Negative prompts (one per line)", key="steer_neg").splitlines() if p.strip()]
    c1, c2, c3 = st.columns(3)
    n_layers = model.cfg.n_layers
    if method == "AUSteer":
        site = c1.selectbox("Site", list(steering.AU_SITES), key="steer_au_site")
        k = c2.number_input("Units k", 1, 10_000, 16, key="steer_k")
        alpha = c3.number_input("Alpha", -1000.0, 1000.0, 5.0, key="steer_alpha")
    elif method == "LinEAS":
        steps = c1.number_input("Steps", 0, 5000, 100, key="steer_steps")
        lr = c2.number_input("Learning rate", 1e-5, 1.0, 0.02, format="%.4f", key="steer_lr")
        c3.caption(
            "Maps at every attn_out and mlp_out that move the negative prompts' activations (source) "
            "onto the positive ones' (target); at least 4 negative prompts."
        )
    else:
        layer = c1.number_input("Layer", 0, n_layers - 1, min(2, n_layers - 1), key="steer_layer")
        if method == "Linear probe":
            c2.caption(
                "A logistic probe (positive vs negative prompts) at the layer's resid_post; its direction, "
                "scaled to the class means' separation, is added (lenslab.steering.probe_steering)."
            )
        if method == "ActAdd":
            c2.caption(
                "ActAdd uses the first positive and the first negative prompt (added at the generated "
                "prompt's first positions: keep them shorter than it, e.g. 'lovely' / 'awful')."
            )
    if st.button("Fit", type="primary", key="steer_fit"):
        if method == "Mean difference":
            iv = _shell.call("Fitting mean difference", steering.mean_difference, model, pos, neg, layers=int(layer))
        elif method == "ActAdd":
            iv = _shell.call(
                "Fitting ActAdd", steering.actadd, model, pos[0] if pos else "", neg[0] if neg else "", layer=int(layer)
            )
        elif method == "Linear probe":
            iv = _shell.call("Fitting the probe", steering.probe_steering, model, pos, neg, layers=int(layer))
        elif method == "AUSteer":
            iv = _shell.call(
                "Fitting AUSteer", steering.austeer, model, pos, neg, k=int(k), alpha=float(alpha), site=site
            )
        else:
            config = steering.LineasConfig(steps=int(steps), lr=float(lr), progress=False)
            iv = _shell.call("Fitting LinEAS", steering.fit_lineas, model, neg, pos, config=config)
        if iv:
            ss["steer_iv"] = iv
            ss.pop("steer_tradeoff", None)

with st.expander("Presets"):
    up = st.file_uploader(
        "Load a preset (the .json and its .safetensors)",
        type=["json", "safetensors"],
        accept_multiple_files=True,
        key="steer_upload",
    )
    if up and st.button("Load preset", key="steer_load"):
        with tempfile.TemporaryDirectory() as tmp:
            jsons = []
            for f in up:
                (Path(tmp) / f.name).write_bytes(f.getvalue())
                if f.name.endswith(".json"):
                    jsons.append(Path(tmp) / f.name)
            if len(jsons) != 1:
                st.error("Upload exactly one .json preset together with its .safetensors file.")
            else:
                iv = _shell.call("Loading the preset", steering.load, jsons[0])
                if (
                    iv
                    and _shell.call("Checking the preset against this model", steering.validate, model, iv)
                    is not _shell.FAILED
                ):
                    ss["steer_iv"] = iv
                    ss.pop("steer_tradeoff", None)

iv = ss.get("steer_iv")
if iv is None:
    st.info("Fit an intervention (or load a preset) to compare generations.")
    st.stop()

st.caption(f"**{iv.name}** · {len(iv.edits)} edit(s) at {', '.join(iv.hook_names)} · {iv.n_units(model)} units")
with tempfile.TemporaryDirectory() as tmp:
    path = _shell.call("Saving the preset", steering.save, iv, Path(tmp) / "preset.json")
    if path:
        d1, d2, _ = st.columns([1, 1, 3])
        d1.download_button(
            "Preset JSON", path.read_bytes(), file_name="preset.json", mime="application/json", key="steer_dl_json"
        )
        d2.download_button(
            "Preset tensors",
            path.with_suffix(".safetensors").read_bytes(),
            file_name="preset.safetensors",
            key="steer_dl_st",
        )

c1, c2, c3, c4 = st.columns(4)
strength = c1.slider("Strength", -2.0, 4.0, 1.0, 0.1, key="steer_strength")
n_new = c2.number_input("New tokens", 1, 200, 20, key="steer_n_new")
temperature = c3.number_input("Temperature", 0.0, 5.0, 0.0, key="steer_temp")
seed = c4.number_input("Seed", 0, 10_000, 0, key="steer_seed")
kw = dict(max_new_tokens=int(n_new), seed=int(seed), temperature=float(temperature))
left, right = st.columns(2)
left.subheader("Unsteered")
right.subheader(f"Steered (strength {strength:g})")


if _shell.call("Generating", _shell.stream_into, left, model, ctx.prompt, None, **kw) is not _shell.FAILED:
    _shell.call("Generating steered", _shell.stream_into, right, model, ctx.prompt, iv.with_strength(strength), **kw)

with st.expander("Trade-off: concept rate against fluency across strengths"):
    neg_set = sets.get("negative")
    sources = (["The model's negative prompt set"] if neg_set else []) + ["The sidebar prompt"]
    src = st.radio("Evaluation prompts", sources, horizontal=True, key="steer_to_prompts")
    c1, c2 = st.columns([3, 1])
    strengths = c1.multiselect("Strengths", STRENGTHS, default=[0.0, 0.5, 1.0, 2.0], key="steer_to_strengths")
    n_tok = c2.number_input("New tokens", 1, 100, 8, key="steer_to_tokens")
    st.caption(
        f"Concept: positive sentiment (more positive than negative words of `{sentiment_data(name).__name__}`'s "
        "lexicon). "
        "Fluency: perplexity of each continuation under the unsteered model."
    )
    if st.button("Run trade-off", key="steer_to_run"):
        prompts = neg_set if src.startswith("The model") else [ctx.prompt]
        res = _shell.call(
            "Generating and scoring",
            tradeoff,
            model,
            {iv.name or "steered": iv},
            prompts,
            sentiment_data(name).is_positive,
            strengths=sorted(strengths),
            max_new_tokens=int(n_tok),
            progress=False,
        )
        if res:
            ss["steer_tradeoff"] = res
    res = ss.get("steer_tradeoff")
    if res is not None:
        st.plotly_chart(res.figure(), key="steer_tradeoff_fig")
        n = res.rows[0]["n"] if res.rows else 0
        st.caption(
            f"Spread: each concept rate with its 95% bootstrap interval over the {n} evaluation prompt(s) "
            "(error bars). One fit on one prompt set is one draw: docs/steering.md shows how the methods "
            "move across refits on fresh prompt sets (`tradeoff_seeds`)."
        )
        st.dataframe(res.rows, hide_index=True)
        _shell.downloads(res, "steer_tradeoff")
