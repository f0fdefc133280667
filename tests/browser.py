"""A real headless Chromium for the page tests, offline (the ``chromium`` fixture; conftest.py
makes it every module's).

The browser comes from env/install-browser.sh (Debian's chromium). Where it cannot be
installed the browser tests are skipped, except on CI (CI=true), where that is a failure.
Every run of the browser has its proxy pointed at a closed local port and its host
resolver switched off, so nothing it tries can leave the machine; its net log then shows
whether the page itself asked for anything.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
    # Belt and braces: the browser's own background requests stay on this machine too.
    "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
)


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        done = subprocess.run(["bash", str(REPO / "env" / "install-browser.sh")], capture_output=True,
                              text=True, timeout=900)
        reason = done.stderr.strip()[-2000:] if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        done, reason = None, str(e)
    if reason is None:
        return done.stdout.strip().splitlines()[-1]
    if os.environ.get("CI") == "true":
        pytest.fail(f"env/install-browser.sh could not install chromium:\n{reason}")
    pytest.skip(f"no chromium (env/install-browser.sh failed: {reason[-300:]})")


def run_browser(chromium: str, tmp_path: Path, *args: str) -> tuple[str, list[dict]]:
    """(stdout, requests the page started) of one headless run."""
    net_log = tmp_path / f"net-{len(list(tmp_path.glob('net-*')))}.json"
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--log-net-log={net_log}", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, page_requests(net_log)


def page_requests(net_log: Path) -> list[dict]:
    """URL requests with a page as initiator (the browser's own carry 'not an origin')."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    begins = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return [p for p in begins if "url" in p and p.get("initiator") != "not an origin"]


def dump_dom(chromium: str, tmp_path: Path, url: str) -> str:
    dom, requests = run_browser(chromium, tmp_path, "--dump-dom", url)
    assert requests == [], f"the page loaded something: {requests}"
    return dom




def data_images(dom: str) -> list:
    """The inline images of a page (``<img src="data:image/jpeg;base64,...">``) as PIL images."""
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(m.group(1))))
            for m in re.finditer(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', dom)]


def loaded_images(chromium: str, tmp_path: Path, page: Path) -> list[list[int]]:
    """[naturalWidth, naturalHeight] of every image of ``page`` as the browser decoded it (0, 0
    for one it could not show), read from a copy of the page with a script that writes them out."""
    probe = page.with_name(page.stem + "-probe.html")
    script = ("<script>window.addEventListener('load', function () { document.body.setAttribute("
              "'data-images', JSON.stringify(Array.prototype.map.call(document.images, function (i) {"
              " return [i.naturalWidth, i.naturalHeight]; }))); });</script>")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = dump_dom(chromium, tmp_path, probe.as_uri())
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, "the load script did not run"
    return json.loads(found.group(1).replace("&quot;", '"'))
