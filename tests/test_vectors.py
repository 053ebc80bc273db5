"""The shared test vectors (protocol/vectors/frames.json) against the Python codec."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from typing import Any

import pytest

from protocol import ProtocolError, decode, decode_parts, encode
from protocol.vectors import ROOT_NOTE, build, frame_of, load, parts_of

VECTORS = load()


def plain(value: Any) -> Any:
    """A decoded field as JSON has it (a ``steps`` column is a tuple)."""
    return list(value) if isinstance(value, tuple) else value


def by_name(kind: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS[kind]]


class TestVectorFile:
    """The committed file is what the generator writes, and it covers every message type and error kind."""

    def test_committed_file_is_up_to_date(self) -> None:
        assert load() == build(), ROOT_NOTE
        done = subprocess.run([sys.executable, "-m", "protocol.vectors", "--check"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def test_every_message_type_and_error_kind_is_covered(self) -> None:
        from protocol.messages import _TYPES

        assert {v["type"] for v in VECTORS["valid"]} == set(_TYPES)
        assert {v["error"] for v in VECTORS["invalid"]} == {
            "too_large", "not_msgpack", "not_a_map", "version", "unknown_type", "missing_field", "field_type",
            "field_value", "multipart"}


class TestValidFrames:
    """Every valid frame decodes to its expected fields; canonical ones re-encode byte for byte."""

    @pytest.mark.parametrize("vector", by_name("valid"))
    def test_decodes_to_the_expected_fields(self, vector: dict[str, Any]) -> None:
        message = decode(frame_of(vector))
        assert vector["type"] == message.TAG
        assert {name: plain(getattr(message, name)) for name in vector["fields"]} == vector["fields"]
        assert set(vector["fields"]) == {f.name for f in dataclasses.fields(message)}

    @pytest.mark.parametrize("vector", by_name("valid"))
    def test_canonical_frames_re_encode_exactly(self, vector: dict[str, Any]) -> None:
        again = encode(decode(frame_of(vector)), vector["v"])
        assert (again == frame_of(vector)) is vector["canonical"]

    def test_floats_decode_as_floats(self) -> None:
        step = next(v for v in VECTORS["valid"] if v["name"] == "step_integer_loss")
        loss = decode(frame_of(step)).loss  # type: ignore[union-attr]
        assert isinstance(loss, float) and not math.isnan(loss)

    def test_not_measured_is_none_not_zero(self) -> None:
        step = next(v for v in VECTORS["valid"] if v["name"] == "step_not_measured")
        message = decode(frame_of(step))
        assert message.mlx_active is None and message.mlx_cache is None  # type: ignore[union-attr]
        assert message.mlx_peak == 0  # type: ignore[union-attr]

    def test_single_part_messages_decode_through_decode_parts(self) -> None:
        for vector in VECTORS["valid"]:
            assert vector["type"] == decode_parts([frame_of(vector)]).TAG


class TestInvalidFrames:
    """Every invalid frame raises ProtocolError of the expected kind."""

    @pytest.mark.parametrize("vector", by_name("invalid"))
    def test_is_refused_with_its_kind(self, vector: dict[str, Any]) -> None:
        with pytest.raises(ProtocolError) as info:
            decode_parts(parts_of(vector))
        assert info.value.kind == vector["error"], str(info.value)
