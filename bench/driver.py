"""The bench's load generator: fsim (simulated FreeSWITCH) in its own process, with timestamps for the figures.

run.py starts it, starts the daemon against its ESL port, then sends SIGUSR1: the driver places `--calls`
16 kHz calls at `--rate` calls/s, even-numbered to DID 7101 (broadcast playback), odd to 7102 (stream playback),
all on one switch with the jambonz build of mod_audio_fork (the daemon asks the switch which build it has and
sends stream routes to their fallback on any other), and prints `ramped <time> <forks connected>` once every fork
is connected.
SIGUSR2 hangs every call up, writes `--out` (JSON) and exits.

Each caller sends, at real time from answer: 2 s of DC at level 60 × (call index + 1) (the fake engine reads the
call's identity from it, and from where it ends, how many frames never reached it), then a quiet tone, then
silence until hangup. Only fsim's own bookkeeping is wrapped (never its behaviour):

- fork frames: fsim's `frames_sent` (monotonic, converted to wall time with one offset taken at start) plus the
  media tick of the first frame sent, so every frame has an absolute index;
- broadcast playback submitted: arrival of the `playback` sendmsg (or `uuid_broadcast`), with the chunk's size;
- stream playback: arrival of each binary frame from the bridge;
- stop sent: arrival of `uuid_break` (broadcast) and of `killAudio` (stream).

The ear (what the caller heard) is switched off: it keeps a copy of every played frame, which at hundreds of
calls only costs the generator memory and time. All times written are `time.time()`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import numpy as np  # noqa: E402

from fsim import CallerScript, FSim, Samples  # noqa: E402
from fsim.audiofork import ForkBug  # noqa: E402
from fsim.ear import Ear  # noqa: E402

RATE = 16000
SIG_STEP = 60
SIG_FRAMES = 100  # 2 s of DC; the step down is at frame 100
DID_BROADCAST, DID_STREAM = "7101", "7102"
WALL = time.time() - time.monotonic()  # monotonic → wall, one offset for the whole run

plays: dict[str, list[tuple[float, int]]] = {}
breaks: dict[str, list[float]] = {}
kills: dict[str, list[float]] = {}
binaries: dict[str, list[tuple[float, int]]] = {}
first_tick: dict[str, int] = {}


def caller_audio(index: int) -> np.ndarray:
    dc = np.full(SIG_FRAMES * RATE // 50, SIG_STEP * (index + 1), np.int16)
    gap = np.zeros(RATE // 5, np.int16)
    tone = (1500 * np.sin(2 * np.pi * 220.0 * np.arange(RATE * 2) / RATE)).astype(np.int16)
    return np.concatenate([dc, gap, tone])


class BenchFSim(FSim):
    def run_api(self, line: str, via: str = "api", job_uuid: str | None = None) -> str:
        cmd, _, args = line.strip().partition(" ")
        now = time.time()
        parts = args.split()
        if cmd == "uuid_break" and parts:
            breaks.setdefault(parts[0], []).append(now)
        elif cmd == "uuid_broadcast" and len(parts) >= 2:
            _note_play(parts[0], parts[1], now)
        return super().run_api(line, via, job_uuid)

    def sendmsg(self, target: str, headers: dict[str, str], body: bytes) -> str:
        h = {k.lower(): v for k, v in headers.items()}
        if h.get("call-command") == "execute" and h.get("execute-app-name") == "playback":
            _note_play(target, h.get("execute-app-arg") or body.decode("utf-8", "replace"), time.time())
        return super().sendmsg(target, headers, body)


def _note_play(uuid: str, path: str, now: float) -> None:
    if "://" in path:
        return  # silence_stream:// under streamed audio
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    plays.setdefault(uuid, []).append((now, size))


_on_text, _on_binary, _on_frame = ForkBug._on_text, ForkBug._on_binary, ForkBug.on_frame


def _text(self: ForkBug, text: str) -> None:
    if "killAudio" in text:
        kills.setdefault(self.ch.uuid, []).append(time.time())
    _on_text(self, text)


def _binary(self: ForkBug, data: bytes) -> None:
    binaries.setdefault(self.ch.uuid, []).append((time.time(), len(data)))
    _on_binary(self, data)


def _frame(self: ForkBug, read, write) -> None:
    if self.ch.uuid not in first_tick and self.state == "connected" and not self._closing:
        first_tick[self.ch.uuid] = self.ch._tick
    _on_frame(self, read, write)


ForkBug._on_text, ForkBug._on_binary, ForkBug.on_frame = _text, _binary, _frame
Ear.hear = lambda *a, **k: None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--esl-port", type=int, required=True)
    p.add_argument("--password", default="ClueCon")
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--rate", type=float, default=100.0, help="calls placed per second")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    sw = BenchFSim(esl_port=args.esl_port, password=args.password, max_call_s=900, fork_build="jambonz")
    sw.start()
    go, stop = gevent.event.Event(), gevent.event.Event()
    gevent.signal_handler(signal.SIGUSR1, go.set)
    gevent.signal_handler(signal.SIGUSR2, stop.set)
    gevent.signal_handler(signal.SIGTERM, stop.set)
    lags: list[float] = []

    def probe() -> None:
        while True:
            t = time.monotonic()
            gevent.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    gevent.spawn(probe)
    print(f"ready {sw.esl_port}", flush=True)
    while not go.wait(0.5):
        if stop.is_set():
            sw.stop()
            return 1
    calls = []
    t0 = time.monotonic()
    for i in range(args.calls):
        gevent.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        stream = i % 2 == 1
        calls.append((i, sw.place_call(did=DID_STREAM if stream else DID_BROADCAST, caller_id=f"+1555{i:07d}",
                                       script=CallerScript(audio=Samples(caller_audio(i), RATE)), rate=RATE,
                                       ptime_ms=20)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not stop.is_set():
        connected = sum(1 for _i, ch in calls if ch.fork is not None and ch.fork.state == "connected")
        if connected == len(calls):
            break
        gevent.sleep(0.1)
    connected = sum(1 for _i, ch in calls if ch.fork is not None and ch.fork.state == "connected")
    print(f"ramped {time.time():.6f} {connected}", flush=True)
    stop.wait()
    t_stop = time.time()
    for _i, ch in calls:
        ch.hangup("NORMAL_CLEARING", by="caller")
    out = {"t_stop": t_stop, "hub_lag_p99_ms": (sorted(lags)[int(len(lags) * 0.99)] * 1000) if lags else 0.0,
           "hub_lag_max_ms": max(lags, default=0.0) * 1000, "calls": []}
    for i, ch in calls:
        fork = ch.fork
        out["calls"].append({
            "index": i, "uuid": ch.uuid, "mode": "stream" if i % 2 else "broadcast",
            "fork_state": None if fork is None else fork.state,
            "first_tick": first_tick.get(ch.uuid),
            "t_answer": None if ch.t_answer is None else ch.t_answer + WALL,
            "frames": [] if fork is None else [(t + WALL, n) for t, n in fork.frames_sent],
            "plays": plays.get(ch.uuid, []), "breaks": breaks.get(ch.uuid, []), "kills": kills.get(ch.uuid, []),
            "binaries": binaries.get(ch.uuid, []),
        })
    with open(args.out, "w") as fh:
        json.dump(out, fh)
    gevent.sleep(0.5)
    sw.stop()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
