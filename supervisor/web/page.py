"""The dashboard's HTML: the whole page rendered on the server from the last status, so it reads as a table
without JavaScript; ``static/dashboard.js`` then draws the charts and keeps it live. Every value from the
daemon goes through ``html.escape``: job names, reasons and log lines are data, never markup.
"""

from __future__ import annotations

import html
import time
from typing import Any

from supervisor.core.sizes import format_bytes

PRESSURE = {1: "normal", 2: "warn", 4: "critical"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bytes(value: Any) -> str:
    return format_bytes(int(value)) if isinstance(value, int | float) and value else "-"


def restarts_text(row: dict[str, Any]) -> str:
    reasons = row.get("restart_reasons") or {}
    parts = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    return f"{row.get('restarts', 0)}" + (f" ({parts})" if parts else "")


def leak_text(row: dict[str, Any]) -> str:
    leak = row.get("leak")
    if not isinstance(leak, dict) or not leak.get("verdict"):
        return ""
    return f"{leak['verdict']}: {leak.get('meaning', '')}".rstrip(": ")


def job_row(row: dict[str, Any]) -> str:
    name = str(row.get("name", ""))
    step = "-" if row.get("step") is None else f"{row['step']}/{row.get('target_steps') or '?'}"
    batch = "-" if row.get("batch") is None else f"{row['batch']}×{row.get('accum')}"
    memory = f"{_bytes(row.get('sampled_bytes'))} / {_bytes(row.get('budget_bytes'))}"
    cells = [f'<th scope="row">{_e(name)}</th>', f'<td data-field="state">{_e(row.get("state", ""))}</td>',
             f'<td data-field="step">{_e(step)}</td>',
             f'<td data-field="rate">{_e(round(row.get("steps_per_second") or 0, 1))}</td>',
             f'<td data-field="memory">{_e(memory)}</td>',
             f'<td data-field="leak">{_e(round((row.get("leak_bytes_per_step") or 0) / 2**20, 2))}</td>',
             f'<td data-field="restarts">{_e(restarts_text(row))}</td>',
             f'<td data-field="batch">{_e(batch)}</td>',
             f'<td data-field="verdict">{_e(leak_text(row))}</td>']
    lines = [f'<tr data-job="{_e(name)}">{"".join(cells)}</tr>']
    for rank in row.get("ranks") or []:
        where = f"@{rank['host']}" if rank.get("host") else ""
        rank_memory = f"{_bytes(rank.get('sampled_bytes'))} / {_bytes(rank.get('budget_bytes'))}"
        lines.append(f'<tr class="rank" data-job="{_e(name)}" data-rank="{_e(rank.get("rank", 0))}">'
                     f'<th scope="row">rank {_e(rank.get("rank", 0))}{_e(where)}</th>'
                     f'<td>{_e(rank.get("state", ""))}</td><td>{_e(rank.get("step", ""))}</td><td></td>'
                     f'<td>{_e(rank_memory)}</td><td></td><td></td><td></td>'
                     f'<td>{_e(rank.get("decision", ""))}</td></tr>')
    return "\n".join(lines)


def system_strip(status: dict[str, Any] | None) -> str:
    system = (status or {}).get("system") or {}
    daemon = (status or {}).get("daemon") or {}
    pressure = system.get("pressure")
    items = [("available", _bytes(system.get("available_bytes"))), ("of total", _bytes(system.get("total_bytes"))),
             ("system floor", _bytes(system.get("floor_bytes")) if system.get("floor_bytes") else "off"),
             ("pressure", PRESSURE.get(pressure, "n/a") if pressure is not None else "n/a"),
             ("daemon", f"{daemon.get('version', '?')}, RSS {_bytes(daemon.get('rss_bytes'))}")]
    body = "".join(f'<div><dt>{_e(k)}</dt><dd data-field="{_e(k)}">{_e(v)}</dd></div>' for k, v in items)
    return f'<dl id="system">{body}</dl>'


def decisions_list(snapshot: dict[str, Any]) -> str:
    items = []
    for job, decisions in sorted(snapshot.get("decisions", {}).items()):
        for d in list(decisions)[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(d.get("t", 0)))
            items.append(f'<li><time>{_e(when)}</time> <b>{_e(job)}</b> {_e(d.get("action", ""))}: '
                         f'{_e(d.get("reason", ""))}</li>')
    return "".join(items) or "<li>none yet</li>"


def render_page(snapshot: dict[str, Any], *, remote: str = "", token_query: str = "", controls: bool = False) -> str:
    """The page for a snapshot; ``remote`` (the address beyond loopback) puts a warning on it."""
    status = snapshot.get("status")
    rows = "\n".join(job_row(r) for r in (status or {}).get("jobs", [])) or '<tr><td colspan="9">no jobs</td></tr>'
    error = snapshot.get("error") or ("" if status else "waiting for the daemon's first status")
    banner = (f'<p class="warning" role="alert">This dashboard listens on {_e(remote)}, beyond loopback: anyone who '
              "has the token in this page's address can watch it"
              + (" and use its buttons" if controls else "") + ".</p>") if remote else ""
    return PAGE.format(
        banner=banner, error=_e(error), system=system_strip(status), rows=rows, decisions=decisions_list(snapshot),
        controls="true" if controls else "false", token=_e(token_query),
        client=_e(((status or {}).get("client") or {}).get("name", "")),
    )


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlx-supervisor dashboard</title>
<link rel="stylesheet" href="/static/dashboard.css">
</head>
<body data-controls="{controls}" data-token="{token}">
<header>
<h1>mlx-supervisor</h1>
<p id="connection" aria-live="polite">static view: reload for fresh numbers (charts need JavaScript)</p>
</header>
{banner}
<main>
<p id="error" class="error">{error}</p>
<section aria-labelledby="system-heading">
<h2 id="system-heading">System</h2>
{system}
</section>
<section aria-labelledby="jobs-heading">
<h2 id="jobs-heading">Jobs</h2>
<table id="jobs">
<thead><tr><th scope="col">job</th><th scope="col">state</th><th scope="col">step</th><th scope="col">steps/s</th>
<th scope="col">memory / budget</th><th scope="col">leak MiB/step</th><th scope="col">restarts (by reason)</th>
<th scope="col">batch</th><th scope="col">leak verdict</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</section>
<section id="charts" aria-labelledby="charts-heading" hidden>
<h2 id="charts-heading">Memory</h2>
<p><label><input type="radio" name="view" value="live" checked> live (last 10 minutes)</label>
<label><input type="radio" name="view" value="run"> whole run (from telemetry.jsonl, downsampled)</label></p>
<div id="figures"></div>
</section>
<section aria-labelledby="decisions-heading">
<h2 id="decisions-heading">Recent decisions</h2>
<ol id="decisions" reversed>{decisions}</ol>
</section>
</main>
<footer><p>Connected to the daemon as <span id="client">{client}</span>.
<a href="/metrics">Prometheus metrics</a></p></footer>
<script src="/static/dashboard.js"></script>
</body>
</html>
"""
