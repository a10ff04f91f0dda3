"""Page "Features": sparse-autoencoder features of the sidebar model. Pick an SAE (a zoo SAE of the
model or a folder saved by sae-lens), then: Lookup (the top features of each token of the sidebar
prompt), Dashboard (one feature: top contexts with token highlighting, activation histogram and
density, logit effects, downloads), Search (features by token, substring or id), Index (build or
resume the feature store for a corpus, with a progress bar) and Steer (ablate, clamp or add a
feature and stream the unmodified and modified generations side by side). Numerics live in
`lenslab.probes.sae`, `lenslab.probes.features` and `lenslab.steering.features`.

Stores go to `$LENSLAB_FEATURE_DIR` (default `~/.cache/lenslab/features/`), one store folder
(`*.store`: Parquet tables) per model, SAE (hook and weights hash) and corpus.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import streamlit as st

from lenslab import steering, zoo
from lenslab.app import _dashboard, _shell
from lenslab.probes import features as F
from lenslab.probes import sae as saes
from lenslab.steering import features as SF

ctx = _shell.context()
model, name = ctx.model, ctx.name
ss = st.session_state
st.title(f"Features · {name}")


def feature_dir() -> Path:
    """Where stores live: `$LENSLAB_FEATURE_DIR`, else `~/.cache/lenslab/features`."""
    env = os.environ.get("LENSLAB_FEATURE_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lenslab" / "features"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


@st.cache_resource(show_spinner=False, max_entries=8)
def _load_sae(source: str, device: str, stamp: float):
    sae = saes.load_sae(source, device=device)
    sae.lenslab_source = source
    return sae


@st.cache_resource(show_spinner=False, max_entries=8)
def _sae_hash(source: str, device: str, stamp: float) -> str:
    return F.sae_hash(_load_sae(source, device, stamp))


def _stamp(source: str) -> float:
    folder = Path(source).expanduser()
    try:
        folder = folder if folder.is_dir() else saes.zoo_sae_path(source)
    except Exception:
        return 0.0
    return max((p.stat().st_mtime for p in folder.glob("*") if p.is_file()), default=0.0)


# --- the SAE ---------------------------------------------------------------------------------------
zoo_saes = saes.list_saes(name)
sources = (["Zoo SAE"] if zoo_saes else []) + ["Folder"]
c1, c2 = st.columns([1, 3])
where = c1.radio("SAE", sources, horizontal=True, key="feat_source")
if where == "Zoo SAE":
    if ss.get("feat_zoo") not in zoo_saes:
        ss["feat_zoo"] = zoo_saes[0]
    source = c2.selectbox("Zoo SAE of this model", zoo_saes, key="feat_zoo")
else:
    source = c2.text_input(
        "Folder saved by sae-lens (cfg.json + sae_weights.safetensors)",
        key="feat_path",
        placeholder="/path/to/sae",
        help="e.g. the --out folder of `lenslab sae train`",
    ).strip()
    if not source:
        if zoo_saes:
            st.info("Give the folder of an SAE trained on this model.")
        else:
            with_sae = [m for m in zoo.zoo_names() if saes.list_saes(m)]
            st.info(
                f"{name} has no zoo SAE (yet): give the folder of an SAE trained on it, e.g. the `--out` of "
                f"`lenslab sae train --model {name} --hook HOOK --out DIR`"
                + (f", or pick a model that ships one in the sidebar: {', '.join(with_sae)}" if with_sae else "")
                + ".",
                icon=":material/info:",
            )
        st.stop()
device = str(getattr(model.cfg, "device", "cpu") or "cpu")
stamp = _stamp(source)
sae = _shell.call("Loading the SAE", _load_sae, source, device, stamp)
if not sae or _shell.call("Checking the SAE against the model", saes.check_sae, model, sae) is _shell.FAILED:
    st.stop()
hook, d_sae = sae.cfg.metadata.hook_name, int(sae.cfg.d_sae)
st.caption(
    f"`{hook}` · {type(sae).__name__} · d_in {sae.cfg.d_in} · {d_sae} features"
    + (f" · k {sae.cfg.k}" if hasattr(sae.cfg, "k") else "")
)
card = _shell.call("Reading the SAE card", saes.read_sae_card, source)
if card:
    with st.expander("SAE card (training, reconstruction metrics)"):
        st.markdown(card)

ss.setdefault("feat_id", 0)
if ss.get("_feat_sae") != (name, source):  # a new SAE: start at feature 0
    ss["feat_id"], ss["_feat_sae"] = 0, (name, source)
    ss.pop("feat_search", None)
ss["feat_id"] = min(int(ss["feat_id"]), d_sae - 1)


def open_feature(f: int) -> None:
    ss["feat_id"] = int(f)


def open_selected() -> None:
    """Heatmap click: its column is a feature ("f12")."""
    try:
        x = str(ss["feat_lookup_fig"]["selection"]["points"][0]["x"])
    except (KeyError, IndexError, TypeError):
        return
    if x.startswith("f") and x[1:].isdigit():
        open_feature(int(x[1:]))


lookup_tab, dash_tab, search_tab, index_tab, steer_tab = st.tabs(["Lookup", "Dashboard", "Search", "Index", "Steer"])

# --- Index (first: it names the store the other tabs read) ------------------------------------------
with index_tab:
    st.caption(
        "Run the model and the SAE over a corpus once; per-feature statistics and top contexts go to a "
        f"store under `{feature_dir()}` (set LENSLAB_FEATURE_DIR to move it). An interrupted run resumes "
        "where it stopped."
    )
    c1, c2, c3 = st.columns([2, 1, 1])
    corpus_kind = c1.radio(
        "Corpus", ["Built-in corpus of the model", "Corpus file"], horizontal=True, key="feat_corpus"
    )
    if corpus_kind == "Corpus file":
        cpath = c2.text_input("File (.txt, .json, .jsonl)", key="feat_corpus_path").strip()
        tag = ""
        if cpath and Path(cpath).expanduser().is_file():
            tag = f"{_slug(Path(cpath).stem)}-{hashlib.sha256(Path(cpath).expanduser().read_bytes()).hexdigest()[:8]}"
        elif cpath:
            st.warning(f"There is no file {cpath!r}: give a .txt (one document per line), .json or .jsonl corpus.")
        corpus_args = ("Reading the corpus", F.read_corpus, Path(cpath).expanduser()) if cpath else None
    else:
        n_docs = int(c2.number_input("Prompts", 1, 100_000, 256, key="feat_n_docs"))
        tag = f"builtin-{n_docs}"
        corpus_args = ("Making the corpus", F.corpus_for, model, n_docs)
    batch_size = int(c3.number_input("Batch", 1, 512, 16, key="feat_batch"))
    store_path = feature_dir() / (
        f"{_slug(name)}__{_slug(hook)}__{_sae_hash(source, device, stamp)[:8]}__{tag or 'none'}.store"
    )
    state = None
    if F.is_store(store_path):
        with F.FeatureStore(store_path) as st_:
            state = st_.describe()
            done = st_.complete
        (st.success if done else st.warning)(state)
    else:
        st.info(f"No store yet for this corpus ({store_path.name}).")
    b1, b2, _ = st.columns([1, 1, 3])
    go = b1.button("Build / resume index", type="primary", key="feat_index", disabled=corpus_args is None or not tag)
    redo = b2.button("Start over", key="feat_reindex", disabled=corpus_args is None or not tag or state is None)
    if go or redo:
        corpus = _shell.call(*corpus_args)
        if corpus is not None and len(corpus):  # a list of texts or a [n, pos] token tensor
            n_batches = max(1, -(-len(corpus) // batch_size))
            bar = st.progress(0.0, text="Indexing…")

            def tick(b: int) -> None:
                bar.progress(min(1.0, (b + 1) / n_batches), text=f"Indexing: batch {b + 1} of {n_batches}")

            store_path.parent.mkdir(parents=True, exist_ok=True)
            store = _shell.call(
                "Indexing",
                F.index,
                model,
                sae,
                corpus,
                store_path,
                batch_size=batch_size,
                resume=not redo,
                sae_source=source,
                progress=False,
                on_batch=tick,
            )
            if store:
                st.success(f"Indexed: {store.describe()}")
                store.close()
have_store = F.is_store(store_path)

# --- Lookup -----------------------------------------------------------------------------------------
with lookup_tab:
    k = st.number_input("Top k per token", 1, 64, 5, key="feat_k")
    res = _shell.call("Looking up features", F.lookup, model, sae, ctx.prompt, int(k))
    if res:
        st.plotly_chart(res.figure(), key="feat_lookup_fig", on_select=open_selected, selection_mode="points")
        df = res.table()
        st.dataframe(df, hide_index=True, key="feat_lookup_table")
        if res.union:
            c1, c2 = st.columns([2, 3])
            pick = c1.selectbox(
                "Feature",
                res.union,
                key="feat_lookup_pick",
                format_func=lambda f: f"f{f} (max {max(r[res.union.index(f)] for r in res.matrix):.3g})",
            )
            c2.button("Open its dashboard", key="feat_lookup_open", on_click=open_feature, args=(pick,))
            st.caption("Click a column of the heatmap or pick a feature: the Dashboard and Steer tabs follow it.")
        else:
            st.info("No feature fires on this prompt.")
        _shell.downloads(res, "feature_lookup")


# --- Dashboard ---------------------------------------------------------------------------------------
with dash_tab:
    c1, c2 = st.columns([1, 3])
    f = int(c1.number_input("Feature", 0, d_sae - 1, key="feat_id"))
    if not have_store:
        c2.info("Build the index (Index tab) for contexts, histogram and density; the logit effects need no index.")
        pos, neg = _shell.call("Logit effects", F.logit_effects, model, sae, f) or ([], [])
        tok = lambda i: _shell.token_text(model.to_single_str_token(int(i)))
        a, b = st.columns(2)
        a.dataframe([{"promoted": tok(i), "logit": v} for i, v in pos], hide_index=True)
        b.dataframe([{"suppressed": tok(i), "logit": v} for i, v in neg], hide_index=True)
    else:
        n_ctx = int(c2.slider("Contexts", 1, 50, 10, key="feat_n_ctx"))
        dash = _shell.call(
            "Building the dashboard", F.FeatureDashboard.from_store, store_path, f, model, sae, n_contexts=n_ctx
        )
        if dash:
            _dashboard.render(dash, "feat_dash", f"feature_{f}")

# --- Search ------------------------------------------------------------------------------------------
with search_tab:
    if not have_store:
        st.info("Search reads the feature store: build it in the Index tab first.")
    else:
        c1, c2, c3, c4, c5 = st.columns([2, 2, 1, 1, 1])
        by = c1.radio("By", ["token", "substring", "feature"], horizontal=True, key="feat_search_by")
        query = c2.text_input("Query", key="feat_search_q", placeholder="a token, part of one, or a feature id")
        rank = c3.selectbox(
            "Rank by",
            F.SEARCH_ORDERS,
            key="feat_search_rank",
            disabled=by == "feature",
            help="max / mean activation on the matched tokens, or share: the fraction of the "
            "feature's firings that are on them (token-specific features first)",
        )
        kk = c4.number_input("Hits", 1, 200, 10, key="feat_search_k")
        if c5.button("Search", type="primary", key="feat_search_go") and query.strip():
            q = query.strip()
            kw = {"feature": int(q)} if by == "feature" and q.isdigit() else {by: q, "by": rank}
            if by == "feature" and not q.isdigit():
                st.error("A feature id is a whole number, e.g. 12.")
            else:
                ss["feat_search"] = _shell.call("Searching", F.search, store_path, k=int(kk), **kw)
        found = ss.get("feat_search")
        if found:
            st.dataframe(found.table(), hide_index=True)
            if found.hits:
                c1, c2 = st.columns([2, 3])
                pick = c1.selectbox("Feature", found.features, key="feat_search_pick", format_func=lambda x: f"f{x}")
                c2.button("Open its dashboard", key="feat_search_open", on_click=open_feature, args=(pick,))
                st.plotly_chart(found.figure(), key="feat_search_fig")
            else:
                st.info("No feature fires on the matched tokens in the indexed corpus.")

# --- Steer -------------------------------------------------------------------------------------------
with steer_tab:
    st.caption(
        "Ablate (activation → 0), clamp (→ c) or add (+ c · W_dec[f]) the feature at the SAE's hook; the SAE's "
        "reconstruction error is kept. Same prompt and seed on both sides."
    )
    c1, c2, c3, c4 = st.columns(4)
    f = int(ss["feat_id"])
    c1.markdown(f"Feature **f{f}** (set it in the Dashboard tab)")
    mode = c2.radio("Edit", ["ablate", "clamp", "add"], horizontal=True, key="feat_steer_mode")
    value = c3.number_input(
        "c",
        -1000.0,
        1000.0,
        5.0,
        key="feat_steer_value",
        disabled=mode == "ablate",
        help="clamp: the activation to hold; add: the multiple of W_dec[f] to add",
    )
    positions = c4.selectbox("Positions", ["all", "prompt", "generated"], key="feat_steer_pos")
    c1, c2, c3, c4 = st.columns(4)
    strength = c1.slider("Strength", 0.0, 2.0, 1.0, 0.05, key="feat_steer_strength")
    n_new = c2.number_input("New tokens", 1, 200, 20, key="feat_steer_n")
    temperature = c3.number_input("Temperature", 0.0, 5.0, 0.0, key="feat_steer_temp")
    seed = c4.number_input("Seed", 0, 10_000, 0, key="feat_steer_seed")
    if mode == "ablate":
        iv = _shell.call("Building the edit", SF.ablate_feature, sae, f, positions=positions, strength=float(strength))
    elif mode == "clamp":
        iv = _shell.call(
            "Building the edit", SF.clamp_feature, sae, f, float(value), positions=positions, strength=float(strength)
        )
    else:
        iv = _shell.call(
            "Building the edit", SF.add_feature, sae, f, float(value), positions=positions, strength=float(strength)
        )
    ok = iv and _shell.call("Checking the edit", steering.validate, model, iv) is not _shell.FAILED
    if st.button("Generate side by side", type="primary", key="feat_steer_go", disabled=not ok):
        kw = dict(max_new_tokens=int(n_new), seed=int(seed), temperature=float(temperature))
        left, right = st.columns(2)
        left.subheader("Unmodified")
        right.subheader(iv.name)
        base = _shell.call("Generating", _shell.stream_into, left, model, ctx.prompt, None, **kw)
        mod = base is not _shell.FAILED and _shell.call(
            "Generating with the edit", _shell.stream_into, right, model, ctx.prompt, iv, **kw
        )
        if mod is not _shell.FAILED and mod is not False:
            ss["feat_steer_out"] = (ctx.prompt, iv.name, base, mod)
    elif ss.get("feat_steer_out") and ss["feat_steer_out"][0] == ctx.prompt:
        prompt, label, base, mod = ss["feat_steer_out"]
        left, right = st.columns(2)
        left.subheader("Unmodified")
        right.subheader(label)
        left.markdown(_shell.continuation_markdown(prompt, base))
        right.markdown(_shell.continuation_markdown(prompt, mod))
