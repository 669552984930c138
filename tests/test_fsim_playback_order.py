"""fsim playback nesting: an execute queued without `event-lock: true` runs inside the playback that is running."""

from __future__ import annotations

import numpy as np
from fsim_helpers import RawESL

from bridge.audio import ulaw_encode
from fsim import CallerScript, FSim
from fsim.audio import Tone


def _tone(path, freq: float, seconds: float, rate: int = 8000) -> str:
    s = (np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * freq / rate) * 10000).astype("<i2")
    path.write_bytes(s.tobytes())
    return str(path)


def _files(tmp_path, seconds: float = 0.2) -> list[str]:
    return [_tone(tmp_path / f"{n}.r8", f, seconds) for n, f in (("a", 440), ("b", 700), ("c", 1000))]


def _sendmsg(sw: FSim, uuid: str, path: str, lock: bool) -> None:
    headers = {"call-command": "execute", "execute-app-name": "playback", "execute-app-arg": path}
    if lock:
        headers["event-lock"] = "true"
    assert sw.sendmsg(uuid, headers, b"") == "+OK"


def _paths(call, name: str) -> list[str]:
    return [e.get("Playback-File-Path") for e in call.events(name)]


def _heard(call) -> list[tuple[str, str]]:
    return [(s.source.removeprefix("broadcast:"), s.status) for s in call.ear.broadcasts()]


def test_unlocked_sendmsg_chunks_nest_newest_first(sw, tmp_path):
    a, b, c = _files(tmp_path)
    call = sw.place_call()
    assert call.wait_answered(2)
    for path in (a, b, c):
        _sendmsg(sw, call.uuid, path, lock=False)
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 3, 5)
    # a starts, parses the queue before its first frame and runs b inside itself; b does the same with c
    assert _paths(call, "PLAYBACK_START") == [a, b, c]
    assert _paths(call, "PLAYBACK_STOP") == [c, b, a]
    assert _heard(call) == [(c, "done"), (b, "done"), (a, "done")]
    assert all(abs(s.duration - 0.2) < 0.001 for s in call.ear.broadcasts())
    assert call.ear.max_gap() < 0.001  # sendmsg has no lead frames
    completes = [e.get("Application-Data") for e in call.events("CHANNEL_EXECUTE_COMPLETE")
                 if e.get("Application") == "playback"]  # fmt: skip
    assert completes == [c, b, a]


def test_locked_sendmsg_chunks_play_in_order(sw, tmp_path):
    a, b, c = _files(tmp_path)
    call = sw.place_call()
    assert call.wait_answered(2)
    for path in (a, b, c):
        _sendmsg(sw, call.uuid, path, lock=True)
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 3, 5)
    assert _paths(call, "PLAYBACK_START") == [a, b, c]
    assert _paths(call, "PLAYBACK_STOP") == [a, b, c]
    assert _heard(call) == [(a, "done"), (b, "done"), (c, "done")]
    # as on FreeSWITCH 1.10.12: the park loop reads one frame between two applications (docs/playback.md)
    assert [round(g.seconds, 3) for g in call.ear.gaps()] == [0.02, 0.02]


def test_a_native_file_plays_while_it_grows_and_ends_where_the_writer_stopped(sw, tmp_path):
    """A .PCMU file (the channel's codec) is read as it plays: appended audio is heard without a gap; when the
    reader reaches the end the playback ends (done) and playback_samples says how many bytes it read."""
    call = sw.place_call(rate=8000)
    assert call.wait_answered(2)
    path = tmp_path / "reply.PCMU"
    tone = ulaw_encode(Tone(500, 0.6).render(8000).astype("<i2").tobytes())
    path.write_bytes(tone[:1600])  # 200 ms
    _sendmsg(sw, call.uuid, str(path), lock=True)
    sw.wait_for(lambda: call.events("PLAYBACK_START"), 2)
    with open(path, "ab") as fh:
        fh.write(tone[1600:])  # the rest, while it plays
    sw.wait_for(lambda: call.events("PLAYBACK_STOP"), 3)
    (stop,) = call.events("PLAYBACK_STOP")
    assert stop.get("Playback-Status") == "done" and stop.get("variable_playback_samples") == str(len(tone))
    (segment,) = call.ear.broadcasts()
    assert abs(segment.duration - 0.6) < 0.021 and abs(segment.frequency() - 500) < 10
    assert np.max(np.abs(segment.samples)) > 5000


def test_event_lock_header_passes_through_esl_case_insensitively(sw, tmp_path):
    a, b, _c = _files(tmp_path)
    call = sw.place_call()
    assert call.wait_answered(2)
    esl = RawESL(sw.esl_port)
    try:
        esl.auth()
        for path in (a, b):
            esl.send(f"sendmsg {call.uuid}\ncall-command: execute\nexecute-app-name: playback\n"
                     f"execute-app-arg: {path}\nEvent-Lock: TRUE")  # fmt: skip
            assert ("Reply-Text", "+OK") in esl.read_frame()[0]
    finally:
        esl.close()
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 5)
    assert _paths(call, "PLAYBACK_STOP") == [a, b]  # unlocked, b would have played inside a


def test_unlocked_uuid_broadcasts_nest_newest_first(sw, tmp_path):
    a, b, c = _files(tmp_path)
    call = sw.place_call()
    assert call.wait_answered(2)
    for path in (a, b, c):
        assert sw.api(f"uuid_broadcast {call.uuid} {path} aleg") == "+OK Message sent\n"
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 3, 5)
    assert _paths(call, "PLAYBACK_START") == [a, b, c]
    assert _heard(call) == [(c, "done"), (b, "done"), (a, "done")]


def test_file_queued_while_one_plays_interrupts_it_and_the_outer_resumes(sw, tmp_path):
    a = _tone(tmp_path / "a.r8", 440, 1.0)
    b = _tone(tmp_path / "b.r8", 1000, 0.2)
    call = sw.place_call()
    assert call.wait_answered(2)
    _sendmsg(sw, call.uuid, a, lock=False)
    sw.wait_for(lambda: call.ear.heard_seconds() >= 0.2, 5)
    _sendmsg(sw, call.uuid, b, lock=True)
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 5)
    assert _heard(call) == [(a, "paused"), (b, "done"), (a, "done")]
    first, inner, rest = call.ear.broadcasts()
    assert abs(first.duration + rest.duration - 1.0) < 0.001  # the outer file lost nothing
    assert abs(first.frequency() - 440) < 15 and abs(inner.frequency() - 1000) < 15
    assert abs(rest.frequency() - 440) < 15
    assert np.array_equal(np.concatenate([first.samples, rest.samples]),
                          np.fromfile(a, "<i2"))  # fmt: skip


def _nested_stack_with_a_queued_chunk(sw, tmp_path):
    a = _tone(tmp_path / "a.r8", 440, 3.0)
    b = _tone(tmp_path / "b.r8", 700, 3.0)
    c = _tone(tmp_path / "c.r8", 1000, 0.2)
    call = sw.place_call()
    assert call.wait_answered(2)
    _sendmsg(sw, call.uuid, a, lock=False)  # the unlocked outer (like a silence writer)
    _sendmsg(sw, call.uuid, b, lock=True)  # nests inside a and holds the lock
    _sendmsg(sw, call.uuid, c, lock=True)  # waits in the queue until b's execute ends
    sw.wait_for(lambda: call.ear.heard_seconds() >= 0.1, 5)
    assert [p.path for p in call.stack] == [a, b] and [q.arg for q in call.queue] == [c]
    return call, a, b, c


def test_uuid_break_unwinds_every_nested_playback_and_keeps_the_queue(sw, tmp_path):
    call, a, b, c = _nested_stack_with_a_queued_chunk(sw, tmp_path)
    assert sw.api(f"uuid_break {call.uuid}") == "+OK\n"
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 3, 5)
    stops = [(e.get("Playback-File-Path"), e.get("Playback-Status")) for e in call.events("PLAYBACK_STOP")]
    assert stops == [(b, "break"), (a, "break"), (c, "done")]
    assert _heard(call) == [(b, "break"), (c, "done")]  # a was paused before its first frame


def test_uuid_break_all_unwinds_and_flushes(sw, tmp_path):
    call, a, b, c = _nested_stack_with_a_queued_chunk(sw, tmp_path)
    assert sw.api(f"uuid_break {call.uuid} all") == "+OK\n"
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 5)
    tick = call._tick
    sw.wait_for(lambda: call._tick > tick + 10, 2)
    assert _paths(call, "PLAYBACK_STOP") == [b, a]
    assert c not in _paths(call, "PLAYBACK_START") and not call.queue and not call.stack


def test_terminator_digit_stops_only_the_innermost_file(tmp_path):
    with FSim(dialplan_vars={"playback_terminators": "*"}, broadcast_lead_frames=0) as sw:
        a = _tone(tmp_path / "a.r8", 440, 0.6)
        b = _tone(tmp_path / "b.r8", 1000, 5.0)
        call = sw.place_call(script=CallerScript(dtmf=[("*", 0.5)]))
        assert call.wait_answered(2)
        sw.api(f"uuid_broadcast {call.uuid} {a}")
        sw.api(f"uuid_broadcast {call.uuid} {b}")
        sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 5)
        assert _heard(call) == [(b, "break"), (a, "done")]
        assert abs(call.ear.broadcasts()[1].duration - 0.6) < 0.001
