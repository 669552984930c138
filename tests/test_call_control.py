"""Call control scenarios: the real daemon against fsim over loopback, checking what FreeSWITCH is told."""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from bridge.tokens import TokenBook
from controller.esl import EslError
from fsim import CallerScript, FSim, Silence, SpeechLike, Tone
from fsim.audio import write_wav
from tests.harness import SECRET, load, running_daemon, wait_until, write_config

ROUTES = """
- name: desk
  did: "7100"
  engine: echo
  sample_rate: 16000
  no_audio_timeout: 4s
  dtmf: {dtmf}
  fallback:
    prompt: {prompt}
    transfer: 1000 XML default
"""

TALKING = CallerScript(audio=SpeechLike(bursts=12), hangup_after=20.0)


def prompt_file(tmp_path) -> str:
    path = str(tmp_path / "sorry.wav")
    write_wav(path, np.zeros(4000, np.int16), 8000)  # half a second, like a short "please hold"
    return path


def config_for(tmp_path, sw, dtmf="forward", engines="", routes=None):
    text = routes or ROUTES.format(dtmf=dtmf, prompt=prompt_file(tmp_path))
    return load(write_config(tmp_path, sw.esl_port, text, engines=engines))


def fork_starts(sw, uuid):
    return [c for c in sw.commands_for(uuid) if c.command == "uuid_audio_fork" and " start " in f" {c.args} "]


def test_routed_call_gets_one_fork_with_a_valid_token_and_a_marked_unrouted_one_its_fallback(tmp_path):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        stranger = sw.place_call(did="9999", script=TALKING)
        ours = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: ours.fork is not None and ours.fork.connected.is_set(), what="the fork to connect")
        (start,) = fork_starts(sw, ours.uuid)
        words = start.args.split(" ")
        assert words[:2] == [ours.uuid, "start"] and words[3:6] == ["mono", "16k", "forkbridge"]
        url = urlsplit(words[2])
        assert url.hostname == "127.0.0.1" and url.port and url.path == f"/calls/{ours.uuid}"
        token = parse_qs(url.query)["token"][0]
        assert TokenBook(SECRET, 30).check(ours.uuid, token) == ""  # signed for this call, unexpired
        assert json.loads(words[6]) == {"uuid": ours.uuid, "did": "7100", "route": "desk"}
        assert len(words) == 7  # compact metadata: no spaces
        assert ours.fork.metadata == words[6]
        # the stranger was marked by the dialplan but no route has 9999: never left parked, no fork, no engine;
        # with no defaults.fallback it is hung up at once (by FreeSWITCH, through an inline dialplan)
        assert stranger.wait_hangup(5)
        acts = [(c.command, c.args) for c in sw.commands_for(stranger.uuid)
                if c.command not in ("uuid_getvar", "uuid_exists")]
        assert acts == [("uuid_setvar", f"{stranger.uuid} forkbridge released"),
                        ("uuid_transfer", f"{stranger.uuid} 'hangup:NORMAL_CLEARING' inline")]
        assert daemon.controller.calls.get(stranger.uuid) is None
        assert daemon.metrics.unrouted_calls._value.get() == 1


@pytest.mark.parametrize(("policy", "expected"), [("forward", ["1", "2", "#"]), ("collect", ["12"])])
def test_digits_reach_the_engine_as_text(tmp_path, policy, expected):
    script = CallerScript(audio=Silence(10.0), dtmf=[("1", 1.0), ("2", 1.3), ("#", 1.6)], hangup_after=10.0)
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, dtmf=policy)) as daemon:
        call = sw.place_call(did="7100", script=script)
        engine = wait_until(lambda: _engine(daemon, call.uuid), what="the engine session")
        wait_until(lambda: len(engine.texts_received) >= len(expected), what="the digits at the engine")
        assert engine.texts_received == expected
        # and each text got a spoken answer the caller heard
        wait_until(lambda: call.ear.heard_seconds("broadcast:") > 0.1, what="the tone answer")


def test_a_local_digit_transfers_without_the_model(tmp_path):
    dtmf = '{mode: forward, actions: {"0": "transfer:operator"}}'
    routes = ROUTES.format(dtmf=dtmf, prompt=prompt_file(tmp_path)) + """
  tools:
    transfer_targets: {operator: "2000 XML default"}
"""
    script = CallerScript(audio=Silence(10.0), dtmf=[("0", 1.0)], hangup_after=10.0)
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, routes=routes)) as daemon:
        call = sw.place_call(did="7100", script=script)
        engine = wait_until(lambda: _engine(daemon, call.uuid), what="the engine session")
        wait_until(lambda: call.transferred_to, what="the transfer")
        assert call.transferred_to.startswith("2000") and engine.texts_received == []
        wait_until(lambda: daemon.controller.calls.get(call.uuid) is None, what="the call to be no longer ours")
        assert call.variables.get("forkbridge") == "released"  # a resync will never take it back


def _engine(daemon, uuid):
    call = daemon.controller.calls.get(uuid)
    return call.media.engine if call is not None and call.media is not None and call.media.engine_ready.is_set() \
        else None


@pytest.mark.parametrize("mode", ["notice", "eof", "mid_body"])
def test_esl_drop_mid_call_reconnects_and_the_call_goes_on(tmp_path, mode):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        call = sw.place_call(did="7100", script=CallerScript(audio=Tone(440, 1.0) + Silence(12.0), hangup_after=4.5))
        wait_until(lambda: call.fork is not None and call.fork.connected.is_set(), what="the fork")
        assert sw.faults.drop_esl(mode) == 1
        wait_until(lambda: daemon.esl.reconnects >= 1 and daemon.esl.connected, what="the reconnect")
        assert daemon.controller.calls.get(call.uuid) is not None  # still ours, fork still up
        assert len(fork_starts(sw, call.uuid)) == 1
        wait_until(lambda: call.ear.heard_seconds("broadcast:") > 0.5, what="the echo after the reconnect")
        assert call.wait_hangup(12)
        wait_until(lambda: daemon.controller.calls.get(call.uuid) is None, what="the call to be released")
        assert call.transferred_to is None  # it ended as the caller wanted, not in the fallback


def test_calls_during_an_outage_are_resynced(tmp_path):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        ended = sw.place_call(did="7100", script=CallerScript(audio=Silence(30.0), hangup_after=30.0))
        wait_until(lambda: ended.fork is not None and ended.fork.connected.is_set(), what="the first fork")
        sw.esl.stop_listening()
        sw.faults.drop_esl("eof")
        wait_until(lambda: not daemon.esl.connected, what="the daemon to notice")
        ended.hangup("NORMAL_CLEARING", by="caller")  # while we are away
        answered = sw.place_call(did="7100", script=TALKING)
        assert answered.wait_answered(5)
        sw.restart_esl(keep_channels=True)
        wait_until(lambda: daemon.esl.connected, what="the reconnect")
        wait_until(lambda: answered.fork is not None and answered.fork.connected.is_set(),
                   what="the call answered during the outage to be forked")
        wait_until(lambda: daemon.controller.calls.get(ended.uuid) is None, what="the ended call to be cleaned up")
        assert len(fork_starts(sw, ended.uuid)) == 1  # nothing more was sent for the call that had ended
        assert len(fork_starts(sw, answered.uuid)) == 1


def test_a_plus_number_answered_during_an_outage_is_picked_up(tmp_path):
    """The resync routes by the dialplan's forkbridge_did (15557654321), as live routing does, not by `dest`."""
    routes = ROUTES.format(dtmf="forward", prompt=prompt_file(tmp_path)).replace('did: "7100"',
                                                                                 'did: ["15557654321"]')
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, routes=routes)) as daemon:
        sw.esl.stop_listening()
        sw.faults.drop_esl("eof")
        wait_until(lambda: not daemon.esl.connected, what="the daemon to notice")
        call = sw.place_call(did="+15557654321", script=TALKING)
        assert call.wait_answered(5)
        sw.restart_esl(keep_channels=True)
        wait_until(lambda: answered_and_forked(call), what="the +1555 call to be picked up and forked")
        assert daemon.controller.calls.get(call.uuid).did == "15557654321"


def answered_and_forked(call) -> bool:
    return call.fork is not None and call.fork.connected.is_set()


def test_a_transfer_made_by_someone_else_lets_the_call_go(tmp_path):
    """Another ESL client moves our parked caller to a human: we stop the fork, close the engine, delete the
    orphan timer and record transferred_away; no fallback, and max_duration can no longer touch the call."""
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        call = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: answered_and_forked(call), what="the fork")
        ours = daemon.controller.calls.get(call.uuid)
        assert sw.api(f"uuid_transfer {call.uuid} 3000 XML default").startswith("+OK")
        wait_until(lambda: ours.gone.is_set(), what="the daemon to let go")
        assert ours.outcome == "transferred_away" and ours.transfer_target == "3000"
        assert not any(n == "fallback_done" for _t, n, _d in ours.timeline)
        ours_sent = [c.command for c in sw.commands_for(call.uuid) if c.kind != "local"]
        assert "uuid_transfer" not in ours_sent  # only the other client's transfer: the daemon sent none
        wait_until(lambda: not call.bugs, what="the fork to be stopped")
        wait_until(lambda: f"forkbridge-{call.uuid}" not in [g for g, _t in sw.tasks.values()],
                   what="the orphan timer to be deleted")
        assert call.variables.get("forkbridge") == "released"
        assert call.transferred_to == "3000" and call.alive  # the caller is with the human now


@pytest.mark.parametrize(("trigger", "engines", "extra"), [
    ("engine_refused", "bot: {type: echo, refuse: true}", ""),
    ("engine_dropped", "bot: {type: echo, drop_after_s: 1}", ""),
    ("max_duration", "bot: {type: echo}", "  max_duration: 2s\n"),
])
def test_engine_and_timer_failures_end_in_the_fallback_transfer(tmp_path, trigger, engines, extra):
    routes = ROUTES.format(dtmf="forward", prompt=prompt_file(tmp_path)).replace("engine: echo", "engine: bot") + extra
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, engines=engines, routes=routes)) as daemon:
        call = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: call.transferred_to, timeout=10, what=f"the fallback transfer after {trigger}")
        assert call.transferred_to.startswith("1000")
        assert (prompt_file(tmp_path), "done") in call.played  # the caller heard the prompt first
        ended = wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], what="the record")
        assert ended[0].end_reason == "TRANSFERRED" or ended[0].outcome == "fallback_transfer"
        assert any(name == "ending" and detail.get("reason") == trigger for _, name, detail in ended[0].timeline)


@pytest.mark.parametrize("fault", ["refused_twice", "cut", "never_connects"])
def test_fork_failures_end_in_the_fallback_transfer(tmp_path, fault):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)):
        if fault == "refused_twice":
            sw.faults.refuse_fork(count=2)
        if fault == "never_connects":
            sw.faults.slow_forks(connect_delay=30)
        call = sw.place_call(did="7100", script=TALKING)
        if fault == "cut":
            wait_until(lambda: call.fork is not None and call.fork.connected.is_set(), what="the fork")
            sw.faults.cut_fork(call.uuid)
        wait_until(lambda: call.transferred_to, timeout=10, what=f"the fallback transfer after {fault}")
        if fault == "refused_twice":
            assert len(fork_starts(sw, call.uuid)) == 2  # one retry, after a stop
            stops = [c for c in sw.commands_for(call.uuid) if c.command == "uuid_audio_fork" and " stop" in c.args]
            assert stops


def test_a_fork_freeswitch_stops_under_a_live_call_is_answered_at_once_and_ends_in_the_fallback(tmp_path):
    """Someone runs `uuid_audio_fork <uuid> stop` while the caller talks: the module sends its close frame and
    waits for the server's (fsim waits 1 s, then drops the connection). The daemon's reader, woken once per
    piece of caller audio, must still see that lone frame and answer it; the caller gets the fallback."""
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)):
        call = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: call.fork is not None and call.fork.audio_bytes >= 32000, what="a second of audio")
        fork = call.fork
        assert sw.api(f"uuid_audio_fork {call.uuid} stop forkbridge").startswith("+OK")
        assert fork.wait_finished(5)
        assert fork.closed_by == "switch" and fork.close_answered, "the daemon left the module's close unanswered"
        wait_until(lambda: call.transferred_to, timeout=10, what="the fallback transfer")


def test_a_prompt_freeswitch_cannot_play_does_not_hold_the_caller(tmp_path):
    routes = ROUTES.format(dtmf="forward", prompt=tmp_path / "missing.wav").replace("engine: echo", "engine: bot")
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, engines="bot: {type: echo, refuse: true}",
                                              routes=routes)) as daemon:
        call = sw.place_call(did="7100", script=TALKING)
        # the prompt wait would be 15 s; FreeSWITCH's FILE NOT FOUND moves the fallback on at once
        wait_until(lambda: call.transferred_to, timeout=8, what="the transfer after the failed prompt")
        ended = wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], what="the record")
        assert any(name == "playback_failed" for _, name, _ in ended[0].timeline)


def test_stream_playback_on_a_switch_that_cannot_stream_falls_back(tmp_path):
    routes = ROUTES.format(dtmf="forward", prompt=prompt_file(tmp_path)) + "  playback: stream\n"
    with FSim(fork_build="drachtio") as sw, running_daemon(config_for(tmp_path, sw, routes=routes)) as daemon:
        wait_until(lambda: daemon.controller.stream_supported is False, what="the module check")
        call = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: call.transferred_to, what="the fallback transfer")
        assert fork_starts(sw, call.uuid) == []  # no fork whose replies the caller could never hear
        ended = wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], what="the record")
        assert ended[0].end_reason == "stream_unsupported" and ended[0].outcome == "fallback_transfer"


def test_a_slow_command_fails_alone_and_the_connection_carries_on(tmp_path):
    """FreeSWITCH runs an api in the connection's thread: one slower than esl.command_timeout (2 s here) fails
    that command, but the connection, and every call on it, carries on; the late reply is not taken as the
    answer to the next command."""
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        call = sw.place_call(did="7100", script=CallerScript(audio=Tone(440, 1.0) + Silence(12.0), hangup_after=9.0))
        wait_until(lambda: answered_and_forked(call), what="the fork")
        sw.faults.delay_replies(2.5)
        with pytest.raises(EslError, match="timed out"):
            daemon.esl.api("module_exists mod_audio_fork")
        sw.faults.delay_replies(0)
        assert daemon.esl.api("show channels count").strip().endswith("total.")  # its own reply, not "true"
        assert daemon.esl.connected and daemon.esl.reconnects == 0
        wait_until(lambda: call.ear.heard_seconds("broadcast:") > 0.5, what="the echo, on the same connection")
        assert call.wait_hangup(12) and call.transferred_to is None


def test_a_call_lost_with_a_crashed_freeswitch_is_recorded_lost_not_fallen_back(tmp_path):
    """FreeSWITCH dies and stays away longer than no_audio_timeout: the caller's audio stops with it, but no
    fallback can be carried out (and the call may be gone): the resync after the reconnect finds the channel gone
    and ends the call as the caller's loss. No fallback outcome, nothing sent for it."""
    routes = ROUTES.format(dtmf="forward", prompt=prompt_file(tmp_path)).replace("no_audio_timeout: 4s",
                                                                                 "no_audio_timeout: 1s")
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, routes=routes)) as daemon:
        call = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: answered_and_forked(call), what="the fork")
        ours = daemon.controller.calls.get(call.uuid)
        sw.esl.stop_listening()
        sw.faults.drop_esl("eof")
        call.vanish()  # the process died: the channel and its fork are gone without an event
        wait_until(lambda: any(n == "no_audio_while_esl_down" for _t, n, _d in ours.timeline), 5,
                   "the no-audio watch to fire while FreeSWITCH is away")
        sent_before = len(sw.commands_for(call.uuid))
        sw.restart_esl(keep_channels=False)
        wait_until(lambda: ours.gone.is_set(), 10, "the resync to end the lost call")
        assert ours.outcome == "completed" and ours.end_reason == "GONE_DURING_OUTAGE"
        assert not any(n in ("ending", "fallback_done") for _t, n, _d in ours.timeline), ours.timeline
        assert [c.command for c in sw.commands_for(call.uuid)[sent_before:] if c.kind != "local"] \
            in ([], ["uuid_exists"], ["uuid_exists", "uuid_exists"])


def test_a_caller_hanging_up_during_a_reply_is_no_playback_failure(tmp_path):
    """FreeSWITCH ends a playback the hangup cuts with PLAYBACK ERROR, before CHANNEL_HANGUP (observed): that is
    the call ending, not a file it could not read."""
    script = CallerScript(audio=Tone(440, 2.0) + Silence(20.0))
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    logging.getLogger("forkbridge").addHandler(handler)
    try:
        with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
            call = sw.place_call(did="7100", script=script)
            wait_until(lambda: call.playing_path and call.playing_path.startswith(str(tmp_path)), timeout=10,
                       what="the echoed reply to be playing")
            call.hangup(by="caller")
            ended = wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], what="the record")
    finally:
        logging.getLogger("forkbridge").removeHandler(handler)
    assert not [name for _, name, _ in ended[0].timeline if name == "playback_failed"]
    assert ended[0].outcome == "completed"
    assert not [r.getMessage() for r in errors]


# ---- which events the daemon is sent (ESL filters) ------------------------------------------------------------------

def _daemon_connection(sw):
    """The daemon's ESL connection on fsim: the one with filters (only its own calls' events are sent to it)."""
    return wait_until(lambda: next((c for c in list(sw.esl.connections) if c.filters and not c.closed), None),
                      what="the daemon's filtered ESL connection")


def _sent_for(conn, uuid: str) -> set[str]:
    return {name for name, about in list(conn.delivered) if about == uuid}


def test_the_switchs_other_calls_reach_the_daemon_only_as_their_answer(tmp_path):
    """A switch carries calls that are not forkbridge's (here DID 5000, parked by another extension): their
    digits, playbacks and hangups are not sent to the daemon at all, while its own call's are."""
    digits = CallerScript(audio=Silence(6.0), dtmf=[("1", 1.0), ("2", 1.3)], hangup_after=3.0)
    with FSim(others=["5000"]) as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        conn = _daemon_connection(sw)
        other = sw.place_call(did="5000", script=digits)
        ours = sw.place_call(did="7100", script=digits)
        engine = wait_until(lambda: _engine(daemon, ours.uuid), what="the engine session")
        wait_until(lambda: engine.texts_received == ["1", "2"], what="our caller's digits at the engine")
        wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == ours.uuid], what="our call's end")
        wait_until(lambda: other.hangup_cause, what="the other call's hangup")
        assert {"DTMF", "CHANNEL_HANGUP_COMPLETE"} <= {ev.name for ev in sw.events_log if ev.uuid == other.uuid}
        assert _sent_for(conn, other.uuid) == {"CHANNEL_ANSWER"}
        assert {"CHANNEL_ANSWER", "DTMF", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE"} <= _sent_for(
            conn, ours.uuid)
        # once the call is over its events stop too: FreeSWITCH keeps no filter for a channel that is gone
        wait_until(lambda: ("Unique-ID", ours.uuid) not in conn.filters, what="our call's filter deleted")
        assert conn.commands.count(f"filter Unique-ID {ours.uuid}") == 1
        assert f"filter delete Unique-ID {ours.uuid}" in conn.commands


def test_a_caller_who_hangs_up_before_the_daemon_watches_the_call_is_not_kept(tmp_path):
    """The hangup of a caller who leaves between the answer and the daemon's filter for the call is never sent
    to it: the daemon asks FreeSWITCH once the filter is in, and lets the call go instead of holding it."""
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        conn = _daemon_connection(sw)
        sw.faults.hang_up_before_filter()
        call = sw.place_call(did="7100", script=TALKING)
        ended = wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], timeout=5,
                           what="the daemon to let the call go")
        assert ended[0].end_reason == "GONE_BEFORE_WATCHED"
        assert _sent_for(conn, call.uuid) == {"CHANNEL_ANSWER"}  # its hangup never came
        assert len(daemon.controller.calls) == 0
        assert [c.command for c in sw.commands_for(call.uuid)].count("uuid_exists") == 1


def test_after_an_esl_drop_the_new_connection_is_sent_the_live_calls_events(tmp_path):
    script = CallerScript(audio=Silence(8.0), dtmf=[("7", 3.0)], hangup_after=5.0)
    with FSim() as sw, running_daemon(config_for(tmp_path, sw)) as daemon:
        call = sw.place_call(did="7100", script=script)
        engine = wait_until(lambda: _engine(daemon, call.uuid), what="the engine session")
        first = _daemon_connection(sw)
        sw.faults.drop_esl("eof")
        second = wait_until(lambda: (c := _daemon_connection(sw)) is not first and c, what="the reconnect")
        assert ("Unique-ID", call.uuid) in second.filters
        wait_until(lambda: engine.texts_received == ["7"], what="the digit pressed after the drop")
        wait_until(lambda: [c for c in daemon.ended_calls if c.uuid == call.uuid], what="the hangup after the drop")
