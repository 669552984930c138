"""Run the real daemon in-process against fsim over real loopback sockets, with configs written as YAML."""

from __future__ import annotations

import contextlib
import socket
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent

from controller.config import Config, load_config
from controller.daemon import Daemon

SECRET = "test-token-secret-0123456789"


def write_config(tmp_path: Path, esl_port: int, routes: str, engines: str = "", extra: str = "",
                 esl_password: str = "ClueCon") -> Path:
    """A daemon config on loopback: ESL to fsim, bridge and metrics on ephemeral ports."""
    engines = engines or """
      echo:
        type: echo
    """
    text = f"""
    esl:
      port: {esl_port}
      password: {esl_password}
      command_timeout: 2s
      reconnect_max: 1s
    bridge:
      listen: 127.0.0.1:0
      spool_dir: {tmp_path / "spool"}
      token_secret: {SECRET}
    metrics:
      listen: 127.0.0.1:0
    daemon:
      shutdown_grace: 2s
    engines:
{textwrap.indent(textwrap.dedent(engines).strip(), "      ")}
    routes:
{textwrap.indent(textwrap.dedent(routes).strip(), "      ")}
    """
    path = tmp_path / "forkbridge.yaml"
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra))
    return path


def load(path: Path) -> Config:
    return load_config(str(path), env={})


@contextlib.contextmanager
def running_daemon(config: Config) -> Iterator[Daemon]:
    daemon = Daemon(config)
    daemon.start()
    try:
        assert daemon.esl.wait_connected(10), "daemon never connected to fsim's ESL"
        yield daemon
    finally:
        daemon.shutdown(grace=0)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll a condition on the gevent hub; fail with `what` if it does not come true in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        gevent.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_ports(n: int = 1) -> list[int]:
    """n distinct free loopback ports, for processes that must be told their port up front (held together while
    picked, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def metric(port: int, text: str) -> bool:
    """True when a daemon's /metrics on this port shows `text` (e.g. 'forkbridge_esl_connected 1.0')."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return text in reply.read().decode()
    except OSError:
        return False
