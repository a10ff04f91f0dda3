"""What every page shares: the sidebar (model picker, prompt box), the cached model, and
`call`, which runs a library function under a spinner and turns any error into a readable
message instead of a traceback.

A page does:

    from lenslab.app import _shell
    ctx = _shell.context()          # stops the page (with a message) if no model is loaded
    result = _shell.call("Computing X", lenslab.something, ctx.model, ctx.prompt)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

import lenslab
from lenslab import figures, steering, zoo
from lenslab._errors import LenslabError

SOURCES = ("Zoo", "Hugging Face id", "Local path")
_CTX = "_lenslab_ctx"


@dataclass(frozen=True)
class Context:
    """The sidebar's choices: model name, the loaded model (None if loading failed), prompt."""

    name: str
    model: object | None
    prompt: str


class _Failed:
    """Marker returned by `call` when the function raised (the error is already shown)."""

    def __bool__(self) -> bool:
        return False


FAILED = _Failed()


def show_error(what: str, exc: BaseException) -> None:
    """Show `exc` as a readable message: LenslabError's text, else a one-line summary with the
    traceback folded away in an expander."""
    if isinstance(exc, LenslabError):
        st.error(f"{what}: {exc}", icon=":material/error:")
        return
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    st.error(f"{what} failed: {type(exc).__name__}{': ' + msg[:300] if msg else ''}", icon=":material/error:")
    with st.expander("Details"):
        st.code("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:], language="text")


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """One re-entrant lock per loaded model. The model is cached once for every browser session,
    and steering / switching / patching add TransformerLens hooks to it while they run, so two
    sessions computing on it at once would see each other's hooks: `call` holds this lock."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def call(what: str, fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` under a spinner labelled `what`, holding the sidebar model's lock
    (`model_lock`); on error show a message and return `FAILED` (falsy). Streamlit's own control
    flow (st.stop, st.rerun) passes through."""
    ctx = st.session_state.get(_CTX)
    model = ctx.model if ctx is not None and ctx.model is not None else None
    try:
        with st.spinner(f"{what}…"), model_lock(model) if model is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)
    except Exception as exc:
        show_error(what, exc)
        return FAILED


@st.cache_resource(show_spinner=False, max_entries=4)
def load_model(name: str):
    """`lenslab.load_model(name)`, cached across reruns and sessions (one copy per name)."""

    return lenslab.load_model(name, device="auto")


def token_text(token: str) -> str:
    """A token as visible text: whitespace shown as ␣ and ↵, backticks made harmless."""
    return token.replace("`", "ˋ").replace("\n", "↵").replace(" ", "␣") or "∅"


def config_line(model) -> str:
    """One line about the model: layers, heads, widths, vocabulary, device."""
    cfg = model.cfg
    return (
        f"{cfg.n_layers} layers · {cfg.n_heads} heads · d_model {cfg.d_model} · "
        f"vocab {cfg.d_vocab} · context {cfg.n_ctx} · {cfg.device}"
    )


def _zoo_names() -> list[str]:

    return zoo.zoo_names()


def _initial_default() -> str | None:

    env = os.environ.get("LENSLAB_DEFAULT_MODEL", "").strip()
    if env:
        return env
    try:
        return zoo.default_model()
    except LenslabError:
        return None


def default_prompt(name: str) -> str:
    """The prompt the sidebar opens with for model `name`: `zoo.default_prompts(name).prompt`, the
    one the CLI falls back to as well."""
    return zoo.default_prompts(name).prompt


def _init_state(zoo_names: list[str]) -> None:
    ss = st.session_state
    if "model_source" in ss:
        return
    default = _initial_default()
    if default in zoo_names:
        ss["model_source"], ss["zoo_model"] = "Zoo", default
    elif default and Path(default).expanduser().is_dir():
        ss["model_source"], ss["local_path"] = "Local path", default
    elif default:  # an HF id, or a zoo name that does not exist: load_model will explain
        ss["model_source"], ss["hf_id"] = "Hugging Face id", default
    else:
        ss["model_source"] = "Hugging Face id"


def sidebar() -> Context | None:
    """Draw the sidebar, load the chosen model (cached) and remember the choices for the pages."""
    zoo_names = _zoo_names()
    _init_state(zoo_names)
    ss = st.session_state
    with st.sidebar:
        st.markdown("## lenslab")
        st.radio("Model source", SOURCES, key="model_source", horizontal=True)
        source = ss["model_source"]
        if source == "Zoo":
            if zoo_names:
                if ss.get("zoo_model") not in zoo_names:
                    ss["zoo_model"] = zoo_names[0]
                st.selectbox("Zoo model", zoo_names, key="zoo_model")
            else:
                st.warning("The model zoo is empty: run `lenslab zoo train induction-2l`, or pick another source.")
            name = ss.get("zoo_model", "") if zoo_names else ""
        elif source == "Hugging Face id":
            st.text_input(
                "Hugging Face id",
                key="hf_id",
                placeholder="gpt2, EleutherAI/pythia-70m, ...",
                help="Loaded with lenslab.load_model: needs the network or the local Hugging Face cache.",
            )
            name = ss.get("hf_id", "")
        else:
            st.text_input(
                "Local path",
                key="local_path",
                placeholder="/path/to/model_dir",
                help="A folder with a Hugging Face config and safetensors, or a lenslab zoo-format folder.",
            )
            name = ss.get("local_path", "")
        name = (name or "").strip()

        # The prompt follows the model's default prompt until the user edits it.
        if name and ss.get("_prompt_model") != name:
            new_default = default_prompt(name)
            if "prompt" not in ss or ss["prompt"] == ss.get("_prompt_default"):
                ss["prompt"] = new_default
            ss["_prompt_model"], ss["_prompt_default"] = name, new_default
        ss.setdefault("prompt", zoo.GENERIC_PROMPT)
        st.text_area("Prompt", key="prompt", height=110, help="Press Ctrl+Enter (or click outside) to apply.")
        prompt = ss["prompt"]

    if not name:
        st.info("Choose a model in the sidebar.", icon=":material/arrow_back:")
        ss[_CTX] = Context(name="", model=None, prompt=prompt)
        return ss[_CTX]
    model = call(f"Loading model {name!r}", load_model, name)
    ctx = Context(name=name, model=model or None, prompt=prompt)
    if model:
        st.sidebar.caption(config_line(model))
    ss[_CTX] = ctx
    return ctx


def context() -> Context:
    """The sidebar's context for a page; stops the page if no model is loaded (the sidebar has
    already said why)."""
    ctx = st.session_state.get(_CTX)
    if ctx is None or ctx.model is None:
        st.stop()
    return ctx


def continuation_markdown(prompt: str, text: str) -> str:
    """The prompt, then the continuation in bold (its surrounding spaces outside the ** so it renders)."""
    core = text.strip()
    if not core:
        return prompt + text
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    return f"{prompt}{lead}**{core}**{trail}"


def stream_into(col, model, prompt: str, intervention, **kw) -> str:
    """Stream the continuation of `prompt` (steered by `intervention`, or None) into the column
    `col`, token by token; returns it. Run streams one after the other, never interleaved: each
    holds its hooks on the shared model while it generates."""

    box, text = col.empty(), ""
    box.markdown(prompt)
    for piece in steering.stream(model, prompt, intervention, **kw):
        text += piece
        box.markdown(continuation_markdown(prompt, text))
    return text


def progress_bar(label: str):
    """A Streamlit progress bar and the `(done, total)` callback the library's `progress=` takes."""
    bar = st.progress(0.0, text=label)
    return bar, lambda done, total: bar.progress(done / max(total, 1), text=f"{label}: {done}/{total}")


def downloads(result, key: str) -> None:
    """Buttons to download `result` as JSON and its figure as SVG, PNG, PDF or HTML
    (exported with `lenslab.figures.export` on request: static formats take a few seconds)."""

    ss = st.session_state
    c1, c2, c3 = st.columns([1, 1, 3])
    c1.download_button("JSON", result.to_json(), file_name=f"{key}.json", mime="application/json", key=f"dl_json_{key}")
    fmt = c2.selectbox("Figure format", ["svg", "png", "pdf", "html"], key=f"fmt_{key}", label_visibility="collapsed")
    if c3.button(f"Prepare {fmt.upper()}", key=f"prep_{key}"):
        with tempfile.TemporaryDirectory() as tmp:
            path = call(f"Exporting {fmt.upper()}", figures.export, result, Path(tmp) / f"{key}.{fmt}")
            if path:
                ss[f"dl_bytes_{key}"] = (fmt, path.read_bytes())
    if ss.get(f"dl_bytes_{key}", (None,))[0] == fmt:
        c3.download_button(
            f"Download {fmt.upper()}", ss[f"dl_bytes_{key}"][1], file_name=f"{key}.{fmt}", key=f"dl_fig_{key}"
        )
