"""Outbound calls on fsim: placed through the daemon's HTTP API, answered (or not) by scripted callees.

fsim's `originate` follows what FreeSWITCH 1.10.12 did with loopback legs (tests/realswitch/test_rs_outbound.py
checks the same scenarios on the real switch): CHANNEL_ANSWER then park for an answered call, `-ERR <cause>` in
the BACKGROUND_JOB for one that is not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from fsim import Callee, CallerScript, FSim, Silence, Tone, dominant_frequency
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, metric, running_daemon, wait_until, write_config

TOKEN = "outbound-api-token-0123456789"
GREETING_HZ, CALLEE_HZ = 300.0, 660.0
ROUTE = """
- name: reminders
  did: "7100"
  engine: bot
  sample_rate: 8000
  greeting: "Hello, this is ACME calling about your appointment."
  instructions: "You remind people of their appointments."
  no_audio_timeout: 5s
  outbound:
    dial: loopback/{to}/public
    allowed: '73\\d\\d'
    caller_id: "+15550001111"
    originate_timeout: 2s
    max_concurrent: 2
"""
API = f"""
api:
  listen: 127.0.0.1:0
  token: {TOKEN}
"""


def callees() -> dict[str, Callee]:
    speaks = CallerScript(audio=Silence(2.5) + Tone(CALLEE_HZ, 0.6) + Silence(6.0), hangup_after=6.0)
    return {"7310": Callee(ring_s=0.3, script=speaks), "7311": Callee(cause="USER_BUSY"),
            "7312": Callee(answer=False), "7313": Callee(cause="CALL_REJECTED"),
            "7320": Callee(ring_s=30.0), "7321": Callee(ring_s=30.0), "7322": Callee(ring_s=30.0)}


def request(daemon: Any, method: str, path: str, body: dict[str, Any] | None = None,
            token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{daemon.call_api.url}{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def bot():
    fake = OpenAIFake(api_key="test-key").start()
    fake.tones = [GREETING_HZ, 700.0, 1000.0]
    yield fake
    fake.stop()


def engine_yaml(fake: OpenAIFake) -> str:
    return (f"bot: {{type: openai_realtime, url: '{fake.url}', api_key: test-key, model: gpt-realtime, "
            f"connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")


def test_answered_outbound_call_hears_the_greeting_and_reaches_the_engine(tmp_path, bot):
    with FSim(callees=callees()) as sw:
        config = load(write_config(tmp_path, sw.esl_port, ROUTE, engines=engine_yaml(bot), extra=API))
        with running_daemon(config) as daemon:
            status, placed = request(daemon, "POST", "/calls", {
                "route": "reminders", "to": "7310", "variables": {"campaign_id": "spring-42"},
                "context": "The appointment is on Tuesday at 10:00 with Dr. Jones."})
            assert status == 201, placed
            assert placed["state"] == "dialing"
            channel = wait_until(lambda: sw.channels.get(placed["id"]), 5, "the originated channel")
            assert channel.wait_answered(5)
            # FreeSWITCH was told our uuid, caller id and variables; the call is forked like an inbound one
            originate = next(c for c in sw.commands_log if c.command == "originate")
            assert originate.kind == "bgapi"
            assert f"origination_uuid={placed['id']}" in originate.args
            assert "origination_caller_id_number=+15550001111" in originate.args
            assert "campaign_id=spring-42" in originate.args
            assert originate.args.endswith("loopback/7310/public &park()")
            wait_until(lambda: channel.fork is not None, 5, "the fork on the outbound leg")
            # the callee hears the greeting first, then the model's reply to what it said
            wait_until(lambda: channel.ear.heard_seconds("broadcast:") >= 0.5, 8, "the greeting")
            greeting = channel.ear.heard_audio("broadcast:")
            assert abs(dominant_frequency(greeting[: 8000 // 2], 8000) - GREETING_HZ) < 15
            session = bot.session
            wait_until(lambda: "Dr. Jones" in session.config["instructions"], 5, "the context in the instructions")
            assert session.config["instructions"].startswith("You remind people")
            wait_until(lambda: request(daemon, "GET", f"/calls/{placed['id']}")[1]["state"] == "answered", 5,
                       "the attempt to show answered")
            assert channel.wait_hangup(12)
            _, done = wait_until(lambda: (r := request(daemon, "GET", f"/calls/{placed['id']}"))[1]["state"]
                                 == "ended" and r, 5, "the attempt to end")
            assert done["outcome"] == "answered" and done["call_outcome"] == "completed"
            assert done["duration"] > 0
            record = daemon.ended_calls[-1].record.to_dict()
            assert record["direction"] == "outbound" and record["did"] == "7310"
            assert record["caller_id"] == "+15550001111"
            assert metric(daemon.http.port, 'forkbridge_outbound_calls_total{outcome="answered",route="reminders"} 1.0')


@pytest.mark.parametrize("number, outcome, cause", [
    ("7311", "busy", "USER_BUSY"), ("7312", "no_answer", "NO_ANSWER"), ("7313", "rejected", "CALL_REJECTED"),
    ("7399", "failed", "NORMAL_CLEARING"),
])
def test_unanswered_attempts_end_in_an_outcome_an_operator_reads(tmp_path, bot, number, outcome, cause):
    with FSim(callees=callees()) as sw:
        config = load(write_config(tmp_path, sw.esl_port, ROUTE, engines=engine_yaml(bot), extra=API))
        with running_daemon(config) as daemon:
            status, placed = request(daemon, "POST", "/calls", {"route": "reminders", "to": number})
            assert status == 201
            _, done = wait_until(lambda: (r := request(daemon, "GET", f"/calls/{placed['id']}"))[1]["state"]
                                 == "ended" and r, 8, "the attempt to end")
            assert (done["outcome"], done["cause"]) == (outcome, cause)
            assert not daemon.controller.calls.get(placed["id"]) and not bot.sessions
            assert metric(daemon.http.port,
                          f'forkbridge_outbound_calls_total{{outcome="{outcome}",route="reminders"}} 1.0')


def test_bad_requests_place_nothing(tmp_path, bot):
    with FSim(callees=callees()) as sw:
        config = load(write_config(tmp_path, sw.esl_port, ROUTE + """
- name: answers-only
  did: "7101"
  engine: bot
""", engines=engine_yaml(bot), extra=API))
        with running_daemon(config) as daemon:
            cases = [
                (None, {"route": "reminders", "to": "7310"}, 401),
                ("wrong-token-wrong-token", {"route": "reminders", "to": "7310"}, 401),
                (TOKEN, {"route": "nope", "to": "7310"}, 404),
                (TOKEN, {"route": "answers-only", "to": "7310"}, 400),
                (TOKEN, {"route": "reminders", "to": "+4930123456"}, 403),
                (TOKEN, {"route": "reminders", "to": "7310,7311"}, 403),
                (TOKEN, {"route": "reminders", "to": "7310", "variables": {"x": "a b"}}, 400),
                (TOKEN, {"route": "reminders", "to": "7310", "variables": {"origination_uuid": "x"}}, 400),
                (TOKEN, {"route": "reminders"}, 400),
            ]
            for token, body, expected in cases:
                status, reply = request(daemon, "POST", "/calls", body, token=token)
                assert status == expected, (body, reply)
                assert reply.get("error")
            assert not [c for c in sw.commands_log if c.command == "originate"]
            assert request(daemon, "GET", "/calls/nope")[0] == 404
            assert request(daemon, "DELETE", "/calls/nope")[0] == 404


def test_the_route_cap_refuses_a_third_call_and_a_cancelled_one_frees_its_place(tmp_path, bot):
    with FSim(callees=callees()) as sw:
        route = ROUTE.replace("originate_timeout: 2s", "originate_timeout: 60s")
        config = load(write_config(tmp_path, sw.esl_port, route, engines=engine_yaml(bot), extra=API))
        with running_daemon(config) as daemon:
            first = request(daemon, "POST", "/calls", {"route": "reminders", "to": "7320"})[1]
            assert request(daemon, "POST", "/calls", {"route": "reminders", "to": "7321"})[0] == 201
            status, refused = request(daemon, "POST", "/calls", {"route": "reminders", "to": "7322"})
            assert status == 429 and "max_concurrent" in refused["error"]
            wait_until(lambda: len(sw.channels) == 2, 5, "two ringing channels")
            assert request(daemon, "DELETE", f"/calls/{first['id']}")[0] == 202
            _, done = wait_until(lambda: (r := request(daemon, "GET", f"/calls/{first['id']}"))[1]["state"]
                                 == "ended" and r, 5, "the cancelled attempt to end")
            assert done["outcome"] == "cancelled"
            assert request(daemon, "POST", "/calls", {"route": "reminders", "to": "7322"})[0] == 201
            wait_until(lambda: len([c for c in sw.commands_log if c.command == "originate"]) == 3, 5,
                       "the third originate")


def test_a_call_answered_after_a_reload_removed_its_route_ends_its_attempt(tmp_path, bot):
    """The route went away (SIGHUP) while the call rang: the answered call gets defaults' fallback like any marked
    call no route matches, and its attempt ends instead of holding a place under the cap for ever."""
    with FSim(callees={"7330": Callee(ring_s=1.0)}) as sw:
        path = write_config(tmp_path, sw.esl_port, ROUTE, engines=engine_yaml(bot), extra=API)
        with running_daemon(load(path)) as daemon:
            status, placed = request(daemon, "POST", "/calls", {"route": "reminders", "to": "7330"})
            assert status == 201
            without = path.read_text().replace("name: reminders", "name: renamed")
            path.write_text(without)
            assert daemon.reload(str(path))
            _, done = wait_until(lambda: (r := request(daemon, "GET", f"/calls/{placed['id']}"))[1]["state"]
                                 == "ended" and r, 8, "the attempt to end")
            assert done["outcome"] == "answered" and done["call_outcome"] == "unrouted"
            assert daemon.dialer.live("reminders") == 0
