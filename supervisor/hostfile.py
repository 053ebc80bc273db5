"""The shape of a gang: its hosts and ranks, this daemon's share, and the ring hostfile of each generation.

A gang is a data-parallel job on one of MLX's backends (ring by default; see ``supervisor.backends``). On one host,
``ranks = N`` runs N ranks on 127.0.0.1. Over several hosts the config lists them in rank order, either as addresses
(``hosts``, each running ``ranks`` ranks) or as mlx.launch's hostfile JSON (``hostfile``: ``[{"ssh": "mac1", "ips":
["10.0.0.1"]}, ...]`` or ``{"hosts": [...]}``, one entry per rank, entries sharing an ``ssh`` name being one host).
The daemon of the host holding rank 0 leads; every daemon starts its own ranks with ``MLX_RANK`` and an
``MLX_HOSTFILE`` such as ``[["10.0.0.1:32339"], ["10.0.0.2:32340"]]``, whose ports move on with every generation so
that a rank of an earlier generation can never join a later ring.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PORT_WINDOW = 16  # generations before ports repeat


class LayoutError(ValueError):
    """A gang description that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One host of a gang: how the config names it, the address its ranks listen on, and its ranks."""

    name: str
    address: str
    ranks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A gang's hosts and which of them this daemon is."""

    hosts: tuple[Host, ...]
    me: int  # index into hosts
    port: int  # first ring port

    @property
    def world(self) -> int:
        return sum(len(h.ranks) for h in self.hosts)

    @property
    def local_ranks(self) -> tuple[int, ...]:
        return self.hosts[self.me].ranks

    @property
    def leader(self) -> bool:
        """This daemon holds rank 0."""
        return 0 in self.local_ranks

    @property
    def peers(self) -> tuple[str, ...]:
        """The leader's followers (none for a follower or a one-host gang)."""
        return tuple(h.name for i, h in enumerate(self.hosts) if i != self.me) if self.leader else ()

    @property
    def me_name(self) -> str:
        return self.hosts[self.me].name

    def writer(self, rank: int) -> bool:
        """The lowest rank on each host writes the replicated model (hosts need not share a disk)."""
        return any(rank == min(h.ranks) for h in self.hosts)

    def ring(self, generation: int) -> list[list[str]]:
        """MLX_HOSTFILE of generation ``generation``: one ``[address:port]`` per rank, in rank order."""
        offset = ((max(generation, 1) - 1) % PORT_WINDOW) * self.world
        address = {r: h.address for h in self.hosts for r in h.ranks}
        return [[f"{address[r]}:{self.port + offset + r}"] for r in range(self.world)]

    def fingerprint(self) -> str:
        """What every daemon of the gang must agree on (checked when a follower syncs)."""
        return json.dumps([[h.address, list(h.ranks)] for h in self.hosts] + [self.port], separators=(",", ":"))


def read_hostfile(path: Path) -> list[tuple[str, str]]:
    """(ssh name, first ip) per rank from mlx.launch's hostfile; LayoutError names the problem."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise LayoutError(f"hostfile {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise LayoutError(f"hostfile {path}: not JSON ({exc})") from None
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise LayoutError(f"hostfile {path}: expected a list of hosts or {{\"hosts\": [...]}}")
    ranks: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        ips = entry.get("ips") if isinstance(entry, dict) else None
        name = entry.get("ssh") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(ips, list) or not ips or not isinstance(ips[0], str):
            raise LayoutError(f"hostfile {path}: entry {index} needs \"ssh\" and \"ips\" (each daemon finds its "
                              "own entry by IP address, and the ring backend connects to them; JACCL too needs an IP "
                              "per host here, though mlx.launch needs only rank 0's)")
        ranks.append((name, _address(ips[0], f"hostfile {path}: entry {index}")))
    return ranks


def _address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise LayoutError(f"{where}: {value!r} is not an IP address") from None


def build_layout(ranks: int, hosts: list[str], hostfile: Path | None, host: str, port: int,
                 local_addresses: Iterable[str]) -> Layout | None:
    """The gang a job describes, or None for a plain job. ``host`` picks this daemon's entry; by default it is
    the one whose address belongs to this machine (``local_addresses``)."""
    if hostfile is not None:
        per_rank = read_hostfile(hostfile)
        names: dict[str, list[int]] = {}
        addresses: dict[str, str] = {}
        for rank, (name, address) in enumerate(per_rank):
            names.setdefault(name, []).append(rank)
            addresses.setdefault(name, address)
        entries = [Host(n, addresses[n], tuple(r)) for n, r in names.items()]
    elif hosts:
        entries = [Host(h, _address(h, "hosts"), tuple(range(i * ranks, (i + 1) * ranks)))
                   for i, h in enumerate(hosts)]
    elif ranks > 1:
        entries = [Host("127.0.0.1", "127.0.0.1", tuple(range(ranks)))]
    else:
        return None
    if len({h.address for h in entries}) != len(entries):
        raise LayoutError("two hosts of the gang share an address")
    layout = Layout(tuple(entries), _which(entries, host, set(local_addresses)), port)
    if layout.world < 2:
        raise LayoutError("a gang needs at least 2 ranks")
    if port < 1024 or port + PORT_WINDOW * layout.world > 65535:
        raise LayoutError(f"ring ports {port}..{port + PORT_WINDOW * layout.world} must lie within 1024..65535")
    return layout


def _which(entries: list[Host], host: str, local: set[str]) -> int:
    if len(entries) == 1:
        return 0
    if host:
        found = [i for i, h in enumerate(entries) if host in (h.name, h.address)]
        if not found:
            raise LayoutError(f"gang.host = {host!r} is none of the hosts ({', '.join(h.name for h in entries)})")
        return found[0]
    found = [i for i, h in enumerate(entries) if h.address in local]
    if len(found) != 1:
        what = "none" if not found else "several"
        raise LayoutError(f"{what} of the gang's hosts ({', '.join(h.address for h in entries)}) is on this "
                          "machine; set gang.host")
    return found[0]


def local_addresses() -> list[str]:
    """The IP addresses of this machine's interfaces (of this network namespace)."""
    import psutil

    return [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name in ("AF_INET", "AF_INET6")]


def ring_json(layout: Layout, generation: int) -> str:
    return json.dumps(layout.ring(generation))


def describe(layout: Layout) -> dict[str, Any]:
    """The gang as status shows it."""
    return {"world": layout.world, "host": layout.me_name, "leader": layout.leader,
            "hosts": [{"name": h.name, "address": h.address, "ranks": list(h.ranks)} for h in layout.hosts]}
