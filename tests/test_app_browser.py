"""A real browser on `python app.py`: headless Chromium (Debian's, driven by Playwright) types a story setting and two
shots, sees the streamed video play before each shot has finished generating, stops a third shot midway (the chat
keeps two shots) and saves a screenshot.

Set-up (done by the CI script): `apt-get install -y chromium ffmpeg` and `pip install playwright==1.65.2`.
The time from the click to the first advancing video frame is printed and written next to the screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
PLAYER_STATE = """() => {
    const v = document.querySelector('#player video:not(.previous-shot)');  // each shot gets a new <video>
    const s = document.querySelector('#status textarea');
    return {time: v ? v.currentTime : 0, error: v && v.error ? v.error.code : null, status: s ? s.value : ''};
}"""

if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install -y chromium)", allow_module_level=True)
if shutil.which("ffprobe") is None:
    pytest.skip("no ffmpeg/ffprobe on PATH (apt-get install -y ffmpeg)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py` (the embedded model) on a free port, as a visitor would start it."""
    port = free_port()
    env = os.environ | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "SHOTSTREAM_MODEL": "tiny"}
    log = (tmp_path_factory.mktemp("app") / "app.log").open("w")
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"app.py did not start; see {log.name}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def submit(page, shot: int) -> float:
    """Click Generate until the page sends the event; returns the time of that click. Gradio ends an event a moment
    after its last output and ignores clicks until then (trigger_mode "once": no double shots from a double click)."""
    for _ in range(20):
        start = time.perf_counter()
        try:
            with page.expect_request(lambda request: "/queue/join" in request.url, timeout=1_000):
                page.click("#generate")
            return start
        except sync_api.TimeoutError:
            continue
    pytest.fail(f"the page never sent shot {shot}")


def stream_shot(page, prompt: str, shot: int) -> tuple[float, float]:
    """Type and submit a shot; returns (seconds to the first playing frame, seconds to the shot's end)."""
    page.fill("#prompt textarea", prompt)
    page.evaluate("() => document.querySelectorAll('#player video').forEach(v => v.classList.add('previous-shot'))")
    start = submit(page, shot)
    first_frame = None
    while time.perf_counter() - start < 240:
        state = page.evaluate(PLAYER_STATE)
        assert state["error"] is None, state
        finished = state["status"].startswith(f"Shot {shot}:") and "Done" in state["status"]
        if first_frame is None and state["time"] > 0:
            first_frame = time.perf_counter() - start
            assert not finished, f"the video only started after the shot was done: {state}"
        if finished:
            return first_frame, time.perf_counter() - start
        time.sleep(0.05)
    pytest.fail(f"shot {shot} did not finish: {page.evaluate(PLAYER_STATE)}")


def test_browser_streams_two_shots(app_url, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(app_url)
        page.wait_for_selector("#setting textarea")
        page.fill("#setting textarea", "A red circle in the meadow.")
        timings = [
            stream_shot(page, "Close-up of the circle bounces.", 1),
            stream_shot(page, "Wide shot of the circle moves left, on the right.", 2),
        ]
        page.wait_for_function("document.querySelectorAll('#chat video').length == 2", timeout=30_000)
        # a visitor who stops mid-shot: the story and the chat stay as they were
        page.fill("#prompt textarea", "Medium shot of the circle shrinks.")
        submit(page, 3)
        page.wait_for_function("document.querySelector('#status textarea').value.startsWith('Shot 3: chunk 1')")
        page.click("#stop")
        page.wait_for_function("document.querySelector('#status textarea').value.startsWith('Stopped')")
        time.sleep(5)  # longer than the rest of the shot would have taken
        assert page.eval_on_selector_all("#chat video", "videos => videos.length") == 2
        assert page.input_value("#prompt textarea") == "Medium shot of the circle shrinks."
        assert page.input_value("#setting textarea") == "A red circle in the meadow."
        page.screenshot(path=tmp_path / "app.png", full_page=True)
        browser.close()
    report = "\n".join(
        f"shot {k + 1}: first streamed frame playing {first:.2f} s after the click; shot done after {done:.2f} s"
        for k, (first, done) in enumerate(timings)
    )
    (tmp_path / "timings.txt").write_text(report + "\n")
    print(f"\n{report}\nscreenshot: {tmp_path / 'app.png'}")
    assert all(first is not None and first < done for first, done in timings)
