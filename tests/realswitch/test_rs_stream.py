"""On the real switch: replies streamed back over the fork's WebSocket (jambonz build), and mod_audio_stream.

`playback: stream` sends the engine's audio as binary L16 frames back to the jambonz mod_audio_fork, which mixes
them into what the forked (parked) leg writes: the leg needs a writer (the daemon's unlocked
`playback silence_stream://-1`), and barge-in is a `killAudio` that empties the module's playout buffer and also
breaks that writer, so the daemon must start a new one before the next reply. Each scenario is judged from a
stereo recording of the caller's leg: the right pitch (the stream's sample rate is the one the module was told),
whole replies, the cut on barge-in, the next reply after it. mod_audio_stream cannot stream back: its route
plays by broadcast.

Timing figures (first-audio delay, holes, barge-in stop time) are kept as test properties (see them with
`--junitxml=x.xml -o junit_family=legacy`); the asserts only separate right from wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from controller.config import Config, load_config
from fsim.audio import Signal, Silence, Tone
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import running_daemon, wait_until, write_config
from tests.realswitch.caller import Caller
from tests.realswitch.heard import SILENT, Piece, Recording
from tests.realswitch.switch import PASSWORD, FreeSwitch, Probe

BARGE_IN_S = 0.15  # nothing of the interrupted reply is heard later than this after the caller starts talking
HOLE_LIMIT_MS = 25.0  # a hole a caller would notice
PITCH_HZ = 15.0
JOIN_S = 0.1  # pieces: sound separated by more silence than this (a reply's own holes must stay under 25 ms)
FIRST_AUDIO_BOUND_S = 1.0  # engine audio not heard within this is a missing writer or a stuck buffer, not latency

ECHO_ROUTE = """
- name: line-check
  did: "7100"
  engine: echo
  module: {module}
  sample_rate: {rate}
  playback: {playback}
  no_audio_timeout: 20s
"""

OPENAI_KEY_ENV = "FB_TEST_OPENAI_API_KEY"
OPENAI_KEY = "sk-test-realswitch-0123456789"
GREETING_HZ, REPLY_HZ = 300.0, 700.0  # the fake's tone per response, in order
CALLER_HZ = 440.0
OPENAI_ROUTE = """
- name: desk
  did: "7100"
  engine: bot
  sample_rate: 16000
  playback: stream
  greeting: "Thanks for calling. How can I help?"
  instructions: "Be brief."
  no_audio_timeout: 20s
"""

STALE_LIMIT_S = 0.005  # more of an earlier reply than this, heard inside a later one, is a defect
# (The jambonz module keeps what it receives in a pre-buffer until a threshold and killAudio never empties it;
# the daemon sends batches of at least the threshold and pads each reply's end: docs/playback.md.)


# ---- helpers -----------------------------------------------------------------------------------------------------

def _config(tmp_path, switch: FreeSwitch, routes: str, engines: str = "",
            env: dict[str, str] | None = None) -> Config:
    path = write_config(tmp_path, switch.esl_port, routes, engines=engines, esl_password=PASSWORD)
    return load_config(str(path), env=env or {})


def _marks(call: Any, name: str) -> list[tuple[float, dict[str, Any]]]:
    return [(t, d) for t, n, d in call.timeline if n == name]


def _on_recording(caller: Caller, call: Any, t: float) -> float:
    """A timeline instant (seconds since the call record started) on the recording's clock."""
    return caller.at(call.record.start_time + t)


def _near(piece: Piece, hz: float) -> bool:
    return abs(piece.freq - hz) < PITCH_HZ


def _describe(rec: Recording) -> str:
    return ("heard: " + "; ".join(str(p) for p in rec.heard(JOIN_S)) + " | said: "
            + "; ".join(str(p) for p in rec.said()))


def _tone_heard(rec: Recording, hz: float, other: float, start: float, end: float | None = None,
                window_s: float = 0.01) -> tuple[float | None, float]:
    """Sound the caller heard in [start, end) that is `hz` rather than `other`: where it was first heard (s, or
    None) and how much of it (s, counting loud samples only)."""
    n = int(window_s * rec.rate)
    t = np.arange(n) / rec.rate
    probe_hz, probe_other = np.exp(-2j * np.pi * hz * t), np.exp(-2j * np.pi * other * t)
    first_at: float | None = None
    loud_samples = 0
    last = len(rec.ear) if end is None else min(len(rec.ear), int(end * rec.rate))
    for i in range(max(0, int(start * rec.rate)), last - n + 1, n):
        seg = rec.ear[i:i + n].astype(np.float64)
        loud = int(np.count_nonzero(np.abs(seg) >= SILENT))
        if loud and abs(seg @ probe_hz) > abs(seg @ probe_other):
            first_at = i / rec.rate if first_at is None else first_at
            loud_samples += loud
    return first_at, loud_samples / rec.rate


def _fork_event(caller: Caller, subclass: str, timeout: float = 5.0):
    return caller.wait(lambda e: e.uuid == caller.b and e.subclass == subclass, timeout, subclass)


def _writers(probe: Probe, uuid: str) -> list:
    """The silence writers started on the forked leg (one at the start, one after each killAudio)."""
    return probe.find(lambda e: e.name == "CHANNEL_EXECUTE" and e.uuid == uuid
                      and e.get("Application") == "playback" and e.get("Application-Data") == "silence_stream://-1")


def _first_audio_delays(caller: Caller, call: Any, pieces: list[Piece]) -> list[float]:
    """Per reply: from the engine's first audio (timeline) to the first sound heard after it (recording), in s.
    The two clocks agree to about a frame, so a piece starting just before the mark still counts."""
    delays = []
    for t, _d in _marks(call, "engine_first_audio"):
        at = _on_recording(caller, call, t)
        after = [p.start - at for p in pieces if p.start >= at - 0.05]
        delays.append(after[0] if after else float("inf"))
    return delays


def _ms(seconds: float) -> int:
    return round(float(seconds) * 1000)


def _echo_call(tmp_path, switch: FreeSwitch, probe: Probe, rate: int, module: str, playback: str,
               audio: Signal, replies: int) -> tuple[Caller, Any, Recording, list]:
    """One call to the echo route: wait for `replies` echoes to be played out, hang up, return what was heard."""
    config = _config(tmp_path, switch, ECHO_ROUTE.format(module=module, rate=rate, playback=playback))
    with running_daemon(config) as daemon:
        caller = Caller(switch, probe, tmp_path, audio).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: len(_marks(call, "engine_first_audio")) >= replies, 10, f"{replies} echo(es)")
        wait_until(lambda: call.media.player is not None and not call.media.player.playing, 10,
                   "the last echo to be played out")
        writers = _writers(probe, caller.b)
        caller.hang_up()
        caller.wait_gone()
        rec = caller.recording()
    return caller, call, rec, writers


# ---- 1. echo streamed back, at both stream rates -------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 16000])
def test_streamed_echo_at_pitch_cut_by_barge_in_then_streams_the_next_reply(tmp_path, jambonz, jprobe, rate,
                                                                             record_property):
    """The caller says 440 Hz, talks over its echo with 660 Hz (barge-in: killAudio), then hears the 660 Hz echo:
    the leg's writer must be back after killAudio broke it, or the second reply is never heard."""
    audio = Tone(440, 1.5, 0.3) + Silence(1.4) + Tone(660, 0.6, 0.3) + Silence(5.0)
    caller, call, rec, writers = _echo_call(tmp_path, jambonz, jprobe, rate, "audio_fork", "stream", audio, 2)

    said = rec.said()
    assert [round(p.freq / 10) * 10 for p in said] == [440, 660], _describe(rec)
    talks_over = said[1].start
    heard = [p for p in rec.heard(JOIN_S) if p.seconds >= 0.1]  # a stale fragment is judged below
    assert len(heard) == 2, _describe(rec)
    first, second = heard
    # pitch: the module plays the frames at the rate it was told, so the echo is what was said
    assert _near(first, 440) and _near(second, 660), _describe(rec)
    # barge-in: the echo was being heard when the caller spoke, and it stopped at once (killAudio)
    assert _marks(call, "barge_in"), "no barge-in in the call's timeline"
    kill = _fork_event(caller, "mod_audio_fork::kill_audio")
    assert first.start < talks_over < first.end, _describe(rec)
    assert first.end - talks_over <= BARGE_IN_S, f"the echo went on after the caller spoke: {_describe(rec)}"
    # after killAudio the leg has a writer again, and the second reply is heard whole, without holes
    assert len(writers) >= 2, f"no new writer after killAudio: {len(writers)} silence_stream playback(s)"
    assert abs(second.seconds - 0.6) < 0.1, _describe(rec)
    for piece in heard:
        assert piece.max_hole_ms <= HOLE_LIMIT_MS, _describe(rec)
    delays = _first_audio_delays(caller, call, heard)
    assert all(d < FIRST_AUDIO_BOUND_S for d in delays), _describe(rec)

    barge_in = _marks(call, "barge_in")[0][1]
    stale_at, stale_s = _tone_heard(rec, 440, 660, talks_over + BARGE_IN_S)
    kill_at = caller.at(int(kill.get("Event-Date-Timestamp")) / 1e6)
    record_property("first_audio_to_heard_ms", [_ms(d) for d in delays])
    record_property("barge_in_stop_after_caller_spoke_ms", _ms(first.end - talks_over))
    record_property("barge_in_stop_after_kill_audio_ms", _ms(first.end - kill_at))
    record_property("barge_in_played_ms_told_vs_heard_ms", [barge_in["played_ms"], _ms(first.seconds)])
    record_property("holes_ms", [[round(float(ms), 1) for _at, ms in p.holes] for p in heard])
    record_property("stale_440_heard_ms", _ms(stale_s))
    # nothing of the interrupted reply is heard later (the module's pre-buffer and resampler held none back)
    assert stale_s < STALE_LIMIT_S, f"the interrupted echo was heard again at {stale_at}: {_describe(rec)}"


# ---- 2. the OpenAI protocol, streamed back ---------------------------------------------------------------------------

@pytest.fixture
def openai_fake():
    fake = OpenAIFake(api_key=OPENAI_KEY).start()
    fake.tones = [GREETING_HZ, REPLY_HZ]
    fake.reply_ms = 1000
    yield fake
    fake.stop()


def test_openai_greeting_and_reply_streamed_at_their_tones(tmp_path, jambonz, jprobe, openai_fake,
                                                           record_property):
    """The engine greets (300 Hz) when the call starts and answers the caller (700 Hz): both streamed back at 16 kHz
    into an 8 kHz call and heard at their own pitch, whole."""
    engines = (f"bot: {{type: openai_realtime, url: '{openai_fake.url}', api_key: '${{{OPENAI_KEY_ENV}}}', "
               f"model: gpt-realtime, voice: alloy, connect_timeout: 3s, "
               f"turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")
    config = _config(tmp_path, jambonz, OPENAI_ROUTE, engines, env={OPENAI_KEY_ENV: OPENAI_KEY})
    with running_daemon(config) as daemon:
        caller = Caller(jambonz, jprobe, tmp_path, Silence(2.0) + Tone(CALLER_HZ, 0.6, 0.3) + Silence(5.0)).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: len(_marks(call, "engine_first_audio")) >= 2, 10, "the greeting and the reply")
        wait_until(lambda: not call.media.player.playing, 10, "the reply to be played out")
        caller.hang_up()
        caller.wait_gone()
        rec = caller.recording()

    assert not openai_fake.messages("error"), openai_fake.messages("error")
    said = rec.said()
    assert len(said) == 1 and abs(said[0].freq - CALLER_HZ) < PITCH_HZ, _describe(rec)
    heard = [p for p in rec.heard(JOIN_S) if p.seconds >= 0.1]
    assert len(heard) == 2, _describe(rec)
    greeting, reply = heard
    assert _near(greeting, GREETING_HZ) and _near(reply, REPLY_HZ), _describe(rec)
    assert greeting.end < said[0].start < reply.start, _describe(rec)  # a turn each: no barge-in here
    assert not _marks(call, "barge_in")
    for piece in heard:
        assert abs(piece.seconds - 1.0) < 0.12, f"a response was not heard whole: {_describe(rec)}"
        assert piece.max_hole_ms <= HOLE_LIMIT_MS, _describe(rec)
    delays = _first_audio_delays(caller, call, heard)
    assert all(d < FIRST_AUDIO_BOUND_S for d in delays), _describe(rec)

    late_at, late_s = _tone_heard(rec, GREETING_HZ, REPLY_HZ, greeting.end + 0.1)
    record_property("first_audio_to_heard_ms", [_ms(d) for d in delays])
    record_property("holes_ms", [[round(float(ms), 1) for _at, ms in p.holes] for p in heard])
    record_property("heard_ms", [_ms(p.seconds) for p in heard])
    record_property("greeting_tail_heard_late_ms", _ms(late_s))
    # the greeting's end was heard with the greeting, not held back until the reply pushed it out
    assert late_s < STALE_LIMIT_S, f"greeting audio heard late at {late_at}: {_describe(rec)}"


# ---- 3. mod_audio_stream, played by broadcast -----------------------------------------------------------------------

def test_audio_stream_8k_echo_heard_at_pitch_by_broadcast(tmp_path, drachtio, probe, record_property):
    """mod_audio_stream forks the caller's audio (8 kHz); it cannot stream back, so the echo is played by broadcast."""
    audio = Tone(440, 1.0, 0.3) + Silence(4.0)
    caller, call, rec, _ = _echo_call(tmp_path, drachtio, probe, 8000, "audio_stream", "broadcast", audio, 1)

    assert probe.find(lambda e: e.uuid == caller.b and e.subclass == "mod_audio_stream::connect"), \
        "mod_audio_stream never connected"
    assert not probe.find(lambda e: e.uuid == caller.b and e.subclass.startswith("mod_audio_fork::"))
    heard = rec.heard(JOIN_S)
    assert len(heard) == 1 and _near(heard[0], 440), _describe(rec)
    assert abs(heard[0].seconds - 1.0) < 0.15, _describe(rec)
    assert heard[0].max_hole_ms <= HOLE_LIMIT_MS, _describe(rec)
    assert _marks(call, "first_caller_audio") and _marks(call, "speech_stopped")
    record_property("first_audio_to_heard_ms", [_ms(d) for d in _first_audio_delays(caller, call, heard)])
    record_property("holes_ms", [round(float(ms), 1) for _at, ms in heard[0].holes])
