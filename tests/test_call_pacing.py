"""An engine that streams its speech at exactly real time (100 ms pieces, 100 ms apart): the caller still hears
each reply without a hole, in both playback modes, and soon after its first audio.

fsim plays a growing native file as FreeSWITCH does (a playback that reaches the end of what was written ends) and
holds streamed audio in jambonz's pre-buffer before playout (a playout buffer that runs dry is a hole): the same
scenario on the real switch is `make bench-switch` (pace real-time), whose figures docs/playback.md gives.
"""

from __future__ import annotations

import pytest

from fsim import CallerScript, FSim, Silence, Tone
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, running_daemon, wait_until, write_config

GREETING_HZ, REPLY_HZ = 300.0, 700.0
ROUTE = """
- did: "7100"
  engine: bot
  sample_rate: 8000
  playback: {playback}
  greeting: Hello
  no_audio_timeout: 10s
"""


@pytest.fixture
def real_time_bot():
    fake = OpenAIFake(api_key="test-key").start()
    fake.tones = [GREETING_HZ, REPLY_HZ]
    fake.reply_ms, fake.delta_ms, fake.delta_interval = 1200, 100, 0.1  # exactly real time, on a clock
    yield fake
    fake.stop()


@pytest.mark.parametrize("playback", ["broadcast", "stream"])
def test_replies_from_a_real_time_engine_have_no_hole(tmp_path, real_time_bot, playback):
    engine = (f"bot: {{type: openai_realtime, url: '{real_time_bot.url}', api_key: test-key, model: gpt-realtime, "
              f"connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")
    build = "jambonz" if playback == "stream" else "drachtio"
    with FSim(fork_build=build) as sw:
        config = load(write_config(tmp_path, sw.esl_port, ROUTE.format(playback=playback), engines=engine))
        with running_daemon(config) as daemon:
            script = CallerScript(audio=Silence(2.0) + Tone(440, 0.4) + Silence(4.0), hangup_after=6.0)
            call = sw.place_call(did="7100", script=script, rate=8000)
            assert call.wait_answered(5)
            source = "stream" if playback == "stream" else "broadcast:"
            # the greeting, then the reply to the caller's tone: both played whole
            wait_until(lambda: call.ear.heard_seconds(source) >= 2.35, 10, "both replies to be heard")
            taken = daemon.controller.calls.get(call.uuid)
            assert taken is not None
            segments = sorted(call.ear.segments(source), key=lambda s: s.start)
            reply_start = next(s.start for s in segments if abs(s.frequency() - REPLY_HZ) < 20)
            for name, inside in (("greeting", [s for s in segments if s.start < reply_start]),
                                 ("reply", [s for s in segments if s.start >= reply_start])):
                holes = [round((b.start - a.end) * 1000, 1) for a, b in zip(inside, inside[1:], strict=False)
                         if b.start - a.end > 0.005]
                assert not holes, f"{playback}: holes in the {name} (ms): {holes}"
            assert call.wait_hangup(10)
