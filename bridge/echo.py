"""The `echo` engine: says back what the caller said, after they stop. The embedded default and a line-check tool.

It runs entirely in-process, at 24 kHz PCM16 both ways so a call's audio goes through the same resampling as with a
real engine (8/16 kHz call <-> 24 kHz), and it behaves like a turn-taking voice agent: an energy VAD on the caller's
audio emits SpeechStarted / SpeechStopped, then the caller's own samples come back as a response (AudioOut chunks
plus ResponseDone), so a 440 Hz tone returns as 440 Hz and a listener hears exactly what the line delivered.
There is no TTS here: a greeting is answered with a short two-note chime and a text turn (DTMF) with the DTMF tones
of its digits.

Threading model: engine methods (send_audio, interrupt, ...) never call the event sink. They update state and queue
events; one dispatcher greenlet per session delivers them in order, interleaving reply chunks with control events so
a SpeechStarted heard during a reply reaches the bridge between two chunks (that is where barge-in happens). The
bridge's sink may therefore call back into the engine (interrupt, close, send_text) without re-entering itself, and
after `interrupt()` returns no further AudioOut of that response is delivered.

Config keys (all optional; numbers may be written with units, e.g. "600ms", "15s", "-40dB"):
  vad_threshold_db (-40)  speech when a 20 ms window's RMS is at or above this (dBFS)
  silence_ms (600)        caller silence that ends an utterance
  max_utterance_s (15)    an utterance this long is cut and echoed (bounds memory per call)
  refuse (false)          connect() raises EngineRefused (for fallback tests and drills)
  drop_after_s (none)     after this long, the session drops: Closed(reason="dropped", clean=False)
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import numpy as np

from bridge.audio import Rechunker, ms_to_bytes, rms_dbfs
from bridge.engine import (
    PCM16,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    Engine,
    EngineEvent,
    EngineFormats,
    EngineRefused,
    EventSink,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
)

__all__ = ["DTMF_FREQS", "ECHO_FORMAT", "EchoEngine", "chime", "dtmf_digits", "dtmf_tones"]

log = logging.getLogger("forkbridge.engine.echo")

ECHO_RATE = 24000
ECHO_FORMAT = AudioFormat(PCM16, ECHO_RATE)

# ITU-T Q.23 DTMF pairs (low group, high group).
DTMF_FREQS: dict[str, tuple[float, float]] = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}  # fmt: skip


# ---- tone synthesis ---------------------------------------------------------------------------------------------


def _synth(freqs: tuple[float, ...], ms: float, level_dbfs: float, decay_ms: float | None = None) -> np.ndarray:
    """Float samples of summed sines with 5 ms raised-cosine edges (hard edges click on a phone line)."""
    n = int(ECHO_RATE * ms / 1000)
    t = np.arange(n) / ECHO_RATE
    peak = 10 ** (level_dbfs / 20) / len(freqs)
    x = sum(np.sin(2 * np.pi * f * t) for f in freqs) * peak
    edge = min(int(ECHO_RATE * 0.005), n // 2)
    if edge:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, edge))
        x[:edge] *= ramp
        x[-edge:] *= ramp[::-1]
    if decay_ms:
        x *= np.exp(-t / (decay_ms / 1000))
    return np.asarray(x, dtype=np.float64)


def _pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2").tobytes()


_ALL_DTMF = re.compile(r"^[0-9*#A-Da-d\s]+$")


def dtmf_digits(text: str) -> str:
    """The DTMF symbols in `text`: every 0-9 * #, and A-D only when the text is nothing but DTMF ("caller", "DTMF"
    and the like are words, not digits)."""
    if _ALL_DTMF.match(text):
        return "".join(c for c in text.upper() if c in DTMF_FREQS)
    return "".join(c for c in text if c in "0123456789*#")


def dtmf_tones(text: str, tone_ms: float = 150, gap_ms: float = 60, max_digits: int = 32) -> bytes:
    """PCM16 24 kHz: the DTMF pair of each digit in `text` (at most `max_digits`); a 523 Hz beep if it has none."""
    digits = dtmf_digits(text)[:max_digits]
    gap = np.zeros(int(ECHO_RATE * gap_ms / 1000))
    if not digits:
        return _pcm(_synth((523.25,), tone_ms, -12))
    parts: list[np.ndarray] = []
    for d in digits:
        parts += [_synth(DTMF_FREQS[d], tone_ms, -9), gap]
    return _pcm(np.concatenate(parts))


def chime(note_ms: float = 200) -> bytes:
    """PCM16 24 kHz: a soft two-note "ding-dong" (A5 then E5, decaying), 0.4 s by default."""
    return _pcm(np.concatenate([_synth((880.0,), note_ms, -12, decay_ms=150),
                                _synth((659.25,), note_ms, -12, decay_ms=150)]))


# ---- config parsing -------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*([a-zA-Z]*)\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _number(config: Mapping[str, Any], key: str, default: float, unit: str) -> float:
    value = _optional_number(config, key, unit)
    return default if value is None else value


def _optional_number(config: Mapping[str, Any], key: str, unit: str) -> float | None:
    """A number as written in YAML: 600, "600", "600ms", "0.6s", "-40dB" (the config loader does not type them)."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"echo: {key} must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _NUMBER.match(str(value))
    if not match:
        raise ValueError(f"echo: {key} must be a number (in {unit}), got {value!r}")
    number, suffix = float(match.group(1)), match.group(2).lower()
    if unit == "dB":
        if suffix not in ("", "db", "dbfs"):
            raise ValueError(f"echo: {key} must be in dBFS, got {value!r}")
        return number
    if suffix and suffix not in _SCALE:
        raise ValueError(f"echo: {key} has unknown unit {suffix!r} in {value!r} (use ms, s or m)")
    return number * _SCALE[suffix or unit] / _SCALE[unit]


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# ---- the engine -------------------------------------------------------------------------------------------------


@dataclass
class _Reply:
    response_id: str
    audio: bytes
    pos: int = 0
    finished: bool = False  # ResponseDone queued or delivered (completed or cancelled)


class EchoEngine(Engine):
    """Local turn-taking echo: VAD, then the caller's own utterance as the reply; tones for text and greetings."""

    type_name = "echo"

    WINDOW_MS = 20  # VAD analysis window
    START_MS = 40  # this much consecutive loud audio starts an utterance (a one-frame click does not)
    PREROLL_MS = 200  # audio kept from before the start, so the first syllable is not clipped
    TAIL_MS = 200  # trailing silence kept in the echo (the last word's decay sits below the threshold)
    CHUNK_MS = 100  # AudioOut chunk size

    def __init__(self, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> None:
        super().__init__(config, call, sink)
        self.interruptions: list[tuple[str, int | None]] = []
        self.texts_received: list[str] = []
        self.tool_results: list[tuple[str, Mapping[str, Any], bool]] = []
        self.responses: list[str] = []  # ids of every response started, in order
        self._config_error = ""
        self.drop_after_s: float | None = None
        try:
            self.vad_threshold_db = _number(config, "vad_threshold_db", -40.0, "dB")
            self.silence_ms = _number(config, "silence_ms", 600.0, "ms")
            self.max_utterance_s = _number(config, "max_utterance_s", 15.0, "s")
            self.drop_after_s = _optional_number(config, "drop_after_s", "s")
            self._check_ranges()
        except ValueError as exc:
            self._config_error = str(exc)
            self.vad_threshold_db, self.silence_ms, self.max_utterance_s, self.drop_after_s = -40.0, 600.0, 15.0, None
        self.refuse = _flag(config, "refuse")

        self._window_bytes = ms_to_bytes(self.WINDOW_MS, ECHO_FORMAT)
        self._start_windows = max(1, round(self.START_MS / self.WINDOW_MS))
        self._silence_windows = max(1, round(self.silence_ms / self.WINDOW_MS))
        self._tail_windows = min(round(self.TAIL_MS / self.WINDOW_MS), self._silence_windows)
        self._max_windows = max(1, int(self.max_utterance_s * 1000 / self.WINDOW_MS))
        self._chunk_bytes = ms_to_bytes(self.CHUNK_MS, ECHO_FORMAT)

        self._windows = Rechunker(ECHO_FORMAT, self.WINDOW_MS)
        self._preroll: collections.deque[bytes] = collections.deque(
            maxlen=self._start_windows + round(self.PREROLL_MS / self.WINDOW_MS)
        )
        self._speaking = False
        self._loud_run = 0
        self._quiet_run = 0
        self._utterance: list[bytes] = []

        self._out: collections.deque[EngineEvent] = collections.deque()
        self._wake = gevent.event.Event()
        self._reply: _Reply | None = None
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._dispatcher: gevent.Greenlet | None = None
        self._drop_timer: gevent.Greenlet | None = None
        self._connected = False
        self._closed = False  # Closed is queued (or delivered): no further input is acted on, no new events

    def _check_ranges(self) -> None:
        if not -120.0 <= self.vad_threshold_db <= 0.0:
            raise ValueError(f"echo: vad_threshold_db must be between -120 and 0 dBFS, got {self.vad_threshold_db}")
        if self.silence_ms < self.WINDOW_MS:
            raise ValueError(f"echo: silence_ms must be at least {self.WINDOW_MS}, got {self.silence_ms}")
        if self.max_utterance_s <= 0:
            raise ValueError(f"echo: max_utterance_s must be positive, got {self.max_utterance_s}")
        if self.drop_after_s is not None and self.drop_after_s <= 0:
            raise ValueError(f"echo: drop_after_s must be positive, got {self.drop_after_s}")

    # ---- Engine interface ----------------------------------------------------------------------------------------

    def connect(self) -> None:
        if self._config_error:
            raise EngineRefused(self._config_error)
        if self.refuse:
            raise EngineRefused("echo engine configured to refuse (refuse: true)")
        if self._closed:
            raise EngineRefused("echo session already closed")
        if self._connected:
            return
        self.formats = EngineFormats(input=ECHO_FORMAT, output=ECHO_FORMAT)
        self._connected = True
        self._ensure_dispatcher()
        if self.drop_after_s is not None:
            self._drop_timer = gevent.spawn_later(self.drop_after_s, self._drop)

    def send_audio(self, audio: bytes) -> None:
        if not self._connected or self._closed:
            return
        for window in self._windows.push(audio):
            self._vad(window)

    def send_text(self, text: str) -> None:
        self.texts_received.append(text)
        if self._connected and not self._closed:
            self._start_reply(dtmf_tones(text))

    def greet(self) -> None:
        """No TTS here: a greeting is a short chime, so the caller hears the line is live."""
        if self.call.greeting and self._connected and not self._closed:
            self._start_reply(chime())

    def interrupt(self, response_id: str, played_ms: int | None) -> None:
        self.interruptions.append((response_id, played_ms))
        reply = self._reply
        if reply is not None and (not response_id or reply.response_id == response_id):
            self._cancel(reply)

    def tool_result(self, call_id: str, result: Mapping[str, Any], is_error: bool = False) -> None:
        self.tool_results.append((call_id, result, is_error))

    def close(self) -> None:
        self._shutdown(Closed(reason="normal"))

    # ---- VAD -----------------------------------------------------------------------------------------------------

    def _vad(self, window: bytes) -> None:
        loud = rms_dbfs(window) >= self.vad_threshold_db
        if not self._speaking:
            self._preroll.append(window)
            self._loud_run = self._loud_run + 1 if loud else 0
            if self._loud_run >= self._start_windows:
                self._speaking = True
                self._quiet_run = 0
                self._utterance = list(self._preroll)
                self._preroll.clear()
                self._queue(SpeechStarted())
            return
        self._utterance.append(window)
        self._quiet_run = 0 if loud else self._quiet_run + 1
        if self._quiet_run >= self._silence_windows:
            self._end_utterance(trim=self._quiet_run - self._tail_windows)
        elif len(self._utterance) >= self._max_windows:
            self._end_utterance(trim=0)

    def _end_utterance(self, trim: int) -> None:
        kept = self._utterance[: len(self._utterance) - trim] if trim > 0 else self._utterance
        audio = b"".join(kept)
        self._utterance = []
        self._speaking = False
        self._loud_run = self._quiet_run = 0
        self._queue(SpeechStopped())
        self._start_reply(audio)

    # ---- responses and delivery --------------------------------------------------------------------------------------

    def _start_reply(self, audio: bytes) -> None:
        """One response at a time, as real engines do: a new one supersedes (cancels) the one in progress."""
        if self._reply is not None:
            self._cancel(self._reply)
        response_id = f"echo-{self._id_prefix}-{next(self._ids)}"
        self.responses.append(response_id)
        self._reply = _Reply(response_id, audio)
        self._wake.set()

    def _cancel(self, reply: _Reply) -> None:
        if reply.finished:
            return
        reply.finished = True
        if self._reply is reply:
            self._reply = None
        self._queue(ResponseDone(reply.response_id, status="cancelled"))

    def _queue(self, event: EngineEvent) -> None:
        if self._closed:
            return
        self._out.append(event)
        self._wake.set()

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = gevent.spawn(self._dispatch)

    def _deliver(self, event: EngineEvent) -> None:
        try:
            self.emit(event)
        except Exception:  # a failing sink must not kill delivery for the rest of the call
            log.exception("echo engine: event sink failed on %s (call %s)", type(event).__name__, self.call.uuid)

    def _dispatch(self) -> None:
        """The only place events reach the sink: queued control events first, then the next reply chunk."""
        while True:
            if self._out:
                event = self._out.popleft()
                self._deliver(event)
                if isinstance(event, Closed):
                    return
                continue
            reply = self._reply
            if reply is not None and not reply.finished:
                if reply.pos < len(reply.audio):
                    chunk = reply.audio[reply.pos : reply.pos + self._chunk_bytes]
                    reply.pos += len(chunk)
                    self._deliver(AudioOut(chunk, reply.response_id))
                    gevent.sleep(0)  # faster than real time, but let the caller's audio and barge-in in between
                else:
                    reply.finished = True
                    self._reply = None
                    self._deliver(ResponseDone(reply.response_id, status="completed"))
                continue
            self._wake.clear()
            self._wake.wait()

    def _drop(self) -> None:
        self._drop_timer = None  # this greenlet is ending; close() must not kill it
        self._shutdown(Closed(reason="dropped", clean=False))

    def _shutdown(self, closed: Closed) -> None:
        """Queue `closed` as the last event (once); an unfinished reply is cancelled first."""
        if self._closed:
            return
        if self._reply is not None:
            self._cancel(self._reply)
        self._closed = True
        self._out.append(closed)
        self._wake.set()
        self._utterance = []
        self._preroll.clear()
        self._windows.reset()
        if self._drop_timer is not None:
            self._drop_timer.kill(block=False)
            self._drop_timer = None
        self._ensure_dispatcher()
