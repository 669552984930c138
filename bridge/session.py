"""One call's media: caller audio → engine, engine speech → caller, barge-in, tools, greeting.

Created by the controller when a call is answered (so the engine warms up while FreeSWITCH dials us), given
the fork's WebSocket when it arrives, and told about playback and DTMF events. It reports failures and
milestones through `SessionHooks`; it changes the call only through `CallControl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
import gevent.event
from gevent.lock import Semaphore

from bridge import engines as engine_registry
from bridge.audio import Converter
from bridge.callcontrol import CallControl
from bridge.engine import (
    PCM16,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    Engine,
    EngineError,
    EngineEvent,
    EngineRefused,
    Interrupted,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.playback import BroadcastPlayer, Player, StreamPlayer, native_format
from bridge.tools import build_tool_specs, decide
from bridge.wakeups import IDLE_S, ReadCoalescer

log = logging.getLogger("forkbridge.bridge")

# Caller audio goes to the engine in 40 ms pieces (two 20 ms frames): half the resampler calls, socket writes
# and JSON/base64 envelopes of forwarding every frame, for at most 20 ms more on the way to the engine's VAD.
ENGINE_CHUNK_MS = 40
PLAYBACK_FAILURES_MAX = 2  # chunks in a row FreeSWITCH could not play before the call falls back
HANGUP_AFTER_PLAYBACK_MAX = 10.0  # seconds a goodbye may still play before the model's hangup happens
HOLD_MAX_S = 30.0  # caller audio kept while a new engine session opens (its connect_timeout is less)
SUMMARY_MAX_CHARS = 4000  # the conversation so far, as carried into a new session's instructions
RENEW_MARGIN_S = 120.0  # a session that announces its end is replaced this long before it (at most a quarter)
RECENT_PIECES = 10_000 // ENGINE_CHUNK_MS  # the caller's last 10 s, replayed to a new session from the utterance start
PREROLL_S = 0.5  # ... and this much before the engine heard it start


@dataclass
class SessionHooks:
    """How the session tells the controller what happened (all optional except fail)."""

    fail: Callable[[str], None]
    mark: Callable[[str, Mapping[str, Any]], None] = lambda _name, _detail: None
    # the model ends the call ("transfer" to a route target name, or "hangup"); False: it is already ending
    end: Callable[[str, str], bool] = lambda _action, _target: True


@dataclass
class MediaOptions:
    engine_type: str
    engine_options: Mapping[str, Any]
    playback: str  # broadcast | stream
    spool_dir: str
    greeting_file: str = ""
    no_audio_timeout: float = 10.0
    tools_allow: tuple[str, ...] = ()
    transfer_targets: Mapping[str, str] = field(default_factory=dict)
    channel_codec: str = ""  # the channel's read codec (PCMU, PCMA, L16, G722, ...) and rate, from FreeSWITCH
    channel_rate: int = 0


class MediaSession:
    def __init__(self, info: CallInfo, options: MediaOptions, control: CallControl, hooks: SessionHooks,
                 stats: Any = None, log: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.log = log
        self.info = info
        self.options = options
        self.control = control
        self.hooks = hooks
        self.stats = stats
        self.call_format = AudioFormat(PCM16, info.sample_rate)
        self.playback_format = self.call_format  # what the engine's speech is converted to for the player
        # replies streamed back on the fork (jambonz) go at the channel's rate when it is below the fork's: the
        # module would only resample them down again (and each resampler holds audio back)
        channel = options.channel_rate
        self.stream_rate = channel if channel in (8000, 16000) and channel < info.sample_rate else info.sample_rate
        if options.playback == "stream":
            self.playback_format = AudioFormat(PCM16, self.stream_rate)
        specs = build_tool_specs(list(options.tools_allow), list(options.transfer_targets))
        self.info = CallInfo(**{**info.__dict__, "tools": specs})
        self.engine: Engine | None = None
        self.engine_ready = gevent.event.Event()
        self.ws = None
        self._ws_lock = Semaphore()
        self._in: Converter | None = None
        self._out: Converter | None = None
        self.player: Player | None = None
        self._early_audio: list[tuple[bytes, str]] = []
        self._dropped: set[str] = set()
        self._closed = False
        self._last_audio = time.monotonic()
        self._speech_stopped_at: float | None = None
        self._greenlets: list[gevent.Greenlet] = []
        self._watcher = gevent.Greenlet()  # the no-audio timer's next run (an unstarted one until start())
        self._playback_failures = 0
        self._generation = 0  # the engine session events are taken from; an older one's are dropped
        self._held: list[bytes] | None = None  # caller audio while a new session opens (None: not switching)
        self._held_text: list[str] = []
        self._said: list[list[str]] = []  # [role, text, response] as the engines reported it, for a new session
        self._open_responses: set[str] = set()
        self._caller_speaking = False
        self._speech_started_at = 0.0
        self._recent: deque[tuple[float, bytes]] = deque(maxlen=RECENT_PIECES)  # for an utterance cut by a switch
        self._wakeups = ReadCoalescer(None)  # the fork socket's, once it is attached

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._greenlets.append(gevent.spawn(self._connect_engine))
        self._watch_audio()
        if self.options.playback == "broadcast":
            # replies as growing files in the channel's own codec where mod_native_file can play it (gapless)
            native = native_format(self.options.channel_codec, self.options.channel_rate)
            if native is not None:
                self.playback_format = native
            self.player = BroadcastPlayer(self.control, self.options.spool_dir, self.info.uuid,
                                          self.info.sample_rate, native=native, on_first_heard=self._first_heard,
                                          on_underrun=self._underrun, on_chunk=self._chunk_queued)

    def _open_engine(self, info: CallInfo) -> Engine:
        """A connected engine session whose events count only while it is the current one."""
        generation = self._generation

        def sink(event: EngineEvent) -> None:
            if generation == self._generation:
                self._on_engine_event(event)

        engine = engine_registry.create_engine(self.options.engine_type, self.options.engine_options, info, sink)
        if generation == 0:
            self.engine = engine  # a hangup during the first connect closes it
        engine.connect()
        return engine

    def _use(self, engine: Engine) -> None:
        formats = engine.formats
        assert formats is not None, "engine.connect() must set formats"
        self._in = Converter(self.call_format, formats.input)
        self._out = Converter(formats.output, self.playback_format)
        self.engine = engine
        if engine.expires_at is not None:  # a timer until then, not a sleeping greenlet (8 KiB per call)
            left = engine.expires_at - time.time()
            self._greenlets.append(gevent.spawn_later(max(0.0, left - min(RENEW_MARGIN_S, left / 4)),
                                                      self._renew_before_the_end, engine))

    def _connect_engine(self) -> None:
        try:
            engine = self._open_engine(self.info)
        except EngineRefused as exc:
            self._fail("engine_refused", str(exc))
            return
        except Exception as exc:
            self.log.exception("engine failed to start")
            self._fail("engine_refused", type(exc).__name__)
            return
        if self._closed:
            engine.close()
            return
        self._use(engine)
        self.engine_ready.set()
        formats = engine.formats
        self.hooks.mark("engine_connected", {"input": formats.input.encoding, "rate": formats.input.rate})
        if self.options.greeting_file:
            self.control.play(self.options.greeting_file)
        elif self.info.greeting:
            engine.greet()

    def close(self, reason: str = "hangup") -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeups.lower()  # the fork's close frame must not wait for audio that will not come
        if self.player is not None:
            self.player.close()
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:
                self.log.exception("engine close failed")
        self._watcher.kill(block=False)
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        ws = self.ws
        if ws is not None and reason != "hangup":
            close_ws(ws, 1000, b"call ended")

    def _fail(self, reason: str, detail: str = "") -> None:
        if self._closed:
            return
        self.log.warning("%s %s", reason, detail)
        self.hooks.fail(reason)

    # ---- the fork socket --------------------------------------------------------------------------

    def attach(self, ws: Any, max_frame_bytes: int, sock: Any = None) -> str:
        """Pump the fork's frames until it closes. Returns why it ended: closed, oversized, or ended.

        Per frame only what must be (size checks, gathering); a piece for the engine (ENGINE_CHUNK_MS) is
        stamped, counted and remembered once. `sock` is the fork's socket, for waking once per piece."""
        self.ws = ws
        self._last_audio = time.monotonic()
        self.hooks.mark("fork_connected", {})
        if self.options.playback == "stream":
            self.player = StreamPlayer(self._send_binary, self._send_text, self.stream_rate,
                                       codec_rate=self.options.channel_rate, on_first_heard=self._first_heard,
                                       on_underrun=self._underrun)
            self.control.keep_writing()
            early, self._early_audio = self._early_audio, []
            for audio, response_id in early:
                self.player.feed(audio, response_id)
        self._wakeups.lower()  # a fork before this one (refork): its close frame must reach its reader
        self._wakeups = wakeups = ReadCoalescer(sock if self.options.no_audio_timeout > 0 else None)
        first_audio = True
        batch = bytearray()
        frames = 0
        batch_bytes = int(self.info.sample_rate * 2 * ENGINE_CHUNK_MS / 1000)
        why = "ended"
        while not self._closed:
            try:
                message = ws.receive()
            except Exception:
                message = None
            if message is None:
                why = "closed"
                break
            if isinstance(message, str):
                self._on_text(message)
                continue
            size = len(message)
            if size > max_frame_bytes:
                close_ws(ws, 1009, b"frame too large")
                why = "oversized"
                break
            if not size:
                continue  # graceful-shutdown marker: no audio follows
            if first_audio:
                first_audio = False
                self.hooks.mark("first_caller_audio", {"bytes": size})
            batch += message
            frames += 1
            now = time.monotonic()
            done = len(batch) >= batch_bytes
            wakeups.gathered(now, size, frames, done)
            if not done:
                continue
            piece = bytes(batch)
            batch.clear()
            self._caller_audio(now, piece, frames)
            frames = 0
        if frames and self.stats is not None:  # the last frames, short of a piece, were received all the same
            self.stats.audio_in(len(batch), frames)
        return why

    def _caller_audio(self, now: float, piece: bytes, frames: int) -> None:
        """One piece of the caller's audio (whole fork frames, ENGINE_CHUNK_MS or a little more)."""
        self._last_audio = now
        if self.stats is not None:
            self.stats.audio_in(len(piece), frames)
        self._remember(now, piece)
        if self._held is not None:  # a new engine session is opening: it gets this once it is ready
            if len(self._held) * len(piece) < HOLD_MAX_S * self.info.sample_rate * 2:
                self._held.append(piece)
            return
        if self._in is None or self.engine is None:
            return  # the engine is not ready yet: nothing to keep, it hears the caller from now on
        try:
            self.engine.send_audio(self._in.convert(piece))
        except Exception:
            self.log.debug("send_audio failed", exc_info=True)

    def _remember(self, now: float, piece: bytes) -> None:
        """Keep what _switch_session may replay: while the caller speaks, the utterance (up to RECENT_PIECES);
        otherwise only the last PREROLL_S, which is all an utterance starting next could need (10 s of every
        call's audio was about 360 KiB per call)."""
        recent = self._recent
        recent.append((now, piece))
        if not self._caller_speaking:
            cutoff = now - PREROLL_S
            while recent[0][0] < cutoff:
                recent.popleft()

    def _on_text(self, text: str) -> None:
        """Metadata and module text frames: parsed defensively, never trusted for anything that matters."""
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(text):  # the drachtio build may concatenate several objects in one frame
            try:
                obj, end = decoder.raw_decode(text, pos)
            except ValueError:
                self.log.debug("ignoring non-JSON text frame (%d bytes)", len(text))
                return
            if isinstance(obj, dict):
                self.hooks.mark("fork_text", {"keys": sorted(obj)[:8]})
            pos = end
            while pos < len(text) and text[pos].isspace():
                pos += 1

    def _send_binary(self, data: bytes) -> None:
        with self._ws_lock:
            self.ws.send(data, binary=True)
        if self.stats is not None:
            self.stats.audio_out(len(data))

    def _send_text(self, text: str) -> None:
        with self._ws_lock:
            self.ws.send(text)

    def watch_audio_again(self) -> None:
        """A no_audio the controller put off (FreeSWITCH was away): watch afresh from now."""
        if not self._closed:
            self._last_audio = time.monotonic()
            if self._watcher is not gevent.getcurrent():  # (it is when the watch's own fallback was put off)
                self._watcher.kill(block=False)
            self._watch_audio()

    def _watch_audio(self) -> None:
        """No caller audio for no_audio_timeout (the fork never came, or went silent) → fallback. A timer that
        re-arms itself (a waiting timer is 1 KiB, a sleeping greenlet 8 KiB per call)."""
        timeout = self.options.no_audio_timeout
        if timeout <= 0 or self._closed:
            return
        idle = time.monotonic() - self._last_audio
        if idle >= IDLE_S:
            self._wakeups.lower()
        if idle >= timeout:
            self._fail("no_audio", f"{idle:.1f}s without caller audio")
            return
        # while the fork's reader wakes once per piece, a pause is noticed within IDLE_S (see bridge/wakeups)
        every = IDLE_S if self._wakeups.holding else 1.0
        self._watcher = gevent.spawn_later(min(every, timeout - idle + 0.05), self._watch_audio)

    # ---- from the controller ----------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """DTMF (or other caller-side text) to the model; waits briefly for the engine to be ready."""
        if self.engine_ready.wait(5.0) and self.engine is not None and not self._closed:
            if self._held is not None:
                self._held_text.append(text)
            else:
                self.engine.send_text(text)

    def reconcile_playback(self) -> None:
        """After an ESL outage, whose PLAYBACK events are lost: files that must have ended by now are over."""
        if isinstance(self.player, BroadcastPlayer):
            self.player.reconcile()

    def deleted_chunk(self, path: str) -> bool:
        """A chunk we removed ourselves after a barge-in (FreeSWITCH then reports FILE NOT FOUND for it)."""
        return isinstance(self.player, BroadcastPlayer) and self.player.cancelled(path)

    def playback_event(self, name: str, path: str, status: str, read_bytes: int = -1) -> None:
        """PLAYBACK_START / PLAYBACK_STOP (with FreeSWITCH's playback_samples), or FAILED (FreeSWITCH could
        not play the file at all)."""
        player = self.player
        if not isinstance(player, BroadcastPlayer) or not player.owns(path):
            return
        if name == "PLAYBACK_START":
            self._playback_failures = 0
            player.playback_started(path)
        elif name == "FAILED" and status == "cancelled":
            player.playback_stopped(path, "failed")
        elif name == "FAILED":
            player.playback_stopped(path, "failed")
            self._playback_failures += 1
            if self._playback_failures >= PLAYBACK_FAILURES_MAX:
                self._fail("playback_failed", path)
        else:
            player.playback_stopped(path, status, read_bytes)

    # ---- from the engine --------------------------------------------------------------------------

    def _on_engine_event(self, event: EngineEvent) -> None:
        if self._closed:
            return
        if isinstance(event, AudioOut):
            self._open_responses.add(event.response_id)
            self._on_audio(event)
        elif isinstance(event, SpeechStarted):
            self._caller_speaking, self._speech_started_at = True, time.monotonic()
            self.hooks.mark("speech_started", {})
            self.barge_in()
        elif isinstance(event, SpeechStopped):
            self._caller_speaking = False
            self._speech_stopped_at = time.monotonic()
            self.hooks.mark("speech_stopped", {})
        elif isinstance(event, Interrupted):
            self.barge_in(tell_engine=False)
        elif isinstance(event, ResponseDone):
            self._open_responses.discard(event.response_id)
            if event.response_id not in self._dropped:
                self._finish_response(event.response_id)
        elif isinstance(event, Transcript):
            if event.final and event.text:
                self.hooks.mark("transcript", {"role": event.role, "text": event.text, "response": event.response_id})
                self._said.append([event.role, event.text, event.response_id])
                del self._said[:-200]
        elif isinstance(event, ToolCall):
            gevent.spawn(self._on_tool, event)
        elif isinstance(event, EngineError):
            self.hooks.mark("engine_error", {"code": event.code, "fatal": event.fatal})
            if event.fatal and self.engine is not None and event.code in self.engine.session_limit_codes:
                self._switch_session(event.code)
            elif event.fatal:
                self._fail("engine_error", event.code)
        elif isinstance(event, Closed):
            if event.clean:  # the agent ended the conversation (e.g. ElevenLabs end_call): say goodbye, hang up
                if self.hooks.end("hangup", ""):
                    gevent.spawn(self._hangup_after_playback)
            else:
                self._fail("engine_dropped", event.reason)

    def _switch_session(self, why: str) -> None:
        """From now on the caller's audio is held for a new session. An utterance under way started in the old
        one: the new one gets it from its start, so the caller's words are not cut."""
        self._generation += 1  # the old session's Closed and anything after it are not the call's end
        since = self._speech_started_at - PREROLL_S
        self._held = [frame for t, frame in self._recent if t >= since] if self._caller_speaking else []
        self._caller_speaking = False
        self._greenlets.append(gevent.spawn(self._continue_session, why))

    def _renew_before_the_end(self, engine: Engine) -> None:
        """A session that says when it will end (OpenAI's expires_at) is replaced shortly before (this runs
        RENEW_MARGIN_S before, or at three quarters of the session's life if that is later), at a moment
        when nobody speaks, so the caller hears no pause at all. If no such moment comes, the session's own end
        is handled as any session limit."""
        assert engine.expires_at is not None
        while engine.expires_at - time.time() > 0.5 and (self._caller_speaking or self._open_responses
                                                         or (self.player is not None and self.player.playing)):
            gevent.sleep(0.05)
        if engine is self.engine and self._held is None and not self._closed and engine.expires_at > time.time():
            self._switch_session("session_ending")

    def _continue_session(self, code: str) -> None:
        """The engine's session reached its limit: the call goes on in a new one, told its instructions and
        the conversation so far; the caller's audio meanwhile is held and then sent to it, so the caller notices
        a pause at most. If the new session cannot open, the fallback."""
        started = time.monotonic()
        old = self.engine
        for response_id in list(self._open_responses):  # replies the old session never finished
            self._open_responses.discard(response_id)
            self._finish_response(response_id)
        info = replace(self.info, greeting="", instructions=continued_instructions(self.info.instructions, self._said))
        try:
            engine = self._open_engine(info)
        except Exception as exc:
            self._held = None
            self.hooks.mark("engine_continuation_failed", {"after": code})
            self._fail("continuation_failed", str(exc) if isinstance(exc, EngineRefused) else type(exc).__name__)
            return
        if old is not None:
            old.close()
        if self._closed:
            engine.close()
            return
        self._use(engine)
        held_ms = 0.0
        while self._held:  # audio that arrives while this sends is appended and sent too
            audio = b"".join(self._held)
            self._held.clear()
            held_ms += len(audio) / (self.info.sample_rate * 2) * 1000.0
            engine.send_audio(self._in.convert(audio))
        self._held = None
        for text in self._held_text:
            engine.send_text(text)
        self._held_text.clear()
        self.hooks.mark("engine_continued", {"after": code, "pause_ms": round((time.monotonic() - started) * 1000),
                                             "held_ms": round(held_ms)})

    def _on_audio(self, event: AudioOut) -> None:
        if event.response_id in self._dropped or self._out is None:
            return
        pcm = self._out.convert(event.audio)
        if not pcm:
            return
        if self.player is None:  # stream mode before the fork arrived
            self._early_audio.append((pcm, event.response_id))
            return
        if event.response_id not in self.player.received_ms:
            self.hooks.mark("engine_first_audio", {"response": event.response_id})
        self.player.feed(pcm, event.response_id)

    def _finish_response(self, response_id: str) -> None:
        """The resampler holds back a few ms: they belong to this reply, not to the start of the next."""
        if self._out is not None:
            tail = self._out.flush()
            if tail and self.player is not None:
                self.player.feed(tail, response_id)
        if self.player is not None:
            self.player.response_done(response_id)

    def barge_in(self, tell_engine: bool = True) -> None:
        """Stop what the caller hears now; tell the engine how much they heard; drop the rest of that reply."""
        player = self.player
        if player is None or not player.playing:
            return
        started = time.monotonic()
        heard = player.stop()
        if heard is None:
            return
        self._dropped.update(heard.dropped or (heard.response_id,))
        if self._out is not None:
            self._out.reset()
        if isinstance(player, StreamPlayer):
            self.control.keep_writing()  # killAudio also stopped the writer
        detail: dict[str, Any] = {"response": heard.response_id, "played_ms": heard.played_ms,
                                  "received_ms": heard.received_ms, "signal_at": started}
        if isinstance(player, StreamPlayer):  # killAudio went out on the socket inside stop()
            detail["stop_ms"] = round((time.monotonic() - started) * 1000.0, 2)
        self.hooks.mark("barge_in", detail)  # broadcast: the stop is timed when uuid_break is written
        for said in self._said:
            if said[2] == heard.response_id and said[0] == "assistant":
                said[1] += " [cut off by the caller]"
        played = heard.played_ms if heard.played_ms > 0 else None
        if tell_engine and self.engine is not None:
            self.engine.interrupt(heard.response_id, played)

    def _hangup_after_playback(self, limit: float = HANGUP_AFTER_PLAYBACK_MAX) -> None:
        """The model's last words are usually still queued when it hangs up: let them play (bounded)."""
        deadline = time.monotonic() + limit
        while self.player is not None and self.player.playing and time.monotonic() < deadline:
            gevent.sleep(0.1)
        self.control.hangup("NORMAL_CLEARING")

    def _first_heard(self, response_id: str) -> None:
        detail: dict[str, Any] = {"response": response_id}
        if self._speech_stopped_at is not None:
            detail["since_speech_stopped_ms"] = round((time.monotonic() - self._speech_stopped_at) * 1000.0, 1)
            self._speech_stopped_at = None
        self.hooks.mark("caller_heard", detail)

    def _chunk_queued(self, ms: float, queued: bool) -> None:
        """Audio written for FreeSWITCH to play: a new file queued, or more of a growing one."""
        if queued:
            self.hooks.mark("chunk_queued", {"ms": round(ms)})
        if self.stats is not None:
            self.stats.audio_out(int(ms * self.info.sample_rate * 2 / 1000))

    def _underrun(self) -> None:
        self.hooks.mark("playback_underrun", {})

    def _on_tool(self, call: ToolCall) -> None:
        decision = decide(call, self.info.tools)
        self.hooks.mark("tool_call", {"name": call.name, "arguments": dict(call.arguments),
                                      "action": decision.action, "refused": decision.is_error})
        if self.engine is not None:
            self.engine.tool_result(call.call_id, decision.result_for_model, decision.is_error)
        if decision.is_error:
            return
        if decision.action == "transfer":
            if self.hooks.end("transfer", decision.argument):
                self.control.transfer(self.options.transfer_targets[decision.argument])
        elif decision.action == "hangup":
            if self.hooks.end("hangup", ""):
                self._hangup_after_playback()
        elif decision.action == "send_dtmf":
            self.control.send_dtmf(decision.argument)


def continued_instructions(instructions: str, said: list[list[str]], limit: int = SUMMARY_MAX_CHARS) -> str:
    """A new session's instructions: the route's, then the conversation so far (its most recent part, at most
    `limit` characters), so the model carries on instead of starting over."""
    lines: list[str] = []
    size = 0
    for role, text, _response in reversed(said):
        line = f"{'Agent' if role == 'assistant' else 'Caller'}: {text}"
        if size + len(line) > limit:
            lines.append("(earlier turns left out)")
            break
        lines.append(line)
        size += len(line) + 1
    history = "\n".join(reversed(lines)) or "(nothing yet)"
    return (f"{instructions}\n\nThis phone call is already under way: it continues in a new session. Do not greet "
            f"the caller again; carry on from where the conversation is. The conversation so far:\n{history}").strip()


def close_ws(ws: Any, code: int, reason: bytes) -> None:
    """A real close frame (gevent-websocket 0.10.1's close() ignores the code and sends a malformed one)."""
    import struct

    from geventwebsocket.websocket import WebSocket

    with contextlib.suppress(Exception):
        ws.send_frame(struct.pack("!H", code) + reason, WebSocket.OPCODE_CLOSE)
    with contextlib.suppress(Exception):
        ws.close()
