"""Headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) and a real `cme up`.

The browser tests skip, with the reason in the summary, when chromium, chromedriver or selenium is
missing (deploy/install-chromium.sh installs the first two from `make test` where it can). Selenium
is pointed at /usr/bin/chromium and /usr/bin/chromedriver: it never downloads a browser or a driver.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CME_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CME_CHROMEDRIVER", "/usr/bin/chromedriver")
# As the machine's notes prescribe: no sandbox as root, and nothing that phones home (the network is
# closed here, and a refused connection per feature only slows the start).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1440, "height": 900, "deviceScaleFactor": 1, "mobile": False}
START_TIMEOUT = 30.0


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not os.access(path, os.X_OK):
            return (
                f"BROWSER TESTS SKIPPED: {what} not found at {path} "
                "(bash deploy/install-chromium.sh installs Debian's chromium and chromium-driver)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "BROWSER TESTS SKIPPED: selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = tmp_path / "chromium-profile"  # a fresh profile: no state from another run
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", VIEWPORT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Up:
    """`cme up` on free ports, the trading page included, with its log in a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "var"
        self.log = root / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> dict[str, Any]:
        ports = ["--gateway-port", "0", "--md-port", "0", "--trades-port", "0", "--metrics-port", "0"]
        argv = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(self.data_dir), *ports]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--web-port", "0"], cwd=ROOT, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"cme up did not come up:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)
        return self.state()

    def _ready(self) -> bool:
        try:
            state = self.state()
        except (OSError, orjson.JSONDecodeError):
            return False
        return bool(state["ready"]) and self.proc is not None and state["supervisor_pid"] == self.proc.pid

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = orjson.loads((self.data_dir / "stack.json").read_bytes())
        return state

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: leave nothing running
            self.proc.wait()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if missing_browser():  # no browser: do not pay for a stack either
        pytest.skip(missing_browser() or "")
    stack = Up(tmp_path_factory.mktemp("web-up"))
    try:
        yield stack.start()
    finally:
        stack.stop()


async def until(cond: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll a condition on the page (an event there, seen from outside) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


def save_artifact(path: Path) -> Path:
    """Copy a file into $CME_ARTIFACTS when it is set (CI keeps that folder); returns the copy or path."""
    target = os.environ.get("CME_ARTIFACTS")
    if not target:
        return path
    Path(target).mkdir(parents=True, exist_ok=True)
    copy = Path(target) / path.name
    shutil.copyfile(path, copy)
    return copy
