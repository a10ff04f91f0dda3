"""Page "Steer": fit a steering intervention (mean difference, ActAdd, AUSteer) from contrastive
prompts, then generate the sidebar prompt unsteered and steered side by side with the same seed.
Presets are saved and loaded as JSON + safetensors. Numerics live in `lenslab.steering`."""
from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from lenslab import steering
from lenslab.app import _shell

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Steer · {name}")

POS = "When Mary and John went to the store, John gave a drink to\nWhen Mary and John went to the office, John gave a book to"
NEG = "When John and Mary went to the store, Mary gave a drink to\nWhen John and Mary went to the office, Mary gave a book to"
METHODS = ("Mean difference", "ActAdd", "AUSteer")

with st.expander("Fit", expanded=True):
    method = st.radio("Method", METHODS, horizontal=True, key="steer_method")
    c1, c2 = st.columns(2)
    pos = [p for p in c1.text_area("Positive prompts (one per line)", POS, key="steer_pos").splitlines() if p.strip()]
    neg = [p for p in c2.text_area("Negative prompts (one per line)", NEG, key="steer_neg").splitlines() if p.strip()]
    c1, c2, c3 = st.columns(3)
    n_layers = model.cfg.n_layers
    if method == "AUSteer":
        site = c1.selectbox("Site", list(steering.AU_SITES), key="steer_au_site")
        k = c2.number_input("Units k", 1, 10_000, 16, key="steer_k")
        alpha = c3.number_input("Alpha", -1000.0, 1000.0, 5.0, key="steer_alpha")
    else:
        layer = c1.number_input("Layer", 0, n_layers - 1, min(2, n_layers - 1), key="steer_layer")
        if method == "ActAdd":
            c2.caption("ActAdd uses the first positive and the first negative prompt.")
    if st.button("Fit", type="primary", key="steer_fit"):
        if method == "Mean difference":
            iv = _shell.call("Fitting mean difference", steering.mean_difference, model, pos, neg, layers=int(layer))
        elif method == "ActAdd":
            iv = _shell.call("Fitting ActAdd", steering.actadd, model, pos[0] if pos else "", neg[0] if neg else "",
                             layer=int(layer))
        else:
            iv = _shell.call("Fitting AUSteer", steering.austeer, model, pos, neg, k=int(k), alpha=float(alpha), site=site)
        if iv:
            ss["steer_iv"] = iv

with st.expander("Presets"):
    up = st.file_uploader("Load a preset (the .json and its .safetensors)", type=["json", "safetensors"],
                          accept_multiple_files=True, key="steer_upload")
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
                if iv and _shell.call("Checking the preset against this model", steering.validate, model, iv) is not _shell.FAILED:
                    ss["steer_iv"] = iv

iv = ss.get("steer_iv")
if iv is None:
    st.info("Fit an intervention (or load a preset) to compare generations.")
    st.stop()

st.caption(f"**{iv.name}** · {len(iv.edits)} edit(s) at {', '.join(iv.hook_names)} · {iv.n_units(model)} units")
with tempfile.TemporaryDirectory() as tmp:
    path = _shell.call("Saving the preset", steering.save, iv, Path(tmp) / "preset.json")
    if path:
        d1, d2, _ = st.columns([1, 1, 3])
        d1.download_button("Preset JSON", path.read_bytes(), file_name="preset.json", mime="application/json",
                           key="steer_dl_json")
        d2.download_button("Preset tensors", path.with_suffix(".safetensors").read_bytes(),
                           file_name="preset.safetensors", key="steer_dl_st")

c1, c2, c3, c4 = st.columns(4)
strength = c1.slider("Strength", -2.0, 4.0, 1.0, 0.1, key="steer_strength")
n_new = c2.number_input("New tokens", 1, 200, 20, key="steer_n_new")
temperature = c3.number_input("Temperature", 0.0, 5.0, 0.0, key="steer_temp")
seed = c4.number_input("Seed", 0, 10_000, 0, key="steer_seed")
kw = dict(max_new_tokens=int(n_new), seed=int(seed), temperature=float(temperature))
left, right = st.columns(2)
left.subheader("Unsteered")
right.subheader(f"Steered (strength {strength:g})")
plain = _shell.call("Generating", steering.generate, model, ctx.prompt, **kw)
steered = _shell.call("Generating steered", steering.generate, model, ctx.prompt, iv.with_strength(strength), **kw)
if plain is not _shell.FAILED:
    left.markdown(f"{ctx.prompt}**{plain}**")
if steered is not _shell.FAILED:
    right.markdown(f"{ctx.prompt}**{steered}**")
