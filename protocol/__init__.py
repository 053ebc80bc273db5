"""Wire protocol between mlxsupd, its workers and its clients.

Depends on the standard library and msgpack only, so every process can import it cheaply.
"""

from __future__ import annotations

from protocol.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    CheckpointSaved,
    Command,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Step,
    decode,
    encode,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "CheckpointSaved",
    "Command",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "ProtocolError",
    "Step",
    "decode",
    "encode",
]
