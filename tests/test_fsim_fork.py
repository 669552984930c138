"""fsim's mod_audio_fork / mod_audio_stream emulation against a plain gevent-websocket server."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fsim_helpers import WSRecorder

from fsim import CallerScript, FSim, Tone, dominant_frequency
from fsim.wire import separate_string


@pytest.fixture
def server():
    r = WSRecorder()
    yield r
    r.stop()


def _answered(sw: FSim, **kw):
    call = sw.place_call(**kw)
    assert call.wait_answered(2)
    return call


def test_handshake_metadata_frames_and_cadence(sw, server):
    call = _answered(sw, script=CallerScript(audio=Tone(440, 2.0)), rate=8000)
    reply = sw.api(f'uuid_audio_fork {call.uuid} start {server.url("/calls/x?token=t")} mono 16k fb {{"a":1}}')
    assert reply == "+OK Success\n"
    assert call.fork.wait_connected(2)
    sw.wait_for(lambda: server.conns and len(server.conns[0].binaries) >= 25, 3)
    conn = server.conns[0]
    assert conn.path == "/calls/x" and conn.query == "token=t"
    assert conn.headers["host"] == "127.0.0.1"
    assert conn.headers["origin"] == "http://127.0.0.1"
    assert conn.headers["sec-websocket-protocol"] == "audio.drachtio.org"
    assert "sec-websocket-extensions" not in conn.headers
    assert isinstance(conn.messages[0][1], str) and conn.messages[0][1] == '{"a":1}'
    sizes = [len(b) for b in conn.binaries]
    assert all(s % 2 == 0 for s in sizes)
    assert 600 <= sorted(sizes)[len(sizes) // 2] <= 680  # 20 ms at 16 kHz = 640 B, resampling moves a few samples
    audio = np.frombuffer(b"".join(conn.binaries), dtype="<i2")
    assert abs(dominant_frequency(audio[1600:], 16000) - 440) < 10
    assert [e.key for e in call.events()][-2:] == ["MEDIA_BUG_START", "mod_audio_fork::connect"]
    media = call.events("MEDIA_BUG_START")[0]
    assert media.get("Media-Bug-Function") == "fb"
    sw.api(f"uuid_kill {call.uuid}")
    assert conn.closed.wait(2)
    assert call.events("mod_audio_fork::disconnect") == []  # no event when FreeSWITCH closes the fork


def test_30ms_packets_give_bigger_frames_same_byte_rate(sw, server):
    call = _answered(sw, rate=16000, ptime_ms=30)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 16k")
    sw.wait_for(lambda: server.conns and len(server.conns[0].binaries) >= 10, 3)
    assert set(len(b) for b in server.conns[0].binaries) == {960}
    sw.api(f"uuid_kill {call.uuid}")


def test_connect_failed_event_and_bug_stays_attached(sw):
    call = _answered(sw)
    reply = sw.api(f"uuid_audio_fork {call.uuid} start ws://127.0.0.1:1/x mono 16k fb")
    assert reply == "+OK Success\n"  # the verdict comes later, as an event
    ev = sw.wait_event("mod_audio_fork::connect_failed", call.uuid, timeout=3)
    assert ev.body == '{"reason":"Unable to connect"}'
    assert ev.get("Event-Subclass") == "mod_audio_fork::connect_failed"
    assert ev.get("variable_forkbridge") == "true"
    assert sw.api(f"uuid_audio_fork {call.uuid} start ws://127.0.0.1:1/x mono 16k fb") == "-ERR Operation Failed\n"
    assert sw.api(f"uuid_audio_fork {call.uuid} stop fb") == "+OK Success\n"
    assert call.events("MEDIA_BUG_STOP")


def test_non_101_is_connect_failed():
    refuser = WSRecorder(status=403)
    try:
        with FSim() as sw:
            call = _answered(sw)
            sw.api(f"uuid_audio_fork {call.uuid} start {refuser.url()} mono 8k")
            ev = sw.wait_event("mod_audio_fork::connect_failed", call.uuid, timeout=3)
            assert "not 101" in json.loads(ev.body)["reason"]
    finally:
        refuser.stop()


def test_send_text_stop_text_and_close_code(sw, server):
    call = _answered(sw)
    u = call.uuid
    sw.api(f"uuid_audio_fork {u} start {server.url()} mono 8k fb")
    call.fork.wait_connected(2)
    assert sw.api(f"uuid_audio_fork {u} send_text fb '{{\"k\": \"v w\"}}'") == "+OK Success\n"
    assert sw.api(f"uuid_audio_fork {u} send_text hello") == "-ERR Operation Failed\n"  # "hello" = a bug name
    sw.wait_for(lambda: server.conns and server.conns[0].texts, 2)
    assert sw.api(f'uuid_audio_fork {u} stop fb {{"bye":1}}') == "+OK Success\n"
    conn = server.conns[0]
    assert conn.closed.wait(2)
    assert conn.texts == ['{"k": "v w"}', '{"bye":1}']
    assert call.fork.close_code == 1000 and call.fork.closed_by == "switch"
    assert call.events("mod_audio_fork::disconnect") == []
    assert call.events("MEDIA_BUG_STOP")[0].get("Media-Bug-Function") == "fb"


def test_pause_resume_and_graceful_shutdown(sw, server):
    call = _answered(sw)
    u = call.uuid
    sw.api(f"uuid_audio_fork {u} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns and len(server.conns[0].binaries) >= 3, 2)
    assert sw.api(f"uuid_audio_fork {u} pause") == "+OK Success\n"
    n = len(call.fork.frames_sent)
    sw.wait_for(lambda: call._tick >= 0, 1)
    tick = call._tick
    sw.wait_for(lambda: call._tick >= tick + 5, 2)
    assert len(call.fork.frames_sent) <= n + 1
    sw.api(f"uuid_audio_fork {u} resume")
    sw.wait_for(lambda: len(call.fork.frames_sent) >= n + 3, 2)
    sw.api(f"uuid_audio_fork {u} graceful-shutdown")
    conn = server.conns[0]
    sw.wait_for(lambda: any(len(b) == 0 for b in conn.binaries), 2)
    idx = [len(b) for b in conn.binaries].index(0)
    tick = call._tick
    sw.wait_for(lambda: call._tick >= tick + 5, 2)
    assert len(conn.binaries) == idx + 1  # no audio after the empty frame


def test_server_messages_become_events(sw, server):
    call = _answered(sw)
    u = call.uuid
    sw.api(f"uuid_audio_fork {u} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns, 2)
    conn = server.conns[0]
    pcm = (np.sin(np.arange(1600) * 2 * np.pi * 440 / 16000) * 8000).astype("<i2").tobytes()
    play = {"audioContentType": "raw", "sampleRate": 16000, "audioContent": base64.b64encode(pcm).decode(),
            "textContent": "hi"}  # fmt: skip
    conn.send(json.dumps({"type": "playAudio", "data": play}))
    ev = sw.wait_event("mod_audio_fork::play_audio", u, timeout=2)
    body = json.loads(ev.body)
    assert body["audioContentType"] == "raw" and body["textContent"] == "hi" and "audioContent" not in body
    assert body["file"].startswith(os.path.join(sw.temp_dir, f"{u}_")) and body["file"].endswith(".tmp.r16")
    assert Path(body["file"]).read_bytes() == pcm
    assert not call.events("PLAYBACK_START")  # written, never played by the module
    conn.send(json.dumps({"type": "transcription", "data": {"text": "hello there"}}))
    assert sw.wait_event("mod_audio_fork::transcription", u).body == '{"text":"hello there"}'
    conn.send(json.dumps({"a": 1}))
    assert sw.wait_event("mod_audio_fork::json", u).body == '{"a":1}'
    conn.send(json.dumps({"type": "nonsense"}))
    conn.send(b"\x00\x01")
    conn.send(json.dumps({"type": "disconnect"}))
    ev = sw.wait_event("mod_audio_fork::disconnect", u)
    assert ev.body is None and call.fork.state == "connected"  # the socket stays open
    assert [e.key for e in call.events() if e.name == "CUSTOM"] == [
        "mod_audio_fork::connect", "mod_audio_fork::play_audio", "mod_audio_fork::transcription",
        "mod_audio_fork::json", "mod_audio_fork::disconnect",
    ]  # fmt: skip
    sw.api(f"uuid_kill {u}")
    assert call.wait_hangup(2)
    assert not os.path.exists(body["file"])  # temp files go with the call


def test_server_close_fires_disconnect(sw, server):
    call = _answered(sw)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns, 2)
    server.conns[0].close(1000)
    ev = sw.wait_event("mod_audio_fork::disconnect", call.uuid, timeout=3)
    assert ev.body is None
    assert call.fork.closed_by == "server"
    assert sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k") == "-ERR Operation Failed\n"


def test_kill_audio_interrupts_playback_not_queue(sw, server, tmp_path):
    wav = tmp_path / "a.r8"
    wav.write_bytes((np.ones(8000 * 2) * 1000).astype("<i2").tobytes())
    call = _answered(sw)
    u = call.uuid
    sw.api(f"uuid_audio_fork {u} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns, 2)
    for _ in range(2):  # event-locked: the second waits in the queue instead of playing inside the first
        sw.sendmsg(u, {"call-command": "execute", "execute-app-name": "playback", "execute-app-arg": str(wav),
                       "event-lock": "true"}, b"")  # fmt: skip
    sw.wait_event("PLAYBACK_START", u, timeout=2)
    server.conns[0].send('{"type":"killAudio"}')
    stop = sw.wait_event("PLAYBACK_STOP", u, timeout=2)
    assert stop.get("Playback-Status") == "break"
    assert sw.wait_for(lambda: len(call.events("PLAYBACK_START")) == 2, 2)  # the queued file still plays
    assert call.events("mod_audio_fork::kill_audio")


def test_jambonz_bidirectional_stream_needs_a_writer():
    server = WSRecorder()
    try:
        with FSim(fork_build="jambonz") as sw:
            call = _answered(sw, rate=8000)
            u = call.uuid
            r = sw.api(f"uuid_audio_fork {u} start {server.url()} mono 8k audio_fork {{}} true true 8000")
            assert r == "+OK Success\n"
            sw.wait_for(lambda: server.conns, 2)
            tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype("<i2").tobytes()
            server.conns[0].send(tone)
            server.conns[0].send('{"type":"mark","data":{"name":"m1"}}')
            sw.wait_for(lambda: call.fork.bidir.pushed >= 8000, 2)
            assert call.ear.segments("stream") == []  # parked and idle: nothing writes, nothing drains
            sw.api(f"uuid_broadcast {u} silence_stream://-1 aleg")  # give the leg a writer
            sw.wait_for(lambda: call.ear.heard_seconds("stream") >= 0.5, 3)
            heard = call.ear.heard_audio("stream")
            assert abs(dominant_frequency(heard, 8000) - 440) < 10
            sw.wait_for(lambda: any('"event": "playout"' in t for t in server.conns[0].texts), 3)
            assert '{"type": "mark", "data": {"name":"m1", "event": "playout"}}' in server.conns[0].texts
            server.conns[0].send(tone)
            sw.wait_for(lambda: call.ear.is_hearing(), 2)
            assert sw.api(f"uuid_audio_fork {u} stop_play") == "+OK Success\n"
            sw.wait_for(lambda: not call.fork.bidir.buf.size, 1)
    finally:
        server.stop()


def test_audio_stream_module(sw, server):
    call = _answered(sw, rate=16000)
    u = call.uuid
    r = sw.api(f"uuid_audio_stream {u} start {server.url('/s')} mono 16k {{\"meta\": \"with space\"}}")
    assert r == "+OK Success\n"
    ev = sw.wait_event("mod_audio_stream::connect", u, timeout=2)
    assert ev.body == '{"status":"connected"}'
    sw.wait_for(lambda: server.conns and len(server.conns[0].binaries) >= 5, 2)
    conn = server.conns[0]
    assert "sec-websocket-protocol" not in conn.headers
    assert conn.headers["host"] == f"127.0.0.1:{server.port}"
    assert conn.texts[0] == '{"meta": "with space"}'
    assert set(len(b) for b in conn.binaries) == {640}
    assert sw.api(f"uuid_audio_stream {u} graceful-shutdown") == "-ERR Operation Failed\n"
    assert sw.api(f"uuid_audio_stream {u} start {server.url('/s')} mono 16k") == "-ERR Operation Failed\n"
    data = {"audioDataType": "raw", "sampleRate": 16000, "audioData": base64.b64encode(b"\0\0" * 160).decode(),
            "seq": 7}  # fmt: skip
    conn.send(json.dumps({"type": "streamAudio", "data": data}))
    body = json.loads(sw.wait_event("mod_audio_stream::play", u).body)
    assert body["seq"] == 7 and body["file"].endswith(f"{u}_0.tmp.r16")
    conn.send('{"type":"killAudio"}')
    assert sw.wait_event("mod_audio_stream::json", u).body == '{"type":"killAudio"}'
    conn.close(1000, b"bye")
    ev = sw.wait_event("mod_audio_stream::disconnect", u, timeout=2)
    assert json.loads(ev.body) == {"status": "disconnected", "message": {"code": 1000, "reason": "bye"}}


def test_audio_stream_refused_is_error_and_bug_removed(sw):
    call = _answered(sw)
    sw.api(f"uuid_audio_stream {call.uuid} start ws://127.0.0.1:1/x mono 8k")
    ev = sw.wait_event("mod_audio_stream::error", call.uuid, timeout=3)
    assert json.loads(ev.body)["message"] == {"code": 6, "error": "Connection refused (system error 111)"}
    assert "audio_stream" not in call.bugs


def test_argument_splitting_quirks():
    assert separate_string("u send_text '{\"k\": \"v w\"}'", 7) == ["u", "send_text", '{"k": "v w"}']
    assert separate_string('u send_text {"k": "v w"}', 7)[2] == '{"k":'
    assert separate_string("u start url mono 16k bug {'a':'b'} x", 7)[6] == "{a:b} x"
    assert separate_string("^^|u|start|url|mono|8000|bug|'{\"a\":1}'|true|false|", 10) == [
        "u", "start", "url", "mono", "8000", "bug", '{"a":1}', "true", "false",
    ]  # fmt: skip
    assert separate_string(r"a b\sc", 7) == ["a", "b c"]
