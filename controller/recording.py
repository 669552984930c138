"""A call's recording, made by FreeSWITCH itself beside the fork (`uuid_record` with `RECORD_STEREO=true`).

FreeSWITCH writes the file, so the directory must be writable by the FreeSWITCH user (it creates missing
subdirectories such as `{date}` itself); forkbridge only names the file, starts and stops it, and reports it in the
call record. A recording that cannot start never touches the call: it is logged and counted.

Measured on FreeSWITCH 1.10.12: `uuid_record <uuid> start <path>` answers `+OK Success`, or `-ERR Cannot record
session!` for a path it cannot open at once; some failures are only reported by a `RECORD_START` whose
`record_completion_cause` is set (`uri-failure`). `RECORD_STOP` carries `record_ms`. It comes after
`CHANNEL_HANGUP`, so the call record waits for it a moment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import gevent.event

from controller.esl import Event

EVENTS = ("RECORD_START", "RECORD_STOP")
# RECORD_STEREO on the parked leg: channel 0 is what the leg reads (the caller), 1 what it writes (what
# FreeSWITCH played to the caller). Checked on the real switch by tests/realswitch/test_rs_recording.py.
CHANNELS = ("caller", "agent")
STOP_WAIT = 2.0  # how long a finished call's record waits for RECORD_STOP (its exact duration)


def recording_path(template: str, uuid: str, did: str, route: str, when: float | None = None) -> str:
    """The route's `record.path` for one call ({date} is the answer's UTC date, YYYY-MM-DD)."""
    day = datetime.fromtimestamp(time.time() if when is None else when, UTC).strftime("%Y-%m-%d")
    return template.format(date=day, uuid=uuid, did=_safe(did), route=_safe(route))


@dataclass
class Recording:
    path: str
    started: float | None = None  # time.monotonic() of FreeSWITCH's +OK
    stopped: float | None = None
    ms: int | None = None  # FreeSWITCH's own count (RECORD_STOP record_ms)
    error: str = ""
    done: gevent.event.Event = field(default_factory=gevent.event.Event)  # stopped, failed, or never started

    def started_ok(self, reply: str) -> bool:
        """The reply to `uuid_record ... start`; False (and done) when FreeSWITCH refused it."""
        if reply.startswith("+OK"):
            self.started = time.monotonic()
            return True
        self.failed(reply.strip() or "no reply")
        return False

    def failed(self, why: str) -> None:
        self.error = why[:200]
        self.done.set()

    def on_event(self, event: Event) -> str:
        """RECORD_START / RECORD_STOP for this file: "failed", "stopped" or "" (nothing new)."""
        if event.get("Record-File-Path") != self.path or self.done.is_set():
            return ""
        cause = event.get("variable_record_completion_cause")
        if event.name == "RECORD_START" and cause:
            self.failed(f"FreeSWITCH could not record: {cause}")
            return "failed"
        if event.name == "RECORD_STOP":
            ms = event.get("variable_record_ms")
            self.ms = int(ms) if ms.isdigit() else None
            self.stopped = time.monotonic()
            self.done.set()
            return "stopped"
        return ""

    def summary(self) -> dict[str, Any]:
        """For the call record: path, seconds recorded and which WAV channel is whose (or the error)."""
        if self.error or self.started is None:
            return {"path": self.path, "error": self.error or "not started"}
        # without RECORD_STOP (ESL down at the end): our own clock, a little longer than the file
        seconds = self.ms / 1000.0 if self.ms is not None else (self.stopped or time.monotonic()) - self.started
        return {"path": self.path, "duration": round(seconds, 3), "channels": list(CHANNELS)}


def _safe(text: str) -> str:
    """A DID or route name as a file-name part."""
    return "".join(ch for ch in text if ch.isalnum() or ch in "+-_.")[:64] or "none"
