"""mod_audio_fork emulation (drachtio build by default, jambonz build as an option): API parsing, the WebSocket
client, frames, server messages and the events the real module fires (see mod_audio_fork.md and
observed-on-freeswitch.md)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

from . import wire
from .wsclient import RAW_EXT, HandshakeError, MediaBug

if TYPE_CHECKING:
    from .channel import Channel
    from .switch import FSim

log = logging.getLogger("fsim.audiofork")

SUBPROTOCOL = "audio.drachtio.org"
DEFAULT_BUG = "audio_fork"
BUFFER_SECS = 2

USAGE_DRACHTIO = (
    "-USAGE: <uuid> [start | stop | send_text | pause | resume | graceful-shutdown ] [wss-url | path] "
    "[mono | mixed | stereo] [8000 | 16000 | 24000 | 32000 | 64000] [bugname] [metadata]\n"
)
USAGE_JAMBONZ = (
    "-USAGE: <uuid> [start | stop | send_text | pause | resume | graceful-shutdown | stop_play ] [wss-url | path] "
    "[mono | mixed | stereo] [8000 | 16000 | 24000 | 32000 | 64000] [bugname] [metadata] "
    "[bidirectionalAudio_enabled] [bidirectionalAudio_stream_enabled] [bidirectionalAudio_stream_samplerate]\n"
)
OK = "+OK Success\n"
FAIL = "-ERR Operation Failed\n"


def _is_json_start(tok: str) -> bool:
    return tok.startswith("{") or tok.startswith("[")


def parse_rate(tok: str) -> int:
    """``8k``/``16k`` literals, else ``atoi`` (so ``48k`` is 48)."""
    if tok == "8k":
        return 8000
    if tok == "16k":
        return 16000
    digits = ""
    for c in tok.strip():
        if c.isdigit() or (not digits and c in "+-"):
            digits += c
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return 0


class BidirBuffer:
    """jambonz's streamed-audio path (lws_glue.cpp at the bundled commit): what the server sends collects in a
    pre-buffer (stream rate) until it holds 320 * factor * 4 samples for the first batch, 320 * factor * 2 for
    every later one (factor = stream rate / codec rate, at least 1); then the batch is resampled to the codec
    rate and moved to the playout buffer, which the channel's written frames take from (a short frame when it
    runs low). killAudio empties the playout buffer only: samples still in the pre-buffer stay there.
    """

    def __init__(self, stream_rate: int, codec_rate: int) -> None:
        self.stream_rate = stream_rate
        self.codec_rate = codec_rate
        self._rs = (
            soxr.ResampleStream(stream_rate, codec_rate, 1, dtype="int16", quality="QQ")
            if stream_rate != codec_rate
            else None
        )
        self.factor = max(1, stream_rate // codec_rate) if codec_rate else 1
        self.threshold = 320 * self.factor * 4
        self.prebuf = np.zeros(0, np.int16)
        self.buf = np.zeros(0, np.int16)
        self._carry = b""
        self.pushed = 0
        self.played = 0
        self.marks: list[tuple[int, str]] = []

    def push(self, data: bytes) -> None:
        data = self._carry + data
        if len(data) % 2:
            self._carry, data = data[-1:], data[:-1]
        else:
            self._carry = b""
        self.prebuf = np.concatenate([self.prebuf, np.frombuffer(data, dtype="<i2").astype(np.int16)])
        if len(self.prebuf) < self.threshold:
            return
        self.threshold = 320 * self.factor * 2  # after the first batch
        whole = len(self.prebuf) - len(self.prebuf) % self.factor
        batch, self.prebuf = self.prebuf[:whole], self.prebuf[whole:]
        if self._rs is not None:
            batch = np.asarray(self._rs.resample_chunk(batch), dtype=np.int16)
        self.buf = np.concatenate([self.buf, batch])
        self.pushed += len(batch)

    def pull(self, n: int) -> np.ndarray | None:
        if len(self.buf) == 0:
            return None
        chunk, self.buf = self.buf[:n], self.buf[n:]
        self.played += len(chunk)
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), np.int16)])
        return chunk

    def clear(self) -> None:
        """killAudio / stop_play: the playout buffer only."""
        self.buf = np.zeros(0, np.int16)


class ForkBug(MediaBug):
    kind = "fork"
    subclass_prefix = "mod_audio_fork"

    def __init__(self, ch: Channel, bugname: str, url: str, mix: str, rate: int, metadata: str | None,
                 build: str, bidir: tuple[bool, bool, int]) -> None:  # fmt: skip
        super().__init__(ch, bugname, url, mix, rate, metadata)
        self.build = build
        self.bidir_enabled, self.bidir_stream_enabled, self.bidir_rate = bidir
        self.bidir: BidirBuffer | None = None
        if build == "jambonz" and self.bidir_enabled:
            self.bidir = BidirBuffer(self.bidir_rate or ch.rate, ch.rate)
        self.overrun = False
        self.marks_sent: list[dict[str, Any]] = []
        self.buffer_limit = BUFFER_SECS * rate * 2 * self.channels

    @property
    def streaming(self) -> bool:
        return self.build == "jambonz" and self.bidir_enabled and self.bidir_stream_enabled and self.bidir_rate > 0

    def _handshake_headers(self, host: str, port: int) -> dict[str, Any]:
        hdr = [f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
        user = self.ch.variables.get("MOD_AUDIO_BASIC_AUTH_USERNAME")
        pw = self.ch.variables.get("MOD_AUDIO_BASIC_AUTH_PASSWORD")
        if user and pw:
            hdr.append("Authorization: Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
        self.request_headers = [f"Host: {host}", f"Origin: http://{host}", *hdr]
        return {"host": host, "origin": f"http://{host}", "header": hdr}

    def _check_response(self) -> None:
        proto = self.response_headers.get("sec-websocket-protocol")
        if proto is not None and proto.strip() != SUBPROTOCOL:
            raise HandshakeError("HS: PROTOCOL malformed")
        if self.response_headers.get("sec-websocket-extensions"):
            raise HandshakeError("HS: EXTENSION malformed")

    def _on_connected(self) -> None:
        self.fire("connect")
        if self.metadata:
            self._texts.append(self.metadata)
            self._wake.set()

    def _on_connect_failed(self, reason: str, handshake: bool, status: int) -> None:
        """The bug stays attached after a failure: a new start with the same name fails until ``stop``."""
        self.state = "failed"
        self.finished.set()
        if not handshake:
            reason = "Unable to connect"
        self.fire("connect_failed", '{"reason":"' + reason + '"}')

    def _ws_gone_event(self, code: int, reason: str) -> None:
        self.fire("disconnect")

    # ------------------------------------------------------------------ audio
    def on_frame(self, read: np.ndarray, write: np.ndarray | None) -> None:
        if self.state != "connected" or self._closing or self.paused or self.graceful:
            return
        data = self._mix_frame(read, write)
        if not data:
            return
        pending = sum(len(a) for a in self._audio)
        if pending + len(data) > self.buffer_limit:
            if not self.overrun:
                self.overrun = True
                self.fire("buffer_overrun")
            self._audio.clear()  # the non-resampled path discards the whole buffer
            return
        self._audio.append(data)
        self._wake.set()

    def _send_text(self, text: str) -> None:
        if self.graceful:
            self._send(b"", binary=True)  # quirk: after graceful-shutdown texts become empty binary frames
        else:
            self._send(text, binary=False)

    def _take_texts(self) -> list[str]:
        texts, self._texts = self._texts, []
        if self.build == "drachtio" and len(texts) > 1:
            return ["".join(texts)]  # drachtio appends pending texts into one frame
        return texts

    def _flush_audio(self) -> None:
        data = b"".join(self._audio)  # lws writes the whole accumulated buffer as one message
        self._audio.clear()
        if data and not self.paused and not self.graceful:
            self._send(data, binary=True)

    def graceful_shutdown(self) -> None:
        if self.state == "connected" and not self.graceful:
            self.graceful = True
            self._audio.clear()
            self._texts.append("")  # sent as one zero-length binary frame (see _send_text)
            self._wake.set()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._audio.clear()  # the bug buffer is flushed on both pause and resume

    # ------------------------------------------------------------------ server → FreeSWITCH
    def _on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            log.info("fork %s: unparsable text ignored", self.bugname)
            return
        if not isinstance(msg, dict):
            log.info("fork %s: non-object message ignored", self.bugname)
            return
        mtype = msg.get("type") if isinstance(msg.get("type"), str) else None
        data = msg.get("data")
        if mtype is None or mtype == "json":
            self.fire("json", msg)
        elif mtype == "playAudio":
            self._play_audio(data)
        elif mtype == "killAudio":
            self.fire("kill_audio")
            self.ch.break_playback(flush=False, unwind=False)  # a bare CF_BREAK: the innermost file only
            if self.bidir is not None:
                self.bidir.clear()
                self._clear_marks(report=True)
        elif mtype in ("transcription", "transfer", "error"):
            self.fire(mtype, data if data is not None else None)
        elif mtype == "disconnect":
            self.fire("disconnect", data if data is not None else None)
        elif mtype == "mark" and self.build == "jambonz":
            name = (data or {}).get("name") if isinstance(data, dict) else None
            if name and self.bidir is not None and len(self.bidir.marks) < 30:
                self.bidir.marks.append((self.bidir.pushed, str(name)))
        elif mtype == "clearMarks" and self.build == "jambonz":
            self._clear_marks(report=False)
        else:
            log.info("fork %s: unsupported msg type %s", self.bugname, mtype)

    def _play_audio(self, data: Any) -> None:
        if self.build == "jambonz" and (not self.bidir_enabled or self.streaming):
            log.info("fork %s: playAudio unsupported while streaming", self.bugname)
            return
        if not isinstance(data, dict):
            return  # no event at all without data
        ctype = data.get("audioContentType")
        if ctype is None:
            # The real module calls strcmp(NULL, ...) here and FreeSWITCH dies.
            self.sw.faults.crash(reason="mod_audio_fork: playAudio without data.audioContentType")
            return
        body = {k: v for k, v in data.items() if k != "audioContent"}
        ext = None
        if ctype == "raw":
            ext = RAW_EXT.get(int(data.get("sampleRate") or 0) if str(data.get("sampleRate", "")).isdigit() else 0,
                              ".r16")  # fmt: skip
        elif ctype in ("wave", "wav"):
            ext = ".wav"
        content = data.get("audioContent")
        if ext and isinstance(content, str):
            try:
                body["file"] = self._write_temp(content, ext, self.sw._next_temp_index())
            except (binascii.Error, ValueError):
                log.info("fork %s: bad base64 in playAudio", self.bugname)
        self.fire("play_audio", body)

    def _on_binary(self, data: bytes) -> None:
        if self.bidir is None:
            log.debug("fork %s: received binary frame, discarding", self.bugname)
            return
        self.bidir.push(data)

    def bidir_pull(self, n: int) -> np.ndarray | None:
        if self.bidir is None or not self.streaming:
            return None
        chunk = self.bidir.pull(n)
        if chunk is not None:
            self._report_marks()
        return chunk

    def stop_play(self) -> None:
        if self.bidir is not None:
            self.bidir.clear()
            self._clear_marks(report=True)

    def _report_marks(self) -> None:
        assert self.bidir is not None
        while self.bidir.marks and self.bidir.marks[0][0] <= self.bidir.played:
            _pos, name = self.bidir.marks.pop(0)
            self._send_mark(name, "playout")

    def _clear_marks(self, report: bool) -> None:
        if self.bidir is None:
            return
        marks, self.bidir.marks = self.bidir.marks, []
        if report:
            for _pos, name in marks:
                self._send_mark(name, "cleared")

    def _send_mark(self, name: str, event: str) -> None:
        text = '{"type": "mark", "data": {"name":"' + name + '", "event": "' + event + '"}}'
        self.marks_sent.append({"name": name, "event": event})
        self.queue_text(text)


# ---------------------------------------------------------------------------------------------- API


def api_uuid_audio_fork(sw: FSim, args: str) -> str:
    """``uuid_audio_fork`` with switch_separate_string's quirks (7 tokens drachtio, 10 jambonz)."""
    first = wire.separate_string(args, 2)
    ch0 = sw.channels.get(first[0]) if first else None
    build_guess = ch0.fork_build if ch0 is not None else sw.fork_build
    argv = wire.separate_string(args, 10 if build_guess == "jambonz" else 7)
    usage = USAGE_JAMBONZ if build_guess == "jambonz" else USAGE_DRACHTIO
    if len(argv) < 2:
        return usage
    ch = sw.channels.get(argv[0])
    cmd = argv[1]
    if cmd == "start" and len(argv) < 4:
        return usage
    if ch is None or not ch.alive:
        return FAIL
    build = ch.fork_build
    opt = argv[2:]
    if cmd == "stop":
        bug, text = DEFAULT_BUG, None
        if len(opt) == 1:
            if _is_json_start(opt[0]):
                text = opt[0]
            else:
                bug = opt[0]
        elif len(opt) >= 2:
            bug, text = opt[0], opt[1]
        b = ch.bugs.get(bug)
        if b is None or b.kind != "fork":
            return FAIL
        b.remove(reason="stop", final_text=text)
        return OK
    if cmd in ("pause", "resume", "graceful-shutdown"):
        bug = opt[0] if opt else DEFAULT_BUG
        b = ch.bugs.get(bug)
        if b is None or b.kind != "fork":
            return FAIL
        if cmd == "graceful-shutdown":
            b.graceful_shutdown()
        else:
            b.set_paused(cmd == "pause")
        return OK
    if cmd == "send_text":
        if not opt:
            return FAIL
        if len(opt) >= 2:
            bug, text = opt[0], opt[1]
        elif _is_json_start(opt[0]):
            bug, text = DEFAULT_BUG, opt[0]
        else:
            return FAIL  # "send_text hello" = bug named hello, no text
        b = ch.bugs.get(bug)
        if b is None or b.kind != "fork":
            return FAIL
        b.queue_text(text)
        return OK
    if cmd == "stop_play" and build == "jambonz":
        b = ch.bugs.get(DEFAULT_BUG)
        if b is None or b.kind != "fork":
            return FAIL
        b.stop_play()
        return OK
    if cmd != "start":
        return FAIL
    url, mix = argv[2], argv[3]
    if mix not in ("mono", "mixed", "stereo"):
        return FAIL
    if len(argv) < 5:
        # The real module reads argv[4] unconditionally here (NULL dereference): treat as a crash.
        sw.faults.crash(reason="mod_audio_fork: start without a sample rate")
        return ""
    rate = parse_rate(argv[4])
    bugname, metadata = DEFAULT_BUG, None
    extra = argv[5:]
    bidir = (True, False, 0)
    if build == "jambonz":
        if len(extra) >= 1 and extra[0]:
            if len(extra) == 1 and _is_json_start(extra[0]):
                metadata = extra[0]
            else:
                bugname = extra[0]
        if len(extra) >= 2 and extra[1]:
            metadata = extra[1]
        if len(extra) >= 5:
            bidir = (extra[2] == "true", extra[3] == "true", parse_rate(extra[4]))
    else:
        if len(extra) == 1:
            if _is_json_start(extra[0]):
                metadata = extra[0]
            else:
                bugname = extra[0]
        elif len(extra) >= 2:
            bugname, metadata = extra[0], extra[1]
    if metadata is not None:
        metadata = metadata[:8192]
    if bugname in ch.bugs:
        return FAIL  # bug already attached
    if rate <= 0:
        return FAIL
    bug = ForkBug(ch, bugname, url, mix, rate, metadata, build, bidir)
    ch.bugs[bugname] = bug
    ch.all_bugs.append(bug)
    ch.fire("MEDIA_BUG_START", [("Media-Bug-Function", bugname), ("Media-Bug-Target", url)])
    bug.start()
    return OK
