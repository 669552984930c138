"""On the real switch: a route with `record:` gets a stereo recording of the call written by FreeSWITCH itself.

The caller says 440 Hz; the (fake) OpenAI engine greets at 300 Hz and replies at 700 Hz. The daemon's recording of
the forked leg must have the caller on one channel and what FreeSWITCH played to the caller on the other, each at
its own pitch, and its path, duration and channel layout in the call record. Measured here (FreeSWITCH 1.10.12,
`RECORD_STEREO=true` on the parked B leg): channel 0 is the caller, channel 1 what was played to the caller.
"""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from fsim.audio import Silence, Tone, dominant_frequency
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, running_daemon, wait_until, write_config
from tests.realswitch.caller import Caller
from tests.realswitch.switch import PASSWORD

CALLER_HZ, GREETING_HZ, REPLY_HZ = 440.0, 300.0, 700.0
PITCH_HZ = 15.0
ROUTE = """
- name: desk
  did: "7100"
  engine: bot
  sample_rate: 16000
  playback: broadcast
  greeting: "Thanks for calling. How can I help?"
  no_audio_timeout: 20s
  record: {{path: '{path}'}}
"""


@pytest.fixture
def bot():
    fake = OpenAIFake(api_key="sk-test-realswitch-0123456789").start()
    fake.tones = [GREETING_HZ, REPLY_HZ]
    fake.reply_ms = 1000
    yield fake
    fake.stop()


def _config(tmp_path, switch, bot: OpenAIFake, path: str):
    engines = (f"bot: {{type: openai_realtime, url: '{bot.url}', api_key: sk-test-realswitch-0123456789, "
               f"connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")
    extra = f"logging:\n  call_records: {tmp_path / 'calls.jsonl'}\n"
    return load(write_config(tmp_path, switch.esl_port, ROUTE.format(path=path), engines=engines, extra=extra,
                             esl_password=PASSWORD))


def _call(tmp_path, switch, probe, bot: OpenAIFake, path: str) -> tuple[Caller, dict]:
    """The greeting, the caller's 440 Hz turn, the reply; the caller hangs up once it has played."""
    with running_daemon(_config(tmp_path, switch, bot, path)) as daemon:
        caller = Caller(switch, probe, tmp_path, Silence(2.0) + Tone(CALLER_HZ, 0.6, 0.3) + Silence(6.0)).dial()
        call = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
        wait_until(lambda: sum(1 for _t, n, _d in call.timeline if n == "engine_first_audio") >= 2, 10,
                   "the greeting and the reply")
        wait_until(lambda: not call.media.player.playing, 10, "the reply to be played out")
        caller.hang_up()
        caller.wait_gone()
        wait_until(lambda: (tmp_path / "calls.jsonl").exists(), 5, "the call record")
    (record,) = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return caller, record


def _pitches(samples: np.ndarray, rate: int) -> list[float]:
    """The pitch of every loud 100 ms of one channel."""
    step = rate // 10
    pieces = [samples[i:i + step] for i in range(0, len(samples) - step, step)]
    return [dominant_frequency(p, rate) for p in pieces if np.sqrt(np.mean(p.astype(np.float64) ** 2)) > 500]


def _near(found: list[float], wanted: float) -> int:
    return sum(1 for f in found if abs(f - wanted) < PITCH_HZ)


def test_a_recorded_call_has_the_caller_on_channel_0_and_the_agent_on_channel_1(tmp_path, drachtio, probe, bot):
    caller, record = _call(tmp_path, drachtio, probe, bot, f"{tmp_path}/recordings/{{date}}/{{uuid}}.wav")

    recording = record["recording"]
    assert recording["path"].startswith(f"{tmp_path}/recordings/20")  # FreeSWITCH made the {date} directory
    assert recording["path"].endswith(f"/{caller.b}.wav") and recording["channels"] == ["caller", "agent"]
    with wave.open(recording["path"]) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, channels)
    assert channels == 2
    # FreeSWITCH's own count (RECORD_STOP record_ms) is the file's length; the call lasts a little longer
    assert abs(recording["duration"] - len(data) / rate) < 0.05
    assert 0 < record["duration"] - recording["duration"] < 1.0, (record["duration"], recording["duration"])
    caller_side, agent_side = _pitches(data[:, 0], rate), _pitches(data[:, 1], rate)
    assert _near(caller_side, CALLER_HZ) >= 5 and len(caller_side) == _near(caller_side, CALLER_HZ), caller_side
    assert _near(agent_side, GREETING_HZ) >= 8 and _near(agent_side, REPLY_HZ) >= 8, agent_side
    assert not _near(agent_side, CALLER_HZ), agent_side  # each side only on its own channel
    assert not _near(caller_side, GREETING_HZ) and not _near(caller_side, REPLY_HZ), caller_side


def test_a_recording_freeswitch_refuses_is_logged_and_counted_and_the_call_goes_on(tmp_path, drachtio, probe, bot):
    _caller, record = _call(tmp_path, drachtio, probe, bot, "/proc/forkbridge-nowhere/{uuid}.wav")

    assert record["outcome"] == "completed"
    assert record["recording"]["error"] == "-ERR Cannot record session!"
    assert sum(1 for _t, n, _d in record["timeline"] if n == "engine_first_audio") >= 2  # greeting and reply
