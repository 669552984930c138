"""On the real switch: a SIP caller (SIPp) with PCMU and RFC 2833 digits, at 20 ms and 30 ms packets.

The loopback calls of the other scenarios never cross SIP or RTP. Here SIPp dials our DID over SIP, says a 440 Hz
tone in PCMU packets of 20 or 30 ms, presses 1 and # as RFC 2833 events, and hangs up with a BYE. The echo engine
says the tone back and answers the digits with their DTMF tones; a tap on SIPp's media port hears that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.echo import DTMF_FREQS
from controller.daemon import Daemon
from fsim.audio import Silence, Tone
from tests.harness import load, running_daemon, wait_until, write_config
from tests.realswitch.caller import wait_no_channels
from tests.realswitch.heard import pieces
from tests.realswitch.sipp import RATE, Dtmf, SippCall, add_sipp_user, why_sipp_unusable
from tests.realswitch.switch import PASSWORD, must_run

ROUTE = """
- name: line-check
  did: "7100"
  engine: echo
  sample_rate: 8000
  playback: broadcast
  no_audio_timeout: 20s
  dtmf: forward
"""
DIGITS = "1#"
# 440 Hz once the fork is surely up (on a switch's first call FreeSWITCH's CHANNEL_ANSWER reaches ESL ~0.5 s late,
# so the fork starts late too); the echo comes back ~0.6 s after the tone ends and lasts 1 s; then the digits;
# then time for the DTMF answers before the BYE.
SCRIPT = [Silence(1.0), Tone(440, 1.0, 0.3), Silence(2.2), Dtmf(DIGITS), Silence(2.0)]


@dataclass
class ForkFrames:
    """What mod_audio_fork sent, as the daemon counted it: (bytes, frames) per piece of caller audio (wraps the
    daemon's audio counters, which every media session is handed)."""

    inner: Any
    pieces: list[tuple[int, int]] = field(default_factory=list)

    def audio_in(self, nbytes: int, frames: int = 1) -> None:
        self.pieces.append((nbytes, frames))
        self.inner.audio_in(nbytes, frames)

    def audio_out(self, nbytes: int) -> None:
        self.inner.audio_out(nbytes)


def _names(call, name: str) -> list[dict]:
    return [d for _t, n, d in call.timeline if n == name]


def _when(event) -> float:
    """FreeSWITCH's own time of an event (microseconds since the epoch)."""
    return int(event.get("Event-Date-Timestamp", "0")) / 1e6


@pytest.fixture
def sipp_daemon(tmp_path, drachtio, probe) -> Iterator[Daemon]:
    """The daemon on the drachtio switch, which now knows the SIPp caller's directory user."""
    why = why_sipp_unusable()
    if why:
        if must_run():
            pytest.fail(f"SIPp scenarios must run under CI, but: {why}", pytrace=False)
        pytest.skip(f"SIPP SCENARIOS SKIPPED: {why}")
    add_sipp_user(drachtio, probe)
    extra = f"logging:\n  call_records: {tmp_path / 'calls.jsonl'}\n"
    config = load(write_config(tmp_path, drachtio.esl_port, ROUTE, extra=extra, esl_password=PASSWORD))
    with running_daemon(config) as daemon:
        yield daemon


@pytest.mark.parametrize("ptime", [20, 30])
def test_sipp_call_pcmu_audio_and_rfc2833_digits_reach_the_engine(tmp_path, drachtio, probe, sipp_daemon, ptime):
    """A carrier-like call: the caller is heard, its digits are acted on, and its BYE ends the call cleanly."""
    daemon = sipp_daemon
    frames = ForkFrames(daemon.controller.stats)
    daemon.controller.stats = frames
    sipp = SippCall(drachtio, tmp_path, SCRIPT, ptime_ms=ptime).start()
    try:
        answer = probe.wait_event(lambda e: e.name == "CHANNEL_ANSWER" and e.get("variable_forkbridge") == "true"
                                  and e.get("Channel-Name").startswith("sofia/internal/"), 10, "the SIP call's answer")
        uuid = answer.uuid
        call = wait_until(lambda: daemon.controller.calls.get(uuid), 5, "the daemon to take the call")
        bug = probe.wait_event(lambda e: e.name == "MEDIA_BUG_START" and e.uuid == uuid, 5, "the fork's media bug")
        probe.wait_event(lambda e: e.subclass == "mod_audio_fork::connect" and e.uuid == uuid, 5, "the fork")
        # (1) the caller's audio reaches the engine, which hears speech and answers it
        wait_until(lambda: _names(call, "speech_started"), 10, "the engine to hear the tone")
        wait_until(lambda: _names(call, "engine_first_audio"), 10, "the echo of the tone")
        # (2) the digits arrive as DTMF events and go to the engine as text
        dtmf = [probe.wait_event(lambda e, d=d: e.name == "DTMF" and e.uuid == uuid and e.get("DTMF-Digit") == d,
                                 10, f"DTMF {d}") for d in DIGITS]
        wait_until(lambda: len(_names(call, "dtmf_to_engine")) == len(DIGITS), 5, "the digits to reach the engine")
        # (3) the caller hangs up: a clean end on both sides
        result = sipp.wait()
        hangup = probe.wait_event(lambda e: e.name == "CHANNEL_HANGUP_COMPLETE" and e.uuid == uuid, 10, "hangup")
        wait_until(lambda: call.gone.is_set(), 10, "the daemon to see the hangup")
        wait_no_channels(probe)
    finally:
        sipp.stop()

    assert result.returncode == 0 and result.successful_calls == 1 and result.failed_calls == 0, str(result)
    # the call came over SIP, authenticated, into the public context's DID, with what SIPp offered
    assert answer.get("Caller-Context") == "public" and answer.get("Caller-Destination-Number") == "7100"
    assert answer.get("variable_sip_authorized") == "true"
    sdp = result.answer_sdp()
    assert "a=rtpmap:0 PCMU/8000" in sdp and "telephone-event/8000" in sdp and f"a=ptime:{ptime}" in sdp, sdp
    assert hangup.get("variable_read_codec") == "PCMU" and hangup.get("variable_read_rate") == "8000"
    # (1) the fork carried the caller: mostly one frame per RTP packet (8 kHz L16 of one ptime; once the first frame
    # held two), and 16 000 bytes a second from the fork's start to the hangup, none lost at either ptime
    whole = [(nbytes, n) for nbytes, n in frames.pieces if nbytes == n * 16 * ptime]
    assert len(whole) >= 0.9 * len(frames.pieces), sorted(set(frames.pieces))
    forked_s = _when(hangup) - _when(bug)
    received = sum(nbytes for nbytes, _n in frames.pieces)
    assert abs(received / 16000 - forked_s) < 0.1, (received, forked_s)
    # (2) RFC 2833 digits as FreeSWITCH saw them, and as the daemon passed them on
    assert [e.get("DTMF-Source") for e in dtmf] == ["RTP"] * len(DIGITS)
    pressed = RATE // 1000 * Dtmf(DIGITS).on_ms  # samples: at least what the caller's events lasted
    assert all(int(e.get("DTMF-Duration")) >= pressed for e in dtmf), [e.get("DTMF-Duration") for e in dtmf]
    assert [d["digit"] for d in _names(call, "dtmf")] == list(DIGITS)
    assert [d["text"] for d in _names(call, "dtmf_to_engine")] == list(DIGITS)
    # (3) SIPp's BYE ended it: a normal clearing, recorded as completed
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"
    assert hangup.get("variable_sip_hangup_disposition") == "recv_bye"
    records = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [(r["uuid"], r["did"], r["outcome"]) for r in records] == [(uuid, "7100", "completed")]
    # what SIPp was sent: PCMU in packets of the agreed ptime, the echo of 440 Hz, then the answer to the first digit
    assert sipp.tap is not None and f"m=audio {sipp.media_port} " in result.offer_sdp()
    sizes = set(sipp.tap.payload_sizes())
    assert sizes == {RATE * ptime // 1000}, f"PCMU payload sizes FreeSWITCH sent to SIPp: {sizes or 'none'}"
    heard = pieces(sipp.tap.heard(), RATE)
    assert heard and abs(heard[0].freq - 440) < 15, [str(p) for p in heard]
    assert abs(heard[0].seconds - 1.0) < 0.1, str(heard[0])
    answers = heard[1:]
    assert answers and min(abs(answers[0].freq - f) for f in DTMF_FREQS[DIGITS[0]]) < 15, [str(p) for p in heard]
