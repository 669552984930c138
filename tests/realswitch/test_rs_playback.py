"""On the real switch: how a reply is played to the caller in broadcast mode, and what they hear of it.

The OpenAI-protocol fake greets the caller with one tone, streamed faster than real time, at exactly real time,
or slower than real time (the engine falls behind). What the caller heard comes from the recording of their leg;
which files FreeSWITCH played, in what order, from its PLAYBACK_START / PLAYBACK_STOP events.
"""

from __future__ import annotations

import os

import pytest

import bridge.session
from fsim.audio import Silence
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, running_daemon, wait_until, write_config
from tests.realswitch.caller import Caller
from tests.realswitch.switch import PASSWORD

GREETING_HZ = 300.0
HOLE_LIMIT_MS = 25.0  # right vs wrong; the figures are measured by `make bench`

ROUTE = """
- name: desk
  did: "7100"
  engine: bot
  sample_rate: 16000
  greeting: Hello
  instructions: Be brief.
  no_audio_timeout: 20s
"""


@pytest.fixture
def fake():
    server = OpenAIFake(api_key="test-key").start()
    server.tones = [GREETING_HZ]
    yield server
    server.stop()


def _greeting_heard(tmp_path, switch, probe, fake, reply_ms: int, delta_ms: int, interval: float):
    fake.reply_ms, fake.delta_ms, fake.delta_interval = reply_ms, delta_ms, interval
    engine = (f"bot: {{type: openai_realtime, url: '{fake.url}', api_key: test-key, model: gpt-realtime, "
              f"voice: alloy, connect_timeout: 3s}}")
    config = load(write_config(tmp_path, switch.esl_port, ROUTE, engines=engine, esl_password=PASSWORD))
    with running_daemon(config) as daemon:
        caller = Caller(switch, probe, tmp_path, Silence(reply_ms / 1000 + 4)).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: any(n == "engine_first_audio" for _t, n, _d in call.timeline), 5, "the greeting")
        wait_until(lambda: fake.sessions and fake.sessions[0].responses
                   and all(r.done for r in fake.sessions[0].responses), reply_ms / 1000 * 3 + 5, "the greeting sent")
        wait_until(lambda: not call.media.player.playing, 5, "the greeting to be played")
        caller.hang_up()
        caller.wait_gone()
        wait_until(lambda: call.gone.is_set(), 10, "the daemon to see the hangup")
        rec = caller.recording()
        wait_until(lambda: not os.listdir(tmp_path / "spool"), 5, "the spool to be emptied")
    return rec.heard(), caller.playbacks(), call


@pytest.mark.parametrize("pace", ["faster", "real_time"])
def test_a_reply_is_one_gapless_playback_however_fast_it_arrives(tmp_path, drachtio, probe, fake, pace):
    """On a channel whose codec mod_native_file plays (loopback legs are L16), a reply is one growing file."""
    interval = 0.005 if pace == "faster" else 0.1
    heard, plays, _call = _greeting_heard(tmp_path, drachtio, probe, fake, 2000, 100, interval)
    assert len(heard) == 1, [str(p) for p in heard]
    greeting = heard[0]
    assert abs(greeting.freq - GREETING_HZ) < 10, str(greeting)
    assert abs(greeting.seconds - 2.0) < 0.08, str(greeting)
    assert greeting.max_hole_ms <= HOLE_LIMIT_MS, str(greeting)
    assert [name for name, _path, _status in plays] == ["PLAYBACK_START", "PLAYBACK_STOP"], plays
    assert plays[0][1].endswith(".L16")


def test_an_engine_that_falls_behind_is_played_on_without_losing_audio(tmp_path, drachtio, probe, fake):
    """Deltas of 100 ms every 160 ms: FreeSWITCH reaches the end of the file and ends that playback; the rest of
    the reply goes on in new files, in order, and every millisecond of it is heard."""
    heard, plays, call = _greeting_heard(tmp_path, drachtio, probe, fake, 1500, 100, 0.16)
    assert all(abs(p.freq - GREETING_HZ) < 15 for p in heard if p.seconds > 0.05), [str(p) for p in heard]
    assert abs(sum(p.sound_seconds for p in heard) - 1.5) < 0.06, [str(p) for p in heard]
    starts = [path for name, path, _s in plays if name == "PLAYBACK_START"]
    stops = [path for name, path, _s in plays if name == "PLAYBACK_STOP"]
    assert len(starts) >= 2 and starts == stops == sorted(starts), plays
    assert any(n == "playback_underrun" for _t, n, _d in call.timeline)


def test_chunked_playback_where_the_codec_cannot_be_played_natively(tmp_path, drachtio, probe, fake, monkeypatch):
    """Other codecs (G.722, Opus, ...) get L16 chunks through mod_sndfile: in order, one frame apart."""
    monkeypatch.setattr(bridge.session, "native_format", lambda _codec, _rate: None)
    heard, plays, _call = _greeting_heard(tmp_path, drachtio, probe, fake, 2000, 100, 0.005)
    names = [name for name, _path, _status in plays]
    assert names == ["PLAYBACK_START", "PLAYBACK_STOP"] * (len(names) // 2) and len(names) >= 6, plays
    starts = [path for name, path, _s in plays if name == "PLAYBACK_START"]
    assert starts == sorted(starts) and all(p.endswith(".r16") for p in starts), plays
    assert len(heard) == 1, [str(p) for p in heard]
    greeting = heard[0]
    assert abs(greeting.freq - GREETING_HZ) < 10, str(greeting)
    # every boundary between two files is a hole of one frame (20 ms at 20 ms ptime) on FreeSWITCH 1.10
    assert len(greeting.holes) == len(starts) - 1, str(greeting)
    assert all(15 <= ms <= HOLE_LIMIT_MS for _at, ms in greeting.holes), str(greeting)
