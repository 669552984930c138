"""On the real switch: outbound calls placed through the daemon's API (loopback/<number>/public to the test
extensions in tests/realswitch/switch.py), and a campaign whose cap is checked against FreeSWITCH's own channels.

Extension 7310 answers, records what it hears (the far leg's channel 0) and says a 660 Hz tone after 2.5 s;
7311 answers `respond 486` then `hangup USER_BUSY` (a loopback leg ignores the respond: seen on 1.10.12);
7312 rings and never answers; 7313 rejects; +1666777xxxx answer, wait 1.2 s and hang up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from controller.config import load_config
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import free_ports, running_daemon, wait_until, write_config
from tests.realswitch.caller import wait_no_channels
from tests.realswitch.heard import Recording
from tests.realswitch.switch import PASSWORD

REPO = Path(__file__).resolve().parents[2]
TOKEN = "rs-outbound-api-token-0123456789"
GREETING_HZ, REPLY_HZ, CALLEE_HZ = 300.0, 700.0, 660.0
ROUTE = """
- name: reminders
  did: "7100"
  engine: bot
  sample_rate: 8000
  greeting: Hello, this is a reminder.
  instructions: You remind people of appointments.
  no_audio_timeout: 30s
  outbound:
    dial: loopback/{to}/public
    allowed: '731\\d|\\+1666777\\d{4}'
    caller_id: "+15550001111"
    originate_timeout: 2s
    max_concurrent: 8
"""


@pytest.fixture
def fake():
    server = OpenAIFake(api_key="test-key").start()
    server.tones = [GREETING_HZ, REPLY_HZ]
    server.reply_ms = 500
    yield server
    server.stop()


def _config(tmp_path, switch, fake):
    engine = (f"bot: {{type: openai_realtime, url: '{fake.url}', api_key: test-key, model: gpt-realtime, "
              f"connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")
    port = free_ports(1)[0]
    path = write_config(tmp_path, switch.esl_port, ROUTE, engines=engine, esl_password=PASSWORD,
                        extra=f"api:\n  listen: 127.0.0.1:{port}\n  token: {TOKEN}\n")
    return path, load_config(str(path), env={})


def _ended(daemon, attempt_id: str, timeout: float = 15) -> dict:
    return wait_until(lambda: (a := daemon.dialer.get(attempt_id)) is not None and a.state == "ended"
                      and a.to_dict(), timeout, "the attempt to end")


def test_an_answered_outbound_call_hears_the_greeting_then_the_reply(tmp_path, drachtio, probe, fake):
    _, config = _config(tmp_path, drachtio, fake)
    with running_daemon(config) as daemon:
        attempt = daemon.dialer.place("reminders", "7310", {"crm_id": "A-17"}, context="Tuesday 10:00, Dr. Jones.")
        call = wait_until(lambda: daemon.controller.calls.get(attempt.id), 10, "the daemon to take the call")
        assert call.direction == "outbound" and call.did == "7310"
        assert probe.api(f"uuid_getvar {attempt.id} crm_id").strip() == "A-17"
        wait_until(lambda: "Dr. Jones" in fake.session.config["instructions"], 5, "the context in the instructions")
        done = _ended(daemon, attempt.id, 20)
        assert done["outcome"] == "answered" and done["call_outcome"] == "completed"
        record = daemon.ended_calls[-1].record.to_dict()
        assert record["direction"] == "outbound" and record["caller_id"] == "+15550001111"
    wait_no_channels(probe)
    # what the callee heard, from its own leg's recording: the greeting, then the reply to its tone
    path = drachtio.recordings / f"callee-{attempt.id}.wav"
    wait_until(lambda: path.exists() and path.stat().st_size > 44, 5, "the callee's recording")
    heard = [p for p in Recording.read(path).heard() if p.sound_seconds > 0.2]
    assert heard and abs(heard[0].freq - GREETING_HZ) < 15, [str(p) for p in heard]
    assert any(abs(p.freq - REPLY_HZ) < 15 for p in heard[1:]), [str(p) for p in heard]
    assert not daemon.controller.calls.get(attempt.id)


@pytest.mark.parametrize("number, outcome, cause", [
    ("7311", "busy", "USER_BUSY"), ("7312", "no_answer", "NO_ANSWER"), ("7313", "rejected", "CALL_REJECTED"),
])
def test_unanswered_calls_end_in_their_outcome(tmp_path, drachtio, probe, fake, number, outcome, cause):
    _, config = _config(tmp_path, drachtio, fake)
    with running_daemon(config) as daemon:
        attempt = daemon.dialer.place("reminders", number)
        done = _ended(daemon, attempt.id)
        assert (done["outcome"], done["cause"]) == (outcome, cause)
        assert not fake.sessions and not daemon.ended_calls
    wait_no_channels(probe)


def test_a_campaign_of_30_rows_at_concurrency_5_never_has_more_than_5_calls_up(tmp_path, drachtio, probe, fake):
    config_path, config = _config(tmp_path, drachtio, fake)
    csv_path = tmp_path / "list.csv"
    numbers = [f"+1666777{i:04d}" for i in range(30)]
    csv_path.write_text("to,customer\n" + "".join(f"{n},C{i}\n" for i, n in enumerate(numbers)))
    peak = {"sampled": 0}

    def sample() -> None:  # FreeSWITCH's own view, as an operator would look at it
        for _ in range(3000):
            rows = json.loads(probe.api("show channels as json") or "{}").get("rows") or []
            ours = [r for r in rows if r.get("direction") == "outbound" and r.get("name", "").startswith("loopback/")]
            peak["sampled"] = max(peak["sampled"], len(ours))
            gevent.sleep(0.05)

    with running_daemon(config):
        sampler = gevent.spawn(sample)
        since = len(probe.events)
        env = dict(os.environ)
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "campaign", "run", str(csv_path), "--config",
                                 str(config_path), "--route", "reminders", "--concurrency", "5", "--rate", "20/s"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            sampler.kill()
        assert proc.returncode == 0, err
    wait_no_channels(probe)
    # exact, from FreeSWITCH's events: outbound legs created minus destroyed, never above 5
    live = peak_events = 0
    created = []
    for event in probe.events[since:]:
        if event.get("Call-Direction") != "outbound" or not event.get("Channel-Name").startswith("loopback/"):
            continue
        if event.name == "CHANNEL_CREATE":
            live += 1
            created.append(event.get("Caller-Destination-Number"))
            peak_events = max(peak_events, live)
        elif event.name == "CHANNEL_DESTROY":
            live -= 1
    assert sorted(created) == numbers  # every row called once
    assert peak_events == 5 and peak["sampled"] <= 5, (peak_events, peak)
    lines = [json.loads(line) for line in Path(f"{csv_path}.results.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {line["outcome"] for line in lines} == {"answered"}
