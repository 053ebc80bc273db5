"""Who may do what on the control plane: roles, the allow-list of client keys, and the role check.

Three roles, each including the one below: ``read`` (look), ``operate`` (run jobs), ``admin`` (everything).
Every command declares the role it needs on its class (``supervisor.control.commands``); the dispatcher
asks :func:`authorize` before running it. The local ipc socket is admin (its guard is the 0700 run dir).

``authorized_keys`` lines::

    # comments start with '#'
    public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" role = "read" name = "grafana"
    rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7          # a bare Z85 key: admin, as before roles existed

A keygen ``.key`` file (or several concatenated) is also a valid list: its ``public-key`` line is read and
its other lines are skipped. A line without a role is admin, so files written before roles keep working.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

from protocol.control import ControlError
from supervisor.config import ConfigError

KEY_CHARS = 40  # a Z85-encoded 32-byte CURVE public key
_PAIR = re.compile(r'([a-z][a-z-]*)\s*=\s*"([^"]*)"\s*')
_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
# Lines of a keygen certificate that carry no key (the section headers; metadata entries are indented).
_CERTIFICATE_LINES = ("metadata", "curve")


class Role(enum.IntEnum):
    """Ordered: a higher role may do everything a lower one may."""

    READ = 10
    OPERATE = 20
    ADMIN = 30

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated client: the name it is audited under and its role."""

    name: str
    role: Role


LOCAL = Principal("local", Role.ADMIN)  # the ipc socket: whoever can open the 0600 socket is the daemon's user
LOOPBACK = Principal("loopback", Role.ADMIN)  # plain TCP on loopback, only with allow_plaintext_loopback


def authorize(principal: Principal, command: str, needed: Role) -> None:
    """Raise ``forbidden`` naming the role that would allow ``command`` when ``principal`` lacks it."""
    if principal.role < needed:
        raise ControlError(ControlError.FORBIDDEN,
                           f"{command} needs role {needed.label} (or higher); key {principal.name!r} has role "
                           f"{principal.role.label}")


def read_authorized_keys(path: Path) -> dict[bytes, Principal]:
    """The allow-list: Z85 public key -> principal. ConfigError names the file, line and problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"daemon.control.authorized_keys: cannot read {path}: {exc}") from None
    keys: dict[bytes, Principal] = {}
    lines: dict[str, int] = {}  # name -> line, to refuse a name given twice
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"daemon.control.authorized_keys: {path}:{number}"
        parsed = _parse_line(raw, where)
        if parsed is None:
            continue
        key, principal = parsed
        if key in keys:
            raise ConfigError(f"{where}: key listed twice (first as {keys[key].name!r})")
        if principal.name in lines:
            raise ConfigError(f"{where}: name {principal.name!r} already used on line {lines[principal.name]}")
        keys[key] = principal
        lines[principal.name] = number
    return keys


def _parse_line(raw: str, where: str) -> tuple[bytes, Principal] | None:
    """One allow-list line: None for comments, blanks and certificate lines without a key."""
    line = raw.strip()
    # '#' is also a Z85 digit, so only a leading one starts a comment.
    if not line or line.startswith("#") or line in _CERTIFICATE_LINES:
        return None
    if line.startswith("secret-key"):
        raise ConfigError(f"{where}: a secret key; list public keys only (the .key file, never .key_secret)")
    if not line.startswith("public-key"):
        if raw[:1].isspace():
            return None  # a metadata entry of a keygen certificate
        return _checked(line, {}, where)
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PAIR.match(line, position)
        if match is None:
            raise ConfigError(f"{where}: expected name = \"value\" pairs, got {line[position:][:40]!r}")
        if match[1] in fields:
            raise ConfigError(f"{where}: {match[1]!r} given twice")
        fields[match[1]] = match[2]
        position = match.end()
    return _checked(fields.pop("public-key", ""), fields, where)


def _checked(key: str, fields: dict[str, str], where: str) -> tuple[bytes, Principal]:
    unknown = set(fields) - {"role", "name"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; a line takes public-key, role and name")
    if len(key) != KEY_CHARS or any(c.isspace() or c in "\"'\\" for c in key):
        raise ConfigError(f"{where}: {key[:48]!r} is not a {KEY_CHARS}-char Z85 public key")
    role_text = fields.get("role", "admin")
    try:
        role = Role[role_text.upper()]
    except KeyError:
        raise ConfigError(f"{where}: role {role_text[:16]!r} is not one of read, operate, admin") from None
    if "name" not in fields:
        return key.encode(), Principal(f"key:{key[:8]}", role)  # named by its first characters in the audit
    name = fields["name"]
    if not _NAME.fullmatch(name) or name in (LOCAL.name, LOOPBACK.name):
        raise ConfigError(f"{where}: name {name[:64]!r}: use 1-64 letters, digits and _.@+- (not 'local' or "
                          "'loopback', which name the daemon's own sockets)")
    return key.encode(), Principal(name, role)
