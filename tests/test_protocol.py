"""The wire protocol: round trips and rejection of anything malformed."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_MESSAGE_BYTES,
    CheckpointSaved,
    Command,
    Goodbye,
    Heartbeat,
    Hello,
    ProtocolError,
    Step,
    Welcome,
    decode,
    encode,
)
from protocol.messages import negotiate

SAMPLES = [
    Hello("tok", 123, "demo", 0, 1000, 8, 1),
    Step(5, 8, 2, 2.5, 0.01, 1 << 30, 1 << 20, 1 << 31, 3 << 30),
    Step(6, 4, 2, 2.4, 0.01, 1 << 30, 1 << 20, 1 << 31, 3 << 30, tokens_per_second=1500.0, val_loss=2.1),
    CheckpointSaved(100, "/tmp/x/ckpt-0000000100", 0.2, 123456),
    Goodbye("finished", 1000),
    Heartbeat(1.7e9),
    Command(Command.CHECKPOINT_EXIT, "leak"),
    Welcome(1),
    Heartbeat(1.7e9, "3f9a0c1d2e4b5a69"),
]


def frame(**body: object) -> bytes:
    return msgpack.packb(body)  # type: ignore[no-any-return]


class TestRoundTrip:
    """Every message type survives encode then decode unchanged."""

    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{m.TAG}-{SAMPLES.index(m)}")
    def test_round_trip(self, message: object) -> None:
        assert decode(encode(message)) == message  # type: ignore[arg-type]

    def test_int_is_accepted_where_a_float_is_expected(self) -> None:
        body = {"v": 1, "t": "heartbeat", "sent_at": 5}
        assert decode(frame(**body)) == Heartbeat(5.0)

    def test_optional_fields_are_left_out_when_none_and_default_to_none(self) -> None:
        body = msgpack.unpackb(encode(SAMPLES[1]))
        assert "val_loss" not in body and "tokens_per_second" not in body
        assert decode(encode(SAMPLES[1])).val_loss is None  # type: ignore[union-attr]

    def test_frames_are_small(self) -> None:
        assert all(len(encode(m)) < 256 for m in SAMPLES)


class TestRejection:
    """Malformed frames raise ProtocolError naming the problem."""

    @pytest.mark.parametrize(
        ("raw", "needle"),
        [
            (b"\xc1garbage", "not valid msgpack"),
            (msgpack.packb([1, 2]), "must be a map"),
            (frame(v=3, t="heartbeat", sent_at=1.0), "version 3"),
            (frame(t="heartbeat", sent_at=1.0), "version None"),
            (frame(v=1, t="nope"), "unknown message type 'nope'"),
            (frame(v=1, t="heartbeat"), "missing field 'sent_at'"),
            (frame(v=1, t="heartbeat", sent_at="now"), "heartbeat.sent_at: expected a number"),
            (frame(v=1, t="goodbye", reason="x", step=True), "goodbye.step: expected an integer, got bool"),
            (frame(v=True, t="heartbeat", sent_at=1.0), "version True"),
            (frame(v=1, t="goodbye", reason="x", step=-1), "outside 0..2**63-1"),
            (frame(v=1, t="hello", token="t", pid=1, job="j", start_step=0, target_steps=1, batch=1, accum=1,
                   protocol=0), "not a protocol version"),
            (frame(v=1, t="step", step=1, batch=1, accum=1, loss=1.0, step_seconds=0.1, mlx_active=0,
                   mlx_cache=0, mlx_peak=0, footprint=0, val_loss="low"), "step.val_loss: expected a number"),
            (frame(v=1, t="command", action="rm -rf /", reason=""), "unknown action"),
            (frame(v=1, t="heartbeat", sent_at=float("inf")), "infinite"),
            (msgpack.packb({**msgpack.unpackb(encode(SAMPLES[1])), "val_loss": "low"}),
             "step.val_loss: expected a number"),
            (frame(v=1, t="goodbye", reason="x" * 5000, step=1), "exceeds"),
            (b"\x00" * (MAX_MESSAGE_BYTES + 1), "exceeds the maximum"),
            (encode(Heartbeat(1.0))[:-3], "not valid msgpack"),
        ],
    )
    def test_rejects(self, raw: bytes, needle: str) -> None:
        with pytest.raises(ProtocolError, match=None) as info:
            decode(raw)
        assert needle in str(info.value)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=512))
    def test_random_bytes_only_ever_raise_protocol_error(self, raw: bytes) -> None:
        try:
            decode(raw)
        except ProtocolError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(["v", "t", "step", "token", "pid", "sent_at", "action"]),
                           st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8),
                                     st.none(), st.booleans()),
                           max_size=6))
    def test_random_maps_only_ever_raise_protocol_error(self, body: dict[str, object]) -> None:
        try:
            decode(frame(**body))
        except ProtocolError:
            pass


class TestForwardCompatibility:
    """Version 1's rule: unknown fields are ignored, unknown types refused, optional fields default."""

    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{m.TAG}-{SAMPLES.index(m)}")
    def test_unknown_fields_are_ignored(self, message: object) -> None:
        body = msgpack.unpackb(encode(message))  # type: ignore[arg-type]
        body.update({"added_in_v9": [1, {"x": 2}], "zz": None})
        assert decode(frame(**body)) == message

    def test_unknown_message_type_is_refused(self) -> None:
        with pytest.raises(ProtocolError) as info:
            decode(frame(v=1, t="rewind", step=3))
        assert info.value.kind == "unknown_type" and "'rewind'" in str(info.value)

    def test_newer_version_is_refused_with_its_kind(self) -> None:
        with pytest.raises(ProtocolError) as info:
            decode(frame(v=3, t="heartbeat", sent_at=1.0))
        assert info.value.kind == "version"

    def test_version_two_frames_may_say_not_measured(self) -> None:
        """Version 2 (PROTOCOL.md 1.1): nil in mlx_active or mlx_cache is None, "not measured", not 0."""
        body = {"t": "step", "step": 1, "batch": 2, "accum": 1, "loss": 0.5, "step_seconds": 0.1,
                "mlx_active": None, "mlx_cache": None, "mlx_peak": 0, "footprint": 4096}
        step = decode(frame(v=2, **body))
        assert isinstance(step, Step) and step.mlx_active is None and step.mlx_cache is None
        assert decode(encode(step, 2)) == step
        with pytest.raises(ProtocolError) as info:
            decode(frame(v=2, **{**body, "mlx_active": 5, "footprint": None}))
        assert info.value.kind == "field_type"
        with pytest.raises(ProtocolError) as missing:
            decode(frame(v=2, **{k: v for k, v in body.items() if k != "mlx_cache"}))
        assert missing.value.kind == "missing_field"

    def test_optional_fields_default_when_absent_or_nil(self) -> None:
        base = {"v": 1, "t": "step", "step": 1, "batch": 2, "accum": 1, "loss": 0.5, "step_seconds": 0.1,
                "mlx_active": 0, "mlx_cache": 0, "mlx_peak": 0, "footprint": 4096}
        assert decode(frame(**base)) == Step(1, 2, 1, 0.5, 0.1, 0, 0, 0, 4096, None, None)
        assert decode(frame(**base, tokens_per_second=None)).tokens_per_second is None  # type: ignore[union-attr]
        assert decode(frame(**base, val_loss=None)).val_loss is None  # type: ignore[union-attr]
        assert decode(frame(**base, val_loss=3)).val_loss == 3.0  # type: ignore[union-attr]

    def test_defaults_are_left_out_so_frames_stay_version_1(self) -> None:
        """A step without the new fields is byte for byte the frame version 1 always sent."""
        step = Step(5, 8, 2, 2.5, 0.01, 1, 2, 3, 4)
        legacy = {"v": 1, "t": "step", "step": 5, "batch": 8, "accum": 2, "loss": 2.5, "step_seconds": 0.01,
                  "mlx_active": 1, "mlx_cache": 2, "mlx_peak": 3, "footprint": 4}
        assert encode(step) == msgpack.packb(legacy, use_bin_type=True)
        hello = Hello("tok", 1, "j", 0, 10, 8, 1)
        assert "protocol" not in msgpack.unpackb(encode(hello))

    def test_a_newer_workers_hello_is_read_and_negotiated_down(self) -> None:
        hello = decode(frame(v=1, t="hello", token="t", pid=9, job="j", start_step=0, target_steps=5, batch=1,
                             accum=1, protocol=7, gpu="m4", topology={"ranks": 2}))
        assert isinstance(hello, Hello) and hello.protocol == 7
        assert negotiate(hello.protocol) == 2
        assert negotiate(2) == 2
        assert negotiate(1) == 1  # a version 1 worker keeps version 1

    def test_a_worker_below_the_oldest_version_is_refused(self) -> None:
        with pytest.raises(ProtocolError, match="oldest supported"):
            negotiate(0)
