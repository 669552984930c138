"""A lean load fake of the OpenAI Realtime GA WebSocket (reference: openai-realtime.md), for `make bench`.

Not tests/fakes/openai_fake.py: that one validates every message, keeps every frame and runs a server-side
VAD on each append (fine for tests, too heavy for 500 concurrent sessions). This one does the minimum the bridge
needs — `session.created`, an echoing `session.updated`, audio responses as base64 deltas in the output format
session.update asked for (PCM16 24 kHz, or mu-law 8 kHz as forkbridge asks for an 8 kHz channel) sent faster
than real time, and a caller interruption (`input_audio_buffer.speech_started`) every other response —
and timestamps what the latency figures need, with `time.time()` (CLOCK_REALTIME: the only clock the three
bench processes share by contract):

- each `input_audio_buffer.append` arrival and the running byte count of decoded audio (the length comes from
  the base64 length, so appends after the first few are never decoded);
- the bench caller signature at the start of each session: a DC level that names the call (60 × (index + 1))
  and the sample position where that level steps down to silence, which says how many of the caller's frames
  never reached us (sent before the fork or the engine was up);
- each audio delta and `response.done` sent, and each `speech_started` sent.

Run: `python bench/fake_openai.py --port P --out data.json`; prints `ready <port>`; SIGTERM writes `--out` and
exits. Plain gevent sockets with a minimal RFC 6455 server (no masking on send, fast unmask on receive).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.lock  # noqa: E402
import numpy as np  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsim.audio import ulaw_encode  # noqa: E402  (fsim's G.711, written apart from the bridge's)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
APPEND_PREFIX = b'{"type":"input_audio_buffer.append","audio":"'
SIG_STEP = 60  # DC level of call i is SIG_STEP * (i + 1)
RATE = 24000

# Response shape (shared with bench/run.py, which reads them from the dump's "config").
RESP_MS = 2000  # audio per response
DELTA_MS = 100  # audio per delta
DELTA_INTERVAL = 0.010  # seconds between deltas: 10x faster than real time
GAP_S = 1.0  # after the response would have finished playing, before the next one
FIRST_AFTER_S = 2.5  # first response this long after session.updated (after the caller's signature)
BARGE_AT_S = 0.8  # interrupted responses: speech_started this long after the first delta
BARGE_EVERY = 2  # every other response is interrupted


def _tone(rate: int) -> np.ndarray:
    return (3000 * np.sin(2 * np.pi * 330.0 * np.arange(rate * DELTA_MS // 1000) / rate)).astype("<i2")


_TONE = _tone(RATE).tobytes()
DELTA_BYTES = len(_TONE)
# One delta of the tone in each output format a session may ask for: what the server sends is in the format
# session.updated confirmed (reference: `audio/pcm` is 24 kHz, `audio/pcmu` 8 kHz mu-law, one byte a sample).
_TONES_B64 = {"audio/pcm": base64.b64encode(_TONE).decode("ascii"),
              "audio/pcmu": base64.b64encode(ulaw_encode(_tone(8000))).decode("ascii")}


def _mask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    whole = int.from_bytes(data, "little") ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return whole.to_bytes(n, "little")


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.lock = gevent.lock.Semaphore()
        self.closed = False

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def _take(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def handshake(self) -> dict[str, str]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest()).decode()
        self.sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        return headers

    def recv(self) -> tuple[int, bytes]:
        """One message (opcode, payload); control frames are answered here and returned too."""
        parts: list[bytes] = []
        first_op = 0
        while True:
            b0, b1 = self._take(2)
            op, fin, n = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            key = self._take(4) if b1 & 0x80 else b""
            payload = self._take(n)
            if key:
                payload = _mask(key, payload)
            if op >= 8:
                if op == 9:
                    self.send(payload, 10)
                return op, payload
            if op:
                first_op = op
            parts.append(payload)
            if fin:
                return first_op, b"".join(parts)

    def send(self, payload: bytes, opcode: int = 1) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        with self.lock:
            if self.closed:
                return
            try:
                self.sock.sendall(head + payload)
            except OSError:
                self.closed = True

    def send_json(self, obj: dict) -> None:
        self.send(json.dumps(obj, separators=(",", ":")).encode())


class Session:
    def __init__(self, server: FakeOpenAI, conn: Conn, n: int) -> None:
        self.server = server
        self.conn = conn
        self.n = n
        self.t_open = time.time()
        self.append_t: list[float] = []
        self.append_cum: list[int] = []
        self.cum = 0
        self.sig: int | None = None  # call index, from the DC level
        self.sig_level = 0
        self.edge: int | None = None  # output sample index where the signature level ended
        self.responses: list[dict] = []
        self.ids = 0
        self.tone_b64 = _TONES_B64["audio/pcm"]  # one delta in the output format session.update asked for

    def _id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}_{self.n}_{self.ids}"

    # ---- bridge → us
    def on_message(self, data: bytes) -> None:
        now = time.time()
        if data.startswith(APPEND_PREFIX):
            b64len = len(data) - len(APPEND_PREFIX) - 2
            tail = data[-4:-2]
            nbytes = b64len // 4 * 3 - tail.count(b"=")
            if self.edge is None:
                self._signature(data[len(APPEND_PREFIX):-2], nbytes)
            self.cum += nbytes
            self.append_t.append(now)
            self.append_cum.append(self.cum)
            return
        msg = json.loads(data)
        kind = msg.get("type")
        if kind == "session.update":
            session = msg.get("session") or {}
            audio = session.get("audio") or {}
            output = ((audio.get("output") or {}).get("format") or {"type": "audio/pcm"}).get("type")
            if output not in _TONES_B64:
                self.conn.send_json({"type": "error", "event_id": self._id("event"),
                                     "error": {"type": "invalid_request_error", "code": "invalid_value",
                                               "message": f"this fake does not send {output}",
                                               "param": "session.audio.output.format"}})
                return
            self.tone_b64 = _TONES_B64[output]
            echoed = {"type": "realtime", "object": "realtime.session", "id": f"sess_{self.n}",
                      "model": session.get("model", "gpt-realtime"), "output_modalities": ["audio"],
                      "audio": {"input": {"format": (audio.get("input") or {}).get("format"),
                                          "turn_detection": (audio.get("input") or {}).get("turn_detection")},
                                "output": {"format": (audio.get("output") or {}).get("format"), "voice": "alloy"}}}
            self.conn.send_json({"type": "session.updated", "event_id": self._id("event"), "session": echoed})
            self.server.spawn(self._talk)
        # response.cancel, conversation.item.truncate, ...: accepted silently

    def _signature(self, b64: bytes, nbytes: int) -> None:
        x = np.frombuffer(base64.b64decode(b64), dtype="<i2")
        if self.sig is None:
            if len(self.append_t) >= 1 and len(x):  # the first append carries the filter's start-up
                level = int(np.median(x))
                if level >= SIG_STEP // 2:
                    self.sig_level = level
                    self.sig = int(round(level / SIG_STEP)) - 1
            return
        below = np.flatnonzero(x < self.sig_level // 2)
        if len(below):
            self.edge = self.cum // 2 + int(below[0])

    # ---- us → bridge
    def _talk(self) -> None:
        conn = self.conn
        gevent.sleep(FIRST_AFTER_S + random.random())
        count = 0
        while not conn.closed:
            count += 1
            rid, item = self._id("resp"), self._id("item")
            record: dict = {"id": rid, "deltas_t": [], "t_done": None, "t_ss": None}
            self.responses.append(record)
            t_start = time.time()
            conn.send_json({"type": "response.created", "event_id": self._id("event"),
                            "response": {"id": rid, "object": "realtime.response", "status": "in_progress",
                                         "output": []}})
            conn.send_json({"type": "response.output_item.added", "event_id": self._id("event"), "response_id": rid,
                            "output_index": 0, "item": {"id": item, "type": "message", "role": "assistant",
                                                        "status": "in_progress", "content": []}})
            head = ('{"type":"response.output_audio.delta","event_id":"ev","response_id":"' + rid + '","item_id":"'
                    + item + '","output_index":0,"content_index":0,"delta":"')
            delta = (head + self.tone_b64 + '"}').encode()
            for _ in range(RESP_MS // DELTA_MS):
                record["deltas_t"].append(time.time())
                conn.send(delta)
                gevent.sleep(DELTA_INTERVAL)
            conn.send_json({"type": "response.output_audio.done", "event_id": self._id("event"), "response_id": rid,
                            "item_id": item, "output_index": 0, "content_index": 0})
            record["t_done"] = time.time()
            conn.send_json({"type": "response.done", "event_id": self._id("event"),
                            "response": {"id": rid, "status": "completed", "status_details": None, "output": []}})
            if count % BARGE_EVERY == 0:
                gevent.sleep(max(0.0, t_start + BARGE_AT_S - time.time()))
                record["t_ss"] = time.time()
                conn.send_json({"type": "input_audio_buffer.speech_started", "event_id": self._id("event"),
                                "audio_start_ms": 0, "item_id": self._id("item")})
                gevent.sleep(0.3)
                conn.send_json({"type": "input_audio_buffer.speech_stopped", "event_id": self._id("event"),
                                "audio_end_ms": 0, "item_id": self._id("item")})
            gevent.sleep(max(0.0, t_start + RESP_MS / 1000 + GAP_S - time.time()))

    def dump(self) -> dict:
        return {"sig": self.sig, "edge": self.edge, "t_open": self.t_open, "append_t": self.append_t,
                "append_cum": self.append_cum, "responses": self.responses}


class FakeOpenAI:
    def __init__(self, port: int) -> None:
        self.sessions: list[Session] = []
        self.lags: list[float] = []
        self._greenlets: list[gevent.Greenlet] = []
        self.server = StreamServer(("127.0.0.1", port), self._handle, backlog=1024)

    def spawn(self, fn, *args) -> gevent.Greenlet:
        g = gevent.spawn(fn, *args)
        self._greenlets.append(g)
        return g

    def _handle(self, sock: socket.socket, _addr) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        try:
            conn.handshake()
        except (EOFError, OSError, KeyError):
            return
        session = Session(self, conn, len(self.sessions))
        self.sessions.append(session)
        conn.send_json({"type": "session.created", "event_id": "ev_created",
                        "session": {"type": "realtime", "id": f"sess_{session.n}", "model": "gpt-realtime"}})
        try:
            while True:
                op, data = conn.recv()
                if op == 8:
                    conn.send(data[:2], 8)
                    break
                if op == 1:
                    session.on_message(data)
        except (EOFError, OSError):
            pass
        finally:
            conn.closed = True

    def lag_probe(self) -> None:
        while True:
            t = time.monotonic()
            gevent.sleep(0.01)
            self.lags.append(time.monotonic() - t - 0.01)

    def dump(self, path: str) -> None:
        lags = sorted(self.lags) or [0.0]
        data = {"config": {"resp_ms": RESP_MS, "delta_ms": DELTA_MS, "delta_bytes": DELTA_BYTES,
                           "sig_step": SIG_STEP},
                "hub_lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000, "hub_lag_max_ms": lags[-1] * 1000,
                "sessions": [s.dump() for s in self.sessions]}
        with open(path, "w") as fh:
            json.dump(data, fh)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    fake = FakeOpenAI(args.port)
    fake.server.start()
    gevent.spawn(fake.lag_probe)
    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    gevent.signal_handler(signal.SIGINT, done.set)
    print(f"ready {fake.server.server_port}", flush=True)
    done.wait()
    fake.server.close()
    fake.dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
