"""The echo engine: VAD turns, the caller's own audio back at 24 kHz, barge-in, DTMF tones, greeting, lifecycle."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
import gevent.event
import numpy as np
import pytest

from bridge.audio import Converter
from bridge.echo import DTMF_FREQS, EchoEngine, dtmf_digits
from bridge.engine import (
    PCM16,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    EngineEvent,
    EngineFormats,
    EngineRefused,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
)

RATE = 24000
WAIT = 10.0  # upper bound for any wait; never a timing assertion


class Collector:
    """Event sink that records events and lets a test wait (bounded) for a condition on them."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.on_event: Callable[[EngineEvent], None] | None = None
        self._changed = gevent.event.Event()

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        self._changed.set()
        if self.on_event is not None:
            self.on_event(event)

    def wait_for(self, predicate: Callable[[list[EngineEvent]], bool], what: str) -> None:
        with gevent.Timeout(WAIT, AssertionError(f"timed out waiting for {what}; got {self.kinds()}")):
            while not predicate(self.events):
                self._changed.clear()
                self._changed.wait()

    def wait_closed(self) -> Closed:
        self.wait_for(lambda evs: any(isinstance(e, Closed) for e in evs), "Closed")
        closed = [e for e in self.events if isinstance(e, Closed)]
        assert len(closed) == 1 and self.events[-1] is closed[0], self.kinds()
        return closed[0]

    def done(self, response_id: str | None = None) -> list[ResponseDone]:
        return [e for e in self.events if isinstance(e, ResponseDone) and response_id in (None, e.response_id)]

    def wait_done(self, count: int = 1) -> list[ResponseDone]:
        self.wait_for(lambda evs: len(self.done()) >= count, f"{count} ResponseDone")
        return self.done()

    def audio(self, response_id: str) -> bytes:
        return b"".join(e.audio for e in self.events if isinstance(e, AudioOut) and e.response_id == response_id)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


def call_info(greeting: str = "", rate: int = 16000) -> CallInfo:
    return CallInfo(uuid="c0ffee00-0000-4000-8000-000000000001", did="7100", caller_id="+4930123456",
                    sample_rate=rate, greeting=greeting)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., tuple[EchoEngine, Collector]]]:
    engines: list[EchoEngine] = []

    def make(config: Mapping[str, Any] | None = None, greeting: str = "", connect: bool = True) -> tuple[
        EchoEngine, Collector
    ]:
        sink = Collector()
        engine = EchoEngine(config or {}, call_info(greeting), sink)
        engines.append(engine)
        if connect:
            engine.connect()
        return engine, sink

    yield make
    for engine in engines:
        engine.close()


def tone(freq: float, seconds: float, amplitude: float = 0.3, rate: int = RATE) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype("<i2").tobytes()


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * int(rate * seconds))


def feed(engine: EchoEngine, data: bytes, sizes: tuple[int, ...] = (960,)) -> None:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        engine.send_audio(data[pos : pos + n])
        pos += n
        i += 1


def peaks_hz(pcm: bytes, rate: int, count: int = 1) -> list[float]:
    """The `count` strongest spectral peaks (at least 100 Hz apart), lowest first."""
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    found: list[float] = []
    for idx in np.argsort(spectrum)[::-1]:
        if all(abs(freqs[idx] - f) > 100 for f in found):
            found.append(float(freqs[idx]))
        if len(found) == count:
            break
    return sorted(found)


# ---- turns ----------------------------------------------------------------------------------------------------------


def test_formats_are_24k_pcm16_both_ways(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, _ = make_engine(connect=False)
    assert engine.formats is None
    engine.connect()
    assert engine.formats == EngineFormats(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 24000))
    assert EchoEngine.type_name == "echo"


def test_utterance_is_echoed_back_sample_for_sample(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    utterance = tone(440, 0.8)
    feed(engine, silence(0.3) + utterance + silence(1.0), sizes=(960, 501, 1234, 3))
    (done,) = sink.wait_done()
    assert done.status == "completed"
    kinds = sink.kinds()
    assert kinds[:2] == ["SpeechStarted", "SpeechStopped"] and kinds[-1] == "ResponseDone"
    assert set(kinds[2:-1]) == {"AudioOut"}
    chunks = [e for e in sink.events if isinstance(e, AudioOut)]
    assert all(e.response_id == done.response_id for e in chunks)
    assert all(0 < len(e.audio) <= 4800 and len(e.audio) % 2 == 0 for e in chunks)  # <= 100 ms at 24 kHz
    reply = sink.audio(done.response_id)
    assert utterance in reply  # the caller's own samples, untouched
    assert 0.8 <= len(reply) / 48000 <= 0.8 + 0.2 + 0.2 + 0.06  # + pre-roll, kept tail, start detection
    assert peaks_hz(reply, RATE) == [pytest.approx(440, abs=2)]
    assert engine.responses == [done.response_id]


def test_two_utterances_get_two_fresh_responses(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    feed(engine, tone(440, 0.3) + silence(0.8))
    sink.wait_done(1)  # a caller in real time speaks again long after a faster-than-real-time reply went out
    feed(engine, tone(660, 0.3) + silence(0.8))
    first, second = sink.wait_done(2)
    assert first.response_id != second.response_id
    assert peaks_hz(sink.audio(first.response_id), RATE) == [pytest.approx(440, abs=3)]
    assert peaks_hz(sink.audio(second.response_id), RATE) == [pytest.approx(660, abs=3)]
    assert sink.kinds().count("SpeechStarted") == 2 and sink.kinds().count("SpeechStopped") == 2


def test_full_path_through_16k_call_converters(make_engine) -> None:  # type: ignore[no-untyped-def]
    """Caller L16 16 kHz -> 24 kHz engine -> back to 16 kHz: the caller hears their 440 Hz tone."""
    engine, sink = make_engine()
    assert engine.formats is not None
    up = Converter.to_engine(16000, engine.formats.input)
    down = Converter.from_engine(engine.formats.output, 16000)
    heard = bytearray()

    def bridge_side(event: EngineEvent) -> None:
        if isinstance(event, AudioOut):
            heard.extend(down.convert(event.audio))
        elif isinstance(event, ResponseDone):
            heard.extend(down.flush())

    sink.on_event = bridge_side
    call_audio = silence(0.2, 16000) + tone(440, 0.6, rate=16000) + silence(1.0, 16000)
    for i in range(0, len(call_audio), 640):  # 20 ms L16 16 kHz frames, as mod_audio_fork sends them
        engine.send_audio(up.convert(call_audio[i : i + 640]))
    sink.wait_done()
    assert peaks_hz(bytes(heard), 16000) == [pytest.approx(440, abs=3)]
    assert 0.6 <= len(heard) / 32000 <= 1.1


def test_quiet_audio_and_clicks_do_not_start_speech(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine({"vad_threshold_db": -40})
    feed(engine, tone(440, 0.5, amplitude=0.005))  # about -49 dBFS: below the threshold
    feed(engine, silence(0.1) + tone(440, 0.02) + silence(0.5))  # one 20 ms click
    engine.close()
    sink.wait_closed()
    assert sink.kinds() == ["Closed"]


def test_threshold_and_silence_are_configurable(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine({"vad_threshold_db": "-55dB", "silence_ms": "200ms"})
    # -49 dBFS speech counts at -55 dB; a 300 ms pause ends the turn at 200 ms
    feed(engine, tone(440, 0.3, amplitude=0.005) + silence(0.3))
    assert [d.status for d in sink.wait_done(1)] == ["completed"]
    assert engine.vad_threshold_db == -55.0 and engine.silence_ms == 200.0


def test_max_utterance_cuts_a_long_turn(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine({"max_utterance_s": 0.5})
    feed(engine, tone(440, 0.8))  # cut at 0.5 s; the rest is the start of the next turn
    sink.wait_for(lambda evs: any(isinstance(e, SpeechStopped) for e in evs), "SpeechStopped")
    (done,) = sink.wait_done()
    assert len(sink.audio(done.response_id)) == 0.5 * 48000


# ---- barge-in -------------------------------------------------------------------------------------------------------


def test_caller_talking_over_the_reply_interrupts_it(make_engine) -> None:  # type: ignore[no-untyped-def]
    """The bridge's part is played by the sink: it stops playback on SpeechStarted and calls interrupt()."""
    engine, sink = make_engine()
    gate = gevent.event.Event()
    playing: list[str] = []

    def bridge_side(event: EngineEvent) -> None:
        if isinstance(event, AudioOut) and not playing:
            playing.append(event.response_id)
            gate.wait(WAIT)  # the sink is busy (e.g. writing a spool file) while the caller talks over it
        elif isinstance(event, SpeechStarted) and playing:
            engine.interrupt(playing[-1], 40)

    sink.on_event = bridge_side
    feed(engine, tone(440, 1.5) + silence(0.8))
    sink.wait_for(lambda evs: any(isinstance(e, AudioOut) for e in evs), "first AudioOut")
    feed(engine, tone(660, 0.4))  # the caller starts again while the reply is still being delivered
    gate.set()
    feed(engine, silence(0.8))
    first, second = sink.wait_done(2)

    r1 = playing[0]
    assert (first.response_id, first.status) == (r1, "cancelled")
    assert engine.interruptions == [(r1, 40)]
    barge = max(i for i, e in enumerate(sink.events) if isinstance(e, SpeechStarted))
    assert not any(isinstance(e, AudioOut) and e.response_id == r1 for e in sink.events[barge:])
    assert len(sink.audio(r1)) < len(tone(440, 1.5))  # it was cut short
    assert (second.status, peaks_hz(sink.audio(second.response_id), RATE)) == ("completed", [pytest.approx(660, abs=3)])


def test_interrupt_from_inside_the_sink_stops_at_once(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    sink.on_event = lambda e: engine.interrupt(e.response_id, None) if isinstance(e, AudioOut) else None
    feed(engine, tone(440, 1.0) + silence(0.8))
    (done,) = sink.wait_done()
    assert done.status == "cancelled"
    assert sink.kinds().count("AudioOut") == 1
    assert engine.interruptions == [(done.response_id, None)]
    engine.close()
    sink.wait_closed()
    assert len(sink.done()) == 1  # exactly one ResponseDone for the response


def test_interrupting_a_finished_response_is_only_recorded(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    feed(engine, tone(440, 0.3) + silence(0.8))
    (done,) = sink.wait_done()
    engine.interrupt(done.response_id, 250)  # the bridge was still playing it when the caller spoke
    engine.close()
    sink.wait_closed()
    assert engine.interruptions == [(done.response_id, 250)]
    assert [d.status for d in sink.done()] == ["completed"]


# ---- text, greeting, tools ------------------------------------------------------------------------------------------


def test_dtmf_text_is_answered_with_its_tones(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    engine.send_text("5")
    (done,) = sink.wait_done()
    assert done.status == "completed"
    assert engine.texts_received == ["5"]
    reply = sink.audio(done.response_id)
    assert reply
    low, high = peaks_hz(reply, RATE, count=2)
    assert (low, high) == (pytest.approx(DTMF_FREQS["5"][0], abs=8), pytest.approx(DTMF_FREQS["5"][1], abs=8))


def test_several_digits_and_plain_text(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    engine.send_text("12#")
    sink.wait_done(1)
    engine.send_text("operator please")  # no digits: still an audible answer
    second = sink.wait_done(2)[1]
    first_audio = sink.audio(sink.done()[0].response_id)
    assert len(first_audio) == 3 * (150 + 60) * 48  # three 150 ms tones with 60 ms gaps
    assert peaks_hz(sink.audio(second.response_id), RATE) == [pytest.approx(523, abs=5)]
    assert engine.texts_received == ["12#", "operator please"]


def test_new_response_supersedes_the_one_in_progress(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    sink.on_event = lambda e: engine.send_text("9") if isinstance(e, AudioOut) and not engine.texts_received else None
    feed(engine, tone(440, 1.0) + silence(0.8))
    first, second = sink.wait_done(2)
    assert (first.status, second.status) == ("cancelled", "completed")
    after = sink.events[sink.events.index(first):]
    assert not any(isinstance(e, AudioOut) and e.response_id == first.response_id for e in after)


def test_greeting_is_a_chime(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine(greeting="Hello, this is the line check.")
    engine.greet()
    (done,) = sink.wait_done()
    reply = sink.audio(done.response_id)
    assert len(reply) == 0.4 * 48000
    assert peaks_hz(reply, RATE, count=2) == [pytest.approx(659, abs=5), pytest.approx(880, abs=5)]
    assert engine.texts_received == []


def test_no_greeting_no_sound(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    engine.greet()
    engine.close()
    sink.wait_closed()
    assert sink.kinds() == ["Closed"]


def test_tool_results_are_recorded(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, _ = make_engine()
    engine.tool_result("t1", {"ok": True})
    engine.tool_result("t2", {"error": "no such target"}, is_error=True)
    assert engine.tool_results == [("t1", {"ok": True}, False), ("t2", {"error": "no such target"}, True)]


# ---- lifecycle ----------------------------------------------------------------------------------------------------


def test_close_is_idempotent_and_final(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    engine.close()
    engine.close()
    closed = sink.wait_closed()
    assert (closed.reason, closed.clean) == ("normal", True)
    engine.send_text("1")
    feed(engine, tone(440, 0.5) + silence(0.8))
    engine.close()
    engine.send_text("2")
    # anything queued after Closed would arrive through the same dispatcher; it has finished
    dispatcher = engine._dispatcher
    assert dispatcher is not None and dispatcher.join(WAIT) is None and dispatcher.dead
    assert sink.kinds() == ["Closed"]


def test_close_during_a_reply_cancels_it_then_closes(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()
    sink.on_event = lambda e: engine.close() if isinstance(e, AudioOut) else None
    feed(engine, tone(440, 1.0) + silence(0.8))
    sink.wait_closed()
    assert sink.kinds()[-2:] == ["ResponseDone", "Closed"]
    assert sink.done()[0].status == "cancelled"
    assert sink.kinds().count("AudioOut") == 1


def test_a_failing_sink_does_not_stop_delivery(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine()

    def explode(event: EngineEvent) -> None:
        if isinstance(event, AudioOut):
            raise RuntimeError("bridge bug")

    sink.on_event = explode
    feed(engine, tone(440, 0.3) + silence(0.8))
    assert [d.status for d in sink.wait_done()] == ["completed"]


def test_close_before_connect_still_reports_closed(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine(connect=False)
    engine.close()
    assert sink.wait_closed().reason == "normal"


@pytest.mark.parametrize("value", [True, "true", "yes"])
def test_refuse(make_engine, value: object) -> None:  # type: ignore[no-untyped-def]
    engine, _ = make_engine({"refuse": value}, connect=False)
    with pytest.raises(EngineRefused, match="refuse"):
        engine.connect()
    assert engine.formats is None


def test_bad_config_value_refuses_with_the_key_name(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, _ = make_engine({"vad_threshold_db": "loud"}, connect=False)
    with pytest.raises(EngineRefused, match="vad_threshold_db"):
        engine.connect()
    engine, _ = make_engine({"silence_ms": "2 parsecs"}, connect=False)
    with pytest.raises(EngineRefused, match="silence_ms"):
        engine.connect()


def test_drop_after_emits_an_unclean_close(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, sink = make_engine({"drop_after_s": "50ms"})
    closed = sink.wait_closed()
    assert (closed.reason, closed.clean) == ("dropped", False)
    engine.close()  # the bridge closes after a drop: no second Closed
    feed(engine, tone(440, 0.5) + silence(0.8))
    assert engine._dispatcher is not None and engine._dispatcher.join(WAIT) is None
    assert sink.kinds() == ["Closed"]


@pytest.mark.parametrize(
    ("text", "digits"),
    [("5", "5"), ("12#", "12#"), ("a b * d", "AB*D"), ("The caller pressed 4 then #", "4#"), ("DTMF", "")],
)
def test_dtmf_digits(text: str, digits: str) -> None:
    assert dtmf_digits(text) == digits
