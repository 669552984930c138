"""Whole calls through each AI engine: fsim and the real daemon against the fake OpenAI Realtime (GA) server, the
fake ElevenLabs Agents server and the example generic model server, all on 127.0.0.1.

Each scenario checks what the caller heard (fsim's ear), what the engine was told (the fake's received messages)
and how the call ended (what FreeSWITCH was told to do). The fakes give every response its own tone frequency, so
the ear can tell the greeting, the reply and any late audio of an interrupted response apart.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import gevent
import numpy as np
import pytest

from bridge.engine import PCMU, AudioFormat
from bridge.tools import build_tool_specs
from fsim import CallerScript, FSim, Silence, Tone
from fsim.audio import write_wav
from tests.fakes.elevenlabs_fake import ElevenLabsFake
from tests.fakes.openai_fake import OpenAIFake
from tests.harness import load, running_daemon, wait_until, write_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example_model_server() -> Any:
    name = "example_model_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "model_server.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


model_server = _example_model_server()

GREETING_HZ, REPLY_HZ, THIRD_HZ = 300.0, 700.0, 1000.0  # the fakes' tone per response, in order
CALLER_HZ = 440.0  # what the caller says (the example model server says it back)
SAY_HZ = 520.0  # the example model server's answer to `say` (the greeting)
GREETING = "Thanks for calling ACME, this is the front desk. How can I help?"
INSTRUCTIONS = "You are the front desk of ACME. Be brief."
CUTOFF_S = 0.3  # after a barge-in, nothing of the interrupted response may be heard once this has passed

ROUTE = """
- name: desk
  did: "7100"
  engine: bot
  sample_rate: {rate}
  greeting: "{greeting}"
  instructions: "{instructions}"
  voice: marin
  no_audio_timeout: 5s
  dtmf: forward
  tools:
    allow: [hangup, transfer]
    transfer_targets: {{sales: "2000 XML default"}}
  fallback:
    prompt: {prompt}
    transfer: 1000 XML default
"""


# ---- the engines, behind one small script API ----------------------------------------------------------------

class OpenAIBot:
    """The fake OpenAI Realtime GA server."""

    def __init__(self) -> None:
        self.fake = OpenAIFake(api_key="test-key").start()
        self.fake.tones = [GREETING_HZ, REPLY_HZ, THIRD_HZ]
        self.greeting_hz = GREETING_HZ

    def engine_yaml(self) -> str:
        return (f"bot: {{type: openai_realtime, url: '{self.fake.url}', api_key: test-key, model: gpt-realtime, "
                f"voice: alloy, connect_timeout: 3s, turn_detection: {{type: server_vad, silence_duration_ms: 200}}}}")

    def calls_tool(self, name: str, **arguments: Any) -> None:
        session = self.fake.session
        self.fake.changed.wait_until(lambda: all(r.done for r in session.responses), 5, "the model to finish talking")
        self.fake.tool_script.append((name, arguments))
        self.fake.start_response()

    def tool_results(self) -> list[tuple[dict[str, Any], bool]]:
        outputs = [m["item"] for m in self.fake.messages("conversation.item.create")
                   if m["item"].get("type") == "function_call_output"]
        results = [json.loads(item["output"]) for item in outputs]
        return [(result, result.get("ok") is False) for result in results]

    def texts(self) -> list[str]:
        return [c["text"] for m in self.fake.messages("conversation.item.create") if m["item"].get("type") == "message"
                for c in m["item"]["content"] if c.get("type") == "input_text"]

    def fail(self) -> None:
        self.fake.fatal_error("insufficient_quota")  # then the socket closes (session_expired is continued)

    def drop(self) -> None:
        self.fake.drop()

    def stop(self) -> None:
        self.fake.stop()


class ElevenLabsBot:
    """The fake ElevenLabs Agents server (public agent)."""

    def __init__(self) -> None:
        self.fake = ElevenLabsFake(agent_id="agent_test_1").start()
        self.fake.tones = [GREETING_HZ, REPLY_HZ, THIRD_HZ]
        self.greeting_hz = GREETING_HZ
        self._tool_ids = 0

    def engine_yaml(self) -> str:
        return f"bot: {{type: elevenlabs, url: '{self.fake.url}', agent_id: agent_test_1, connect_timeout: 3s}}"

    def calls_tool(self, name: str, **arguments: Any) -> None:
        self._tool_ids += 1
        self.fake.call_tool(name, arguments, tool_call_id=f"toolu_{self._tool_ids:02d}")

    def tool_results(self) -> list[tuple[dict[str, Any], bool]]:
        return [(json.loads(m["result"]), bool(m["is_error"])) for m in self.fake.messages("client_tool_result")]

    def texts(self) -> list[str]:
        return [m["text"] for m in self.fake.messages("user_message")]

    def fail(self) -> None:
        self.fake.fail("server_error", 1011, "The agent failed.")

    def drop(self) -> None:
        self.fake.drop()

    def stop(self) -> None:
        self.fake.stop()


class ScriptedModelServer(model_server.ModelServer):
    """The example model server, run in-process, recording what it receives so a test can check it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[Any] = []
        self.received: list[dict[str, Any]] = []
        self.responses: list[Any] = []

    def _serve(self, call: Any) -> None:
        self.calls.append(call)
        super()._serve(call)

    def _on_message(self, call: Any, m: dict[str, Any]) -> None:
        self.received.append(m)
        super()._on_message(call, m)

    def _play(self, call: Any, r: Any, *args: Any) -> None:
        self.responses.append(r)
        super()._play(call, r, *args)

    def messages(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == type_]

    def command(self, text: str) -> None:
        """One of the example server's scripting commands (/tool, /fatal, /drop), as if the model did it."""
        self._on_text_input(self.calls[-1], text, True)


class GenericBot:
    """examples/model_server.py, in-process."""

    def __init__(self) -> None:
        self.server = ScriptedModelServer(token="model-token-0123456789", silence_ms=200).start("127.0.0.1", 0)
        self.greeting_hz = SAY_HZ

    def engine_yaml(self) -> str:
        return (f"bot: {{type: generic, url: 'ws://127.0.0.1:{self.server.port}/v1/call', "
                f"token: model-token-0123456789, connect_timeout: 3s}}")

    def calls_tool(self, name: str, **arguments: Any) -> None:
        self.server.command(f"/tool {name} {json.dumps(arguments)}")

    def tool_results(self) -> list[tuple[dict[str, Any], bool]]:
        return [(json.loads(m["output"]), bool(m["is_error"])) for m in self.server.messages("tool.result")]

    def texts(self) -> list[str]:
        return [m["text"] for m in self.server.messages("input.text")]

    def fail(self) -> None:
        self.server.command("/fatal model_crashed")  # error{fatal:true}, then close 1011

    def drop(self) -> None:
        self.server.command("/drop")

    def stop(self) -> None:
        self.server.stop()


BOTS = {"openai_realtime": OpenAIBot, "elevenlabs": ElevenLabsBot, "generic": GenericBot}


@pytest.fixture(params=list(BOTS))
def bot(request):
    engine = BOTS[request.param]()
    yield engine
    engine.stop()


# ---- helpers ---------------------------------------------------------------------------------------------------

def prompt_file(tmp_path) -> str:
    path = tmp_path / "sorry.wav"
    if not path.exists():
        write_wav(str(path), np.zeros(4000, np.int16), 8000)  # half a second, like a short "please hold"
    return str(path)


def config_for(tmp_path, sw, engine_yaml: str, rate: int = 16000):
    routes = ROUTE.format(rate=rate, greeting=GREETING, instructions=INSTRUCTIONS, prompt=prompt_file(tmp_path))
    return load(write_config(tmp_path, sw.esl_port, routes, engines=engine_yaml))


def near(hz: float, wanted: float) -> bool:
    return abs(hz - wanted) <= 20.0


def tone_segments(call, hz: float) -> list:
    """What the caller heard at `hz` (one segment per played chunk)."""
    return [s for s in call.ear.segments() if s.duration >= 0.04 and s.rms() > 100 and near(s.frequency(), hz)]


def heard(call, hz: float) -> float:
    return sum(s.duration for s in tone_segments(call, hz))


def first_break(sw, uuid: str) -> float:
    """When FreeSWITCH was told to stop playback (the barge-in)."""
    breaks = wait_until(lambda: [c.at for c in sw.commands_for(uuid) if c.command == "uuid_break"],
                        what="playback to be stopped")
    return breaks[0]


def assert_nothing_of_it_after(call, hz: float, cutoff: float) -> None:
    late = [(round(s.start - cutoff, 3), s.duration) for s in tone_segments(call, hz) if s.end > cutoff]
    assert not late, f"the interrupted response ({hz:.0f} Hz) was still heard after the barge-in:\n" \
                     f"{call.ear.summary(call.t_answer)}"


def caller_hangs_up(call, daemon) -> None:
    if call.alive:
        call.hangup("NORMAL_CLEARING", by="caller")
    wait_until(lambda: daemon.controller.calls.get(call.uuid) is None, what="the daemon to let the call go")


def record_of(daemon, uuid: str):
    return wait_until(lambda: next((c for c in daemon.ended_calls if c.uuid == uuid), None), what="the call record")


def ending_reason(record) -> str:
    return next((d.get("reason") for _, name, d in record.timeline if name == "ending"), "")


def live_call(daemon, uuid: str):
    return wait_until(lambda: daemon.controller.calls.get(uuid), what="the daemon to take the call")


QUIET = CallerScript(audio=Silence(20.0), hangup_after=20.0)
# Silent while the greeting starts, talks over it for 0.6 s, then waits for the answer and presses 5.
TALKS_OVER_GREETING = CallerScript(audio=Silence(1.0) + Tone(CALLER_HZ, 0.6) + Silence(15.0), dtmf=[("5", 3.0)],
                                   hangup_after=15.0)


# ---- a conversation per engine ---------------------------------------------------------------------------------

def test_openai_call_greets_truncates_on_barge_in_replies_and_takes_digits(tmp_path):
    bot = OpenAIBot()
    bot.fake.reply_ms, bot.fake.delta_interval = 3000, 0.05  # 3 s per response, streamed at twice real time
    bot.fake.late_deltas = 5  # deltas already in flight when the server cancels the greeting
    try:
        with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
            call = sw.place_call(did="7100", script=TALKS_OVER_GREETING, rate=16000)
            wait_until(lambda: heard(call, GREETING_HZ) >= 0.3, what="the greeting to be heard")

            # the caller talks over the greeting: playback stops, the server is told how much was heard
            cutoff = first_break(sw, call.uuid) + CUTOFF_S
            session = bot.fake.session
            truncation = bot.fake.changed.wait_until(lambda: session.truncations, 5, "the truncate")[0]
            greeting = session.responses[0]
            assert truncation["item_id"] == greeting.item_id and truncation.get("ok")
            assert 0 < truncation["audio_end_ms"] <= truncation["item_audio_ms"]  # never more than was decoded
            assert greeting.cancel_reason == "turn_detected"  # the server cancelled it, late deltas and all

            wait_until(lambda: heard(call, REPLY_HZ) >= 0.3, what="the reply to be heard")
            assert_nothing_of_it_after(call, GREETING_HZ, cutoff)
            wait_until(lambda: "5" in bot.texts(), what="the digit at the model")

            fmt = {"type": "audio/pcm", "rate": 24000}
            specs = build_tool_specs(["hangup", "transfer"], ["sales"])
            assert bot.fake.messages("session.update") == [{
                "type": "session.update", "event_id": "fb_session_1",
                "session": {
                    "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
                    "instructions": INSTRUCTIONS,
                    "audio": {
                        "input": {"format": fmt, "transcription": {"model": "gpt-4o-mini-transcribe"},
                                  "turn_detection": {"type": "server_vad", "silence_duration_ms": 200,
                                                     "create_response": True, "interrupt_response": True}},
                        "output": {"format": fmt, "voice": "marin"},  # the route's voice beats the engine's
                    },
                    "tools": [{"type": "function", "name": s.name, "description": s.description,
                               "parameters": json.loads(json.dumps(s.parameters))} for s in specs],
                    "tool_choice": "auto",
                },
            }]
            transfer = bot.fake.messages("session.update")[0]["session"]["tools"][1]
            assert transfer["parameters"]["properties"]["target"]["enum"] == ["sales"]
            assert not bot.fake.messages("error")
            caller_hangs_up(call, daemon)
    finally:
        bot.stop()


def test_openai_8k_call_speaks_pcmu_both_ways_without_resampling(tmp_path):
    bot = OpenAIBot()
    try:
        with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml(), rate=8000)) as daemon:
            script = CallerScript(audio=Silence(1.5) + Tone(CALLER_HZ, 0.5) + Silence(10.0), hangup_after=12.0)
            call = sw.place_call(did="7100", script=script, rate=8000)
            wait_until(lambda: heard(call, GREETING_HZ) >= 0.3, what="the greeting to be heard")
            wait_until(lambda: heard(call, REPLY_HZ) >= 0.3, what="the reply to the caller's words")

            update = bot.fake.messages("session.update")[0]["session"]["audio"]
            assert update["input"]["format"] == update["output"]["format"] == {"type": "audio/pcmu"}
            media = live_call(daemon, call.uuid).media
            assert media._in.dst == media._out.src == AudioFormat(PCMU, 8000)
            assert media._in.resampler is None and media._out.resampler is None
            # the caller's audio went as G.711: the fake decoded it as such, its VAD heard the caller, it replied
            assert bot.fake.messages("input_audio_buffer.append") and not bot.fake.messages("error")
            caller_hangs_up(call, daemon)
    finally:
        bot.stop()


def test_elevenlabs_call_greets_drops_interrupted_audio_replies_and_takes_digits(tmp_path):
    bot = ElevenLabsBot()
    bot.fake.reply_ms = 3000  # each agent turn "plays" for 3 s (its audio is all sent at once)
    bot.fake.stale_after_interrupt = 5  # chunks of the interrupted turn still arriving after `interruption`
    bot.fake.audio_ids = "chunk"  # every chunk its own event_id: only the "<= interrupted id" rule drops them
    try:
        with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
            call = sw.place_call(did="7100", script=TALKS_OVER_GREETING, rate=16000)
            wait_until(lambda: heard(call, GREETING_HZ) >= 0.3, what="the greeting to be heard")

            conversation = bot.fake.conversation
            override = conversation.initiation["conversation_config_override"]
            assert override == {"agent": {"prompt": {"prompt": INSTRUCTIONS}, "first_message": GREETING},
                                "tts": {"voice_id": "marin"}}

            cutoff = first_break(sw, call.uuid) + CUTOFF_S  # the agent's own `interruption` stopped playback
            assert conversation.turns[0].interrupted
            wait_until(lambda: heard(call, REPLY_HZ) >= 0.3, what="the reply to be heard")
            assert_nothing_of_it_after(call, GREETING_HZ, cutoff)  # event_id <= the interrupted one: dropped
            wait_until(lambda: "5" in bot.texts(), what="the digit at the agent")
            caller_hangs_up(call, daemon)
    finally:
        bot.stop()


def test_generic_call_greets_cancels_on_barge_in_echoes_and_takes_digits(tmp_path):
    bot = GenericBot()
    try:
        with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
            call = sw.place_call(did="7100", script=TALKS_OVER_GREETING, rate=16000)
            wait_until(lambda: heard(call, SAY_HZ) >= 0.3, what="the greeting to be heard")
            server = bot.server
            start = server.messages("session.start")[0]
            assert start["instructions"] == INSTRUCTIONS and start["voice"] == "marin"
            assert server.messages("say") == [{"type": "say", "text": GREETING}]

            cutoff = first_break(sw, call.uuid) + CUTOFF_S
            cancel = wait_until(lambda: server.messages("response.cancel"), what="the response.cancel")[0]
            greeting = server.responses[0]
            assert cancel["response_id"] == greeting.id
            assert 0 < cancel["played_ms"] <= greeting.sent_ms  # what the caller heard, never more than sent

            wait_until(lambda: heard(call, CALLER_HZ) >= 0.3, what="the caller's words said back")
            assert_nothing_of_it_after(call, SAY_HZ, cutoff)
            wait_until(lambda: "5" in bot.texts(), what="the digit at the model")
            caller_hangs_up(call, daemon)
    finally:
        bot.stop()


def test_a_call_through_the_example_model_server_run_as_a_program(tmp_path):
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "model_server.py"), "--port", "0",
                               "--silence-ms", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(10, AssertionError("the model server never said where it listens")):
            port = None
            while port is None:
                line = server.stderr.readline()
                assert line, "the model server exited"
                match = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
                port = int(match.group(1)) if match else None
        engines = f"bot: {{type: generic, url: 'ws://127.0.0.1:{port}/v1/call'}}"
        with FSim() as sw, running_daemon(config_for(tmp_path, sw, engines)) as daemon:
            script = CallerScript(audio=Silence(0.5) + Tone(CALLER_HZ, 0.5) + Silence(10.0), hangup_after=12.0)
            call = sw.place_call(did="7100", script=script, rate=16000)
            wait_until(lambda: heard(call, SAY_HZ) >= 0.2, what="the greeting to be heard")
            wait_until(lambda: heard(call, CALLER_HZ) >= 0.3, what="the caller's words said back")
            caller_hangs_up(call, daemon)
            assert call.transferred_to is None  # no fallback: the model server served the whole call
    finally:
        server.terminate()
        server.wait(5)
        server.stderr.close()


# ---- tools, per engine -----------------------------------------------------------------------------------------

def test_model_transfers_to_an_allowed_target(tmp_path, bot):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
        call = sw.place_call(did="7100", script=QUIET, rate=16000)
        wait_until(lambda: heard(call, bot.greeting_hz) >= 0.2, what="the greeting to be heard")
        bot.calls_tool("transfer", target="sales")
        wait_until(lambda: call.transferred_to, what="the transfer")
        assert call.transferred_to.startswith("2000")
        assert wait_until(bot.tool_results, what="the tool result")[0][1] is False
        record = record_of(daemon, call.uuid)
        assert (record.outcome, ending_reason(record)) == ("transferred", "model_transfer")


def test_model_is_refused_a_target_the_route_does_not_list_then_hangs_up(tmp_path, bot):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
        call = sw.place_call(did="7100", script=QUIET, rate=16000)
        wait_until(lambda: heard(call, bot.greeting_hz) >= 0.2, what="the greeting to be heard")

        bot.calls_tool("transfer", target="ceo")
        result, is_error = wait_until(bot.tool_results, what="the refusal at the model")[0]
        assert is_error and result["ok"] is False and "not allowed" in result["error"] and "sales" in result["error"]
        assert call.transferred_to is None and call.alive  # the call goes on
        assert daemon.controller.calls.get(call.uuid).live
        assert not [c for c in sw.commands_for(call.uuid) if c.command == "uuid_transfer"]

        bot.calls_tool("hangup", reason="caller is done")
        assert call.wait_hangup(10)
        assert call.hangup_by == "switch" and call.transferred_to is None
        record = record_of(daemon, call.uuid)
        assert (record.outcome, ending_reason(record)) == ("completed", "model_hangup")


# ---- engine failures, per engine -------------------------------------------------------------------------------

@pytest.mark.parametrize(("failure", "reason"), [("fail", "engine_error"), ("drop", "engine_dropped")])
def test_engine_failure_mid_call_ends_in_the_fallback(tmp_path, bot, failure, reason):
    with FSim() as sw, running_daemon(config_for(tmp_path, sw, bot.engine_yaml())) as daemon:
        call = sw.place_call(did="7100", script=QUIET, rate=16000)
        wait_until(lambda: heard(call, bot.greeting_hz) >= 0.2, what="the greeting to be heard")
        getattr(bot, failure)()
        wait_until(lambda: call.transferred_to, what=f"the fallback transfer after {failure}")
        assert call.transferred_to.startswith("1000")
        assert (prompt_file(tmp_path), "done") in call.played  # the caller heard the prompt first
        record = record_of(daemon, call.uuid)
        assert (record.outcome, ending_reason(record)) == ("fallback_transfer", reason)
