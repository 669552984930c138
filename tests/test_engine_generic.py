"""Generic engine against examples/model_server.py (the protocol's reference server) over loopback."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import gevent
import pytest
import websocket

from bridge.engine import (
    PCM16,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    EngineError,
    EngineRefused,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.engines import create_engine
from bridge.generic import GenericEngine
from bridge.tools import build_tool_specs
from tests.fakes import silence, tone

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("example_model_server", ROOT / "examples" / "model_server.py")
model_server = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = model_server
_spec.loader.exec_module(model_server)

TOKEN = "model-token-0123456789"


@pytest.fixture
def server():
    srv = model_server.ModelServer(token=TOKEN, silence_ms=200).start("127.0.0.1", 0)
    yield srv
    srv.stop()


def make(server, rec, *, rate=16000, token=TOKEN, greeting="Hello from the model.", tools=()):
    cfg = {"url": f"ws://127.0.0.1:{server.port}/v1/call", "token": token, "connect_timeout": "3s"}
    call = CallInfo(uuid="uuid-gen", did="7300", caller_id="+15559990000", sample_rate=rate,
                    instructions="Be brief.", greeting=greeting, tools=tuple(tools))
    engine = create_engine("generic", cfg, call, rec)
    engine.connect()
    return engine


def speak(engine, speech_ms, silence_ms):
    rate = engine.formats.input.rate
    for chunk in [tone(20, rate)] * (speech_ms // 20) + [silence(20, rate)] * (silence_ms // 20):
        engine.send_audio(chunk)


def audio_of(rec, rid):
    return b"".join(e.audio for e in rec.of(AudioOut) if e.response_id == rid)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_session_uses_the_call_rate_both_ways(server, rec, rate):
    engine = make(server, rec, rate=rate)
    assert isinstance(engine, GenericEngine)
    assert engine.formats.input == engine.formats.output == AudioFormat(PCM16, rate)
    assert engine.session_id
    engine.close()


def test_greeting_audio_arrives_as_one_response(server, rec):
    engine = make(server, rec)
    engine.greet()
    done = rec.wait_for(ResponseDone)
    assert done.status == "completed"
    assert audio_of(rec, done.response_id)
    assert rec.wait_for(Transcript, lambda t: t.role == "assistant").text == "Hello from the model."
    engine.close()


def test_caller_utterance_is_echoed_back(server, rec):
    engine = make(server, rec, greeting="")
    speak(engine, speech_ms=300, silence_ms=300)
    rec.wait_for(SpeechStarted)
    rec.wait_for(SpeechStopped)
    assert rec.wait_for(Transcript, lambda t: t.role == "user").text.endswith("ms of speech)")
    done = rec.wait_for(ResponseDone)
    assert len(audio_of(rec, done.response_id)) == 300 * 32  # the 300 ms utterance, at 16 kHz
    engine.close()


def test_barge_in_interrupts_and_drops_the_rest(server, rec):
    engine = make(server, rec, greeting="")
    speak(engine, speech_ms=2000, silence_ms=200)
    first = rec.wait_for(AudioOut)
    speak(engine, speech_ms=60, silence_ms=0)  # the caller talks over the reply
    rec.wait_for(SpeechStarted, lambda e: len(rec.of(SpeechStarted)) >= 2)
    engine.interrupt(first.response_id, 150)
    seen = len(audio_of(rec, first.response_id))
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == first.response_id)
    assert done.status == "interrupted"
    assert len(audio_of(rec, first.response_id)) == seen
    assert len(audio_of(rec, first.response_id)) < 2000 * 32
    engine.close()


def test_interrupt_clamps_played_ms_to_audio_received(server, rec, monkeypatch):
    engine = make(server, rec)
    sent = []
    original = engine._send_json
    monkeypatch.setattr(engine, "_send_json", lambda m: sent.append(m) or original(m))
    engine.greet()
    done = rec.wait_for(ResponseDone)
    engine.interrupt(done.response_id, 10_000_000)
    cancel = [m for m in sent if m["type"] == "response.cancel"][0]
    assert cancel["played_ms"] == len(audio_of(rec, done.response_id)) // 32
    engine.interrupt(done.response_id, None)
    assert [m for m in sent if m["type"] == "response.cancel"][1]["played_ms"] == 0
    engine.close()


def test_dtmf_text_gets_a_reply(server, rec):
    engine = make(server, rec, greeting="")
    engine.send_text("The caller pressed 5.")
    assert rec.wait_for(Transcript, lambda t: t.role == "assistant").text == "You said: The caller pressed 5."
    assert audio_of(rec, rec.wait_for(ResponseDone).response_id)
    engine.close()


def test_tool_call_round_trip(server, rec):
    engine = make(server, rec, greeting="", tools=build_tool_specs(["transfer"], ["billing"]))
    engine.send_text('/tool transfer {"target": "billing"}')
    call = rec.wait_for(ToolCall)
    assert (call.name, dict(call.arguments)) == ("transfer", {"target": "billing"})
    engine.tool_result(call.call_id, {"ok": True, "result": "Transferring the caller to billing."})
    spoken = rec.wait_for(Transcript, lambda t: t.role == "assistant").text
    assert spoken.startswith("transfer result:") and "billing" in spoken
    engine.close()


def test_recoverable_error(server, rec):
    engine = make(server, rec)
    engine.send_text("/error overloaded")
    error = rec.wait_for(EngineError)
    assert (error.code, error.fatal) == ("overloaded", False)
    engine.greet()
    assert rec.wait_for(ResponseDone).status == "completed"
    engine.close()


def test_fatal_error_closes_unclean(server, rec):
    engine = make(server, rec)
    engine.send_text("/fatal model_crashed")
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("model_crashed", False)
    assert rec.of(EngineError)[0].fatal


def test_server_ending_the_conversation_is_clean(server, rec):
    engine = make(server, rec)
    engine.send_text("/close")
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("ended", True)


def test_dropped_connection(server, rec):
    engine = make(server, rec)
    engine.send_text("/drop")
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("dropped", False)


def test_wrong_token_is_refused(server, rec):
    with pytest.raises(EngineRefused, match="401") as info:
        make(server, rec, token="wrong-token-99999999")
    assert "wrong-token" not in str(info.value)


def test_example_server_runs_from_the_command_line():
    """`python examples/model_server.py --port N` serves the protocol."""
    import socket as stdsocket

    with stdsocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "model_server.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ws = None
        for _ in range(100):  # bounded: up to ~10 s for the process to start listening
            if proc.poll() is not None:
                break
            try:
                ws = websocket.create_connection(f"ws://127.0.0.1:{port}/v1/call?call_id=x", timeout=2)
                break
            except (OSError, websocket.WebSocketException):
                gevent.sleep(0.1)
        assert ws is not None, proc.stderr.read().decode() if proc.poll() is not None else "not listening"
        ws.send('{"type":"session.start","audio":{"encoding":"pcm_s16le","sample_rate":8000,"channels":1}}')
        assert '"session.started"' in ws.recv()
        ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=5)
