"""OpenAI Realtime engine against the GA fake over real loopback sockets."""

from __future__ import annotations

import base64
import logging

import pytest

from bridge.engine import (
    PCM16,
    PCMU,
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
from bridge.openai_realtime import OpenAIRealtimeEngine
from bridge.tools import build_tool_specs
from tests.fakes import lin2ulaw, silence, tone
from tests.fakes.openai_fake import OpenAIFake

KEY = "sk-test-abcdefghijklmnop0123"


@pytest.fixture
def fake():
    server = OpenAIFake(api_key=KEY).start()
    yield server
    server.stop()


def make(fake, rec, *, rate=16000, tools=(), greeting="Thanks for calling ACME.", channel_rate=0, **config):
    cfg = {"url": fake.url, "api_key": KEY, "model": "gpt-realtime", "voice": "marin", "connect_timeout": "3s",
           "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                              "silence_duration_ms": 200}}
    cfg.update(config)
    call = CallInfo(uuid="uuid-1", did="7100", caller_id="+15551230000", sample_rate=rate,
                    instructions="You are the front desk.", voice="", greeting=greeting, tools=tuple(tools),
                    channel_rate=channel_rate)
    engine = create_engine("openai_realtime", cfg, call, rec)
    engine.connect()
    return engine


def speak(engine, rate=16000, speech_ms=200, silence_ms=300):
    """Caller audio in the engine's input format, in 20 ms frames (faster than real time)."""
    out_rate = engine.formats.input.rate
    for chunk in [tone(20, out_rate)] * (speech_ms // 20) + [silence(20, out_rate)] * (silence_ms // 20):
        engine.send_audio(lin2ulaw(chunk) if engine.formats.input.encoding == PCMU else chunk)


def audio_of(rec, rid):
    return b"".join(e.audio for e in rec.of(AudioOut) if e.response_id == rid)


def test_registry_builds_the_openai_engine(fake, rec):
    engine = make(fake, rec)
    assert isinstance(engine, OpenAIRealtimeEngine)
    engine.close()


def test_session_update_is_the_exact_ga_shape_for_a_16k_call(fake, rec):
    specs = build_tool_specs(["hangup", "transfer"], ["operator"])
    engine = make(fake, rec, tools=specs)
    update = fake.messages("session.update")[0]
    fmt = {"type": "audio/pcm", "rate": 24000}
    assert update == {
        "type": "session.update", "event_id": "fb_session_1",
        "session": {
            "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
            "instructions": "You are the front desk.",
            "audio": {
                "input": {"format": fmt, "transcription": {"model": "gpt-4o-mini-transcribe"},
                          "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                             "silence_duration_ms": 200, "create_response": True,
                                             "interrupt_response": True}},
                "output": {"format": fmt, "voice": "marin"},
            },
            "tools": [{"type": "function", "name": s.name, "description": s.description,
                       "parameters": dict(s.parameters)} for s in specs],
            "tool_choice": "auto",
        },
    }
    assert engine.formats.input == engine.formats.output == AudioFormat(PCM16, 24000)
    conn = fake.conn
    assert conn.headers["authorization"] == f"Bearer {KEY}"
    assert "openai-beta" not in conn.headers
    assert conn.query["model"] == "gpt-realtime"
    assert not fake.messages("error")  # the fake accepted it
    engine.close()


def test_8k_call_uses_pcmu_both_ways_without_resampling(fake, rec):
    engine = make(fake, rec, rate=8000)
    audio = fake.messages("session.update")[0]["session"]["audio"]
    assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcmu"}
    assert engine.formats.input == engine.formats.output == AudioFormat(PCMU, 8000)
    engine.greet()
    done = rec.wait_for(ResponseDone)
    assert len(audio_of(rec, done.response_id)) == fake.reply_ms * 8  # mu-law: 8 bytes per ms
    engine.close()


@pytest.mark.parametrize("channel_rate, heard", [(8000, {"type": "audio/pcmu"}),
                                                  (16000, {"type": "audio/pcm", "rate": 24000})])
def test_a_16k_call_hears_pcmu_when_its_channel_is_8k(fake, rec, channel_rate, heard):
    """24 kHz output on an 8 kHz channel would only be resampled down, and soxr's 24→8 kHz stream comes out in
    blocks of up to 75 ms: the first words of every reply would wait for them."""
    engine = make(fake, rec, rate=16000, channel_rate=channel_rate)
    audio = fake.messages("session.update")[0]["session"]["audio"]
    assert audio["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio["output"]["format"] == heard
    assert engine.formats.input == AudioFormat(PCM16, 24000)
    assert engine.formats.output == (AudioFormat(PCMU, 8000) if channel_rate == 8000 else AudioFormat(PCM16, 24000))
    engine.close()


def test_semantic_vad_sends_eagerness_only(fake, rec):
    engine = make(fake, rec, turn_detection={"type": "semantic_vad", "eagerness": "low", "threshold": 0.9})
    td = fake.messages("session.update")[0]["session"]["audio"]["input"]["turn_detection"]
    assert td == {"type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}
    engine.close()


def test_session_updated_without_the_asked_format_is_refused(fake, rec):
    fake.echo_output_format = {"type": "audio/pcm", "rate": 24000}  # asked for pcmu: the model ignored it
    with pytest.raises(EngineRefused, match="output format"):
        make(fake, rec, rate=8000)


def test_bad_key_is_refused_without_showing_it(fake, rec):
    with pytest.raises(EngineRefused) as info:
        make(fake, rec, api_key="sk-wrong-key-0123456789")
    assert "401" in str(info.value)
    assert "sk-wrong" not in str(info.value)


def test_unreachable_server_is_refused(rec):
    server = OpenAIFake(api_key=KEY).start()
    url = server.url
    server.stop()
    with pytest.raises(EngineRefused):
        make(server, rec, url=url)


def test_greeting_audio_arrives_as_audio_out(fake, rec):
    engine = make(fake, rec)
    engine.greet()
    done = rec.wait_for(ResponseDone)
    assert done.status == "completed"
    assert len(audio_of(rec, done.response_id)) == fake.reply_ms * 48  # 24 kHz PCM16: 48 bytes per ms
    create = fake.messages("response.create")[0]
    assert "Thanks for calling ACME." in create["response"]["instructions"]
    assert rec.wait_for(Transcript, lambda t: t.role == "assistant").text
    engine.close()


def test_caller_turn_gets_a_reply_with_transcripts(fake, rec):
    engine = make(fake, rec)
    speak(engine)
    rec.wait_for(SpeechStarted)
    rec.wait_for(SpeechStopped)
    assert rec.wait_for(Transcript, lambda t: t.role == "user").text == fake.user_transcript
    done = rec.wait_for(ResponseDone)
    assert audio_of(rec, done.response_id)
    appended = fake.messages("input_audio_buffer.append")
    assert all(base64.b64decode(m["audio"]) for m in appended)
    engine.close()


def _playing_response(fake, rec, engine):
    fake.reply_ms, fake.delta_ms, fake.delta_interval, fake.late_deltas = 4000, 100, 0.02, 3
    engine.greet()
    first = rec.wait_count(AudioOut, 3)[0]
    return first.response_id


def test_barge_in_truncates_what_was_heard_and_drops_late_audio(fake, rec):
    engine = make(fake, rec)
    rid = _playing_response(fake, rec, engine)
    speak(engine, speech_ms=60, silence_ms=0)
    rec.wait_for(SpeechStarted)
    engine.interrupt(rid, 250)
    seen = len(rec.of(AudioOut))
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == rid)
    assert done.status == "interrupted"
    truncate = fake.wait_message("conversation.item.truncate")
    assert truncate["audio_end_ms"] == 250 and truncate["content_index"] == 0
    assert fake.session.truncations[-1].get("ok"), fake.session.truncations
    assert not fake.messages("response.cancel")  # server_vad with interrupt_response cancels by itself
    assert len([e for e in rec.of(AudioOut) if e.response_id == rid]) == seen  # late deltas were dropped
    assert not rec.of(EngineError)
    engine.close()


def test_truncate_never_exceeds_the_audio_received_for_the_item(fake, rec):
    engine = make(fake, rec)
    rid = _playing_response(fake, rec, engine)
    engine.interrupt(rid, 10_000_000)
    truncate = fake.wait_message("conversation.item.truncate")
    assert truncate["audio_end_ms"] <= len(audio_of(rec, rid)) // 48
    record = fake.session.truncations[-1]
    assert record.get("ok") and truncate["audio_end_ms"] <= record["item_audio_ms"]
    rec.wait_for(ResponseDone, lambda e: e.response_id == rid)
    assert not rec.of(EngineError)
    engine.close()


@pytest.mark.parametrize("played", [None, 0])
def test_nothing_played_means_no_truncate(fake, rec, played):
    engine = make(fake, rec)
    rid = _playing_response(fake, rec, engine)
    engine.interrupt(rid, played)
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == rid)
    assert done.status == "interrupted"
    assert not fake.messages("conversation.item.truncate")
    engine.close()


def test_bridge_side_interrupt_cancels_the_response(fake, rec):
    engine = make(fake, rec)
    rid = _playing_response(fake, rec, engine)
    engine.interrupt(rid, 100)  # e.g. a DTMF key: the server did not detect speech, so it is not cancelling
    cancel = fake.wait_message("response.cancel")
    assert cancel["response_id"] == rid
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == rid)
    assert done.status == "interrupted"
    assert fake.messages("conversation.item.truncate")[0]["audio_end_ms"] == 100
    engine.close()


def test_interrupt_after_a_fully_played_response_sends_nothing(fake, rec):
    engine = make(fake, rec)
    engine.greet()
    done = rec.wait_for(ResponseDone)
    engine.interrupt(done.response_id, fake.reply_ms + 500)
    engine.send_text("marker")
    fake.wait_message("conversation.item.create")
    assert not fake.messages("conversation.item.truncate")
    assert not fake.messages("response.cancel")
    engine.close()


def test_dtmf_text_is_a_user_item_and_gets_a_reply(fake, rec):
    engine = make(fake, rec)
    engine.send_text("The caller pressed 5.")
    item = fake.wait_message("conversation.item.create")
    assert item["item"] == {"type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": "The caller pressed 5."}]}
    fake.wait_message("response.create")
    done = rec.wait_for(ResponseDone)
    assert audio_of(rec, done.response_id)
    engine.close()


def test_text_during_a_response_waits_for_it_to_finish(fake, rec):
    engine = make(fake, rec)
    fake.reply_ms, fake.delta_interval = 1000, 0.01
    engine.greet()
    rec.wait_for(AudioOut)
    engine.send_text("The caller pressed 1.")
    rec.wait_count(ResponseDone, 2)
    assert len(fake.messages("response.create")) == 2
    assert not rec.of(EngineError)  # no conversation_already_has_active_response
    engine.close()


def test_tool_call_round_trip(fake, rec):
    engine = make(fake, rec, tools=build_tool_specs(["transfer"], ["billing"]))
    fake.tool_script.append(("transfer", {"target": "billing"}))
    fake.start_response()
    call = rec.wait_for(ToolCall)
    assert (call.name, dict(call.arguments)) == ("transfer", {"target": "billing"})
    rec.wait_for(ResponseDone)
    engine.tool_result(call.call_id, {"ok": True, "result": "Transferring the caller to billing."})
    output = fake.wait_message("conversation.item.create")
    assert output["item"]["type"] == "function_call_output" and output["item"]["call_id"] == call.call_id
    assert isinstance(output["item"]["output"], str) and "billing" in output["item"]["output"]
    fake.wait_message("response.create")
    second = rec.wait_count(ResponseDone, 2)[1]
    assert audio_of(rec, second.response_id)
    assert not rec.of(EngineError)
    engine.close()


def test_recoverable_error_is_reported_and_the_session_goes_on(fake, rec):
    engine = make(fake, rec)
    fake.error(fake.conn, "rate_limit_exceeded", "Rate limit reached", type_="rate_limit_error")
    error = rec.wait_for(EngineError)
    assert (error.code, error.fatal) == ("rate_limit_exceeded", False)
    engine.greet()
    assert rec.wait_for(ResponseDone).status == "completed"
    assert not rec.of(Closed)
    engine.close()


def test_session_expired_is_fatal_and_closes_unclean(fake, rec):
    make(fake, rec)
    fake.expire_session()
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("session_expired", False)
    error = rec.of(EngineError)[0]
    assert (error.code, error.fatal) == ("session_expired", True)
    assert isinstance(rec.events[-1], Closed) and len(rec.of(Closed)) == 1


def test_dropped_connection_is_an_unclean_close(fake, rec):
    engine = make(fake, rec)
    fake.drop()
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("dropped", False)
    engine.send_audio(b"\x00" * 960)  # harmless after the drop
    engine.close()
    assert len(rec.of(Closed)) == 1


def test_close_is_idempotent_and_silent(fake, rec):
    engine = make(fake, rec)
    engine.close()
    engine.close()
    fake.changed.wait_until(lambda: fake.conn.closed, 5, "the fake to see the close")
    assert not rec.of(Closed)


def test_secrets_never_reach_logs_or_events(fake, rec, caplog):
    caplog.set_level(logging.DEBUG)
    engine = make(fake, rec)
    fake.error(fake.conn, "invalid_api_key", f"Incorrect API key provided: {KEY}.")
    rec.wait_for(Closed)
    engine.close()
    assert KEY not in caplog.text
    assert all(KEY not in repr(e) for e in rec.events)


# ---- the registry, and the fake's own validation (so the tests above can trust it) ------------------------


def test_registry_imports_engines_lazily_and_names_unknown_types():
    import subprocess
    import sys

    code = ("import sys, bridge.engines as e; "
            "assert not any(m in sys.modules for m in ('bridge.echo', 'bridge.openai_realtime', 'bridge.elevenlabs',"
            " 'bridge.generic')), sorted(sys.modules); "
            "assert set(e.ENGINE_TYPES) == {'echo', 'openai_realtime', 'elevenlabs', 'generic'}")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    from bridge.engines import UnknownEngineType, engine_class

    with pytest.raises(UnknownEngineType, match="openai_realtime"):
        engine_class("gemini")


def _raw(fake, headers=()):
    import json

    import websocket

    ws = websocket.create_connection(f"{fake.url}?model=gpt-realtime", timeout=3,
                                     header=[f"Authorization: Bearer {KEY}", *headers])
    return ws, json.loads(ws.recv())


def test_fake_refuses_the_beta_header_like_the_server(fake):
    import websocket

    ws, first = _raw(fake, ["OpenAI-Beta: realtime=v1"])
    assert first["error"]["code"] == "beta_api_shape_disabled"
    opcode, data = ws.recv_data()
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4000
    ws.close()


@pytest.mark.parametrize("session, code", [
    ({"modalities": ["audio", "text"], "input_audio_format": "g711_ulaw"}, "unknown_parameter"),
    ({"type": "realtime", "audio": {"input": {"format": "pcm16"}}}, "invalid_value"),
    ({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "invalid_value"),
    ({"instructions": "no type"}, "missing_required_parameter"),
])
def test_fake_refuses_beta_or_invalid_session_updates(fake, session, code):
    import json

    ws, first = _raw(fake)
    assert first["type"] == "session.created"
    ws.send(json.dumps({"type": "session.update", "event_id": "e1", "session": session}))
    reply = json.loads(ws.recv())
    assert reply["type"] == "error" and reply["error"]["code"] == code and reply["error"]["event_id"] == "e1"
    ws.close()
