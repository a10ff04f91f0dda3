"""The real app in a real browser: exactly the README command, `python3 run.py app --headless`, started
in the repository root on a free port, opened in Debian's Chromium through Playwright. Every page of
the navigation is visited and fails the test on an error box (`st.error`), an exception box, a
traceback or a blank page; the Model page is also checked for the model's content, with a screenshot.

Playwright's own browser download is not reachable here, so it drives `/usr/bin/chromium`.
A missing Chromium or Playwright skips with the reason, which tests/conftest.py turns into a failure
unless LENSLAB_ALLOW_SKIPS=1. No fixed sleeps: every wait is for a signal of the page itself
(Streamlit's script state on `stApp`, headings, drawn Plotly figures).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lenslab import inspection, zoo

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401 (availability check)
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        pytest.skip("browser test needs " + " and ".join(missing))


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lenslab app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"lenslab app did not answer on port {port} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(params=[None, "zoo/moe-refusal"], ids=["readme-command", "moe-refusal"])
def app_server(tmp_path, request):
    """`python3 run.py app --headless` in the root on a free 127.0.0.1 port; yields (url, model name, log).

    First exactly the README command (the default model), then with `--model zoo/moe-refusal`, so
    the Experts page has a Mixture-of-Experts model to show.

    run.py uses the venv these tests run in (LENSLAB_RUNPY_VENV, set by `run.py test`; set here when
    pytest was started another way), so the command installs nothing. Always stopped."""
    _need_browser()
    model = request.param or zoo.default_model()
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    env.setdefault("LENSLAB_RUNPY_VENV", sys.prefix)
    python3 = shutil.which("python3") or sys.executable
    extra = ["--model", model] if request.param else []
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [python3, "run.py", "app", "--headless", "--port", str(port), *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, port, log)
        yield f"http://127.0.0.1:{port}", model, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # run.py, the CLI and the streamlit server it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


# Streamlit's root element carries the script run state ("initial", "running", "notRunning", ...)
# and the server connection state: the page is done when its script has stopped running.
_IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"][data-test-connection-state="CONNECTED"]'
_PLOTS_DRAWN = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .every(p => p.querySelector('.main-svg') && p.querySelector('.plot-container'))"""


def _settled(page, timeout_ms: int = 120_000) -> None:
    """Wait until Streamlit has finished running the page script (the caller has already seen an
    element the script draws, so a run has started), its status widget is gone and every Plotly
    figure on the page has drawn its SVG."""
    page.locator(_IDLE).wait_for(state="attached", timeout=timeout_ms)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)
    page.wait_for_function(_PLOTS_DRAWN, timeout=timeout_ms)


def _problems(page) -> list[str]:
    """Error boxes, exception boxes and tracebacks on the page, as text."""
    found = [
        page.locator(sel).nth(i).inner_text()[:500]
        for sel in ('[data-testid="stException"]', '[data-testid="stAlertContentError"]')
        for i in range(page.locator(sel).count())
    ]
    if "Traceback (most recent call last)" in page.inner_text("body"):
        found.append("a traceback on the page")
    return found


# app/main.py's
PAGES = ("Model", "Circuits", "Graph", "Sinks", "Steer", "Experts", "Features", "Lens", "Scale & norms")


def test_pages_are_the_apps_navigation():
    main = (Path(__file__).resolve().parent.parent / "app" / "main.py").read_text()
    assert tuple(re.findall(r'st\.Page\("page_\w+\.py", title="([^"]+)"', main)) == PAGES


def test_every_page_renders_in_chromium(app_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, model_name, log = app_server
    prompt = zoo.default_prompt(model_name)
    import lenslab

    tokens = inspection.tokenize(lenslab.load_model(model_name, device="cpu"), prompt).str_tokens if prompt else []
    shots = {}
    texts = {}
    problems = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("heading", name="Attention patterns").wait_for(timeout=90_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # a figure was drawn
            page.get_by_role("heading", name="Top next-token predictions").wait_for(timeout=60_000)
            n_plots = 0
            for title in PAGES:
                if title != "Model":
                    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
                page.get_by_role("heading", name=f"{title} · {model_name}").wait_for(timeout=90_000)
                _settled(page)
                if title == "Model":
                    n_plots = page.locator(".js-plotly-plot").count()
                shots[title] = tmp_path / f"{model_name.replace('/', '_')}_{title.lower()}.png"
                page.screenshot(path=str(shots[title]), full_page=True)
                texts[title] = page.inner_text('[data-testid="stMain"]')
                problems[title] = _problems(page)
        finally:
            browser.close()
    if os.environ.get("LENSLAB_SCREENSHOT_DIR"):  # keep a copy to look at
        Path(os.environ["LENSLAB_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        for shot in shots.values():
            (Path(os.environ["LENSLAB_SCREENSHOT_DIR"]) / shot.name).write_bytes(shot.read_bytes())
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
    for title in PAGES:
        body = texts[title].replace(f"{title} · {model_name}", "").strip()
        assert len(body) > 100, f"page {title} is (nearly) blank: {texts[title]!r}"
        assert shots[title].stat().st_size > 20_000, f"screenshot of {title} is suspiciously small (blank page?)"
    text = texts["Model"]
    for heading in ("Tokenization", "Attention patterns", "Logit lens", "Top next-token predictions"):
        assert heading in text
    assert n_plots >= 3
    if tokens:
        assert any(t.strip() and t.strip() in text for t in tokens[1:]), (tokens, text[:2000])
    assert "Email" not in log.read_text()  # the first run never prompts
