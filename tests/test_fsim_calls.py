"""fsim channels: dialplan, playback queue and the ear, DTMF, transfer, hangup."""

from __future__ import annotations

import numpy as np
import pytest

from fsim import CallerScript, FSim, SpeechLike, Tone
from fsim.audio import write_wav
from fsim.caller import parse_dtmf_spec, parse_seconds


def _tone_file(path, freq: float, seconds: float, rate: int) -> str:
    s = (np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * freq / rate) * 10000).astype("<i2")
    if str(path).endswith(".wav"):
        write_wav(str(path), s, rate)
    else:
        path.write_bytes(s.tobytes())
    return str(path)


def test_event_order_for_answer_and_park(sw):
    call = sw.place_call(script=CallerScript(hangup_after=0.1))
    assert call.wait_hangup(2)
    names = [(e.name, e.get("Application")) for e in call.events()]
    core = [n for n in names if n[0] != "CHANNEL_EXECUTE" or n[1] in ("answer", "park")]
    core = [n for n in core if n[0] != "CHANNEL_EXECUTE_COMPLETE" or n[1] == "answer"]
    assert [n[0] for n in core] == [
        "CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_EXECUTE",
        "CHANNEL_PARK", "CHANNEL_HANGUP", "CHANNEL_UNPARK", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY",
    ]  # fmt: skip
    hc = call.events("CHANNEL_HANGUP_COMPLETE")[0]
    assert [v for k, v in hc.headers if k == "Hangup-Cause"] == ["NORMAL_CLEARING", "NORMAL_CLEARING"]
    assert call.hangup_by == "caller"


def test_broadcast_plays_in_order_with_resampling_and_lead_frames(sw, tmp_path):
    a = _tone_file(tmp_path / "a.r16", 440, 0.3, 16000)
    b = _tone_file(tmp_path / "b.wav", 1000, 0.3, 22050)
    call = sw.place_call(rate=8000)
    call.wait_answered(2)
    assert sw.api(f"uuid_broadcast {call.uuid} {a} aleg") == "+OK Message sent\n"
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 1, 3)  # queued while a plays, b would nest in it
    sw.api(f"uuid_broadcast {call.uuid} {b} aleg")
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 3)
    segs = call.ear.broadcasts()
    assert [s.source for s in segs] == [f"broadcast:{a}", f"broadcast:{b}"]
    assert all(s.rate == 8000 and s.status == "done" for s in segs)
    assert abs(segs[0].frequency() - 440) < 15 and abs(segs[1].frequency() - 1000) < 15
    assert abs(segs[0].duration - 0.3) < 0.03
    # each queued broadcast reads 5 lead frames (100 ms at 20 ms ptime) before it starts
    assert len(call.ear.gaps()) == 1 and call.ear.gaps()[0].seconds > 0.05
    kinds = [(e.name, e.get("Application"), e.get("Playback-Status")) for e in call.events()
             if e.name.startswith("PLAYBACK") or e.get("Application") == "playback"]  # fmt: skip
    assert kinds[:4] == [
        ("CHANNEL_EXECUTE", "playback", None), ("PLAYBACK_START", None, None), ("PLAYBACK_STOP", None, "done"),
        ("CHANNEL_EXECUTE_COMPLETE", "playback", None),
    ]  # fmt: skip
    assert call.events("PLAYBACK_START")[0].get("Playback-File-Path") == a
    assert call.events("CHANNEL_EXECUTE_COMPLETE")[-1].get("Application-Response") == "FILE PLAYED"


def test_no_lead_frames_means_no_gap(tmp_path):
    with FSim(broadcast_lead_frames=0) as sw:
        a = _tone_file(tmp_path / "a.r8", 440, 0.2, 8000)
        call = sw.place_call()
        call.wait_answered(2)
        for _ in range(3):
            sw.api(f"uuid_broadcast {call.uuid} {a} aleg")
        sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 3, 3)
        assert call.ear.max_gap() < 0.001


def test_break_without_all_keeps_queue_with_all_flushes(sw, tmp_path):
    a = _tone_file(tmp_path / "a.r8", 440, 2.0, 8000)
    call = sw.place_call()
    call.wait_answered(2)
    u = call.uuid
    for _ in range(3):  # event-locked, so they queue behind each other instead of nesting
        sw.sendmsg(u, {"call-command": "execute", "execute-app-name": "playback", "execute-app-arg": a,
                       "event-lock": "true"}, b"")  # fmt: skip
    sw.wait_event("PLAYBACK_START", u, timeout=2)
    sw.api(f"uuid_break {u}")
    assert sw.wait_event("PLAYBACK_STOP", u).get("Playback-Status") == "break"
    sw.wait_for(lambda: len(call.events("PLAYBACK_START")) == 2, 2)  # the next one still plays
    sw.api(f"uuid_break {u} all")
    sw.wait_for(lambda: len(call.events("PLAYBACK_STOP")) == 2, 2)
    tick = call._tick
    sw.wait_for(lambda: call._tick > tick + 10, 2)
    assert len(call.events("PLAYBACK_START")) == 2  # the third was flushed
    assert [s.status for s in call.ear.broadcasts()] == ["break", "break"]
    assert call.ear.broadcasts()[0].duration < 1.0


def test_missing_and_unplayable_files(sw, tmp_path):
    bad = tmp_path / "x.r48"
    bad.write_bytes(b"\0" * 100)
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_broadcast {call.uuid} /nonexistent/file.wav aleg")
    sw.api(f"uuid_broadcast {call.uuid} {bad} aleg")
    sw.wait_for(lambda: len(call.played) == 2, 3)
    responses = [e.get("Application-Response") for e in call.events("CHANNEL_EXECUTE_COMPLETE")
                 if e.get("Application") == "playback"]  # fmt: skip
    assert responses == ["FILE NOT FOUND", "PLAYBACK ERROR"]
    assert not call.events("PLAYBACK_START")


def test_caller_dtmf_and_playback_terminator(tmp_path):
    with FSim(dialplan_vars={"playback_terminators": "*"}) as sw:
        a = _tone_file(tmp_path / "a.r8", 440, 3.0, 8000)
        script = CallerScript(dtmf=[("5", 0.1), ("*", 0.6)], hangup_after=1.0)
        call = sw.place_call(script=script)
        call.wait_answered(2)
        sw.api(f"uuid_broadcast {call.uuid} {a}")
        assert call.wait_hangup(3)
        digits = [e.get("DTMF-Digit") for e in call.events("DTMF")]
        assert digits == ["5", "*"]
        d = call.events("DTMF")[0]
        assert d.get("DTMF-Duration") == "2000" and d.get("DTMF-Source") == "RTP"
        assert not [k for k, _ in d.headers if k.startswith("variable_")]
        assert call.events("PLAYBACK_STOP")[0].get("Playback-Status") == "break"


def test_transfer_ends_ownership_and_caller_hangs_up_later(sw, tmp_path):
    a = _tone_file(tmp_path / "a.r8", 440, 2.0, 8000)
    call = sw.place_call(script=CallerScript(hangup_after=0.8))
    call.wait_answered(2)
    sw.api(f"uuid_broadcast {call.uuid} {a}")
    sw.wait_event("PLAYBACK_START", call.uuid, timeout=2)
    assert sw.api(f"uuid_transfer {call.uuid} 1000 XML default") == "+OK\n"
    assert call.transferred_to == "1000" and call.transfer_context == "default"
    assert call.alive
    assert call.events("PLAYBACK_STOP")[0].get("Playback-Status") == "break"
    assert call.events("CHANNEL_UNPARK")
    ex = call.events("CHANNEL_EXECUTE")[-1]
    assert ex.get("Application") == "bridge" and ex.get("Caller-Destination-Number") == "1000"
    assert call.wait_hangup(3)
    assert call.hangup_by == "caller"


def test_inline_transfer_to_hangup(sw):
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_transfer {call.uuid} hangup:USER_BUSY inline")
    assert call.wait_hangup(2)
    assert call.hangup_cause == "USER_BUSY"


def test_uuid_kill_cause_and_fork_closed(sw):
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_kill {call.uuid} CALL_REJECTED")
    assert call.wait_hangup(2)
    assert call.hangup_cause == "CALL_REJECTED" and call.hangup_by == "switch"
    assert sw.api(f"uuid_exists {call.uuid}") == "false"


def test_caller_signals_and_ear_helpers():
    s = SpeechLike(bursts=2, burst_s=0.5, pause_s=0.5).render(8000)
    assert len(s) == 16000 and np.abs(s[:4000]).max() > 1000 and not s[4000 + 100 : 8000 - 100].any()
    t = (Tone(440, 0.5) + Tone(880, 0.5)).render(16000)
    assert len(t) == 16000
    assert parse_dtmf_spec("5@3s,#@250ms") == [("5", 3.0), ("#", 0.25)]
    assert parse_seconds("20s") == 20.0
    with pytest.raises(ValueError):
        CallerScript(dtmf=[("x", 1.0)])


def test_caller_audio_reaches_the_fork_at_the_codec_rate(sw):
    call = sw.place_call(script=CallerScript(audio=Tone(300, 1.0)), rate=16000)
    call.wait_answered(2)
    assert call.variables["read_codec"] == "G722" and call.variables["read_rate"] == "16000"
