"""The README's and the docs' code blocks run as written.

Every ```python block of README.md and docs/**/*.md runs, page by page in document order, in one
namespace per page, in a subprocess with the repository off sys.path (PYTHONSAFEPATH=1), offline,
with a temporary working directory. A block that cannot run here (network, GPU, a placeholder
path, a fragment, minutes of CPU) carries `<!-- no-test: reason -->` on the line before its fence
(docs/design.md, "Code blocks in the docs"). ```bash blocks are not run; the `lenslab ...`
commands they name must exist in the CLI's parser (their --help runs in tests/test_cli.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>.*?)\s*-->$")


def blocks(text: str) -> list[dict]:
    """Fenced blocks: line (1-based, the fence), lang, code (de-indented), skip reason or None."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ind, fence = m["indent"], m["fence"]
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])):
            j += 1
        code = "\n".join(l[len(ind) :] if l.startswith(ind) else l.lstrip() for l in lines[i + 1 : j])
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NO_TEST.match(lines[k].strip()) if k >= 0 else None
        out.append(
            {
                "line": i + 1,
                "lang": (m["info"].split() or [""])[0],
                "code": code,
                "skip": marker["reason"] if marker else None,
            }
        )
        i = j + 1
    return out


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _python(page: Path) -> list[dict]:
    return [b for b in blocks(page.read_text(encoding="utf-8")) if b["lang"] in ("python", "py")]


_DRIVER = r"""
import json, sys, traceback
pages = json.load(open(sys.argv[1]))
results = {}
for page, todo in pages.items():
    ns, done = {"__name__": "__main__"}, []
    for b in todo:
        try:
            exec(compile(b["code"], f"{page}:{b['line']}", "exec"), ns)
            done.append([b["line"], None])
        except BaseException:
            done.append([b["line"], traceback.format_exc(limit=6)])
            break  # later blocks of the page build on this one
    results[page] = done
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """Run every page's runnable blocks in one subprocess (imports and zoo loads paid once)."""
    work = tmp_path_factory.mktemp("doc_blocks")
    todo = {_rel(p): [b for b in _python(p) if b["skip"] is None] for p in PAGES}
    (work / "in.json").write_text(json.dumps({k: v for k, v in todo.items() if v}))
    env = dict(
        os.environ,
        PYTHONSAFEPATH="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PLOTLY_RENDERER="json",
        MPLBACKEND="Agg",
    )  # fig.show() prints JSON instead of opening a browser
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(work / "in.json"), str(work / "out.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,  # every page in one process; a loaded 2-core machine needs the margin
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "out.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("page", [_rel(p) for p in PAGES if any(b["skip"] is None for b in _python(p))])
def test_page_python_blocks_run(ran, page):
    todo = [b for b in _python(ROOT / page) if b["skip"] is None]
    done = ran[page]
    for line, err in done:
        assert err is None, f"{page}:{line} failed:\n{err}"
    assert [line for line, _ in done] == [b["line"] for b in todo]


def test_no_test_markers_have_a_reason_and_a_block():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = sum(b["skip"] is not None for b in blocks(text))
        assert marked == len(re.findall(r"(?m)^\s*<!--\s*no-test:", text)), (
            f"{_rel(page)}: a no-test marker not right before a fence"
        )
        for b in blocks(text):
            if b["skip"] is not None:
                assert len(b["skip"]) >= 8, f"{_rel(page)}:{b['line']}: say why the block cannot run"


def _transcripts():
    """(page, line, expression, error type, message) for every `>>>` line of a skipped REPL-transcript
    block that an `Error: message` line follows."""
    for page in PAGES:
        for b in _python(page):
            if b["skip"] is None or not b["code"].lstrip().startswith(">>>"):
                continue
            lines = b["code"].splitlines()
            for i, line in enumerate(lines[:-1]):
                m = re.match(r"^(\w+(?:Error|Exception)): (.*)$", lines[i + 1])
                if line.startswith(">>> ") and m:
                    yield _rel(page), b["line"] + 1 + i, line[4:], m.group(1), m.group(2)


_TRANSCRIPTS = list(_transcripts())


def test_transcripts_were_found():
    assert len(_TRANSCRIPTS) >= 1  # docs/getting-started.md shows load_model's errors


@pytest.mark.parametrize("page,line,expr,err,message", _TRANSCRIPTS, ids=[f"{p}:{l}" for p, l, *_ in _TRANSCRIPTS])
def test_repl_transcript_shows_the_real_error(page, line, expr, err, message):
    """What the page shows after `>>> expr` is what the library raises: the exception's class and its
    message (`...` in the page stands for any text)."""
    import lenslab

    with pytest.raises(Exception) as info:
        eval(expr, {"lenslab": lenslab})
    assert type(info.value).__name__ == err, f"{page}:{line}: raises {type(info.value).__name__}, the page shows {err}"
    pattern = "^" + ".*".join(map(re.escape, message.split("..."))) + "$"
    assert re.match(pattern, str(info.value), re.S), (
        f"{page}:{line}: the page shows\n  {message}\nthe library says\n  {info.value}"
    )


def _named_commands():
    """(page, line, argv) for every `lenslab ...` command line of the bash blocks."""
    for page in PAGES:
        for b in blocks(page.read_text(encoding="utf-8")):
            if b["lang"] not in ("bash", "sh", "shell", "console"):
                continue
            for line in b["code"].splitlines():
                line = line.strip().removeprefix("$ ")
                m = re.match(r"^(?:\S*/)?(?:lenslab|python3? run\.py cli)\s+(.*)$", line)
                if m:
                    yield _rel(page), b["line"], m.group(1).split()


def test_bash_blocks_name_existing_subcommands():
    import argparse

    from lenslab.cli import build_parser

    def subparsers(p):
        return next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)

    seen = 0
    for page, line, argv in _named_commands():
        parser = build_parser()
        for word in argv:
            choices = subparsers(parser)
            if choices is None or word.startswith("-"):
                break
            for alt in word.split("|"):  # `lenslab sinks attention|massive|ablate`
                assert alt in choices, (
                    f"{page}:{line}: `{' '.join(argv)}`: no subcommand {alt!r} (have {sorted(choices)})"
                )
                seen += 1
            parser = choices[alt]
    assert seen >= 20  # the docs name dozens of commands: the extraction found them
