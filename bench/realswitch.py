"""`make bench`, real-switch part: what a caller hears, measured from recordings of calls on a real FreeSWITCH.

Runs when a FreeSWITCH is found the way the test suite finds one (tests/realswitch/switch.py find_prefix:
FORKBRIDGE_FREESWITCH, or the bundle `make freeswitch` installs in .cache/freeswitch); otherwise prints one line
saying why it is skipped. Run alone with `make bench-switch [N=10]`.

Cells: playback mode x route sample_rate (8000, 16000) x engine pace.

- broadcast-native: the daemon as it is (a reply is one growing file in the channel's codec, mod_native_file);
- broadcast-chunked: the before, native files disabled (`bridge.session.native_format` returns None): L16 chunks
  through mod_sndfile;
- stream: replies as binary frames back on the fork socket (the jambonz build of mod_audio_fork);
- pace faster: deltas of 100 ms every 5 ms; real-time: deltas of 100 ms every 100 ms on a clock (exactly real time).

Per cell, one in-process daemon (tests/harness.py) and one OpenAI Realtime fake (tests/fakes/openai_fake.py) serve
N concurrent calls (loopback callers recording their own leg in stereo, tests/realswitch/caller.py). Every call:

- the engine greets with a 1.5 s 300 Hz tone;
- the caller says a 0.5 s tone after it (at 3.0 s); the fake's VAD ends the turn after 200 ms of silence and
  answers with a 3 s 700 Hz tone;
- the caller talks over that reply 1.25 s after its question ended (about 1 s into the reply as heard); the fake's
  VAD sends speech_started and the daemon barges in;
- when the caller stops talking the engine answers again (0.6 s, 1100 Hz), and the call is hung up once that
  has been played out (plus 0.5 s, so late audio would be in the recording).

Figures, in ms, from the caller-side recording (8 kHz stereo; every 10 ms window with sound is given to the
nearest of the three reply tones, so each reply is measured on its own samples):

- holes: silences of 1 ms or more inside a reply (greeting and third reply: first to last sound; the interrupted
  reply: first sound to the cut). Per reply its largest hole; over every reply of every call the max and p99
  (0 for a reply without holes), plus the number of holes (#holes).
- missing: of the replies played whole (greeting, third reply), how much less sound than the engine sent was heard
  (a hole that replaced audio rather than delaying it); the max over calls.
- first audio: the daemon's engine_first_audio mark -> that reply's first sound in the recording, over every reply
  that has a mark (in stream mode, greeting audio that arrived before the fork did gets none).
- barge-in: the speech_started mark during the reply -> the end of the interrupted reply as heard (its last sound
  before a silence of 200 ms or more).
- after cut: sound of the interrupted reply (700 Hz) heard anywhere after that cut (should be 0); the max.
- talk-over: how far into the reply as heard the speech_started mark came (the scenario, not a figure of merit).

Clocks: the timeline marks are the daemon's (time.time() at the call record's start + monotonic seconds); the
recording is put on wall time by Caller.at() from FreeSWITCH's stamp of the caller's audio starting, corrected by
FreeSWITCH's clock offset read with `sendevent` during the cell (its stamps step in 20 ms, so figures are good to
about +-10 ms; a negative first-audio or barge-in of a few ms is that). A check: each speech_started mark must come
after the caller's onset on the same clock (vad_lag_ms in the JSON). The daemon, the fake and the callers share one
gevent hub in this process; its stalls are measured (hub_lag_ms) and noted under the table when over 50 ms.

Printed as a table (one row per cell, notes under it) and merged into bench/results.json under "realswitch" with
every call's figures and marks (the rest of the file, written by bench/run.py, is kept). Options: --calls N,
--modes, --rates, --paces, --keep (keep recordings, switch logs, configs). Everything listens on 127.0.0.1; every
FreeSWITCH started here is stopped by PID.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.local  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bridge.session  # noqa: E402
from bench.run import merge_results  # noqa: E402
from controller.esl import EslConnection  # noqa: E402
from fsim.audio import Silence, Tone  # noqa: E402
from tests.fakes.openai_fake import OpenAIFake  # noqa: E402
from tests.harness import load, running_daemon, wait_until, write_config  # noqa: E402
from tests.realswitch.caller import Caller, wait_no_channels  # noqa: E402
from tests.realswitch.heard import SILENT, Recording, pieces  # noqa: E402
from tests.realswitch.switch import PASSWORD, FreeSwitch, Probe, find_prefix  # noqa: E402

API_KEY = "sk-bench-realswitch-0123456789"
KINDS = ("greeting", "reply", "after")
TONES_HZ = (300.0, 700.0, 1100.0)  # the fake's tone per response, in order
LENGTHS_MS = (1500, 3000, 600)
DELTA_MS = 100
PACES = {"faster": 0.005, "real-time": DELTA_MS / 1000}
MODES = ("broadcast-native", "broadcast-chunked", "stream")
RATES = (8000, 16000)
QUESTION_AT_S, QUESTION_S, TALK_OVER_GAP_S, TALK_OVER_S = 3.0, 0.5, 1.25, 0.8
CALLER_AUDIO = (Silence(QUESTION_AT_S) + Tone(440, QUESTION_S, 0.3) + Silence(TALK_OVER_GAP_S)
                + Tone(550, TALK_OVER_S, 0.3) + Silence(10.0))
WINDOW_S = 0.01  # tone classification window
JOIN_S = 0.2  # the interrupted reply ends at its last sound before this much silence
TAIL_S = 0.5  # kept on the line after the last reply is played out
CALL_LIMIT_S = 25.0  # dial -> last reply played out, per call
CELL_LIMIT_S = 60.0
CLOCK_SUBCLASS = "forkbridge::bench_clock"
CLOCK_EVERY_S = 0.1
CLOCK_RTT_S = 0.005
CLOCK_WINDOW_S = 1.0
PROBE_EVENTS = ("CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY", "PLAYBACK_START",
                "PLAYBACK_STOP", "RECORD_START", "RECORD_STOP")
HUB_TICK_S = 0.005
HUB_WINDOW_S = 0.3
HUB_NOTE_MS = 50.0  # a stall this long shows in the figures: printed under the table
VAD_LAG_NOTE_MS = 150.0
ALIGN_SLACK_MS = 25.0  # FreeSWITCH stamps events to the frame (20 ms): the alignment is good to about that
MARKS = ("engine_first_audio", "speech_started", "speech_stopped", "barge_in", "playback_failed", "ending")

ROUTE = """
- name: bench
  did: "7100"
  engine: bot
  sample_rate: {rate}
  playback: {playback}
  greeting: Hello
  instructions: Be brief.
  no_audio_timeout: 20s
"""
ENGINE = ("bot: {{type: openai_realtime, url: '{url}', api_key: {key}, model: gpt-realtime, voice: alloy, "
          "connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")
LOGGING = "logging:\n  level: error\n"


class BenchFake(OpenAIFake):
    """The test fake with a length per response (greeting, reply, the answer after the barge-in): the base class
    reads `reply_ms` while it streams a response, in that response's own greenlet."""

    def __init__(self, lengths_ms: tuple[int, ...], **kwargs: Any) -> None:
        self._lengths = lengths_ms
        self._local = gevent.local.local()
        super().__init__(**kwargs)

    @property
    def reply_ms(self) -> int:  # type: ignore[override]
        return getattr(self._local, "reply_ms", self._lengths[-1])

    @reply_ms.setter
    def reply_ms(self, _value: int) -> None:
        pass  # per response, from the lengths

    def _run_response(self, s, r) -> None:
        index = sum(1 for x in s.responses[: s.responses.index(r)] if x.kind == "audio")
        self._local.reply_ms = self._lengths[min(index, len(self._lengths) - 1)]
        super()._run_response(s, r)


class ClockProbe(Probe):
    """The cell's ESL probe, which also reads FreeSWITCH's clock against ours.

    FreeSWITCH stamps events from its own runtime clock (in steps: we read its stamps 3-16 ms behind time.time()),
    and the caller's recording is aligned from such a stamp (PLAYBACK_START of the caller's audio). So every
    CLOCK_EVERY_S we send an event (`sendevent`) and read the stamp FreeSWITCH gave it against our clock before the
    command and after its reply: offset = stamp - midpoint, kept when the round trip is short."""

    def __post_init__(self) -> None:
        """As Probe, but subscribed to what the callers wait for only: parsing every event of ten calls costs
        the process the daemon runs in (and its garbage collector) more than the daemon itself."""
        self.clock: list[tuple[float, float]] = []  # (our time, FreeSWITCH stamp - our time)
        self._sent: dict[str, tuple[float, float]] = {}
        self._arrived = gevent.event.Event()
        self.esl = EslConnection(self.host, self.port, PASSWORD, timeout=10)
        self.esl.connect()
        self.esl.register_handle("*", self._on_event)
        self.esl.send(f"event plain {' '.join(PROBE_EVENTS)} CUSTOM {CLOCK_SUBCLASS}")

    def _on_event(self, raw) -> None:
        event = getattr(raw, "parsed", None)
        if event is not None and event.subclass == CLOCK_SUBCLASS:
            sent = self._sent.pop(event.get("Bench-Seq"), None)
            if sent is not None and sent[1] - sent[0] <= CLOCK_RTT_S:
                mid = (sent[0] + sent[1]) / 2
                self.clock.append((mid, int(event.get("Event-Date-Timestamp", "0")) / 1e6 - mid))
            return
        super()._on_event(raw)

    def read_clock(self, seq: int) -> None:
        t0 = time.time()
        self.esl.send(f"sendevent CUSTOM\nEvent-Subclass: {CLOCK_SUBCLASS}\nBench-Seq: {seq}")
        self._sent[str(seq)] = (t0, time.time())

    def keep_reading(self) -> None:
        for seq in itertools.count():
            with contextlib.suppress(Exception):
                self.read_clock(seq)
            gevent.sleep(CLOCK_EVERY_S)

    def offset_at(self, when: float) -> tuple[float, int]:
        """FreeSWITCH's stamp minus our time around `when` (median of the readings within CLOCK_WINDOW_S), and
        how many readings that is."""
        near = [off for t, off in self.clock if abs(t - when) <= CLOCK_WINDOW_S]
        return (float(np.median(near)), len(near)) if near else (0.0, 0)


class HubLag:
    """How late a 5 ms sleep wakes up on the gevent hub the daemon, the fake and the callers share: a stall
    here delays the daemon's work too (what it sends, and its timeline marks)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (our time, how late in s)
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            t0 = time.time()
            gevent.sleep(HUB_TICK_S)
            now = time.time()
            self.samples.append((now, now - t0 - HUB_TICK_S))

    def stop(self) -> None:
        self._greenlet.kill(block=True, timeout=5)

    def worst(self, start: float, end: float) -> float:
        """The longest stall (ms) that ended between start and end (our time)."""
        return round(1000.0 * max((lag for t, lag in self.samples if start <= t <= end), default=0.0), 1)

    def pct(self, q: float) -> float | None:
        return pct([lag * 1000.0 for _t, lag in self.samples], q)


# ---- one call ------------------------------------------------------------------------------------------------


@dataclass
class Taken:
    """What one call left: its recording, the daemon's timeline for it, and what went wrong on the way."""

    name: str
    caller: Caller | None = None
    rec: Recording | None = None
    timeline: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    start_time: float = 0.0
    hangup_at: float = 0.0  # wall clock
    outcome: str = ""
    clock_offset: tuple[float, int] = (0.0, 0)  # FreeSWITCH's clock - ours when the caller's audio started
    hub_stall_ms: dict[str, float] = field(default_factory=dict)  # the worst hub stall around each mark
    errors: list[str] = field(default_factory=list)


def _marks(timeline: list, name: str) -> list[float]:
    return [t for t, n, _d in timeline if n == name]


def _played_out(call: Any) -> bool:
    """The answer after the barge-in has arrived and the daemon has nothing more to play."""
    ss = _marks(call.timeline, "speech_started")
    if len(ss) < 2 or not [t for t in _marks(call.timeline, "engine_first_audio") if t > ss[1]]:
        return False
    player = getattr(call.media, "player", None)
    return player is not None and not player.playing


def one_call(daemon: Any, switch: FreeSwitch, probe: Probe, workdir: Path, name: str) -> Taken:
    taken = Taken(name)
    caller = taken.caller = Caller(switch, probe, workdir, CALLER_AUDIO, name=name)
    try:
        caller.dial(timeout=20)
    except Exception as exc:
        taken.errors.append(f"dial: {exc}")
        return taken
    call = None
    try:
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 10, "the daemon to take the call")
        wait_until(lambda: _played_out(call), CALL_LIMIT_S, "the last reply to be played out")
        gevent.sleep(TAIL_S)
    except Exception as exc:
        taken.errors.append(str(exc))
    try:
        taken.hangup_at = time.time()
        caller.hang_up()
        caller.wait_gone(15)
        if call is not None:
            wait_until(lambda: call.gone.is_set(), 10, "the daemon to see the hangup")
        taken.rec = caller.recording(15)
    except Exception as exc:
        taken.errors.append(f"hangup/recording: {exc}")
    if call is not None:
        taken.timeline = list(call.timeline)
        taken.start_time = call.record.start_time
        taken.outcome = call.outcome or call.record.outcome
    return taken


# ---- what the caller heard -------------------------------------------------------------------------------------


def classify(ear: np.ndarray, rate: int) -> np.ndarray:
    """Per sample: the index of the reply tone its 10 ms window is nearest to, or -1 in a window without sound."""
    n = int(WINDOW_S * rate)
    windows = len(ear) // n
    x = ear[: windows * n].astype(np.float64).reshape(windows, n)
    t = np.arange(n) / rate
    probes = np.exp(-2j * np.pi * np.outer(TONES_HZ, t))  # (tones, n)
    labels = np.argmax(np.abs(x @ probes.T), axis=1)
    labels[~(np.abs(x) >= SILENT).any(axis=1)] = -1
    out = np.full(len(ear), -1)
    out[: windows * n] = np.repeat(labels, n)
    return out


def analyse(taken: Taken) -> dict[str, Any]:
    out: dict[str, Any] = {"call": taken.name, "outcome": taken.outcome, "problems": list(taken.errors),
                           "hub_stall_ms": taken.hub_stall_ms}
    rec, caller = taken.rec, taken.caller
    if rec is None or caller is None or not taken.timeline:
        out["problems"].append("no recording or no timeline")
        return out
    rate = rec.rate

    # Caller.at() aligns from FreeSWITCH's stamp of the caller's audio starting; put that stamp on our clock
    offset, readings = taken.clock_offset
    out["fs_clock_offset_ms"] = round(offset * 1000.0, 1)
    if not readings:
        out["problems"].append("no reading of FreeSWITCH's clock near the call's start")

    def rec_at(wall: float) -> float:
        return caller.at(wall) - offset

    def on_rec(t: float) -> float:
        return rec_at(taken.start_time + t)

    ss = _marks(taken.timeline, "speech_started")
    fa = _marks(taken.timeline, "engine_first_audio")
    barge = _marks(taken.timeline, "barge_in")
    # the recording's clock (aligned from the caller's own audio) against the timeline's: the engine's VAD hears the
    # caller after its audio went through the fork, so each speech_started mark must come after the caller's onset
    out["marks_s"] = {name: [round(on_rec(t), 3) for t in _marks(taken.timeline, name)] for name in MARKS}
    out["marks_s"]["hangup"] = [round(rec_at(taken.hangup_at), 3)]
    said = rec.said()
    out["said_s"] = [[round(p.start, 3), round(p.end, 3)] for p in said]
    out["vad_lag_ms"] = [round((on_rec(t) - p.start) * 1000.0, 1) for t, p in zip(ss, said, strict=False)]
    if any(lag < -ALIGN_SLACK_MS for lag in out["vad_lag_ms"]):
        out["problems"].append(f"speech_started before the caller spoke on the recording's clock "
                               f"({out['vad_lag_ms']} ms): clock alignment suspect")
    if len(ss) != 2:
        out["problems"].append(f"{len(ss)} speech_started marks (expected 2)")
        if len(ss) < 2:
            return out
    s1, s2 = ss[0], ss[1]
    if any(t < s2 for t in barge):
        out["problems"].append("barge-in before the talk-over (the question cut the greeting)")
    if not [t for t in barge if t >= s2]:
        out["problems"].append("no barge_in mark after the talk-over")
    marks = {"greeting": [t for t in fa if t < s1], "reply": [t for t in fa if s1 < t < s2],
             "after": [t for t in fa if t > s2]}
    labels = classify(rec.ear, rate)
    out["first_audio_ms"], out["max_hole_ms"], out["holes_ms"], out["heard_ms"] = {}, {}, [], {}
    out["heard_s"], out["hole_at_ms"] = {}, {}
    for k, kind in enumerate(KINDS):
        ear = np.where(labels == k, rec.ear, 0)
        loud = np.flatnonzero(np.abs(ear.astype(np.int32)) >= SILENT)
        mark = on_rec(marks[kind][0]) if marks[kind] else None
        body = [p for p in pieces(ear, rate, JOIN_S) if p.seconds >= 0.03]  # not a stray window
        if not body:
            out["problems"].append(f"{kind} ({TONES_HZ[k]:.0f} Hz) never heard")
            continue
        first = int(round(body[0].start * rate))
        if mark is not None:
            out["first_audio_ms"][kind] = round((first / rate - mark) * 1000.0, 1)
        if kind != "reply":
            end = int(loud[-1]) + 1
        else:
            talk = on_rec(s2)
            until = max(talk, body[0].start)
            cut_piece = [p for p in body if p.start <= until][-1]
            end = int(round(cut_piece.end * rate))
            out["barge_in_ms"] = round((end / rate - talk) * 1000.0, 1)
            out["talkover_ms"] = round((talk - first / rate) * 1000.0, 1)
            after = np.abs(ear[end:].astype(np.int32)) >= SILENT
            out["after_cut_ms"] = round(float(np.count_nonzero(after)) / rate * 1000.0, 1)
            if out["talkover_ms"] < 0:
                out["problems"].append("the caller talked over the reply before it was heard")
        found = pieces(ear[first:end], rate, join_s=float("inf"))
        holes = [round(float(ms), 1) for p in found for _at, ms in p.holes]
        out["hole_at_ms"][kind] = [[round(w * 1000.0), round(float(ms), 1)] for p in found for w, ms in p.holes]
        out["holes_ms"].extend(holes)
        out["max_hole_ms"][kind] = max(holes, default=0.0)
        out["heard_ms"][kind] = round((end - first) / rate * 1000.0 - sum(holes), 1)  # sound, holes left out
        out["heard_s"][kind] = [round(first / rate, 3), round(end / rate, 3)]
    # replies played whole: how much of them the caller did not hear (holes that replaced audio rather than
    # delaying it; negative: more sound than was sent)
    out["missing_ms"] = {kind: round(length - out["heard_ms"][kind], 1)
                         for kind, length in (("greeting", LENGTHS_MS[0]), ("after", LENGTHS_MS[2]))
                         if kind in out["heard_ms"]}
    return out


# ---- one cell --------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(np.asarray(values, dtype=float), q)), 1)


def summarise(calls: list[dict[str, Any]]) -> dict[str, Any]:
    reply_max = [v for c in calls for v in c.get("max_hole_ms", {}).values()]
    holes = [h for c in calls for h in c.get("holes_ms", [])]
    first = [v for c in calls for v in c.get("first_audio_ms", {}).values()]
    barge = [c["barge_in_ms"] for c in calls if "barge_in_ms" in c]
    after = [c["after_cut_ms"] for c in calls if "after_cut_ms" in c]
    talk = [c["talkover_ms"] for c in calls if "talkover_ms" in c]
    missing = [v for c in calls for v in c.get("missing_ms", {}).values()]
    by_kind = {kind: [c["first_audio_ms"][kind] for c in calls if kind in c.get("first_audio_ms", {})]
               for kind in KINDS}
    outcomes: dict[str, int] = {}
    for c in calls:
        outcomes[c.get("outcome") or "?"] = outcomes.get(c.get("outcome") or "?", 0) + 1
    lags = [v for c in calls for v in c.get("vad_lag_ms", [])]
    offsets = [c["fs_clock_offset_ms"] for c in calls if "fs_clock_offset_ms" in c]
    return {
        "calls_ok": sum(1 for c in calls if not c["problems"]),
        "outcomes": outcomes,
        "playback_failed_marks": sum(len(c.get("marks_s", {}).get("playback_failed", [])) for c in calls),
        "vad_lag_ms": {"min": pct(lags, 0), "p50": pct(lags, 50), "max": pct(lags, 100)},
        "fs_clock_offset_ms": {"min": pct(offsets, 0), "p50": pct(offsets, 50), "max": pct(offsets, 100)},
        "holes_ms": {"max": pct(reply_max, 100), "p99": pct(reply_max, 99), "count": len(holes),
                     "replies": len(reply_max), "every_hole_p99": pct(holes, 99)},
        "first_audio_ms": {"p50": pct(first, 50), "p99": pct(first, 99), "max": pct(first, 100), "n": len(first),
                           "by_reply": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)}
                                        for k, v in by_kind.items()}},
        "barge_in_ms": {"p50": pct(barge, 50), "p99": pct(barge, 99), "max": pct(barge, 100), "n": len(barge)},
        "missing_ms": {"max": pct(missing, 100), "p50": pct(missing, 50), "min": pct(missing, 0)},
        "after_cut_ms": {"max": pct(after, 100), "calls": sum(1 for v in after if v > 0)},
        "talkover_ms": {"p50": pct(talk, 50), "min": pct(talk, 0), "max": pct(talk, 100)},
    }


@contextlib.contextmanager
def playback_mode(mode: str):
    """broadcast-chunked: the daemon without native files (the chunked path every codec took before)."""
    original = bridge.session.native_format
    if mode == "broadcast-chunked":
        bridge.session.native_format = lambda _codec, _rate: None
    try:
        yield
    finally:
        bridge.session.native_format = original


def run_cell(switch: FreeSwitch, mode: str, rate: int, pace: str, n: int, workdir: Path) -> dict[str, Any]:
    name = f"{mode} {rate // 1000}k {pace}"
    celldir = workdir / f"{mode}-{rate}-{pace}"
    celldir.mkdir(parents=True)
    fake = BenchFake(LENGTHS_MS, api_key=API_KEY).start()
    fake.tones = list(TONES_HZ)
    fake.delta_ms, fake.delta_interval = DELTA_MS, PACES[pace]
    probe = ClockProbe("127.0.0.1", switch.esl_port)
    clock = gevent.spawn(probe.keep_reading)
    hub = HubLag()
    started = time.monotonic()
    taken: list[Taken] = []
    try:
        playback = "stream" if mode == "stream" else "broadcast"
        path = write_config(celldir, switch.esl_port, ROUTE.format(rate=rate, playback=playback),
                            engines=ENGINE.format(url=fake.url, key=API_KEY), extra=LOGGING,
                            esl_password=PASSWORD)
        with playback_mode(mode), running_daemon(load(path)) as daemon:
            jobs = [gevent.spawn(one_call, daemon, switch, probe, celldir, f"call{i}") for i in range(n)]
            gevent.joinall(jobs, timeout=CELL_LIMIT_S)
            for i, job in enumerate(jobs):
                if job.ready() and job.successful():
                    taken.append(job.value)
                else:
                    job.kill(block=True, timeout=5)
                    taken.append(Taken(f"call{i}", errors=[f"not done in {CELL_LIMIT_S:g} s: {job.exception}"]))
    finally:
        clock.kill(block=True, timeout=5)
        hub.stop()
        for t in taken:
            if t.caller is not None and t.caller.rec_t0:
                t.clock_offset = probe.offset_at(t.caller.said_from)
            for mark in ("engine_first_audio", "speech_started"):
                for i, m in enumerate(_marks(t.timeline, mark)):
                    wall = t.start_time + m
                    t.hub_stall_ms[f"{mark}{i}"] = hub.worst(wall - HUB_WINDOW_S, wall + HUB_WINDOW_S)
        with contextlib.suppress(Exception):
            probe.api("hupall NORMAL_CLEARING")
            wait_no_channels(probe, 10)
        probe.close()
        fake.stop()
    calls = [analyse(t) for t in taken]
    result = {"cell": name, "mode": mode, "sample_rate": rate, "pace": pace, "delta_interval_s": PACES[pace],
              "calls": n, "seconds": round(time.monotonic() - started, 1)}
    result.update(summarise(calls))
    result["fs_clock_readings"] = len(probe.clock)
    result["hub_lag_ms"] = {"p50": hub.pct(50), "p99": hub.pct(99), "max": hub.pct(100)}
    result["per_call"] = calls
    return result


class LogTally(logging.Handler):
    """The in-process daemon's warnings and errors, counted per message instead of interleaved with the table."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.name, str(record.msg)))

    def since(self, start: int) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str, str], int] = {}
        for key in self.records[start:]:
            counts[key] = counts.get(key, 0) + 1
        return [{"level": level, "logger": name, "message": msg, "count": n}
                for (level, name, msg), n in counts.items()]


# ---- report ----------------------------------------------------------------------------------------------------

COLUMNS = (("cell", 31), ("ok", 5), ("holes max/p99", 13), ("#holes", 6), ("missing max", 11),
           ("first audio p50/p99", 19), ("barge-in p50/p99", 16), ("after cut", 9), ("talk-over", 9))
HEADER = " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _pair(d: dict[str, Any], a: str, b: str) -> str:
    return f"{_f(d[a])}/{_f(d[b])}"


def row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['cell']:<31} failed: {r['error']}"
    cells = (r["cell"], f"{r['calls_ok']}/{r['calls']}", _pair(r["holes_ms"], "max", "p99"),
             str(r["holes_ms"]["count"]), _f(r["missing_ms"]["max"]), _pair(r["first_audio_ms"], "p50", "p99"),
             _pair(r["barge_in_ms"], "p50", "p99"), _f(r["after_cut_ms"]["max"]), _f(r["talkover_ms"]["p50"]))
    return " ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, (_n, w)) in enumerate(zip(cells, COLUMNS,
                                                                                                strict=True)))


def notes(r: dict[str, Any]) -> list[str]:
    """What a row does not show: calls with problems, how the daemon saw the calls end, playbacks it saw fail."""
    calls = r.get("per_call", [])
    out = []
    problems = [f"{c['call']}: {', '.join(c['problems'])}" for c in calls if c["problems"]]
    if problems:
        out.append(f"{len(problems)} call(s) with problems; " + "; ".join(problems[:3])
                   + (" ..." if len(problems) > 3 else ""))
    if set(r.get("outcomes", {})) - {"completed"}:
        out.append(f"outcomes as the daemon recorded them: {r['outcomes']}")
    lag, hub = r.get("vad_lag_ms", {}), r.get("hub_lag_ms", {})
    if (hub.get("max") or 0) > HUB_NOTE_MS or (lag.get("max") or 0) > VAD_LAG_NOTE_MS:
        out.append(f"speech_started came {_f(lag.get('min'))}..{_f(lag.get('max'))} ms after the caller's onset on "
                   f"the recording; the shared gevent hub stalled up to {_f(hub.get('max'))} ms (p99 "
                   f"{_f(hub.get('p99'))} ms)")
    for entry in r.get("daemon_log", []):
        out.append(f"daemon log: {entry['count']}x {entry['level']} {entry['logger']}: {entry['message']}")
    failed = [round((t - c["marks_s"]["hangup"][0]) * 1000.0) for c in calls
              for t in c.get("marks_s", {}).get("playback_failed", [])]
    if failed:
        out.append(f"{len(failed)} playback_failed mark(s), at {sorted(failed)} ms from our hangup")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="forkbridge real-switch bench (see the module docstring)")
    p.add_argument("--calls", type=int, default=10, help="concurrent calls per cell")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated playback modes")
    p.add_argument("--rates", default="8000,16000")
    p.add_argument("--paces", default=",".join(PACES))
    p.add_argument("--out", default=str(ROOT / "bench/results.json"))
    p.add_argument("--keep", action="store_true", help="keep the work dir (recordings, switch logs, configs)")
    args = p.parse_args()
    out = Path(args.out)
    prefix, why = find_prefix()
    if prefix is None:
        print(f"real-switch bench skipped: {why}", flush=True)
        merge_results(out, "realswitch", {"skipped": why, "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return 0
    modes = [m for m in args.modes.split(",") if m]
    rates = [int(r) for r in args.rates.split(",") if r]
    paces = [x for x in args.paces.split(",") if x]
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(paces) - set(PACES))
    if unknown:
        p.error(f"unknown mode/pace: {', '.join(unknown)}")
    builds = {"mod": [m for m in modes if m != "stream"], "mod-jambonz": [m for m in modes if m == "stream"]}
    skipped: list[str] = []
    for build, wanted in list(builds.items()):
        if wanted and not (prefix / build).is_dir():
            skipped.append(f"{', '.join(wanted)}: {prefix / build} missing")
            builds[build] = []
    workdir = Path(tempfile.mkdtemp(prefix="forkbridge-bench-rs-"))
    started = time.monotonic()
    print(f"forkbridge real-switch bench: FreeSWITCH from {why}; {args.calls} concurrent calls per cell; "
          f"greeting {LENGTHS_MS[0]} ms, reply {LENGTHS_MS[1]} ms talked over, answer {LENGTHS_MS[2]} ms; "
          f"figures in ms from the caller's recording", flush=True)
    for line in skipped:
        print(f"skipped {line}", flush=True)
    tally = LogTally()
    logging.getLogger().addHandler(tally)  # and so no stderr handler of logging.basicConfig's
    switches: dict[str, FreeSwitch] = {}
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for build, wanted in builds.items():
            if wanted:
                switches[build] = FreeSwitch(prefix, workdir, build, name=build)
        starting = [gevent.spawn(s.start) for s in switches.values()]
        gevent.joinall(starting, timeout=120)
        if not all(job.successful() for job in starting):
            gevent.killall(starting, timeout=5)
            why_not = [str(job.exception or "timed out") for job in starting if not job.successful()]
            raise RuntimeError(f"FreeSWITCH did not start: {'; '.join(why_not)}")
        print(HEADER, flush=True)
        for mode in modes:
            build = "mod-jambonz" if mode == "stream" else "mod"
            if mode not in builds[build]:
                continue
            switch = switches[build]
            for rate in rates:
                for pace in paces:
                    logged = len(tally.records)
                    try:
                        r = run_cell(switch, mode, rate, pace, args.calls, workdir)
                    except Exception as exc:  # one broken cell must not hide the others
                        failed = True
                        r = {"cell": f"{mode} {rate // 1000}k {pace}", "error": f"{type(exc).__name__}: {exc}"}
                    r["daemon_log"] = tally.since(logged)
                    results.append(r)
                    print(row(r), flush=True)
    finally:
        for s in switches.values():
            with contextlib.suppress(Exception):
                s.stop()
        if args.keep:
            print(f"work dir kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = round(time.monotonic() - started, 1)
    for r in results:
        for line in notes(r):
            print(f"  {r['cell']}: {line}", flush=True)
    print(f"took {elapsed} s", flush=True)
    merge_results(out, "realswitch", {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "freeswitch": why,
                        "calls_per_cell": args.calls, "elapsed_s": elapsed, "skipped": skipped, "cells": results})
    print(f"wrote realswitch into {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
