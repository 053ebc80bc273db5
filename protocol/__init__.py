"""Wire protocol between mlxsupd, its workers and its clients.

Depends on the standard library and msgpack only, so every process can import it cheaply.
"""

from __future__ import annotations

from protocol.messages import (
    EXIT_CHECKPOINTED,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Census,
    CheckpointSaved,
    Command,
    Go,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Standby,
    Step,
    Steps,
    Welcome,
    decode,
    decode_parts,
    encode,
    negotiate,
)

__all__ = [
    "EXIT_CHECKPOINTED",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Census",
    "CheckpointSaved",
    "Command",
    "Go",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "ProtocolError",
    "Standby",
    "Step",
    "Steps",
    "Welcome",
    "decode",
    "decode_parts",
    "encode",
    "negotiate",
]
