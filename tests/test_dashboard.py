"""``mlxsupctl dashboard`` end to end: a real daemon with a leaking job, the real dashboard process, and Debian's
headless chromium reading the page as a person would; its HTTP security checks; /metrics through
prometheus_client's parser, ``promtool check metrics`` and a real Prometheus server on loopback."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, free_port, missing
from tests.conftest import ROOT, SMALL
from tests.test_daemon import Daemon

pytestmark = pytest.mark.slow

# About 5 s per life at ~50 steps/s: a climb the page can show, and a recycle every few seconds.
LEAKY = {"leaky": {"budget": "600MiB", "checkpoint_every": 50,
                   "train": {**SMALL, "steps": 1_000_000, "leak_mb_per_step": 2}}}


def ctl_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), *args]


class Dashboard:
    """A running ``mlxsupctl dashboard`` on a free loopback port."""

    def __init__(self, spawn: Any, config: Path, tmp_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = tmp_path / "dashboard.log"
        with open(self.log, "ab") as log:
            self.proc = spawn(ctl_argv(config, "dashboard", "--port", str(self.port), "--seconds", "300", *extra),
                              stdout=log, stderr=log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if '"jobs"' in self.get("/api/snapshot")[1]:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError("dashboard did not answer: " + self.log.read_text())

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        return self.request("GET", path, None, headers)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture
def leaking(spawn: Any, config_file: Any, tmp_path: Path) -> tuple[Daemon, Path]:
    config = config_file(LEAKY)
    daemon = Daemon(spawn, config, tmp_path)
    daemon.wait(lambda: daemon.states().get("leaky") == "RUNNING", 60, "leaky running")
    return daemon, config


SERIES = """
const line = document.querySelector('figure[data-job="leaky"] polyline.series.sampled');
if (!line) return null;
return line.getAttribute('points').trim().split(/\\s+/).map((p) => Number(p.split(',')[1]));
"""


def longest_climb(ys: list[float]) -> int:
    """The longest run of points each above the one before (SVG y grows downwards)."""
    best = run = 0
    for before, after in itertools.pairwise(ys):
        run = run + 1 if after < before else 0
        best = max(best, run)
    return best


@pytest.mark.skipif(bool(missing()), reason=missing() or "browser present")
class TestPage:
    """What a person sees in chromium: the job row, memory climbing, the restart marker, live updates."""

    def test_leaking_job_recycles_live(self, leaking: tuple[Daemon, Path], spawn: Any, tmp_path: Path) -> None:
        _daemon, config = leaking
        dash = Dashboard(spawn, config, tmp_path)
        browser = Browser(spawn)
        try:
            browser.get(dash.url + "/")
            row = browser.wait("const r = document.querySelector('#jobs tr[data-job=\"leaky\"]');"
                               "return r && r.querySelector('[data-field=state]') && r.textContent;", 30, "job row")
            assert "leaky" in row and "600.0 MiB" in row
            loaded = browser.run("return document.body.dataset.loadedAt;")
            updates = int(browser.run("return document.body.dataset.updates;"))
            first_step = browser.run("return document.querySelector('#jobs tr[data-job=\"leaky\"] "
                                     "[data-field=step]').textContent;")
            ys = browser.wait(f"const ys = (function () {{ {SERIES} }})(); "
                              "return ys && ys.length >= 6 && ys;", 60, "a memory series")
            browser.wait("return document.querySelectorAll('figure[data-job=\"leaky\"] line.marker.restart').length",
                         60, "a restart marker after a recycle")
            climbs = 0
            deadline = time.monotonic() + 60
            while climbs < 3 and time.monotonic() < deadline:
                ys = browser.run(f"return (function () {{ {SERIES} }})();") or []
                climbs = longest_climb(ys)
                time.sleep(0.5)
            assert climbs >= 3, f"no climbing footprint in the chart: {ys}"
            title = browser.run("return document.querySelector('figure[data-job=\"leaky\"] line.marker.restart "
                                "title').textContent;")
            assert title.startswith("restart")
            # Live: the same page (never reloaded) shows later steps and counted pushed updates.
            browser.wait("return document.querySelector('#jobs tr[data-job=\"leaky\"] [data-field=step]')"
                         f".textContent !== {json.dumps(first_step)};", 30, "the step to change")
            assert browser.run("return document.body.dataset.loadedAt;") == loaded
            assert int(browser.run("return document.body.dataset.updates;")) > updates
            caption = browser.run("return document.querySelector('figure[data-job=\"leaky\"] figcaption').textContent;")
            assert "restart" in caption and "MLX active" in caption
            assert "live" in browser.run("return document.getElementById('connection').textContent;")
            browser.run("window.scrollTo(0, 0);")
            # What a person sees; it replaces the README's picture only when asked, so a run leaves the tree clean.
            shot = tmp_path / "dashboard.png"
            browser.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("MLXSUP_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")
            # The whole-run view, read from telemetry.jsonl through the control socket.
            browser.run("document.querySelector('input[name=view][value=run]').click();")
            browser.wait("const c = document.querySelector('figure[data-job=\"leaky\"] figcaption');"
                         "return c && document.querySelector('figure[data-job=\"leaky\"] polyline.series.sampled') "
                         "&& /restarts? marked/.test(c.textContent) && !/; 0 restarts/.test(c.textContent);",
                         30, "the whole-run chart with its restarts")
        finally:
            browser.close()


class TestWithoutJavaScript:
    """The server-rendered page is a readable table; data is escaped; nothing changes through GET."""

    def test_table_security_and_control(self, leaking: tuple[Daemon, Path], spawn: Any, tmp_path: Path) -> None:
        daemon, config = leaking
        dash = Dashboard(spawn, config, tmp_path, "--allow-control")
        code, page = dash.get("/")
        assert code == 200
        assert re.search(r'<tr data-job="leaky"><th scope="row">leaky</th><td data-field="state">', page)
        assert "<table" in page and "available" in page
        assert dash.get("/", {"Host": "evil.example:80"})[0] == 421  # DNS rebinding: unknown Host
        assert dash.get("/api/control")[0] == 404  # no control through GET
        body = json.dumps({"command": "checkpoint", "job": "leaky"}).encode()
        json_type = {"Content-Type": "application/json"}
        # No Origin, or another site's Origin: refused.
        assert dash.request("POST", "/api/control", body, json_type)[0] == 403
        assert dash.request("POST", "/api/control", body, {**json_type, "Origin": "http://evil.example"})[0] == 403
        origin = {**json_type, "Origin": f"http://127.0.0.1:{dash.port}"}
        # A form post (not JSON) is refused even from the page's origin.
        assert dash.request("POST", "/api/control", b"command=stop&job=leaky",
                            {"Origin": origin["Origin"], "Content-Type": "application/x-www-form-urlencoded"})[0] == 400
        code, text = dash.request("POST", "/api/control", body, origin)
        assert code == 200, text
        records = daemon.json("audit", "-n", "20")["records"]
        assert any(r.get("command") == "checkpoint" and r.get("client") == "local" for r in records)
        snapshot = json.loads(dash.get("/api/snapshot")[1])
        assert snapshot["controls"] == ["checkpoint", "stop", "restart"]

    def test_no_buttons_without_allow_control(self, leaking: tuple[Daemon, Path], spawn: Any,
                                              tmp_path: Path) -> None:
        daemon, config = leaking
        dash = Dashboard(spawn, config, tmp_path)
        assert json.loads(dash.get("/api/snapshot")[1])["controls"] == []
        body = json.dumps({"command": "stop", "job": "leaky"}).encode()
        code, text = dash.request("POST", "/api/control", body, {"Content-Type": "application/json",
                                                                 "Origin": f"http://127.0.0.1:{dash.port}"})
        assert code == 403 and "--allow-control" in text
        assert daemon.states()["leaky"] == "RUNNING"

    def test_non_loopback_needs_public_then_a_token(self, leaking: tuple[Daemon, Path], spawn: Any,
                                                    tmp_path: Path) -> None:
        _, config = leaking
        refused = subprocess.run(ctl_argv(config, "dashboard", "--host", "0.0.0.0", "--seconds", "1"),
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "--public" in refused.stderr
        port = free_port()
        with open(tmp_path / "public.log", "wb") as log:
            spawn(ctl_argv(config, "dashboard", "--host", "0.0.0.0", "--port", str(port), "--public",
                           "--seconds", "60"), stdout=log, stderr=log, env={"MLXSUP_DASHBOARD_TOKEN": "s3cret-token"})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "token=s3cret-token" not in (tmp_path / "public.log").read_text():
            time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused_get:
            urllib.request.urlopen(url + "/api/snapshot", timeout=10)
        assert refused_get.value.code == 401
        with urllib.request.urlopen(url + "/?token=s3cret-token", timeout=10) as response:
            page = response.read().decode()
        assert "beyond loopback" in page and "token" in page
        request = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert "mlxsup_up 1" in response.read().decode()


def wait_for_metric(dash: Dashboard, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = dash.get("/metrics")[1]
        if needle in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in /metrics:\n{text}")


class TestMetrics:
    """/metrics in the text format 0.0.4, as Prometheus and its tools read it."""

    def test_parser_promtool_and_textfile(self, leaking: tuple[Daemon, Path], spawn: Any, tmp_path: Path) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        _, config = leaking
        dash = Dashboard(spawn, config, tmp_path)
        restarted = 'mlxsup_job_restarts_total{job="leaky",reason="leak_predicted"}'
        deadline = time.monotonic() + 30
        while True:  # just after a recycle the next worker may not be sampled yet (footprint 0): read again
            text = wait_for_metric(dash, restarted)
            families = {f.name: f for f in text_string_to_metric_families(text)}
            footprint = families["mlxsup_job_footprint_bytes"].samples[0]
            if footprint.value > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert footprint.labels == {"job": "leaky", "rank": "0"} and footprint.value > 0
        assert families["mlxsup_job_restarts"].type == "counter"  # the parser names a counter without _total
        states = {s.labels["state"]: s.value for s in families["mlxsup_job_state"].samples}
        assert sum(states.values()) == 1 and len(states) >= 9
        for name in ("mlxsup_job_budget_bytes", "mlxsup_job_warn_bytes", "mlxsup_job_kill_bytes",
                     "mlxsup_job_mlx_active_bytes", "mlxsup_job_mlx_cache_bytes", "mlxsup_job_steps",
                     "mlxsup_job_samples_over_budget", "mlxsup_job_leak_bytes_per_step",
                     "mlxsup_system_available_bytes", "mlxsup_daemon_cpu_seconds",
                     "mlxsup_daemon_resident_memory_bytes", "mlxsup_daemon_info"):
            assert name in families, name
        promtool = shutil.which("promtool")
        if promtool is not None:
            checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                     timeout=30)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        out = tmp_path / "textfile" / "mlxsup.prom"
        out.parent.mkdir()
        done = subprocess.run(ctl_argv(config, "metrics", "--textfile", str(out)), capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        written = {f.name for f in text_string_to_metric_families(out.read_text())}
        assert {"mlxsup_job_footprint_bytes", "mlxsup_job_restarts", "mlxsup_up"} <= written
        assert [p.name for p in out.parent.iterdir()] == ["mlxsup.prom"]  # no temporary file left
        if promtool is None:
            pytest.skip("promtool not found (Debian package prometheus): parsed, not linted")

    @pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not found (Debian package prometheus)")
    def test_a_real_prometheus_scrapes_it(self, leaking: tuple[Daemon, Path], spawn: Any, tmp_path: Path) -> None:
        _, config = leaking
        dash = Dashboard(spawn, config, tmp_path)
        wait_for_metric(dash, "mlxsup_job_restarts_total")
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: mlxsup\n    honor_labels: true\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{dash.port}']}}]\n")
        with open(tmp_path / "prometheus.log", "wb") as log:
            spawn(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                  stdout=log, stderr=log)

        def query(expr: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return list(json.loads(response.read())["data"]["result"])
            except OSError:
                return []

        deadline = time.monotonic() + 60
        footprint: list[dict[str, Any]] = []
        restarts: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (footprint and restarts):
            footprint = query('mlxsup_job_footprint_bytes{job="leaky"}')
            restarts = query('sum by (job) (mlxsup_job_restarts_total{job="leaky"})')
            time.sleep(1)
        assert footprint, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(footprint[0]["value"][1]) > 0 and footprint[0]["metric"]["rank"] == "0"
        assert restarts and float(restarts[0]["value"][1]) >= 1
