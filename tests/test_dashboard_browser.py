"""The live dashboard's Task Stream shows component calls, checked in headless Chromium as a person would.

Chromium (Debian's ``chromium`` package; ``ci/install_chromium.sh``) opens the
dashboard's ``/individual-task-stream`` page and is driven through its DevTools
protocol: the test reads the Bokeh document the page received over its
websocket (bar names, rows) and takes a screenshot whose pixels must show the
bars of ``Echo.sleep`` in one row per rank. Deselect with ``-m 'not browser'``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from components import Echo
from distributed.diagnostics.progress_stream import color_of
from PIL import Image
from tornado.websocket import websocket_connect

from twinkle_dask.testing import local_session

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

# The Task Stream figure's data, as the page's BokehJS holds it.
TASK_STREAM_JS = r"""
(() => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  const fig = Bokeh.documents[0].get_model_by_name('task_stream');
  if (!fig) return null;
  const d = fig.renderers[0].data_source.data;
  const col = k => Array.from(d instanceof Map ? d.get(k) : d[k]);
  return {name: col('name'), worker_thread: col('worker_thread'), y: col('y'), color: col('color')};
})()
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium; yields the DevTools websocket of its page."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium, or bash ci/install_chromium.sh)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,600",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 30 s"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bands(png: bytes, rgb: tuple[int, int, int], min_pixels: int = 20) -> list[tuple[int, int]]:
    """The horizontal bands (first and last pixel row) of the screenshot holding at least ``min_pixels`` of ``rgb``."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    rows = [y for y in range(height) if sum(pixels[x, y] == rgb for x in range(width)) >= min_pixels]
    bands: list[tuple[int, int]] = []
    for y in rows:
        if bands and y == bands[-1][1] + 1:
            bands[-1] = (bands[-1][0], y)
        else:
            bands.append((y, y))
    return bands


async def _look(ws_url: str, url: str, method: str, ranks: int,
                bars: int) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Open ``url``; wait for ``bars`` bars of ``method`` in the Task Stream and ``ranks`` rows of them on a screenshot.

    Calls reach the scheduler in batches (every 0.5 s per worker), so the page
    is read again until all of them are there, or 30 s passed.
    """
    ws = await websocket_connect(ws_url, max_message_size=64 << 20)
    ids = iter(range(1, 1 << 30))

    async def call(name: str, **params: Any) -> dict[str, Any]:
        i = next(ids)
        await ws.write_message(json.dumps({"id": i, "method": name, "params": params}))
        while True:
            message = json.loads(await ws.read_message())
            if message.get("id") == i:
                assert "error" not in message, message
                return dict(message["result"])

    try:
        await call("Page.navigate", url=url)
        rgb = tuple(int(color_of(method)[i:i + 2], 16) for i in (1, 3, 5))
        data: dict[str, Any] = {}
        bands: list[tuple[int, int]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = (await call("Runtime.evaluate", expression=TASK_STREAM_JS, returnByValue=True))["result"].get(
                "value") or {}
            if data.get("name", []).count(method) >= bars:
                shot = await call("Page.captureScreenshot", format="png")
                bands = _bands(base64.b64decode(shot["data"]), (rgb[0], rgb[1], rgb[2]))
                if len(bands) >= ranks:
                    break
            await asyncio.sleep(0.2)
        return data, bands
    finally:
        ws.close()
        try:  # until the closing handshake is done and the socket closed
            while await asyncio.wait_for(ws.read_message(), 5) is not None:
                pass
        except TimeoutError:
            pass


def test_the_task_stream_page_shows_one_row_of_bars_per_rank(browser):
    with local_session(sampler=2, dashboard_address="127.0.0.1:0") as client:
        echo = Echo(remote_group="sampler")
        for _ in range(2):
            echo.sleep(0.3)()
        addresses = echo._twinkle_ref.addresses
        url = client.dashboard_link.replace("/status", "/individual-task-stream")
        data, bands = asyncio.run(_look(browser, url, "Echo.sleep", ranks=2, bars=4))
    rows = {(n, t, y) for n, t, y in zip(data["name"], data["worker_thread"], data["y"]) if n == "Echo.sleep"}
    assert {t for _, t, _ in rows} == {f"{addresses[0]}-Echo-rank0", f"{addresses[1]}-Echo-rank1"}
    assert len({y for _, _, y in rows}) == 2  # one Task Stream row per rank
    assert data["name"].count("Echo.sleep") == 4  # two calls on each rank
    assert {n for n in data["name"] if n.startswith("Echo.")} == {"Echo.__init__", "Echo.sleep"}
    assert len(bands) == 2, f"expected the bars of Echo.sleep ({color_of('Echo.sleep')}) in 2 rows, got {bands}"
    assert all(last - first >= 20 for first, last in bands)  # rows of bars, not stray pixels
