"""On the real switch: transfers. The caller ends up where the transfer sent them (extension 7300 plays 1000 Hz,
heard on the caller's recording), and a transfer made by anyone else makes the daemon let go of the call.
"""

from __future__ import annotations

import pytest

from fsim.audio import Silence, Tone, write_wav
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, running_daemon, wait_until, write_config
from tests.realswitch.caller import Caller
from tests.realswitch.switch import PASSWORD

OPERATOR_HZ = 1000.0  # extension 7300 in the test switch's public context
GREETING_HZ = 300.0

ROUTE = """
- name: desk
  did: "7100"
  engine: bot
  sample_rate: 8000
  greeting: Hello
  no_audio_timeout: 30s
  dtmf:
    mode: forward
    actions: {"0": "transfer:operator"}
  tools:
    allow: [transfer, hangup]
    transfer_targets: {operator: "7300 XML public"}
  fallback: hangup
"""


@pytest.fixture
def fake():
    server = OpenAIFake(api_key="test-key").start()
    server.tones = [GREETING_HZ]
    server.reply_ms = 600
    yield server
    server.stop()


def _config(tmp_path, switch, fake):
    engine = (f"bot: {{type: openai_realtime, url: '{fake.url}', api_key: test-key, model: gpt-realtime, "
              f"voice: alloy, connect_timeout: 3s}}")
    return load(write_config(tmp_path, switch.esl_port, ROUTE, engines=engine, esl_password=PASSWORD))


def _operator_heard(caller: Caller) -> bool:
    rec = caller.recording()
    return any(abs(p.freq - OPERATOR_HZ) < 15 and p.seconds > 0.3 for p in rec.heard())


def _fork_stopped(caller: Caller) -> bool:
    return bool([e for e in caller.events("MEDIA_BUG_STOP") if e.get("Media-Bug-Function") == "forkbridge"])


@pytest.mark.parametrize("how", ["model", "digit"])
def test_a_transfer_lands_the_caller_on_the_target_extension(tmp_path, drachtio, probe, fake, how):
    with running_daemon(_config(tmp_path, drachtio, fake)) as daemon:
        caller = Caller(drachtio, probe, tmp_path, Silence(4.0), hangs_up=True).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: fake.sessions and fake.sessions[0].responses and fake.sessions[0].responses[0].done,
                   5, "the greeting")
        wait_until(lambda: not call.media.player.playing, 5, "the greeting to be heard")
        if how == "model":
            fake.tool_script.append(("transfer", {"target": "operator"}))
            fake.start_response()
        else:
            caller.recv_dtmf("0")
        caller.wait(lambda e: e.name == "CHANNEL_EXECUTE" and e.uuid == caller.b
                    and e.get("Application") == "playback" and "1000" in e.get("Application-Data"),
                    5, "the operator extension to run")
        wait_until(lambda: call.gone.is_set(), 10, "the daemon to let go")
        assert _fork_stopped(caller)
        assert probe.api(f"uuid_getvar {caller.b} forkbridge").strip() == "released"
        # the caller hears the operator until their script ends, then hangs up
        caller.wait_gone()
    assert call.outcome == "transferred" and call.transfer_target == "7300 XML public"
    assert _operator_heard(caller)


def test_a_transfer_made_by_someone_else_makes_the_daemon_let_go(tmp_path, drachtio, probe, fake):
    """Another ESL client (here the test's own) transfers our parked caller: FreeSWITCH sends CHANNEL_UNPARK and
    CHANNEL_EXECUTE_COMPLETE(park) with Answer-State answered; the daemon stops the fork, deletes its orphan
    timer and records transferred_away; no fallback (the route's fallback would hang the caller up)."""
    with running_daemon(_config(tmp_path, drachtio, fake)) as daemon:
        caller = Caller(drachtio, probe, tmp_path, Silence(3.0), hangs_up=True).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        caller.wait(lambda e: e.subclass == "mod_audio_fork::connect" and e.uuid == caller.b, 5, "the fork")
        assert probe.api(f"uuid_transfer {caller.b} 7300 XML public").startswith("+OK")
        wait_until(lambda: call.gone.is_set(), 10, "the daemon to let go")
        assert call.outcome == "transferred_away"
        wait_until(lambda: _fork_stopped(caller), 5, "the fork to be stopped")
        # the timer is deleted by a command of its own, not necessarily before the fork stop is seen (one CI run)
        wait_until(lambda: f"forkbridge-{caller.b}" not in probe.api("show tasks"), 5, "the orphan timer's deletion")
        assert probe.api(f"uuid_exists {caller.b}").strip() == "true"  # not hung up: with the operator now
        caller.wait_gone()
    assert not any(n in ("fallback_done", "ending") and d.get("outcome", "").startswith("fallback")
                   for _t, n, d in call.timeline)
    assert _operator_heard(caller)


def test_a_marked_call_no_route_matches_gets_the_default_fallback_at_once(tmp_path, drachtio, probe, fake):
    """The dialplan answers 7101 for us but no route has it (they drifted apart): the caller hears defaults'
    fallback prompt and reaches the operator, instead of waiting an hour in park."""
    prompt = tmp_path / "sorry.wav"
    write_wav(str(prompt), Tone(500, 0.6).render(8000), 8000)
    extra = f"defaults:\n  fallback:\n    prompt: {prompt}\n    transfer: 7300 XML public\n"
    engine = f"bot: {{type: openai_realtime, url: '{fake.url}', api_key: test-key, connect_timeout: 3s}}"
    config = load(write_config(tmp_path, drachtio.esl_port, ROUTE, engines=engine, esl_password=PASSWORD,
                               extra=extra))
    with running_daemon(config) as daemon:
        caller = Caller(drachtio, probe, tmp_path, Silence(2.5), did="7101", hangs_up=True).dial()
        caller.wait_gone()
        assert daemon.controller.calls.get(caller.b) is None and not fake.sessions
        assert daemon.metrics.unrouted_calls._value.get() == 1
    heard = caller.recording().heard(join_s=0.015)  # the one-frame hole between prompt and operator splits them
    assert [round(p.freq, -1) for p in heard if p.seconds > 0.2][:2] == [500, OPERATOR_HZ], [str(p) for p in heard]
