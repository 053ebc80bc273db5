"""docs/PROTOCOL.md stays true to the code: every message, field, type and environment variable."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from protocol.messages import _FIELDS, _TYPES, EXIT_CHECKPOINTED, MAX_MESSAGE_BYTES, MAX_STRING_CHARS
from worker.session import ENV_PREFIX, SessionSettings

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
TYPE_NAMES = {int: "int", float: "float", str: "str"}
COLUMN_NAMES = {int: "ints", float: "floats", str: "strs"}  # a ``steps`` or ``census`` column: tuple[int, ...]...


def type_name(kind: Any) -> str:
    """The spec's name of a field's type."""
    if get_origin(kind) is tuple:
        (element, *_) = get_args(kind)
        if get_origin(element) in (Union, types.UnionType):
            (element,) = (arg for arg in get_args(element) if arg is not type(None))
        return COLUMN_NAMES[element]
    return TYPE_NAMES[kind]


def message_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """{tag: {field: (type, required column)}} from the spec's '### `tag`' sections."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for section in re.split(r"^#{2,3} ", SPEC, flags=re.M)[1:]:
        heading = re.match(r"`(\w+)`", section)
        if heading is None:
            continue
        rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+) \|", section, flags=re.M)
        tables[heading.group(1)] = {name: (kind, required.strip()) for name, kind, required in rows}
    return tables


class TestMessages:
    """Each message type of protocol/messages.py has a section listing exactly its fields."""

    def test_every_type_has_a_section_with_its_fields(self) -> None:
        tables = message_tables()
        assert set(tables) == set(_TYPES)
        for tag, fields in _FIELDS.items():
            assert set(tables[tag]) == {f.name for f in fields}, tag
            for field in fields:
                kind, required = tables[tag][field.name]
                assert kind == type_name(field.kind), (tag, field.name)
                assert (required == "yes") is field.required, (tag, field.name, required)

    def test_limits_and_exit_code_are_the_codes(self) -> None:
        assert f"at most {MAX_MESSAGE_BYTES:,} bytes".replace(",", " ") in SPEC
        assert f"at most {MAX_STRING_CHARS:,}".replace(",", " ") + " characters" in SPEC
        assert f"| {EXIT_CHECKPOINTED} (`EX_TEMPFAIL`)" in SPEC

    def test_every_command_action_is_described(self) -> None:
        from protocol import Command

        for action in Command.ACTIONS:
            assert f"- `{action}`:" in SPEC


def section(title: str) -> str:
    """The text of the spec's '## <title>' section."""
    return SPEC.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


class TestEnvironment:
    """The variables the daemon sets and the SDK reads are the ones the spec lists."""

    def test_environment_table_matches_daemon_and_sdk(self) -> None:
        documented = set(re.findall(r"^\| `(MLXSUP_\w+)` \|", section("5. Environment"), flags=re.M))
        read = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(SessionSettings)}
        spawning = (ROOT / "supervisor" / "daemon" / "spawning.py").read_text()  # where the daemon sets them
        set_by_daemon = set(re.findall(r'"(MLXSUP_\w+)"', spawning))
        assert documented == read == set_by_daemon


class TestGang:
    """The variables a gang's ranks get are the ones section 10 lists, set by the daemon and read by the SDK."""

    def test_gang_variables_match_daemon_and_sdk(self) -> None:
        pattern = r'"((?:MLX|MLXSUP)_(?:RANK|HOSTFILE|RANKS|WRITER))"'
        documented = set(re.findall(r"^\| `((?:MLX|MLXSUP)_\w+)` \|", section("10. Gangs"), flags=re.M))
        set_by_daemon = set(re.findall(pattern, (ROOT / "supervisor" / "daemon" / "ranks.py").read_text()))
        read_by_sdk = set(re.findall(pattern, (ROOT / "worker" / "gang.py").read_text())) | {"MLX_HOSTFILE"}
        assert documented == set_by_daemon == read_by_sdk  # MLX_HOSTFILE is read by MLX itself


class TestConformance:
    """Section 9 lists the kit's checks in its order, and the steering variables the kit sets and the SDK reads."""

    def test_check_table_lists_every_check_in_order(self) -> None:
        from protocol.conformance import CHECKS

        rows = re.findall(r"^\| `(\w+)` \| (?!variable)", section("9. Conformance"), flags=re.M)
        assert [name for name in rows if not name.startswith("MLXSUP_")] == list(CHECKS)

    def test_steering_table_matches_kit_and_sdk(self) -> None:
        from protocol.conformance import duties
        from worker.steering import PREFIX, Steering

        documented = set(re.findall(r"^\| `(MLXSUP_CONFORMANCE_\w+)` \|", section("9. Conformance"), flags=re.M))
        read = {PREFIX + f.name.upper() for f in dataclasses.fields(Steering)}
        assert documented == read == {duties.LOAD_ENV, duties.SLOW_EVERY_ENV, duties.SLOW_SECONDS_ENV}
