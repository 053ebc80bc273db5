"""A small WebDriver client (W3C protocol over plain HTTP with urllib) for Debian's chromium + chromedriver.

Used by the dashboard tests and bench: the real browser loads the real page. Every request has a timeout.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1000"]


def missing() -> str:
    """Why a browser test cannot run here ('' when it can): the binary and the Debian package to install."""
    for binary, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(binary) is None:
            return f"{binary} not found (Debian package {package})"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One headless chromium session driven through chromedriver (both in their own process group)."""

    def __init__(self, spawn: Any, timeout: float = 30) -> None:
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="mlxsup-chromium-"))
        self.driver = spawn(["chromedriver", f"--port={self.port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._request("GET", "/status", timeout=2)["ready"]:
                    break
            except (OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("chromedriver did not become ready")
            time.sleep(0.2)
        options = {"binary": shutil.which("chromium"), "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"]}
        value = self._request("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}}, timeout=60)
        self.session = f"/session/{value['sessionId']}"

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def get(self, url: str) -> None:
        self._request("POST", f"{self.session}/url", {"url": url}, timeout=60)

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds args) in the page and return its value."""
        return self._request("POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script: str, timeout: float, what: str) -> Any:
        """Poll ``script`` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(script)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out in the browser waiting for: {what}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._request("GET", f"{self.session}/screenshot")))

    def close(self) -> None:
        try:
            self._request("DELETE", self.session, timeout=10)
        except (OSError, AssertionError):
            pass
        shutil.rmtree(self.profile, ignore_errors=True)
