"""A simulated inbound SIP channel: dialplan (set, answer, park), media clock, playback queue, DTMF, hangup.

The media loop ticks once per packet (ptime) against a monotonic clock, like FreeSWITCH's read loop: each tick
reads the caller's frame, dequeues DTMF, advances playback (or the lead frames of a queued broadcast) and feeds the
media bugs. Everything the caller hears goes to ``self.ear``.

Playbacks nest as in FreeSWITCH: a running playback parses the channel's private events on every frame, so an
execute queued behind one that was not queued with ``event-lock: true`` runs *inside* it (the outer file pauses
and resumes when the inner one ends). ``self.stack`` holds the running playbacks, outermost first.

Between two applications on a parked channel the park loop reads one frame before it dequeues the next execute,
so the caller hears one frame of silence at every boundary between queued files (20 ms at 20 ms ptime; measured on
FreeSWITCH 1.10.12, see docs/playback.md); uuid_broadcast's five lead frames include that frame.

A file whose extension is a codec name (``.PCMU``, ``.PCMA``, ``.L16``) is a native file (mod_native_file): its
bytes are frames in the channel's own codec, read as the playback goes, so a file still being written keeps
playing until the reader catches up with the writer (then the playback ends, ``done``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import numpy as np

from .audio import UnplayableFile, g711_decode, read_audio_file, resample
from .caller import CallerScript
from .ear import Ear

if TYPE_CHECKING:
    from .switch import FSim

log = logging.getLogger("fsim.channel")

SHOW_COLUMNS = [
    "uuid",
    "direction",
    "created",
    "created_epoch",
    "name",
    "state",
    "cid_name",
    "cid_num",
    "ip_addr",
    "dest",
    "application",
    "application_data",
    "dialplan",
    "context",
    "read_codec",
    "read_rate",
    "read_bit_rate",
    "write_codec",
    "write_rate",
    "write_bit_rate",
    "secure",
    "hostname",
    "presence_id",
    "presence_data",
    "accountcode",
    "callstate",
    "callee_name",
    "callee_num",
    "callee_direction",
    "call_uuid",
    "sent_callee_name",
    "sent_callee_num",
    "initial_cid_name",
    "initial_cid_num",
    "initial_ip_addr",
    "initial_dest",
    "initial_dialplan",
    "initial_context",
]

CODECS = {8000: ("PCMU", 64000), 16000: ("G722", 64000), 48000: ("opus", 0)}
NATIVE_EXTENSIONS = {"PCMU", "PCMA", "L16", "G722", "OPUS", "G729"}  # mod_native_file: one per loaded codec


@dataclass
class Callee:
    """What a number fsim's ``originate`` dials does: answer after ``ring_s`` and then speak ``script`` (like a
    caller's script), or never answer (``answer=False``: NO_ANSWER at originate_timeout), or refuse at once with
    ``cause`` (``USER_BUSY``, ``CALL_REJECTED``, ...). ``rate`` is the outbound leg's codec rate."""

    answer: bool = True
    ring_s: float = 0.0
    cause: str = ""
    script: CallerScript | None = None
    rate: int = 8000


@dataclass
class QueuedApp:
    """A private ``execute`` event waiting in the channel's queue (uuid_broadcast / sendmsg)."""

    app: str
    arg: str
    lead_frames: int = 0
    app_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    event_lock: bool = False  # queued with ``event-lock: true``: nothing queued later runs inside it


@dataclass
class Playing:
    item: QueuedApp
    path: str
    samples: np.ndarray | None  # None = endless silence (silence_stream://-1)
    pos: int = 0
    remaining: int = -1  # for silence_stream://N
    native: Any = None  # an open native file, read one frame per tick
    native_read: int = 0  # bytes read from it (FreeSWITCH's playback_samples for a native file)
    src_rate: int = 0  # the file's own rate (playback_samples counts samples at this rate)


class Channel:
    """One call. Tests read its attributes; the switch and the API commands drive it."""

    def __init__(
        self,
        sw: FSim,
        did: str,
        caller_id: str,
        caller_name: str,
        script: CallerScript,
        rate: int,
        ptime_ms: int,
        fork_build: str,
        ring_s: float,
        extra_vars: dict[str, str] | None,
        outbound: tuple[Callee, float] | None = None,
        uuid: str = "",
    ) -> None:
        if ptime_ms not in (10, 20, 30, 40, 60):
            raise ValueError("ptime_ms must be 10, 20, 30, 40 or 60")
        self.sw = sw
        self.uuid = uuid or str(uuidlib.uuid4())
        self.outbound = outbound  # placed by ``originate``: the callee and its originate_timeout
        self.originated = gevent.event.AsyncResult()  # originate's reply: "+OK <uuid>" or "-ERR <cause>"
        direction = "outbound" if outbound else "inbound"
        self.direction = direction
        self.did = did
        self.script = script
        self.rate = rate
        self.ptime_ms = ptime_ms
        self.frame_samples = rate * ptime_ms // 1000
        self.codec, self.codec_bit_rate = CODECS.get(rate, ("L16", rate * 16))
        self.fork_build = fork_build
        self.ring_s = ring_s
        self.name = f"loopback/{did}-a" if outbound else f"sofia/external/{caller_id}@127.0.0.1"
        self.profile: dict[str, Any] = {
            "username": caller_id.lstrip("+"),
            "dialplan": "XML",
            "cid_name": caller_name,
            "cid_num": caller_id,
            "network_addr": "127.0.0.1",
            "destination": did,
            "context": "public",
            "index": 1,
            "transfer_source": "",
        }
        now_us = int(time.time() * 1_000_000)
        self.t_created_us = now_us
        self.t_answered_us = 0
        self.t_hangup_us = 0
        self.t_transfer_us = 0
        self.state = "CS_NEW"
        self.state_number = 0
        self.call_state = "DOWN"
        self.answer_state = "ringing"
        self.hangup_cause: str | None = None
        self.hangup_by: str | None = None  # "caller" | "switch"
        self.transferred_to: str | None = None
        self.transfer_dialplan: str | None = None
        self.transfer_context: str | None = None
        sip_call_id = f"{uuidlib.uuid4().hex[:20]}@127.0.0.1"
        self.variables: dict[str, str] = {
            "direction": direction,
            "uuid": self.uuid,
            "session_id": str(sw._next_session_id()),
            "sip_from_user": caller_id.lstrip("+"),
            "sip_from_uri": f"{caller_id.lstrip('+')}@127.0.0.1",
            "sip_from_host": "127.0.0.1",
            "sip_to_user": did,
            "sip_to_uri": f"{did}@127.0.0.1",
            "sip_to_host": "127.0.0.1",
            "sip_req_user": did,
            "sip_req_uri": f"{did}@127.0.0.1:5080",
            "sip_req_host": "127.0.0.1",
            "sip_call_id": sip_call_id,
            "sip_network_ip": "127.0.0.1",
            "sip_network_port": "5060",
            "sip_received_ip": "127.0.0.1",
            "sip_received_port": "5060",
            "sip_via_protocol": "udp",
            "sip_local_network_addr": "127.0.0.1",
            "sip_profile_name": "external",
            "sofia_profile_name": "external",
            "channel_name": self.name,
            "read_codec": self.codec,
            "read_rate": str(rate),
            "write_codec": self.codec,
            "write_rate": str(rate),
            "rtp_use_codec_name": self.codec,
            "rtp_use_codec_rate": str(rate),
            "rtp_use_codec_ptime": str(ptime_ms),
            "caller_id": caller_id,
            "destination_number": did,
        }
        if extra_vars:
            self.variables.update(extra_vars)
        self.ear = Ear()
        self.bugs: dict[str, Any] = {}  # bugname -> ForkBug / StreamBug
        self.all_bugs: list[Any] = []  # every bug ever attached, for tests
        self.recordings: dict[str, Any] = {}  # path -> fsim.record.RecordBug (uuid_record)
        self.queue: collections.deque[QueuedApp] = collections.deque()
        self.leading: QueuedApp | None = None
        self.lead_left = 0
        self._app_just_ended = False  # an application just ended: the park loop reads a frame before the next
        self.stack: list[Playing] = []  # running playbacks, outermost first; only the last one is heard
        self.played: list[tuple[str, str]] = []  # (path, status) of every finished playback
        self.temp_files: list[str] = []
        self.answered = gevent.event.Event()
        self.hungup = gevent.event.Event()
        self.parked = False
        self.t_answer: float | None = None  # time.monotonic() at answer
        self.t_hangup: float | None = None
        self._caller_audio = np.zeros(0, np.int16)
        self._dtmf_pending = sorted(script.dtmf, key=lambda d: d[1])
        self._tick = 0
        self._glet: gevent.Greenlet | None = None
        self._dead = False

    # ------------------------------------------------------------------ public helpers for tests
    @property
    def fork(self) -> Any:
        """The first mod_audio_fork bug attached to this call (or None)."""
        for b in self.all_bugs:
            if b.kind == "fork":
                return b
        return None

    @property
    def stream(self) -> Any:
        for b in self.all_bugs:
            if b.kind == "stream":
                return b
        return None

    def wait_answered(self, timeout: float = 5.0) -> bool:
        return self.answered.wait(timeout)

    def wait_hangup(self, timeout: float = 5.0) -> bool:
        return self.hungup.wait(timeout)

    def events(self, name: str | None = None) -> list[Any]:
        """Every event fired for this channel (optionally only those whose name or subclass is ``name``)."""
        return [e for e in self.sw.events_log if e.uuid == self.uuid and (name is None or e.key == name)]

    def commands(self) -> list[Any]:
        return [c for c in self.sw.commands_log if c.uuid == self.uuid]

    @property
    def alive(self) -> bool:
        return not self._dead and self.hangup_cause is None

    @property
    def playing(self) -> Playing | None:
        """The innermost running playback (the one the caller hears), or None."""
        return self.stack[-1] if self.stack else None

    @property
    def playing_path(self) -> str | None:
        return self.playing.path if self.playing else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._glet = gevent.spawn(self._run)

    def fire(self, name: str, extra: list[tuple[str, str]] | None = None, body: str | None = None,
             subclass: str | None = None) -> None:  # fmt: skip
        self.sw.fire_channel_event(self, name, extra or [], body, subclass)

    def _set_state(self, state: str, number: int) -> None:
        self.state, self.state_number = state, number

    def _execute(self, app: str, arg: str, response: str | None = None, app_uuid: str | None = None) -> str:
        u = app_uuid or str(uuidlib.uuid4())
        self.fire("CHANNEL_EXECUTE", [("Application", app), ("Application-Data", arg), ("Application-UUID", u)])
        if response is not None:
            self._execute_complete(app, arg, response, u)
        return u

    def _execute_complete(self, app: str, arg: str, response: str, app_uuid: str) -> None:
        self.fire(
            "CHANNEL_EXECUTE_COMPLETE",
            [("Application", app), ("Application-Data", arg), ("Application-Response", response),
             ("Application-UUID", app_uuid)],
        )  # fmt: skip

    def _run(self) -> None:
        try:
            self._set_state("CS_INIT", 2)
            self.fire("CHANNEL_CREATE")
            if self.outbound is not None:
                self._run_outbound(*self.outbound)
                return
            self._set_state("CS_ROUTING", 3)
            self.call_state = "RINGING"
            dp = self.sw.dialplan(self.did)
            if dp is None:
                self.hangup("NO_ROUTE_DESTINATION", by="switch")
                return
            self._set_state("CS_EXECUTE", 4)
            for k, v in dp.items():
                self.variables[k] = v
                self._execute("set", f"{k}={v}", "_none_")
            after, to = dp.get("forkbridge_untaken_after"), dp.get("forkbridge_untaken_to")
            if after and to:  # ${sched_api(...)} in dialplan/forkbridge.xml: the daemon replaces it when it takes us
                self.variables["forkbridge_untaken"] = self.sw.run_api(
                    f"sched_api +{after} forkbridge-{self.uuid} uuid_transfer {self.uuid} {to}", via="dialplan").strip()
            if self.ring_s > 0:
                self._sleep_until(time.monotonic() + self.ring_s)
                if not self.alive:
                    return
            self._answer()
            self._park()
        except gevent.GreenletExit:
            pass
        except Exception:
            log.exception("channel %s crashed", self.uuid)
            if self.alive:
                self.hangup("NORMAL_TEMPORARY_FAILURE", by="switch")

    def _run_outbound(self, callee: Callee, timeout: float) -> None:
        """`originate {vars}<dial string> &park()` as FreeSWITCH runs it (seen on 1.10.12 with loopback legs):
        CHANNEL_ORIGINATE, CHANNEL_PROGRESS while it rings, CHANNEL_ANSWER when the far end answers (no answer
        application on this leg), then the park; an unanswered leg hangs up with the far end's cause, or
        NO_ANSWER at originate_timeout, and the job answers -ERR <cause>."""
        self.fire("CHANNEL_ORIGINATE")
        if callee.cause:
            self._sleep_until(time.monotonic() + 0.02)
            self.hangup(callee.cause, by="switch")
            return
        if not callee.answer or callee.ring_s > 0:
            self.call_state = "EARLY"
            self.fire("CHANNEL_PROGRESS")
            self._sleep_until(time.monotonic() + (timeout if not callee.answer else min(callee.ring_s, timeout)))
            if not self.alive:
                return
            if not callee.answer or callee.ring_s >= timeout:
                self.hangup("NO_ANSWER", by="switch")
                return
        self._set_state("CS_EXECUTE", 4)
        self.answer_state = "answered"
        self.t_answered_us = int(time.time() * 1_000_000)
        self.t_answer = time.monotonic()
        self.fire("CHANNEL_ANSWER")
        self.call_state = "ACTIVE"
        self.answered.set()
        self.originated.set(f"+OK {self.uuid}\n")
        self._park()

    def _park(self) -> None:
        self._caller_audio = self.script.audio.render(self.rate) if self.script.audio else np.zeros(0, np.int16)
        self.parked = True
        self._execute("park", "")
        self.fire("CHANNEL_PARK")
        self._media_loop()

    def _answer(self) -> None:
        u = self._execute("answer", "")
        self.answer_state = "answered"
        self.t_answered_us = int(time.time() * 1_000_000)
        self.t_answer = time.monotonic()
        self.fire("CHANNEL_ANSWER")  # Channel-Call-State switches to ACTIVE only after the event
        self.call_state = "ACTIVE"
        self._execute_complete("answer", "", "_none_", u)
        self.answered.set()

    def _sleep_until(self, t: float) -> None:
        for _ in range(100_000):
            d = t - time.monotonic()
            if d <= 0 or not self.alive:
                return
            gevent.sleep(min(d, 0.05))

    def _media_loop(self) -> None:
        ptime = self.ptime_ms / 1000.0
        t0 = self.t_answer or time.monotonic()
        max_ticks = int(self.sw.max_call_s / ptime) + 1
        while self.alive and self._tick < max_ticks:
            target = t0 + self._tick * ptime
            delay = target - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if not self.alive:
                break
            self._on_tick(target, self._tick * ptime)
            self._tick += 1
        if self.alive:
            self.hangup("ALLOTTED_TIMEOUT", by="switch")

    def _on_tick(self, now: float, elapsed: float) -> None:
        n = self.frame_samples
        start = self._tick * n
        read = self._caller_audio[start : start + n]
        if len(read) < n:
            read = np.concatenate([read, np.zeros(n - len(read), np.int16)])
        while self._dtmf_pending and self._dtmf_pending[0][1] <= elapsed:
            digit, _t = self._dtmf_pending.pop(0)
            self._dtmf(digit.upper())
        s = self.script
        if s.hangup_after is not None and elapsed >= s.hangup_after:
            self.hangup(s.hangup_cause, by="caller")
            return
        t_x = self.t_transfer_mono
        if self.transferred_to and t_x is not None and time.monotonic() - t_x >= self.sw.transfer_timeout:
            self.hangup("NORMAL_CLEARING", by="switch")
            return
        write = self._playback_tick(now)
        write = self._stream_tick(now, write)
        for bug in list(self.bugs.values()):
            try:
                bug.on_frame(read, write)
            except Exception:
                log.exception("media bug %s failed", bug.bugname)
        for recording in self.recordings.values():
            recording.on_frame(read, write)

    t_transfer_mono: float | None = None

    # ------------------------------------------------------------------ DTMF
    def _dtmf(self, digit: str) -> None:
        dur = max(400, min(192000, self.script.dtmf_duration_ms * 8))
        src = self.script.dtmf_source
        self.fire("DTMF", [("DTMF-Digit", digit), ("DTMF-Duration", str(dur)), ("DTMF-Source", src)])
        terms = self.variables.get("playback_terminators", "*")
        if self.playing is not None and terms != "none" and (digit in terms or terms == "any"):
            self._stop_playback("break")

    def send_dtmf_to_caller(self, digits: str) -> None:
        now = time.monotonic()
        for d in digits:
            if d.upper() in "0123456789*#ABCD":
                self.ear.dtmf_received.append((d.upper(), now))

    # ------------------------------------------------------------------ playback
    def enqueue(self, app: str, arg: str, lead_frames: int, event_lock: bool = False,
                app_uuid: str | None = None) -> QueuedApp:  # fmt: skip
        item = QueuedApp(app, arg, lead_frames, event_lock=event_lock)
        if app_uuid:
            item.app_uuid = app_uuid
        self.queue.append(item)
        return item

    def break_playback(self, flush: bool, unwind: bool = True) -> None:
        """``uuid_break [all]`` (unwind) and killAudio (a bare CF_BREAK: the innermost file only).

        ``uuid_break`` finds CF_BROADCAST set (every execute dequeued from the private queue sets it) and calls
        ``switch_channel_stop_broadcast``: CF_BREAK stops the innermost file, then each enclosing execute sees
        CF_STOP_BROADCAST when its app returns and sets CF_BREAK again, so every nested playback stops. A chunk
        already dequeued and in its lead frames survives (its execute clears CF_STOP_BROADCAST and the break flag
        is cleared before it starts), and so do the playbacks it is nested in.
        """
        if flush:
            self.queue.clear()
        if self.leading is not None:
            return
        if unwind:
            self._stop_all("break")
        elif self.playing is not None:
            self._stop_playback("break")

    def _can_dequeue(self) -> bool:
        """``switch_core_session_dequeue_private_event``: held back while a running execute holds the event lock."""
        if not self.queue or self.leading is not None or not self.parked or not self.alive:
            return False
        return not any(p.item.event_lock for p in self.stack)

    def _playback_tick(self, now: float) -> np.ndarray | None:
        # The park loop, and every running playback's frame loop (switch_ivr_parse_all_events), dequeue the next
        # queued execute; a playback started here parses events before its first frame, so it may nest again.
        for _ in range(len(self.queue) + 2):
            if self.leading is None and self._can_dequeue():
                self.leading = self.queue.popleft()
                self.lead_left = self.leading.lead_frames
                if self._app_just_ended:  # the park loop reads a frame before it dequeues the next execute
                    self.lead_left = max(1, self.lead_left)
                self.ear.close("bc", "paused")  # the enclosing file (if any) writes nothing until this one ends
            if self.leading is None:
                break
            if self.lead_left > 0:
                self.lead_left -= 1
                return None
            item, self.leading = self.leading, None
            self._start_app(item)
            if not self.alive:
                return None
        self._app_just_ended = False
        p = self.playing
        if p is None:
            return None
        n = self.frame_samples
        if p.native is not None:
            return self._native_tick(p, now)
        if p.samples is None:
            frame = np.zeros(n, np.int16)
            if p.remaining >= 0:
                p.remaining -= n
                if p.remaining <= 0:
                    self._stop_playback("done")
            return frame
        frame = p.samples[p.pos : p.pos + n]
        p.pos += len(frame)
        if len(frame) < n:
            frame = np.concatenate([frame, np.zeros(n - len(frame), np.int16)])
        self.ear.hear("bc", f"broadcast:{p.path}", frame, self.rate, now, self.ptime_ms / 1000.0)
        if p.pos >= len(p.samples):
            self._stop_playback("done")
        return frame

    def _native_tick(self, p: Playing, now: float) -> np.ndarray | None:
        """One frame of a native file in the channel's codec; the end of what is written so far ends it."""
        width = 2 if self.codec == "L16" else 1
        data = p.native.read(self.frame_samples * width)
        if not data:
            self._stop_playback("done")
            return None
        p.native_read += len(data)
        if self.codec in ("PCMU", "PCMA"):
            frame = g711_decode(data, self.codec)
        else:  # L16, and anything else read as if it were (what a codec mismatch sounds like)
            frame = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2").astype(np.int16)
        if len(frame) < self.frame_samples:
            frame = np.concatenate([frame, np.zeros(self.frame_samples - len(frame), np.int16)])
        self.ear.hear("bc", f"broadcast:{p.path}", frame, self.rate, now, self.ptime_ms / 1000.0)
        return frame

    def _start_app(self, item: QueuedApp) -> None:
        app, arg = item.app, item.arg
        if app == "playback" and os.path.splitext(arg)[1][1:].upper() in NATIVE_EXTENSIONS:
            self._execute(app, arg, app_uuid=item.app_uuid)
            try:
                native = open(arg, "rb")  # noqa: SIM115 - closed when the playback stops
            except OSError:
                self._execute_complete(app, arg, "FILE NOT FOUND", item.app_uuid)
                self.played.append((arg, "not_found"))
                return
            self.stack.append(Playing(item, arg, None, native=native))
            self.fire("PLAYBACK_START", [("Playback-File-Path", arg)])
            return
        if app == "playback":
            self._execute(app, arg, app_uuid=item.app_uuid)
            if arg.startswith("silence_stream://"):
                ms = arg.split("://", 1)[1].split(",")[0]
                total = int(ms) if ms.lstrip("-").isdigit() else -1
                rem = -1 if total < 0 else max(1, total * self.rate // 1000)
                self.stack.append(Playing(item, arg, None, remaining=rem))
                self.fire("PLAYBACK_START", [("Playback-File-Type", "silence_stream"), ("Playback-File-Path", arg)])
                return
            try:
                samples, src_rate = read_audio_file(arg)
            except FileNotFoundError:
                self._execute_complete(app, arg, "FILE NOT FOUND", item.app_uuid)
                self.played.append((arg, "not_found"))
                return
            except UnplayableFile:
                self._execute_complete(app, arg, "PLAYBACK ERROR", item.app_uuid)
                self.played.append((arg, "error"))
                return
            self.stack.append(Playing(item, arg, resample(samples, src_rate, self.rate), src_rate=src_rate))
            self.fire("PLAYBACK_START", [("Playback-File-Path", arg)])
            if len(samples) == 0:
                self._stop_playback("done")
        elif app == "hangup":
            self._execute(app, arg, "_none_", item.app_uuid)
            self.hangup(arg or "NORMAL_CLEARING", by="switch")
        else:
            self._execute(app, arg, "_none_", item.app_uuid)

    def _stop_all(self, status: str, ear_status: str | None = None, response: str = "FILE PLAYED") -> None:
        """Stop every running playback, innermost first (each one's STOP and EXECUTE_COMPLETE in that order)."""
        for _ in range(len(self.stack)):
            self._stop_playback(status, ear_status, response)

    def _stop_playback(self, status: str, ear_status: str | None = None, response: str = "FILE PLAYED") -> None:
        """Stop the innermost playback; the one it was nested in (if any) resumes on the next frame."""
        if not self.stack:
            return
        p = self.stack.pop()
        if not self.stack:
            self._app_just_ended = True
        self.ear.close("bc", ear_status or status)
        # FreeSWITCH sets playback_samples before PLAYBACK_STOP: bytes for a native file, else file-rate samples
        if p.native is not None:
            p.native.close()
            samples = p.native_read
        else:
            samples = p.pos * p.src_rate // self.rate if p.src_rate else 0
        self.variables["playback_samples"] = str(samples)
        extra = [("Playback-File-Path", p.path), ("Playback-Status", status),
                 ("variable_playback_samples", str(samples))]
        if p.samples is None:
            extra.insert(0, ("Playback-File-Type", "silence_stream"))
        self.fire("PLAYBACK_STOP", extra)
        self.played.append((p.path, ear_status or status))
        self._execute_complete("playback", p.path, response, p.item.app_uuid)

    # ------------------------------------------------------------------ bidirectional stream playout (jambonz)
    def _stream_tick(self, now: float, write: np.ndarray | None) -> np.ndarray | None:
        """Streamed audio is mixed into frames the channel *writes*; a parked idle channel writes nothing."""
        idle_writer = self.variables.get("send_silence_when_idle", "0") not in ("0", "", "false")
        has_writer = write is not None or idle_writer
        for bug in self.bugs.values():
            pull = getattr(bug, "bidir_pull", None)
            if pull is None:
                continue
            if not has_writer:
                continue
            chunk = pull(self.frame_samples)
            key = f"stream:{bug.bugname}"
            if chunk is None:
                self.ear.close(key, "done")
                continue
            self.ear.hear(key, "stream", chunk, self.rate, now, self.ptime_ms / 1000.0)
            base = write if write is not None else np.zeros(self.frame_samples, np.int16)
            write = np.clip(base.astype(np.int32) + chunk, -32768, 32767).astype(np.int16)
        if write is None and idle_writer:
            write = np.zeros(self.frame_samples, np.int16)
        return write

    # ------------------------------------------------------------------ call control
    def transfer(self, dest: str, dialplan: str, context: str) -> None:
        """Leave park: our (the controller's) ownership ends. The transferred call stays up until the caller leaves."""
        self.transferred_to = dest
        self.transfer_dialplan = dialplan
        self.transfer_context = context
        self.t_transfer_us = int(time.time() * 1_000_000)
        self.t_transfer_mono = time.monotonic()
        self.queue.clear()
        self.leading = None
        self._stop_all("break")
        # the new caller profile is in place before the park ends: CHANNEL_UNPARK already shows it (observed)
        self.profile["transfer_source"] = f"{int(time.time())}:{self.uuid}:bl_xfer:{dest}/{context}/{dialplan}"
        self.variables["transfer_history"] = self.profile["transfer_source"]
        self.variables["transfer_source"] = self.profile["transfer_source"]
        self.profile["destination"] = dest
        self.profile["dialplan"] = dialplan
        self.profile["context"] = context
        self.profile["index"] += 1
        self.variables["destination_number"] = dest
        if self.parked:
            self.parked = False
            self.fire("CHANNEL_UNPARK")
            self._execute_complete("park", "", "_none_", str(uuidlib.uuid4()))
        self._set_state("CS_ROUTING", 3)
        self._set_state("CS_EXECUTE", 4)
        if dialplan == "inline":
            for part in dest.split(","):
                app, _, arg = part.partition(":")
                if app == "hangup":
                    self._execute(app, arg, "_none_")
                    self.hangup(arg or "NORMAL_CLEARING", by="switch")
                    return
                self._execute(app, arg, "_none_")
        else:
            # The target extension rings a human; the caller talks to them until someone hangs up.
            self._execute("bridge", f"user/{dest}@{context}")

    def hangup(self, cause: str = "NORMAL_CLEARING", by: str = "switch") -> None:
        if self.hangup_cause is not None or self._dead:
            return
        self.hangup_cause = cause
        self.hangup_by = by
        if not self.originated.ready():
            self.originated.set(f"-ERR {cause}\n")
        self.t_hangup_us = int(time.time() * 1_000_000)
        self.t_hangup = time.monotonic()
        # As observed: a playback the hangup cuts usually ends (PLAYBACK_STOP "done", then EXECUTE_COMPLETE
        # "PLAYBACK ERROR") before CHANNEL_HANGUP, while the channel still looks answered.
        self._stop_all("done", ear_status="hangup", response="PLAYBACK ERROR")
        self.answer_state = "hangup"
        self.call_state = "HANGUP"
        self._set_state("CS_HANGUP", 10)
        self.variables["hangup_cause"] = cause
        self.variables["sip_hangup_disposition"] = "recv_bye" if by == "caller" else "send_bye"
        self.fire("CHANNEL_HANGUP")  # Hangup-Cause comes with the channel data
        self.ear.close_all("hangup")
        self.queue.clear()
        self.leading = None
        if self.parked:
            self.parked = False
            self.fire("CHANNEL_UNPARK")
        for bug in list(self.bugs.values()):
            bug.remove(reason="hangup")
        self.bugs.clear()
        for path in list(self.recordings):
            self.recordings.pop(path).stop()
        for path in self.temp_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._set_state("CS_REPORTING", 11)
        self.fire("CHANNEL_HANGUP_COMPLETE", [("Hangup-Cause", cause)])
        self._set_state("CS_DESTROY", 12)
        self.fire("CHANNEL_DESTROY")
        self._dead = True
        self.sw._channel_gone(self)
        self.hungup.set()
        self.answered.set()  # unblock anyone still waiting for an answer that will never come

    def vanish(self) -> None:
        """FreeSWITCH died: the channel is gone without any event (used by crash/restart without channels)."""
        self._dead = True
        self.hangup_cause = self.hangup_cause or "CRASH"
        for bug in list(self.bugs.values()):
            bug.abort()
        self.bugs.clear()
        if self._glet is not None and self._glet is not gevent.getcurrent():
            self._glet.kill(block=False)
        self.hungup.set()
        self.answered.set()

    # ------------------------------------------------------------------ show channels
    def show_row(self) -> dict[str, str]:
        app = "park" if self.parked else ("bridge" if self.transferred_to else "")
        return {
            "uuid": self.uuid,
            "direction": self.direction,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.t_created_us / 1e6)),
            "created_epoch": str(self.t_created_us // 1_000_000),
            "name": self.name,
            "state": self.state,
            "cid_name": self.profile["cid_name"],
            "cid_num": self.profile["cid_num"],
            "ip_addr": "127.0.0.1",
            "dest": self.profile["destination"],
            "application": app,
            "application_data": "",
            "dialplan": self.profile["dialplan"],
            "context": self.profile["context"],
            "read_codec": self.codec,
            "read_rate": str(self.rate),
            "read_bit_rate": str(self.codec_bit_rate),
            "write_codec": self.codec,
            "write_rate": str(self.rate),
            "write_bit_rate": str(self.codec_bit_rate),
            "secure": "",
            "hostname": self.sw.hostname,
            "presence_id": "",
            "presence_data": "",
            "accountcode": "",
            "callstate": self.call_state,
            "callee_name": "",
            "callee_num": "",
            "callee_direction": "",
            "call_uuid": "",
            "sent_callee_name": "",
            "sent_callee_num": "",
            "initial_cid_name": self.profile["cid_name"],
            "initial_cid_num": self.profile["cid_num"],
            "initial_ip_addr": "127.0.0.1",
            "initial_dest": self.did,
            "initial_dialplan": "XML",
            "initial_context": "public",
        }
