"""The stand-ins listen on loopback only: the private broker (AMQP, TLS and Erlang distribution) and the demo."""

from __future__ import annotations

import ipaddress
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from service.local import demo
from service.local.rabbitmq import LocalBroker

_LISTEN = "0A"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6 writes an address as four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening(pid: int) -> list[tuple[str, int]]:
    """Every TCP socket ``pid`` listens on, as (address, port)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink())
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and inode in inodes:
                address, port = local.split(":")
                found.append((str(_address(address)), int(port, 16)))
    return found


async def test_the_private_node_listens_on_loopback_only(session_node: LocalBroker | None) -> None:
    if session_node is None or session_node.pid is None:
        pytest.skip("AMQP_URL names a broker of its own")
    sockets = listening(session_node.pid)
    ports = {port for _, port in sockets}
    assert {session_node.amqp_port, session_node.dist_port} <= ports, sockets
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in sockets), sockets


async def test_the_demo_serves_its_probes_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HTTP_HOST", raising=False)
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.setenv("CLERK_SECRET_KEY", "sk_test_" + "d" * 32)
    async with AsyncExitStack() as stack:
        environ, fake = await demo._environment(stack, {}, replicas=1)
    assert fake is None
    assert environ["HTTP_HOST"] == "127.0.0.1"
