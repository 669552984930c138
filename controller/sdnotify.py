"""systemd notify protocol (sd_notify(3)), written out because it is a few lines and not worth a dependency.

The unit is `Type=notify` with `WatchdogSec=`: systemd considers us started only after READY=1 (ESL connected,
WebSocket server listening), and restarts us if the watchdog pings stop. The pinger only pings while a health
callable says the daemon works, so a wedged daemon (ESL gone for good, hub starved) is restarted rather than
kept alive by a loop that merely still runs. Everything is a no-op when NOTIFY_SOCKET is unset (tests, a shell).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import gevent
from gevent.event import Event

log = logging.getLogger("forkbridge.sdnotify")


class Notifier:
    """Sends state lines to $NOTIFY_SOCKET; `enabled` is False (and every call returns False) without it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if addr.startswith("@"):
            self._address = b"\0" + addr[1:].encode()  # abstract namespace socket
        elif addr.startswith("/"):
            self._address = addr
        self._watchdog_usec = _watchdog_usec(env)
        self._stop = Event()
        self._pinger: gevent.Greenlet | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of `KEY=value` lines; False (logged at debug) if not under systemd or on error."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", fields, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """Say a SIGHUP reload started; follow with ready() when done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), or None if systemd asked for no watchdog."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def start_watchdog(self, healthy: Callable[[], bool]) -> gevent.Greenlet | None:
        """Ping every watchdog_interval() while healthy() is True; None (nothing started) without a watchdog."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled or self._pinger is not None:
            return self._pinger
        self._stop.clear()
        self._pinger = gevent.spawn(self._ping_loop, interval, healthy)
        return self._pinger

    def stop_watchdog(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._pinger is not None:
            self._pinger.join(timeout=timeout)
            self._pinger.kill(block=False)
            self._pinger = None

    def _ping_loop(self, interval: float, healthy: Callable[[], bool]) -> None:
        # Runs for the daemon's lifetime; each turn waits on the stop event, so stop_watchdog() ends it at once.
        while True:
            try:
                ok = bool(healthy())
            except Exception as exc:
                log.warning("health check raised %s; withholding the watchdog ping", exc)
                ok = False
            if ok:
                self.watchdog()
            else:
                log.warning("daemon unhealthy; withholding the systemd watchdog ping")
            if self._stop.wait(interval):
                return


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC, honouring WATCHDOG_PID (the watchdog is for that process only, as sd_watchdog_enabled)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None


_default: Notifier | None = None


def notifier() -> Notifier:
    """The process's Notifier (built from os.environ on first use)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def ready(status: str = "") -> bool:
    return notifier().ready(status)


def stopping(status: str = "") -> bool:
    return notifier().stopping(status)


def status(text: str) -> bool:
    return notifier().status(text)


def watchdog() -> bool:
    return notifier().watchdog()
