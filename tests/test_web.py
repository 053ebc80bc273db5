"""The dashboard's pure parts: metrics text, the model's rings and markers, the page's escaping, the whole-run
reader, and the metric reference in docs/running.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from supervisor.web.history import downsample, parse_chunk
from supervisor.web.metrics import FAMILIES, render
from supervisor.web.model import Model, split_topic
from supervisor.web.page import render_page

ROOT = Path(__file__).resolve().parent.parent


def row(**extra: Any) -> dict[str, Any]:
    return {"name": "j", "state": "RUNNING", "step": 5, "target_steps": 10, "steps_per_second": 2.0,
            "sampled_bytes": 100, "budget_bytes": 1000, "warn_bytes": 850, "kill_bytes": 1100, "batch": 8,
            "accum": 1, "restarts": 2, "restart_reasons": {"leak_predicted": 2}, "leak_bytes_per_step": 3,
            "samples_over_budget": 0, **extra}


class TestMetrics:
    """The exposition text parses, escapes labels and says when the daemon is down."""

    def test_parses_with_escaped_labels(self) -> None:
        text = render({"jobs": [row(name='a"b\\c\nd')], "daemon": {"version": "1", "cpu_seconds": 1.5,
                                                                  "rss_bytes": 10}},
                      {('a"b\\c\nd', 0): {"mlx_active": 7, "mlx_cache": 8}})
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["mlxsup_job_footprint_bytes"].samples[0].labels["job"] == 'a"b\\c\nd'
        assert families["mlxsup_job_mlx_active_bytes"].samples[0].value == 7
        assert families["mlxsup_job_restarts"].samples[0].labels["reason"] == "leak_predicted"

    def test_daemon_down(self) -> None:
        assert render(None).splitlines()[-1] == "mlxsup_up 0"

    def test_docs_list_every_metric(self) -> None:
        readme = (ROOT / "docs" / "running.md").read_text()
        assert [name for name in FAMILIES if f"| `{name}` |" not in readme] == []


class TestModel:
    """Rings are bounded; restarts become markers from events or, when events were missed, from status."""

    def test_ring_is_bounded_and_markers(self) -> None:
        model = Model(interval=0.5)
        for i in range(model.maxlen + 50):
            model.on_status({"jobs": [row()]}, float(i))
        assert len(model.rings["j"]) == model.maxlen == 1200
        update = model.on_event("job.j.state", {"old": "CHECKPOINTING", "new": "STARTING",
                                                "reason": "restart: leak_predicted"}, 9999.0)
        assert update is not None and update["marker"]["kind"] == "restart"
        assert model.on_status({"jobs": [row(restarts=3)]}, 10000.0)["markers"] == {}  # already marked
        assert model.on_status({"jobs": [row(restarts=4)]}, 10001.0)["markers"]["j"]["kind"] == "restart"

    def test_topics(self) -> None:
        assert split_topic("job.a.b.decision") == ("a.b", "decision")
        assert split_topic("job.x") is None and split_topic("other.a.b") is None


class TestPage:
    """Job names and reasons are text, never markup."""

    def test_escaped(self) -> None:
        model = Model()
        model.on_status({"jobs": [row(name="<script>x</script>")]}, 1.0)
        model.on_event("job.<script>x</script>.decision", {"action": "recycle", "reason": "<img src=x>"}, 2.0)
        page = render_page(model.snapshot())
        assert "<script>x" not in page and "<img" not in page and "&lt;img src=x&gt;" in page


class TestHistory:
    """A chunk's torn lines are skipped; steps frames expand; downsampling keeps peaks."""

    def test_chunk(self) -> None:
        lines = [json.dumps({"t": 1, "k": "sample", "bytes": 5}), json.dumps({"t": 2, "k": "steps", "step": [1, 2],
                                                                              "mlx_active": [3, 4]})]
        data = 'torn"}\n' + "\n".join(lines) + '\n{"t": 3'
        records = parse_chunk(data, first=False)
        assert [r["k"] for r in records] == ["sample", "step", "step"]
        assert parse_chunk("\n".join(lines) + "\n", first=True)[0]["bytes"] == 5

    def test_downsample(self) -> None:
        points = [[i, i % 7, None, None, i] for i in range(7000)]
        out = downsample(points, 100)
        assert len(out) == 100 and all(p[1] == 6 for p in out)
