"""Getting the engine's speech to the caller, and knowing how much of it they actually heard.

Two modes behind one small shape (`feed`, `response_done`, `stop`, `close`):
- `BroadcastPlayer`: files in the spool dir queued on the parked channel through call control: one growing file
  per reply in the channel's own codec (mod_native_file) where it can, else L16 chunks (.r8/.r16, mod_sndfile).
  PLAYBACK_START/STOP say what is playing.
- `StreamPlayer`: binary L16 frames back over the fork's WebSocket (jambonz bidirectional build), paced at
  real time with a small lead, cleared with `killAudio`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from bridge.callcontrol import CallControl
from bridge.engine import PCM16, PCMA, PCMU, AudioFormat

log = logging.getLogger("forkbridge.playback")

FIRST_CHUNK_MS = 160
MAX_CHUNK_MS = 1000
FLUSH_AFTER_S = 0.08  # pending audio shorter than a chunk is queued anyway after this long
# Growing (native) files: a file starts playing at once when it holds NATIVE_START_MS and NATIVE_MARGIN_MS more
# than the largest single delivery so far (the engine is running ahead of real time), else NATIVE_START_AFTER_S
# after the reply's first audio once it holds NATIVE_START_MS. Started then, an engine that streams at exactly
# real time stays about that far ahead of FreeSWITCH's reading (which runs a frame ahead of the caller's ear)
# whatever the size of its pieces: each piece lands before the one before it has been read. An engine whose
# pieces come later than that makes FreeSWITCH reach the end of the file (a one-frame hole, docs/playback.md):
# from then on that call's replies start NATIVE_LEAD_STEP_S later each time, up to NATIVE_START_WAIT_S.
NATIVE_START_MS = 40
FRAME_S = 0.02  # what FreeSWITCH leaves between two queued files (one frame at 20 ms ptime)
NATIVE_MARGIN_MS = 20
NATIVE_START_AFTER_S = 0.03
NATIVE_START_WAIT_S = 0.15  # a reply slower than real time starts anyway after this long
NATIVE_LEAD_STEP_S = 0.04  # after FreeSWITCH caught up with a call's engine, its later replies wait this much more
# Codecs mod_native_file plays as they are (the file's extension names the codec; it must be the channel's)
NATIVE_CODECS = {"PCMU": PCMU, "PCMA": PCMA, "L16": PCM16}


def native_format(codec: str, rate: int) -> AudioFormat | None:
    """The format of a growing file for a channel whose read codec is `codec` at `rate`, or None when
    mod_native_file cannot play that codec for us (then chunks are played through mod_sndfile)."""
    encoding = NATIVE_CODECS.get(codec.upper())
    if encoding is None or rate <= 0 or (encoding != PCM16 and rate != 8000):
        return None
    return AudioFormat(encoding, rate)


@dataclass
class Heard:
    """What the caller heard of one response when playback was stopped."""

    response_id: str
    played_ms: int
    received_ms: int
    dropped: tuple[str, ...] = ()  # every response whose audio must never be played now (this one included)


@dataclass
class _Chunk:
    path: str
    response_id: str
    duration_ms: float
    started_at: float = 0.0
    finished: bool = False
    written: int = -1  # a growing file: bytes written to it so far (its unread tail is re-queued on underrun)
    fd: int = -1  # a growing file still open for appending


class Player:
    """Common bookkeeping: audio per response received, and callbacks for metrics/timeline."""

    def __init__(self, rate: int, on_first_heard: Callable[[str], None] | None = None,
                 on_underrun: Callable[[], None] | None = None,
                 on_chunk: Callable[[float, bool], None] | None = None,
                 fmt: AudioFormat | None = None) -> None:
        self.rate = rate
        self.format = fmt or AudioFormat(PCM16, rate)
        self.on_chunk = on_chunk or (lambda _ms, _queued: None)
        self.bytes_per_ms = self.format.bytes_per_ms
        self.on_first_heard = on_first_heard or (lambda _rid: None)
        self.on_underrun = on_underrun or (lambda: None)
        self.received_ms: dict[str, float] = {}
        self.current: str = ""  # the response being played (or last played)

    def _ms(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_ms

    def feed(self, pcm: bytes, response_id: str) -> None:
        raise NotImplementedError

    def response_done(self, response_id: str) -> None:
        raise NotImplementedError

    def stop(self) -> Heard | None:
        raise NotImplementedError

    @property
    def playing(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class BroadcastPlayer(Player):
    """Files in the spool dir, queued on the parked channel one after another (sendmsg playback, event-lock).

    FreeSWITCH leaves one frame of silence between two queued files (docs/playback.md), so a reply should be as
    few files as possible. With `native` (the channel's codec is PCMU, PCMA or L16), a reply is one *growing*
    file in that codec: mod_native_file reads it as it plays and we append as audio arrives, so nothing is
    heard between pieces; if the engine falls behind and FreeSWITCH reaches the end of what was written, that
    playback ends and the rest of the reply goes on in a new file (FreeSWITCH reports how many bytes it read).
    Otherwise (other codecs) a reply is L16 chunks played through mod_sndfile: a short first chunk, then
    doubling ones.
    """

    def __init__(self, control: CallControl, spool_dir: str, uuid: str, rate: int,
                 native: AudioFormat | None = None, **callbacks) -> None:
        super().__init__(rate, fmt=native, **callbacks)
        self.control = control
        self.spool_dir = spool_dir
        self.uuid = uuid
        self.native = native is not None
        if native is not None:
            self.ext = "." + next(name for name, enc in NATIVE_CODECS.items() if enc == native.encoding)
        else:
            self.ext = ".r8" if rate == 8000 else ".r16"
        self._seq = 0
        self._pending = bytearray()
        self._pending_response = ""
        self._next_chunk_ms = FIRST_CHUNK_MS
        self._chunks: dict[str, _Chunk] = {}  # path → chunk, in queue order
        self._order: list[str] = []
        self._heard_ms: dict[str, float] = {}
        self._flush_timer: gevent.Greenlet | None = None
        self._done: set[str] = set()
        self._cancelled: set[str] = set()
        self._growing: _Chunk | None = None  # the file the current reply is appended to
        self._align = 2 if self.format.encoding == PCM16 else 1
        self._largest_ms = 0.0  # the largest single delivery since the last file was queued
        self._start_after = NATIVE_START_AFTER_S  # grows each time this call's engine fell behind (a jitter buffer)

    # ---- feeding ----
    def feed(self, pcm: bytes, response_id: str) -> None:
        if response_id != self._pending_response:
            self._flush()
            self._seal()
            self._pending_response = response_id
            self._next_chunk_ms = FIRST_CHUNK_MS
        self.received_ms[response_id] = self.received_ms.get(response_id, 0.0) + self._ms(len(pcm))
        growing = self._growing
        if growing is not None and growing.response_id == response_id:
            self._append(growing, pcm)
            return
        self._pending += pcm
        self._largest_ms = max(self._largest_ms, self._ms(len(pcm)))
        if self._ms(len(self._pending)) >= self._start_ms():
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = gevent.spawn_later(self._start_after if self.native else FLUSH_AFTER_S,
                                                   self._timed_flush)

    def _start_ms(self) -> float:
        """How much audio a new file needs before it is queued."""
        if self.native:
            return max(NATIVE_START_MS, self._largest_ms + NATIVE_MARGIN_MS)
        return self._next_chunk_ms

    def response_done(self, response_id: str) -> None:
        self._done.add(response_id)
        if response_id == self._pending_response:
            self._flush()
            self._seal()

    def _timed_flush(self, waited: float = 0.0) -> None:
        self._flush_timer = None
        waited += self._start_after if self.native else FLUSH_AFTER_S
        if self.native and self._ms(len(self._pending)) < NATIVE_START_MS and waited < NATIVE_START_WAIT_S:
            self._flush_timer = gevent.spawn_later(self._start_after, self._timed_flush, waited)
            return
        self._flush()

    def _flush(self) -> None:
        """Queue what is pending as a new file (for a growing file: the start of one)."""
        if self._flush_timer is not None:
            self._flush_timer.kill(block=False)
            self._flush_timer = None
        usable = len(self._pending) - len(self._pending) % self._align
        if usable <= 0:
            return
        data = bytes(self._pending[:usable])
        del self._pending[:usable]
        self._largest_ms = 0.0
        self._seq += 1
        path = os.path.join(self.spool_dir, f"{self.uuid}-{self._seq:05d}{self.ext}")
        chunk = _Chunk(path, self._pending_response, 0.0)
        if self.native and self._pending_response not in self._done and self._growing is None:
            chunk.written = 0
            chunk.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            self._growing = chunk
            self._append(chunk, data, queued=True)
        else:
            with open(path, "wb") as fh:
                fh.write(data)
            chunk.duration_ms = self._ms(len(data))
            self.on_chunk(chunk.duration_ms, True)
        self._chunks[path] = chunk
        self._order.append(path)
        self._next_chunk_ms = min(MAX_CHUNK_MS, self._next_chunk_ms * 2)
        self.control.play(path)

    def _append(self, chunk: _Chunk, data: bytes, queued: bool = False) -> None:
        """More of the reply at the end of its growing file (FreeSWITCH reads it as it plays)."""
        assert chunk.written >= 0
        os.write(chunk.fd, data)
        chunk.written += len(data)
        ms = self._ms(len(data))
        chunk.duration_ms += ms
        self.on_chunk(ms, queued)

    def _seal(self, chunk: _Chunk | None = None) -> None:
        """The growing file takes no more audio (its reply is complete, stopped, or it ran dry)."""
        chunk = chunk or self._growing
        if chunk is None:
            return
        if chunk.fd >= 0:
            os.close(chunk.fd)
            chunk.fd = -1
        if chunk is self._growing:
            self._growing = None

    # ---- what FreeSWITCH reports ----
    def cancelled(self, path: str) -> bool:
        return path in self._cancelled

    def owns(self, path: str) -> bool:
        return path in self._chunks or path in self._cancelled

    def playback_started(self, path: str) -> None:
        if path in self._cancelled:
            self.control.break_current()  # it left FreeSWITCH's queue just before our break: stop it alone
            return
        chunk = self._chunks.get(path)
        if chunk is None:
            return
        chunk.started_at = time.monotonic()
        if self._heard_ms.get(chunk.response_id) is None:
            self._heard_ms[chunk.response_id] = 0.0
            self.on_first_heard(chunk.response_id)
        self.current = chunk.response_id

    def playback_stopped(self, path: str, status: str, read_bytes: int = -1) -> None:
        """PLAYBACK_STOP; `read_bytes` is FreeSWITCH's playback_samples (bytes, for a native file)."""
        self._cancelled.discard(path)
        chunk = self._chunks.pop(path, None)
        if chunk is None:
            return
        if path in self._order:
            self._order.remove(path)
        tail = b""
        if chunk.written >= 0:
            self._seal(chunk)
            if status == "done" and 0 <= read_bytes < chunk.written:
                # FreeSWITCH caught up with us and ended this playback: what it did not read goes on next (read
                # back from the file: a reply is not also kept in memory while it plays)
                tail = _read_from(path, read_bytes - read_bytes % self._align)
                chunk.duration_ms -= self._ms(len(tail))
        if chunk.started_at and not chunk.finished:
            played = chunk.duration_ms if status == "done" else self._elapsed_ms(chunk)
            self._heard_ms[chunk.response_id] = self._heard_ms.get(chunk.response_id, 0.0) + played
            chunk.finished = True
        _remove(path)
        still_coming = chunk.response_id not in self._done
        if tail or (status == "done" and not self._order and still_coming
                    and chunk.response_id == self._pending_response):
            self.on_underrun()
        if tail:
            self._start_after = min(NATIVE_START_WAIT_S, self._start_after + NATIVE_LEAD_STEP_S)
            self._requeue(tail, chunk.response_id)

    def _requeue(self, tail: bytes, response_id: str) -> None:
        """The unread end of a reply's file: played next, and the reply grows on in it if still coming."""
        if any(self._chunks[p].response_id != response_id for p in self._order):
            return  # a later reply is queued already: this one has been overtaken, its end is not played
        if self._pending and self._pending_response != response_id:
            later, later_response = bytes(self._pending), self._pending_response
            self._pending[:] = tail
            self._pending_response = response_id
            self._flush()
            self._pending[:] = later
            self._pending_response = later_response
            return
        self._pending[:0] = tail
        self._pending_response = response_id
        if response_id in self._done or self._ms(len(self._pending)) >= self._start_ms():
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = gevent.spawn_later(self._start_after, self._timed_flush)

    def reconcile(self) -> None:
        """After an ESL outage, whose PLAYBACK events are lost. FreeSWITCH cannot say which queued file it is
        playing (current_application_data keeps naming the last file started, ended or not), but it plays our
        files in the order queued, back to back, each at real time: a complete file whose end (from its start, or
        from the end of the one before it) has passed is over. A file still growing may still be being read."""
        now = time.monotonic()
        next_start = 0.0
        for path in list(self._order):
            chunk = self._chunks[path]
            start = chunk.started_at or next_start
            if chunk.fd >= 0 or not start or start + chunk.duration_ms / 1000.0 > now:
                return
            if not chunk.started_at:  # played whole while we were away
                chunk.started_at = start
                self._heard_ms.setdefault(chunk.response_id, 0.0)
                self.current = chunk.response_id
            next_start = start + chunk.duration_ms / 1000.0 + FRAME_S
            self.playback_stopped(path, "done")

    def _elapsed_ms(self, chunk: _Chunk) -> float:
        return min(chunk.duration_ms, (time.monotonic() - chunk.started_at) * 1000.0)

    @property
    def playing(self) -> bool:
        return bool(self._order) or bool(self._pending)

    def stop(self) -> Heard | None:
        """Barge-in: stop FreeSWITCH at once, drop everything queued, say how much of the response was heard."""
        if not self.playing:
            return None
        self.control.break_all()
        self._seal()
        # The reply being heard is the one whose chunk is playing; later replies may already be queued
        # behind it (or be pending here): all of them are dropped, none of them was heard.
        playing = next((self._chunks[p] for p in self._order if self._chunks[p].started_at), None)
        queued = [self._chunks[p].response_id for p in self._order]
        dropped = tuple(dict.fromkeys([*queued, *([self._pending_response] if self._pending else [])]))
        # Between two chunks nothing plays: the interrupted reply is the last one heard if more of it is
        # queued, else the next one (of which nothing was heard).
        if playing is not None:
            response = playing.response_id
        elif self.current in dropped or not dropped:
            response = self.current
        else:
            response = dropped[0]
        heard = self._heard_ms.get(response, 0.0)
        if playing is not None and not playing.finished:
            heard += self._elapsed_ms(playing)
            playing.finished = True
        self._pending.clear()
        if self._flush_timer is not None:
            self._flush_timer.kill(block=False)
            self._flush_timer = None
        # Queued chunks never start after `uuid_break all`; their files go now or at PLAYBACK_STOP.
        for path in list(self._order):
            if not self._chunks[path].started_at:
                self._chunks.pop(path)
                self._order.remove(path)
                self._cancelled.add(path)
                _remove(path)
        received = self.received_ms.get(response, 0.0)
        return Heard(response, int(min(heard, received)), int(received), dropped or (response,))

    def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.kill(block=False)
        for chunk in self._chunks.values():
            self._seal(chunk)
        for path in list(self._chunks):
            _remove(path)
        self._chunks.clear()
        self._order.clear()
        self._pending.clear()


class StreamPlayer(Player):
    """Paced binary frames back on the fork socket; `send_binary`/`send_text` write to that socket.

    jambonz's mod_audio_fork holds what it receives in a pre-buffer until it has 1280 * factor samples (stream
    rate; factor = stream rate / codec rate, at least 1: 160 ms on an 8 kHz channel) for the first batch, then
    640 * factor for every later one, and only then moves it to the playout buffer;
    killAudio empties the playout buffer but never the pre-buffer (docs/playback.md). So every message we send
    is at least the threshold: nothing ever waits in the pre-buffer, a reply's end is padded with silence to it
    (else its last ~60 ms would be heard at the start of the next reply), and a barge-in leaves nothing behind.
    """

    LEAD_MS = 60

    def __init__(self, send_binary: Callable[[bytes], None], send_text: Callable[[str], None], rate: int,
                 codec_rate: int = 0, **callbacks) -> None:
        super().__init__(rate, **callbacks)
        self.send_binary = send_binary
        self.send_text = send_text
        # thresholds in samples at our (the stream's) rate; an unknown codec rate is taken as 8 kHz, whose
        # thresholds are the larger ones (a message above the threshold is always moved on whole)
        factor = max(1, rate // (codec_rate or 8000))
        # the module resamples each batch with a stateful resampler, which keeps the last few ms of a batch
        # until the next one: a batch of silence pushes them out (at a reply's end, and before a killAudio)
        self._resampled = rate != (codec_rate or 8000)
        self._later_batch_bytes = 640 * factor * 2
        self._batch_bytes = 1280 * factor * 2  # the module's threshold for the next message
        # a reply's first message waits one later batch after its first audio (see _drain_buffer): 80 ms on an
        # 8 kHz channel, 40 ms on a 16 kHz one
        self._later_batch_ms = self._ms(self._later_batch_bytes)
        self._queue: list[tuple[str, bytes]] = []
        self._buffer = bytearray()
        self._buffer_response = ""
        self._pacer: gevent.Greenlet | None = None
        self._sent_ms: dict[str, float] = {}
        self._heard_from: dict[str, float] = {}  # when the caller starts hearing each response
        self._clock_start = 0.0  # the pacing clock: when it started and how much it has sent since
        self._clock_sent_ms = 0.0
        self._first_audio: dict[str, float] = {}  # when each reply's first audio came from the engine
        self._start_timer: gevent.Greenlet | None = None
        self._largest_ms = 0.0  # the largest single delivery of the reply being buffered

    def feed(self, pcm: bytes, response_id: str) -> None:
        if response_id != self._buffer_response:
            self._drain_buffer(final=True)
            self._buffer_response = response_id
            self._largest_ms = 0.0
        self.received_ms[response_id] = self.received_ms.get(response_id, 0.0) + self._ms(len(pcm))
        self._largest_ms = max(self._largest_ms, self._ms(len(pcm)))
        self._first_audio.setdefault(response_id, time.monotonic())
        self._buffer += pcm
        self._drain_buffer(final=False)
        self._kick()

    def _kick(self) -> None:
        if self._queue and (self._pacer is None or self._pacer.dead):
            self._pacer = gevent.spawn(self._pace)

    def response_done(self, response_id: str) -> None:
        if response_id == self._buffer_response:
            self._drain_buffer(final=True)
            if self._queue and (self._pacer is None or self._pacer.dead):
                self._pacer = gevent.spawn(self._pace)

    def _drain_buffer(self, final: bool) -> None:
        """What is buffered goes to the queue in messages of at least the module's threshold; at a reply's end the
        rest too, padded with silence to the threshold.

        The module plays what it has and then nothing until the next message. Whole messages hold back up to one
        batch less a piece of what the engine has sent (100 ms pieces in 80 ms batches: 20, 40, 60, 0 ms), so an
        engine at exactly real time leaves a hole wherever what is held back exceeds the lead FreeSWITCH was
        given (measured with a 40 ms lead: a 20 ms hole in 16-20 of 30 replies). A reply's first message therefore
        waits one later batch after its first audio, unless the engine is already ahead of real
        time by a batch and a piece (its advance just before its next piece still covers what is held back).
        Messages stay exactly one threshold long: larger ones (the whole buffer at once) were heard with holes
        and left audio behind a killAudio on the real switch."""
        response = self._buffer_response
        if not final and response not in self._sent_ms:
            elapsed = time.monotonic() - self._first_audio.get(response, time.monotonic())
            ahead_ms = self.received_ms.get(response, 0.0) - elapsed * 1000.0
            running_ahead = ahead_ms >= self._later_batch_ms + self._largest_ms
            wait = 0.0 if running_ahead else self._later_batch_ms / 1000.0 - elapsed
            if wait > 0 or len(self._buffer) < self._batch_bytes:
                if wait > 0 and (self._start_timer is None or self._start_timer.dead
                                 or self._start_timer.args != (response,)):
                    if self._start_timer is not None:
                        self._start_timer.kill(block=False)
                    self._start_timer = gevent.spawn_later(wait, self._timed_drain, response)
                return
        while len(self._buffer) >= self._batch_bytes:
            self._queue.append((response, bytes(self._buffer[:self._batch_bytes])))
            del self._buffer[:self._batch_bytes]
            self._batch_bytes = self._later_batch_bytes
        if final and (len(self._buffer) >= 2 or (self._resampled and self._buffer_response in self._sent_ms)):
            tail = bytes(self._buffer[: len(self._buffer) - len(self._buffer) % 2])
            self._queue.append((self._buffer_response, tail + bytes(self._batch_bytes - len(tail))))
            self._batch_bytes = self._later_batch_bytes
        if final:
            self._buffer.clear()

    def _timed_drain(self, response_id: str) -> None:
        self._start_timer = None
        if response_id == self._buffer_response:
            self._drain_buffer(final=False)
            self._kick()

    def _ahead_ms(self) -> float:
        return self._clock_sent_ms - (time.monotonic() - self._clock_start) * 1000.0

    def _pace(self) -> None:
        """Real time plus LEAD_MS. The clock survives short gaps between engine bursts: a restarted pacer
        must not send another full lead on top of audio FreeSWITCH has not played yet."""
        if self._ahead_ms() <= 0:
            self._clock_start, self._clock_sent_ms = time.monotonic(), 0.0  # drained: start afresh
        while self._queue:
            ahead = self._ahead_ms()
            if ahead > self.LEAD_MS:
                gevent.sleep((ahead - self.LEAD_MS) / 1000.0)
                continue
            response_id, frame = self._queue.pop(0)
            if response_id not in self._heard_from:
                # heard once what is already in FreeSWITCH's playout buffer has played
                self._heard_from[response_id] = time.monotonic() + max(0.0, ahead) / 1000.0
                self.current = response_id
                self.on_first_heard(response_id)
            try:
                self.send_binary(frame)
            except Exception:
                self._queue.clear()
                return
            ms = self._ms(len(frame))
            self._clock_sent_ms += ms
            self._sent_ms[response_id] = self._sent_ms.get(response_id, 0.0) + ms

    @property
    def playing(self) -> bool:
        if self._queue or self._buffer:
            return True
        start = self._heard_from.get(self.current)
        return start is not None and (time.monotonic() - start) * 1000.0 < self._sent_ms.get(self.current, 0.0)

    def stop(self) -> Heard | None:
        if not self.playing:
            return None
        queued = [rid for rid, _frame in self._queue]
        self._queue.clear()
        self._buffer.clear()
        if self._start_timer is not None:
            self._start_timer.kill(block=False)
            self._start_timer = None
        if self._pacer is not None:
            self._pacer.kill(block=False)
            self._pacer = None
        self._clock_sent_ms = 0.0  # FreeSWITCH's buffer is cleared with it
        with contextlib.suppress(Exception):
            if self._resampled and self._sent_ms:
                self.send_binary(bytes(self._later_batch_bytes))  # out of the resampler, then cleared with it
            self.send_text('{"type":"killAudio"}')
        dropped = tuple(dict.fromkeys([self.current, *queued, self._buffer_response] if self.current
                                      else [*queued, self._buffer_response]))
        response = self.current or self._buffer_response
        start = self._heard_from.get(response)
        played = 0.0 if start is None else (time.monotonic() - start) * 1000.0
        played = max(0.0, min(played, self._sent_ms.get(response, 0.0)))
        received = self.received_ms.get(response, 0.0)
        return Heard(response, int(min(played, received)), int(received), tuple(r for r in dropped if r))

    def close(self) -> None:
        self._queue.clear()
        if self._pacer is not None:
            self._pacer.kill(block=False)
        if self._start_timer is not None:
            self._start_timer.kill(block=False)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_from(path: str, offset: int) -> bytes:
    """A spool file from `offset` to its end (nothing if it is gone: there is nothing left to play then)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except OSError:
        return b""
