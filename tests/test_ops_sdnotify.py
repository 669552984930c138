"""sd_notify against a fake NOTIFY_SOCKET: the datagrams systemd would receive, and the watchdog pinger."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.sdnotify import Notifier


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5.0)
    try:
        yield s, path
    finally:
        s.close()


def recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_ready_status_stopping(sock: tuple[socket.socket, str]) -> None:
    s, path = sock
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("ESL connected")
    assert recv(s) == "READY=1\nSTATUS=ESL connected"
    assert n.status("2 calls\nactive")
    assert recv(s) == "STATUS=2 calls active"
    assert n.watchdog()
    assert recv(s) == "WATCHDOG=1"
    assert n.reloading()
    msg = recv(s)
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and int(msg.rsplit("=", 1)[1]) > 0
    assert n.stopping()
    assert recv(s) == "STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"forkbridge-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5.0)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(s) == "READY=1"
    finally:
        s.close()


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert n.start_watchdog(lambda: True) is None


def test_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False


def test_watchdog_interval() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval() is None
    assert Notifier({}).watchdog_interval() is None


def test_watchdog_pings_only_while_healthy(sock: tuple[socket.socket, str]) -> None:
    s, path = sock
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # ping every 20 ms
    health = {"ok": True, "checks": 0}

    def healthy() -> bool:
        health["checks"] += 1
        return health["ok"]

    pinger = n.start_watchdog(healthy)
    assert pinger is not None
    try:
        assert recv(s) == "WATCHDOG=1"
        assert recv(s) == "WATCHDOG=1"
        health["ok"] = False
        # Drain pings already in flight, then no more may arrive while unhealthy: wait until several
        # health checks have run past the switch and check nothing was sent after the first of them.
        s.settimeout(0.0)
        while True:
            try:
                s.recv(4096)
            except BlockingIOError:
                break
        seen = health["checks"]
        for _ in range(250):  # bounded: at most 250 × 20 ms
            if health["checks"] >= seen + 3:
                break
            pinger.join(timeout=0.02)
        assert health["checks"] >= seen + 3
        with pytest.raises(BlockingIOError):
            s.recv(4096)
    finally:
        n.stop_watchdog()
    assert pinger.dead
