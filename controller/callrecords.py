"""Call records: one JSON line per finished call, for support questions ("what did the bot hear, and when?").

A `CallRecord` is built up during the call (timeline events, transcripts, digits, tool calls, latencies) and
written once at the end by `CallRecordWriter`. Times in the timeline are seconds since the record started
(monotonic clock, so NTP steps do not reorder events); start/answer/end are UTC wall-clock ISO 8601 stamps.
The written line passes through the log redactor (registered secrets, token= URL parameters) and detail keys
that name a secret are masked, so a record never carries a credential.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.logs import MASK, redact

log = logging.getLogger("forkbridge.callrecords")

_SECRET_KEYS = ("token", "password", "secret", "api_key", "apikey", "authorization")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _mask_details(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: (MASK if any(s in k.lower() for s in _SECRET_KEYS) else v) for k, v in detail.items()}


def _mark_cut(entry: dict[str, Any], heard_ms: int, received_ms: int) -> None:
    """What the caller actually heard of a reply they interrupted: the played share of its text, cut back to a
    whole word (an estimate: engines give text and audio separately; the milliseconds are exact)."""
    text = entry["text"]
    share = min(1.0, max(0.0, heard_ms / received_ms)) if received_ms > 0 else 0.0
    heard = text[: int(len(text) * share)]
    if 0 < len(heard) < len(text) and not text[len(heard)].isspace():
        heard = heard.rsplit(" ", 1)[0] if " " in heard else ""
    entry["interrupted"] = {"heard_ms": heard_ms, "of_ms": received_ms, "heard_text": heard.strip()}


@dataclass
class CallRecord:
    """Everything worth keeping about one call; builder methods return self so calls can be chained."""

    uuid: str
    did: str = ""
    caller_id: str = ""
    route: str = ""
    engine: str = ""
    direction: str = "inbound"  # outbound: a call we placed; did is then the number called
    start_time: float = field(default_factory=time.time)
    answer_time: float | None = None
    end_time: float | None = None
    outcome: str = ""
    hangup_cause: str = ""
    timeline: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    dtmf: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    recording: dict[str, Any] | None = None  # {path, started, duration, channels} when the route records
    continuations: int = 0  # engine sessions that replaced one at its session limit
    _cuts: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # response → (heard, received) ms
    _t0: float = field(default_factory=time.monotonic, repr=False)

    @property
    def clock_origin(self) -> float:
        """time.monotonic() at which this record's timeline starts (t = 0)."""
        return self._t0

    def now(self) -> float:
        """Seconds since the record started (the timeline's clock)."""
        return round(time.monotonic() - self._t0, 3)

    def event(self, name: str, /, **detail: Any) -> CallRecord:
        self.timeline.append((self.now(), name, _mask_details(detail)))
        return self

    def answered(self) -> CallRecord:
        self.answer_time = time.time()
        return self.event("answered")

    def transcript(self, role: str, text: str, response: str = "") -> CallRecord:
        """What the engine said it heard (role "user") or said (role "assistant"); `response` ties an assistant
        line to the reply it belongs to, so a barge-in can mark it (the cut may come before or after the text)."""
        entry: dict[str, Any] = {"t": self.now(), "role": role, "text": text}
        if response:
            entry["response"] = response
        self.transcripts.append(entry)
        if response in self._cuts:
            _mark_cut(entry, *self._cuts[response])
        return self

    def cut(self, response: str, heard_ms: int, received_ms: int) -> CallRecord:
        """The caller barged in on `response` after hearing `heard_ms` of its `received_ms`."""
        if not response:
            return self
        self._cuts[response] = (heard_ms, received_ms)
        for entry in self.transcripts:
            if entry.get("response") == response and entry["role"] == "assistant":
                _mark_cut(entry, heard_ms, received_ms)
        return self

    def digit(self, digit: str, source: str = "") -> CallRecord:
        self.dtmf.append({"t": self.now(), "digit": digit, **({"source": source} if source else {})})
        return self

    def tool_call(self, name: str, arguments: dict[str, Any] | None = None, result: str = "") -> CallRecord:
        self.tool_calls.append({"t": self.now(), "name": name, "arguments": _mask_details(arguments or {}),
                                "result": result})
        return self

    def latency(self, kind: str, seconds: float) -> CallRecord:
        """E.g. kind "first_audio", "playout", "bargein_stop" (same meanings as the metrics)."""
        self.latencies.setdefault(kind, []).append(round(seconds, 4))
        return self

    def finish(self, outcome: str, hangup_cause: str = "", ended: float | None = None) -> CallRecord:
        """`ended`: time.monotonic() when the call ended, if the record is finished later (default: now)."""
        now = time.monotonic()
        ended = now if ended is None else ended
        self.end_time = time.time() - (now - ended)
        self.outcome = outcome
        self.hangup_cause = hangup_cause or self.hangup_cause
        detail = {"outcome": outcome, **({"cause": hangup_cause} if hangup_cause else {})}
        last = self.timeline[-1][0] if self.timeline else 0.0
        self.timeline.append((max(last, round(ended - self._t0, 3)), "end", detail))
        return self

    @property
    def duration(self) -> float | None:
        """Answered duration (answer → end), None if never answered or not finished."""
        if self.answer_time is None or self.end_time is None:
            return None
        return round(self.end_time - self.answer_time, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid, "did": self.did, "caller_id": self.caller_id, "route": self.route,
            "engine": self.engine, "direction": self.direction, "start": _iso(self.start_time),
            "answer": _iso(self.answer_time),
            "end": _iso(self.end_time), "duration": self.duration, "outcome": self.outcome,
            "hangup_cause": self.hangup_cause,
            "timeline": [[t, name, detail] for t, name, detail in self.timeline],
            "transcripts": self.transcripts, "dtmf": self.dtmf, "tool_calls": self.tool_calls,
            "latencies": self.latencies, "recording": self.recording, "continuations": self.continuations,
        }

    def to_json(self) -> str:
        """One line of JSON, redacted (json.dumps escapes newlines, so it is always a single line)."""
        return redact(json.dumps(self.to_dict(), ensure_ascii=False, default=str, separators=(",", ":")))


class CallRecordWriter:
    """Appends records to `path`, one line each; follows log rotation (reopens if the file was moved).

    Each line is one write() on an O_APPEND descriptor, unbuffered: with several worker processes appending to
    the same file, the kernel places every record whole at the end, so lines never interleave."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: Any = None
        self._inode: tuple[int, int] | None = None

    def write(self, record: CallRecord) -> bool:
        """Append the record; False (logged) on an I/O error, so call teardown never fails because of a disk."""
        line = (record.to_json() + "\n").encode()
        with self._lock:
            try:
                self._ensure_open()
                written = self._file.write(line)
                if written != len(line):  # a full disk: the kernel wrote what it could
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                return True
            except OSError as exc:
                log.error("cannot write call record %s to %s: %s", record.uuid, self.path, exc)
                self._close()
                return False

    def reopen(self) -> None:
        """Close now; the next write opens the path afresh (SIGHUP after logrotate)."""
        with self._lock:
            self._close()

    def close(self) -> None:
        self.reopen()

    def _ensure_open(self) -> None:
        if self._file is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    return
            except FileNotFoundError:
                pass
            self._close()
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "ab", buffering=0)
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            self._inode = None
