"""Call control over ESL for one call we own: the only place that writes commands for it.

Commands for one call go out in order through one worker (chunks must be queued in the order they were
written), except `break_all`, which jumps the queue and drops queued plays: a barge-in must not wait. The
worker lives only while there is something to send (a waiting greenlet holds about 8 KiB, per call).
Once the call has ended nothing more is sent for its uuid.

Files are queued with `sendmsg ... execute playback`, the mechanism under `uuid_broadcast` minus its five
lead frames: uuid_broadcast makes the park loop read ~100 ms of audio before each file starts, so chunks
queued back to back with it would leave ~100 ms of silence between them. `uuid_break <uuid> all` flushes
both kinds of queued execute.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import gevent

from controller.esl import EslClient, EslError

log = logging.getLogger("forkbridge.controller")

RECONNECT_WAIT = 30.0  # how long a command for a live call waits for ESL to come back


class EslCallControl:
    def __init__(self, esl: EslClient, uuid: str, on_sent: Callable[[str, float], None] | None = None,
                 log: logging.Logger | logging.LoggerAdapter = log, stop_fork: str = "",
                 marker: str = "") -> None:
        self.lost = False  # a command could not be sent (ESL down): the resync after the reconnect redoes it
        self._may_arm = True
        self.log = log
        self.esl = esl
        self.uuid = uuid
        self.stop_fork = stop_fork  # the module's stop command for this call's fork
        self.marker = marker  # the dialplan's ownership variable, cleared when we let the call go
        self.on_sent = on_sent or (lambda _cmd, _t: None)
        self._queue: deque[tuple[str, str]] = deque()  # (kind, command)
        self._retried: tuple[str, str] | None = None
        self._closed = False
        self._worker: gevent.Greenlet | None = None

    def _put(self, kind: str, command: str, urgent: bool = False) -> None:
        if self._closed:
            return
        if urgent:
            self._queue.appendleft((kind, command))
        else:
            self._queue.append((kind, command))
        if self._worker is None or self._worker.dead:
            self._worker = gevent.spawn(self._run)

    def _run(self) -> None:
        while self._queue:
            kind, command = self._queue.popleft()
            try:
                if kind in ("play", "writer"):
                    # A locked execute runs after the one before it; an unlocked one (the silence writer
                    # under streamed audio) lets later files play inside it instead of waiting forever.
                    reply = self.esl.execute(self.uuid, "playback", command, lock=kind == "play")
                else:
                    reply = self.esl.api(command)
            except EslError as exc:
                if self._retry_after_reconnect(kind, command):
                    continue
                self.log.warning("%s not sent: %s", kind, exc)
                self.lost = True
                continue
            except Exception:  # a bug here must not silently swallow the call's hangup or transfer
                self.log.exception("%s failed", kind)
                continue
            self.on_sent(kind, time.monotonic())
            if not reply.startswith("+OK") and reply.strip() not in ("true", "false"):
                self.log.info("%s → %s", kind, reply.strip())

    def _retry_after_reconnect(self, kind: str, command: str) -> bool:
        """ESL is down: a hangup or transfer must still happen, so wait for the reconnect and send it then."""
        if self._retried == (kind, command) or self.esl.connected or not self.esl.wait_connected(RECONNECT_WAIT):
            return False
        self._retried = (kind, command)  # once: a command that fails on a fresh connection is not retried again
        self._queue.appendleft((kind, command))
        return True

    # ---- the CallControl interface ----
    def play(self, path: str) -> None:
        self._put("play", path)

    def keep_writing(self) -> None:
        """Give the parked leg a writer (endless silence): jambonz streamed audio only plays while one runs."""
        self._put("writer", "silence_stream://-1")

    def break_all(self) -> None:
        remaining = deque(item for item in self._queue if item[0] not in ("play", "writer"))
        self._queue = remaining
        self._put("break", f"uuid_break {self.uuid} all", urgent=True)

    def drop_queued_plays(self) -> None:
        """Forget files not yet sent, without a break: the channel plays someone else's applications now."""
        self._queue = deque(item for item in self._queue if item[0] not in ("play", "writer", "break"))

    def break_current(self) -> None:
        """Stop only the file playing now; what is queued behind it plays on."""
        self._put("break", f"uuid_break {self.uuid}", urgent=True)

    def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        self._put("hangup", f"uuid_kill {self.uuid} {cause}")

    def stop_forking(self) -> None:
        """Stop the call's fork (once)."""
        if self.stop_fork:
            self._put("fork", self.stop_fork)
            self.stop_fork = ""

    def arm_orphan_timer(self, seconds: float, action: str) -> None:
        """Ask FreeSWITCH itself to run `action` (the route's fallback transfer or hangup) in `seconds`,
        replacing the previous timer: if this daemon dies, its callers are not left parked in silence."""
        if not self._may_arm:
            return
        group = f"forkbridge-{self.uuid}"
        self._put("watchdog", f"sched_del {group}")
        self._put("watchdog", f"sched_api +{int(seconds)} {group} {action}")

    def disarm_orphan_timer(self) -> None:
        """For good: a re-arm still queued would put the timer back on a call that is no longer ours."""
        self._may_arm = False
        self._queue = deque(item for item in self._queue if item[0] != "watchdog")
        self._put("watchdog", f"sched_del forkbridge-{self.uuid}", urgent=True)

    def transfer(self, target: str) -> None:
        """Hand the call over: silence, stop the fork, clear our marker (a resync must never take the call
        back from whoever has it now), no orphan timer, then transfer."""
        self.break_all()
        self.disarm_orphan_timer()
        self.stop_forking()
        if self.marker:
            self._put("setvar", f"uuid_setvar {self.uuid} {self.marker} released")
        self._put("transfer", f"uuid_transfer {self.uuid} {target}")

    def stop_recording(self, path: str) -> None:
        self._put("record", f"uuid_record {self.uuid} stop {path}")

    def send_dtmf(self, digits: str) -> None:
        self._put("send_dtmf", f"uuid_send_dtmf {self.uuid} {digits}")

    def setvar(self, name: str, value: str) -> None:
        self._put("setvar", f"uuid_setvar {self.uuid} {name} {value}")

    def drain(self, timeout: float) -> None:
        """Wait until what is queued has been sent (used before a fallback transfer or hangup)."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            gevent.sleep(0.02)

    def finish(self) -> None:
        """We are letting go of the call: send what is queued, accept nothing new."""
        self._closed = True

    def close(self) -> None:
        """The call is over: drop what is queued, send nothing more."""
        self._closed = True
        self._queue.clear()
