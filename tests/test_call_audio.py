"""What the caller hears: the echo engine says back what they said, at the right pitch, without gaps."""

from __future__ import annotations

import os

import pytest

from fsim import CallerScript, FSim, Silence, Tone, dominant_frequency
from tests.harness import load, running_daemon, wait_until, write_config

ECHO_ROUTE = """
- did: "7100"
  engine: echo
  sample_rate: {rate}
  playback: {playback}
  no_audio_timeout: 5s
"""


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("playback", ["broadcast", "stream"])
def test_tone_comes_back_at_440_hz(tmp_path, rate, playback):
    build = "jambonz" if playback == "stream" else "drachtio"
    with FSim(fork_build=build) as sw:
        config = load(write_config(tmp_path, sw.esl_port, ECHO_ROUTE.format(rate=rate, playback=playback)))
        with running_daemon(config):
            script = CallerScript(audio=Tone(440, 1.0) + Silence(6.0), hangup_after=4.5)
            call = sw.place_call(did="7100", script=script, rate=rate)
            assert call.wait_answered(5)
            source = "stream" if playback == "stream" else "broadcast:"
            wait_until(lambda: call.ear.heard_seconds(source) >= 0.9, timeout=8, what="the echo to be heard")
            heard = call.ear.heard_audio(source)
            assert abs(dominant_frequency(heard, rate) - 440) < 10
            if playback == "broadcast":
                # PCMU (8 kHz here): one growing file, no gap; G.722 (16 kHz): chunks, one frame apart as on
                # FreeSWITCH
                assert call.ear.max_gap() < (0.001 if rate == 8000 else 0.021)
            assert call.wait_hangup(10)
            spool = tmp_path / "spool"
            wait_until(lambda: not os.listdir(spool), timeout=5, what="spool files to be removed")
