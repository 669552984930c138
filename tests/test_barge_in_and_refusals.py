"""The caller talks over the bot, and strangers knock on the bridge: what the caller hears, what is refused."""

from __future__ import annotations

import pytest
import websocket

from bridge.tokens import TokenBook
from fsim import CallerScript, FSim, Silence, Tone
from tests.harness import SECRET, load, running_daemon, wait_until, write_config

ROUTE = """
- did: "7100"
  engine: echo
  sample_rate: 16000
  playback: {playback}
  no_audio_timeout: 5s
"""

# says 440 Hz, waits for the echo, then talks over it at 880 Hz
INTERRUPTING = CallerScript(audio=Tone(440, 1.0) + Silence(1.2) + Tone(880, 1.0) + Silence(8.0), hangup_after=8.0)


def _live(daemon, uuid):
    call = daemon.controller.calls.get(uuid)
    return call if call is not None and call.media is not None and call.media.engine_ready.is_set() else None


@pytest.mark.parametrize("playback", ["broadcast", "stream"])
def test_caller_interrupts_and_the_bot_stops_at_once(tmp_path, playback):
    build = "jambonz" if playback == "stream" else "drachtio"
    with FSim(fork_build=build) as sw, \
            running_daemon(load(write_config(tmp_path, sw.esl_port, ROUTE.format(playback=playback)))) as daemon:
        call = sw.place_call(did="7100", script=INTERRUPTING, rate=16000)
        ours = wait_until(lambda: _live(daemon, call.uuid), what="the call's engine")
        engine = ours.media.engine
        wait_until(lambda: engine.interruptions, timeout=8, what="the barge-in")
        (_, name, barge), = [e for e in ours.timeline if e[1] == "barge_in"]
        response, played = engine.interruptions[0]
        assert response == barge["response"]
        assert played == barge["played_ms"] and 0 < played <= barge["received_ms"]  # never more than decoded
        if playback == "broadcast":
            breaks = wait_until(lambda: [c for c in sw.commands_for(call.uuid) if c.command == "uuid_break"],
                                what="uuid_break")
            stop = breaks[0]
            assert stop.args.split() == [call.uuid, "all"]
            stopped_at = stop.at
            source = "broadcast:"
        else:
            wait_until(lambda: '{"type":"killAudio"}' in call.fork.texts_received, what="killAudio on the socket")
            stopped_at = ours.record.clock_origin + [t for t, n, _ in ours.timeline if n == "barge_in"][0]
            source = "stream"
        assert call.wait_hangup(10)
        heard = [s for s in call.ear.segments(source) if s.duration > 0.05]
        before = [s for s in heard if s.start < stopped_at]
        after = [s for s in heard if s.start > stopped_at + 0.1]
        assert before and abs(before[0].frequency() - 440) < 15  # the echo was playing
        if playback == "broadcast":
            # the chunk playing when the break came (it may have just started: any length)
            assert any(s.status == "break" and s.start < stopped_at for s in call.ear.segments(source))
        # nothing of the interrupted reply (440 Hz) comes back after the stop; the next reply is the 880 Hz turn
        assert all(abs(s.frequency() - 440) > 100 for s in after)


def test_bad_peers_are_refused_and_counted_while_a_call_carries_on(tmp_path):
    routes = ROUTE.format(playback="broadcast") + '- did: "7200"\n  engine: echo\n  no_audio_timeout: 5s\n'
    with FSim() as sw, running_daemon(load(write_config(tmp_path, sw.esl_port, routes))) as daemon:
        good = sw.place_call(did="7100", script=CallerScript(audio=Tone(440, 1.0) + Silence(8.0), hangup_after=8.0),
                             rate=16000)
        wait_until(lambda: good.fork is not None and good.fork.connected.is_set(), what="the good call's fork")
        base = f"ws://127.0.0.1:{daemon.bridge.port}/calls"
        used_token = good.fork.url.split("token=", 1)[1]
        book = TokenBook(SECRET, 30)
        attempts = {
            "no_token": f"{base}/{good.uuid}",
            "bad_token": f"{base}/{good.uuid}?token=1.deadbeef",
            "replayed": f"{base}/{good.uuid}?token={used_token}",
            "unknown_call": f"{base}/00000000-0000-0000-0000-000000000000?token="
                            f"{book.mint('00000000-0000-0000-0000-000000000000')}",
            "bad_path": f"ws://127.0.0.1:{daemon.bridge.port}/other",
        }
        for reason, url in attempts.items():
            with pytest.raises(websocket.WebSocketBadStatusException):
                websocket.create_connection(url, timeout=5)
            assert daemon.bridge.refusals.get(reason) == 1, reason

        # an oversized frame from an admitted peer: closed and counted
        sw.faults.slow_forks(connect_delay=30)  # the second call's own fork stays pending: the peer below is it
        lone = sw.place_call(did="7200", script=CallerScript(audio=Silence(8.0), hangup_after=8.0), rate=16000)
        wait_until(lambda: daemon.controller.calls.get(lone.uuid), what="the second call")
        peer = websocket.create_connection(f"{base}/{lone.uuid}?token={daemon.tokens.mint(lone.uuid)}", timeout=5)
        peer.send_binary(b"\0" * (daemon.config.bridge.max_frame_bytes + 2))
        wait_until(lambda: daemon.bridge.refusals.get("oversized_frame") == 1, what="the oversized frame refusal")
        peer.close()

        # the good call never noticed
        wait_until(lambda: good.ear.heard_seconds("broadcast:") > 0.9, what="the good call's echo")
        assert good.fork.state == "connected" and good.hangup_cause is None
        assert 'forkbridge_ws_refusals_total{reason="replayed"} 1.0' in daemon.metrics.exposition().decode()
