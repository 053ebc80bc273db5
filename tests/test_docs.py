"""The manual (README.md and docs/): every intra-doc link and anchor resolves, every fenced ``sh`` block either runs
here or is marked ``sh illustrative``, and the --help of mlxsupd and mlxsupctl ends with the page to read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(```+|~~~+)(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# The sh blocks a test below runs, by page: any other sh block must say `sh illustrative`.
RUN_HERE = {"docs/sdk.md": ["mlxsupd run --budget 4GiB -- python examples/sdk_loop.py 3000"]}


def blocks(text: str) -> list[tuple[int, str, str]]:
    """Fenced code blocks: (line number of the fence, info string, body)."""
    found: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, start, body = match.group(1), i, []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        found.append((start + 1, match.group(2).strip(), "\n".join(body)))
        i += 1
    return found


def prose(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced blocks, with inline code spans blanked (a link in code is not a link)."""
    out: list[tuple[int, str]] = []
    inside = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match and (not inside or line.startswith(inside)):
            inside = "" if inside else match.group(1)
            continue
        if not inside:
            out.append((number, re.sub(r"`[^`]*`", "``", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_with_code(path.read_text()):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def prose_with_code(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code kept (headings keep their code's words in the anchor)."""
    keep = {number for number, _ in prose(text)}
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if n in keep]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``page`` whose file or anchor does not exist, as 'page:line: target (why)'."""
    problems: list[str] = []
    for number, line in prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(root)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where} (no file {dest})")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return problems


class TestLinks:
    """Every intra-doc link and anchor of README.md, CHANGELOG.md and docs/*.md resolves."""

    @pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_every_link_resolves(self, page: Path) -> None:
        assert broken_links(page) == []

    def test_a_broken_file_or_anchor_is_named(self, tmp_path: Path) -> None:
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.md").write_text("# A page\n\n## One job in the foreground: `mlxsupd run`\n")
        page = tmp_path / "README.md"
        page.write_text("[ok](docs/a.md#one-job-in-the-foreground-mlxsupd-run) [ok](#top) [web](https://x.org/y)\n"
                        "# Top\n[gone](docs/b.md) and [no anchor](docs/a.md#nope)\n"
                        "`[in code](docs/c.md)`\n```\n[in a block](docs/d.md)\n```\n")
        assert broken_links(page, tmp_path) == [
            f"README.md:3: docs/b.md (no file {tmp_path / 'docs' / 'b.md'})",
            "README.md:3: docs/a.md#nope (no heading with anchor #nope in a.md)"]

    def test_anchor_of_a_heading_with_code_and_brackets(self) -> None:
        assert slug("One job in the foreground: `mlxsupd run`") == "one-job-in-the-foreground-mlxsupd-run"
        assert slug("`[jobs.NAME.mlx_lm]`") == "jobsnamemlx_lm"
        assert slug("The daemon: `mlxsupd -c CONFIG` and `mlxsupctl`") == "the-daemon-mlxsupd--c-config-and-mlxsupctl"


class TestShellBlocks:
    """A command shown in a fenced sh block runs in a test, or the block says it is illustrative."""

    def test_every_sh_block_runs_here_or_is_illustrative(self) -> None:
        unmarked = []
        for page in PAGES:
            name = str(page.relative_to(ROOT))
            for number, info, body in blocks(page.read_text()):
                words = info.split()
                if not words or words[0] not in ("sh", "bash", "shell", "console"):
                    continue
                if words[1:] == ["illustrative"]:
                    continue
                if words[1:] or body.strip() not in RUN_HERE.get(name, []):
                    unmarked.append(f"{name}:{number}: ```{info}")
        assert unmarked == [], "mark these `sh illustrative`, or run them in tests/test_docs.py (RUN_HERE)"

    def test_the_run_blocks_are_on_their_pages(self) -> None:
        for name, bodies in RUN_HERE.items():
            shown = [body.strip() for _, info, body in blocks((ROOT / name).read_text()) if info == "sh"]
            assert all(body in shown for body in bodies), (name, bodies, shown)

    @pytest.mark.slow
    def test_the_sdk_block_runs_supervised_to_its_end(self, tmp_path: Path, run_dir: Path) -> None:
        """docs/sdk.md's one-line run, as written, from the source tree, with the venv's commands on PATH; the
        platform's state and run dirs point into this test's directory."""
        command = RUN_HERE["docs/sdk.md"][0]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
               "XDG_RUNTIME_DIR": str(run_dir), "MLXSUP_TEST_MARK": str(tmp_path)}
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=100)  # under pytest's own 120 s
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads(out)
        assert summary["outcome"] == "finished" and summary["steps_completed"] == 3000, summary
        assert summary["kind"] == "sdk"
        assert Path(summary["checkpoint_dir"]).is_relative_to(tmp_path)


class TestHelpNamesThePage:
    """The --help of mlxsupd (and of `mlxsupd run`) and of mlxsupctl ends with the page of docs/ to read."""

    @pytest.mark.parametrize("argv", [["supervisor.cli.mlxsupd"], ["supervisor.cli.mlxsupd", "run"],
                                      ["supervisor.cli.mlxsupctl"]], ids=["mlxsupd", "mlxsupd run", "mlxsupctl"])
    def test_help_ends_with_an_existing_page(self, argv: list[str]) -> None:
        done = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, timeout=60,
                              check=True)
        match = re.search(r"read\s+(docs/[\w.-]+\.md)(#[\w-]+)?$", done.stdout.rstrip())
        assert match is not None, done.stdout[-300:]
        page = ROOT / match.group(1)
        assert page.exists()
        if match.group(2):
            assert match.group(2)[1:] in anchors(page)
