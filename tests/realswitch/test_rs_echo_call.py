"""On the real switch: an inbound call to the echo engine, judged from a recording of the caller's leg.

The caller says a 440 Hz tone, waits for it to come back, talks over the echo with a 660 Hz tone (barge-in),
presses digits, and hangs up. The echo engine says back what it heard, and answers digits with their DTMF tones.
"""

from __future__ import annotations

import json
import os

import pytest

from bridge.echo import DTMF_FREQS
from fsim.audio import Silence, Tone
from tests.harness import load, running_daemon, wait_until, write_config
from tests.realswitch.caller import ABANDONED, Caller, real_calls, wait_no_channels
from tests.realswitch.switch import PASSWORD

ROUTE = """
- name: line-check
  did: "7100"
  engine: echo
  sample_rate: {rate}
  playback: broadcast
  no_audio_timeout: 20s
  dtmf: forward
"""
BARGE_IN_S = 0.15  # the reply stops within this of the caller starting to talk over it
HOLE_LIMIT_MS = 25.0  # tests separate right from wrong; the figures are in `make bench`


def _config(tmp_path, switch, rate: int):
    extra = f"logging:\n  call_records: {tmp_path / 'calls.jsonl'}\n"
    return load(write_config(tmp_path, switch.esl_port, ROUTE.format(rate=rate), extra=extra,
                             esl_password=PASSWORD))


@pytest.mark.parametrize("rate", [8000, 16000])
def test_echo_call_heard_right_cut_by_barge_in_and_answering_digits(tmp_path, drachtio, probe, rate):
    config = _config(tmp_path, drachtio, rate)
    with running_daemon(config) as daemon:
        received: list[tuple[str, str]] = []  # every event FreeSWITCH sent the daemon: (name, channel)
        handle = daemon.esl.on_event
        daemon.esl.on_event = lambda event: (received.append((event.name, event.uuid)), handle(event))
        # 440 Hz for 1.5 s; the echo comes back ~0.6 s after it ends; 660 Hz starts 0.5 s into the echo.
        caller = Caller(drachtio, probe, tmp_path, Tone(440, 1.5, 0.3) + Silence(1.1) + Tone(660, 0.6, 0.3)
                        + Silence(5.0)).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: any(n == "barge_in" for _t, n, _d in call.timeline), 10, "the barge-in")
        # the echo of 660 Hz has been heard: now the digits
        wait_until(lambda: sum(1 for _t, n, d in call.timeline if n == "engine_first_audio") >= 2, 10,
                   "the echo of the second tone")
        wait_until(lambda: not call.media.player.playing, 10, "the second echo to finish")
        caller.recv_dtmf("5")
        wait_until(lambda: sum(1 for _t, n, d in call.timeline if n == "engine_first_audio") >= 3, 10,
                   "the answer to the digit")
        wait_until(lambda: not call.media.player.playing, 10, "the DTMF answer to finish")
        caller.hang_up()
        hangup = caller.wait_gone()
        rec = caller.recording()
        wait_until(lambda: call.gone.is_set(), 10, "the daemon to see the hangup")
        spool = tmp_path / "spool"
        wait_until(lambda: not os.listdir(spool), 5, "the spool to be emptied")

    heard = rec.heard()
    said = rec.said()
    assert [round(p.freq / 10) * 10 for p in said] == [440, 660], [str(p) for p in said]
    assert len(heard) == 3, [str(p) for p in heard]
    first, second, digit = heard
    # pitch: what came back is what was said
    assert abs(first.freq - 440) < 15 and abs(second.freq - 660) < 15, (str(first), str(second))
    assert min(abs(digit.freq - f) for f in DTMF_FREQS["5"]) < 15, str(digit)
    # barge-in: the first echo stops soon after the caller starts the second tone
    cut_after = first.end - said[1].start
    assert 0 < cut_after <= BARGE_IN_S, f"echo still heard {cut_after * 1000:.0f} ms after the caller spoke"
    # the whole second echo is heard, without a hole a caller would notice
    assert abs(second.seconds - 0.6) < 0.1, str(second)
    for piece in heard:
        assert piece.max_hole_ms <= HOLE_LIMIT_MS, str(piece)
    # FreeSWITCH sent the daemon its call's events, and of the caller's own leg (a channel on the same switch that is
    # not forkbridge's: it plays the caller's audio, sends the digit, hangs up) only the answer
    ours = {name for name, uuid in received if uuid == caller.b}
    assert {"CHANNEL_ANSWER", "DTMF", "PLAYBACK_START", "PLAYBACK_STOP", "CHANNEL_HANGUP"} <= ours, ours
    assert {name for name, uuid in received if uuid == caller.a} <= {"CHANNEL_ANSWER"}
    assert all(uuid in (caller.b, *ABANDONED) or name in ("CHANNEL_ANSWER", "BACKGROUND_JOB")
               for name, uuid in received), received  # (the B leg of a dial placed again was the daemon's too)
    # the digit reached the engine as text
    assert any(n == "dtmf_to_engine" and d.get("text") == "5" for _t, n, d in call.timeline)
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"
    # the call record
    records = real_calls([json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()])
    assert [r["uuid"] for r in records] == [caller.b]
    assert records[0]["did"] == "7100" and records[0]["outcome"] == "completed"


def test_only_the_marked_leg_is_forked(tmp_path, drachtio, probe):
    """A loopback call shows the DID on both legs; only the leg our dialplan marked is forked."""
    with running_daemon(_config(tmp_path, drachtio, 8000)) as daemon:
        caller = Caller(drachtio, probe, tmp_path, Tone(440, 0.5) + Silence(3.0)).dial()
        caller.wait(lambda e: e.subclass == "mod_audio_fork::connect", 5, "the fork to connect")
        answers = [e for e in probe.events if e.name == "CHANNEL_ANSWER" and e.uuid in (caller.a, caller.b)]
        assert {e.get("Caller-Destination-Number") for e in answers} == {"7100"} and len(answers) == 2
        # (a dial placed again after the loopback race leaves a marked B leg that was forked too: not this call)
        forked = {e.uuid for e in probe.events if e.name == "MEDIA_BUG_START"
                  and e.get("Media-Bug-Function") != "session_record"} - ABANDONED
        assert forked == {caller.b}
        assert [c.uuid for c in daemon.controller.calls if c.uuid not in ABANDONED] == [caller.b]
        caller.hang_up()
        caller.wait_gone()
    wait_no_channels(probe)
