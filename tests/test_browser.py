"""The real app in a real browser: `lenslab app` headless on a free port, opened in Debian's
Chromium through Playwright, checked for the model's content, with a screenshot.

Playwright's own browser download is not reachable here, so it drives `/usr/bin/chromium`.
In CI (CI=true) a missing Chromium fails the test; locally it is skipped with the reason.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lenslab import lens, zoo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

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
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)


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


@pytest.fixture
def app_server(tmp_path, request):
    """`lenslab app --headless` on a free 127.0.0.1 port; yields (url, model name); always stopped."""
    _need_browser()
    model = zoo.default_model() if zoo.zoo_names() else str(request.getfixturevalue("tiny_zoo_dir"))
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lenslab", "app", "--headless", "--port", str(port), "--model", model],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        _wait_healthy(proc, port, log)
        yield f"http://127.0.0.1:{port}", model, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the streamlit server it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def test_app_renders_in_chromium(app_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, model_name, log = app_server
    prompt = zoo.default_prompt(model_name)
    import lenslab

    tokens = lens.tokenize(lenslab.load_model(model_name, device="cpu"), prompt).str_tokens if prompt else []
    shot = tmp_path / "model_page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("heading", name="Attention patterns").wait_for(timeout=90_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # a figure was drawn
            page.get_by_role("heading", name="Top next-token predictions").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let plotly finish laying out before the screenshot
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")
            n_plots = page.locator(".js-plotly-plot").count()
            n_errors = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]').count()
        finally:
            browser.close()
    if os.environ.get("LENSLAB_SCREENSHOT_DIR"):  # keep a copy to look at
        Path(os.environ["LENSLAB_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["LENSLAB_SCREENSHOT_DIR"]) / shot.name).write_bytes(shot.read_bytes())
    assert shot.stat().st_size > 20_000, "screenshot is suspiciously small (blank page?)"
    assert n_errors == 0, text[:2000]
    assert "Traceback" not in text
    assert f"Model · {model_name}" in text, text[:2000]
    for heading in ("Tokenization", "Attention patterns", "Logit lens", "Top next-token predictions"):
        assert heading in text
    assert n_plots >= 3
    if tokens:
        assert any(t.strip() and t.strip() in text for t in tokens[1:]), (tokens, text[:2000])
