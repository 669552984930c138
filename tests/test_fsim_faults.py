"""Every fsim fault-injection hook, seen from a client."""

from __future__ import annotations

import json

import gevent
import greenswitch
import pytest
from fsim_helpers import RawESL, WSRecorder, esl_client


@pytest.fixture
def server():
    r = WSRecorder()
    yield r
    r.stop()


def test_drop_esl_with_notice(sw):
    esl = esl_client(sw)
    notices = []
    esl.register_handle("DISCONNECT", notices.append)
    assert sw.faults.drop_esl("notice") == 1
    sw.wait_for(lambda: notices, 3)
    assert not esl.connected


def test_drop_esl_eof_gives_no_notice(sw):
    esl = esl_client(sw)
    notices = []
    esl.register_handle("DISCONNECT", notices.append)
    sw.faults.drop_esl("eof")
    sw.wait_for(lambda: not esl.connected, 3)
    # every frame greenswitch read has been handed to its handlers: a DISCONNECT would be there by now
    sw.wait_for(lambda: esl._receive_events_greenlet.dead and esl._esl_event_queue.empty(), 3)
    assert notices == []
    with pytest.raises(greenswitch.esl.NotConnectedError):
        esl.send("api status")


def test_drop_esl_mid_body_cuts_inside_a_frame(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    sw.faults.drop_esl("mid_body")
    with pytest.raises(EOFError):
        c.read_frame()
    c.close()


def test_shutdown_notice_body(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    sw.faults.drop_esl("shutdown")
    headers, body, _ = c.read_frame()
    assert headers[0] == ("Content-Type", "text/disconnect-notice") and body == b"The system is being shut down.\n"
    c.close()


def test_delay_replies(sw):
    esl = esl_client(sw)
    sw.faults.delay_replies(0.5)
    line = "api uuid_exists 33333333-3333-3333-3333-333333333333"
    g = gevent.spawn(esl.send, line)
    sw.wait_for(lambda: any(line in conn.commands for conn in sw.esl.connections), 3)  # it has arrived...
    assert not g.ready()  # ...and is not answered yet
    assert g.get(timeout=3).data == "false"
    sw.faults.delay_replies(0)
    esl.stop()


def test_rude_rejection(sw):
    sw.faults.rude_reject = True
    esl = greenswitch.InboundESL("127.0.0.1", sw.esl_port, "ClueCon", timeout=2)
    with pytest.raises(greenswitch.esl.NotConnectedError):
        esl.connect()


def test_restart_esl_keeps_channels(sw):
    esl = esl_client(sw)
    call = sw.place_call()
    call.wait_answered(2)
    port = sw.esl_port
    sw.restart_esl(keep_channels=True)
    sw.wait_for(lambda: not esl.connected, 3)
    assert sw.esl_port == port
    esl2 = esl_client(sw)
    rows = json.loads(esl2.send("api show channels as json").data)
    assert rows["row_count"] == 1 and rows["rows"][0]["uuid"] == call.uuid
    esl2.stop()


def test_restart_esl_loses_channels_silently(sw, server):
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns, 2)
    sw.restart_esl(keep_channels=False)
    assert call.wait_hangup(1)
    assert not call.events("CHANNEL_HANGUP")
    assert server.conns[0].closed.wait(2)
    esl = esl_client(sw)
    assert json.loads(esl.send("api show channels as json").data) == {"row_count": 0}
    esl.stop()


def test_refuse_fork(sw, server):
    call = sw.place_call()
    call.wait_answered(2)
    sw.faults.refuse_fork(count=1)
    assert sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k") == "+OK Success\n"
    ev = sw.wait_event("mod_audio_fork::connect_failed", call.uuid, timeout=2)
    assert json.loads(ev.body) == {"reason": "Unable to connect"}
    assert server.conns == []
    sw.api(f"uuid_audio_fork {call.uuid} stop")
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    sw.wait_event("mod_audio_fork::connect", call.uuid, timeout=2)


def test_cut_fork_fires_disconnect(sw, server):
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    call.fork.wait_connected(2)
    assert sw.faults.cut_fork(call.uuid)
    ev = sw.wait_event("mod_audio_fork::disconnect", call.uuid, timeout=3)
    assert ev.body is None and call.fork.state == "disconnected"
    assert server.conns[0].closed.wait(2)


def test_slow_fork_writer_coalesces_frames(sw, server):
    call = sw.place_call(rate=8000)
    call.wait_answered(2)
    sw.faults.slow_forks(write_lag=0.05)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns and len(server.conns[0].binaries) >= 6, 3)
    sizes = [len(b) for b in server.conns[0].binaries]
    assert all(s % 320 == 0 for s in sizes) and max(sizes) > 320


def test_play_audio_without_content_type_crashes_the_switch(sw, server):
    esl = esl_client(sw)
    call = sw.place_call()
    call.wait_answered(2)
    sw.api(f"uuid_audio_fork {call.uuid} start {server.url()} mono 8k")
    sw.wait_for(lambda: server.conns, 2)
    server.conns[0].send(json.dumps({"type": "playAudio", "data": {"audioContent": ""}}))
    sw.wait_for(lambda: sw.faults.crashes, 2)
    assert "audioContentType" in sw.faults.crashes[0].reason
    sw.wait_for(lambda: not esl.connected, 2)
    assert call.uuid in sw.faults.crashes[0].channels_lost
    sw.restart_esl(keep_channels=False)
