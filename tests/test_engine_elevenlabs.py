"""ElevenLabs Agents engine against the fake over real loopback sockets."""

from __future__ import annotations

import logging

import pytest

from bridge.elevenlabs import ElevenLabsEngine, parse_format
from bridge.engine import (
    PCM16,
    PCMU,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    EngineError,
    EngineRefused,
    Interrupted,
    ResponseDone,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.engines import create_engine
from tests.fakes import silence, tone
from tests.fakes.elevenlabs_fake import ElevenLabsFake

AGENT = "agent_test_1"


@pytest.fixture
def fake():
    server = ElevenLabsFake(agent_id=AGENT).start()
    yield server
    server.stop()


def make(fake, rec, *, rate=16000, greeting="Welcome to ACME.", dtmf_mode="message", connect=True, **config):
    cfg = {"url": fake.url, "agent_id": AGENT, "connect_timeout": "3s"}
    cfg.update(config)
    call = CallInfo(uuid="uuid-el", did="7200", caller_id="+15550001111", sample_rate=rate,
                    instructions="You are ACME support.", voice="voice_abc", greeting=greeting, dtmf_mode=dtmf_mode)
    engine = create_engine("elevenlabs", cfg, call, rec)
    if connect:
        engine.connect()
    return engine


def speak(engine, speech_ms=100, silence_ms=400):
    rate = engine.formats.input.rate
    for chunk in [tone(20, rate)] * (speech_ms // 20) + [silence(20, rate)] * (silence_ms // 20):
        engine.send_audio(chunk)


def audio_of(rec, rid):
    return b"".join(e.audio for e in rec.of(AudioOut) if e.response_id == rid)


def test_initiation_overrides_and_dynamic_variables(fake, rec):
    engine = make(fake, rec)
    assert isinstance(engine, ElevenLabsEngine)
    init = fake.messages("conversation_initiation_client_data")[0]
    assert init == {
        "type": "conversation_initiation_client_data",
        "conversation_config_override": {
            "agent": {"prompt": {"prompt": "You are ACME support."}, "first_message": "Welcome to ACME."},
            "tts": {"voice_id": "voice_abc"},
        },
        "dynamic_variables": {"caller_id": "+15550001111", "did": "7200", "call_uuid": "uuid-el"},
    }
    assert engine.formats.input == engine.formats.output == AudioFormat(PCM16, 16000)
    assert fake.conn.query["agent_id"] == AGENT
    engine.close()


def test_formats_come_from_the_agent_metadata(fake, rec):
    fake.input_format, fake.output_format = "ulaw_8000", "pcm_24000"
    engine = make(fake, rec, rate=8000)
    assert engine.formats.input == AudioFormat(PCMU, 8000)
    assert engine.formats.output == AudioFormat(PCM16, 24000)
    engine.close()


def test_parse_format():
    assert parse_format("pcm_8000") == AudioFormat(PCM16, 8000)
    assert parse_format(None) == AudioFormat(PCM16, 16000)  # the JS SDK's fallback
    with pytest.raises(ValueError):
        parse_format("mp3_44100")


def test_greeting_is_held_until_the_bridge_is_ready_then_arrives_in_order(fake, rec):
    engine = make(fake, rec)
    turn = fake.conversation.turns[0]
    fake.changed.wait_until(lambda: turn.done, 5, "the greeting to be sent")
    assert not rec.of(AudioOut)  # nowhere to play it yet
    engine.greet()
    chunks = rec.of(AudioOut)
    assert {c.response_id for c in chunks} == {str(turn.eid)}
    assert len(audio_of(rec, str(turn.eid))) == fake.reply_ms * 32  # 16 kHz PCM16
    assert rec.of(Transcript)[0].text == "Welcome to ACME."
    engine.close()


@pytest.mark.parametrize("audio_ids", ["turn", "chunk"])
def test_interruption_flushes_the_turn_and_drops_its_late_audio(fake, rec, audio_ids):
    fake.audio_ids, fake.reply_ms, fake.chunk_interval, fake.stale_after_interrupt = audio_ids, 4000, 0.02, 2
    engine = make(fake, rec)
    engine.greet()
    first = rec.wait_count(AudioOut, 3)[0]
    assert len({e.response_id for e in rec.of(AudioOut)}) == 1  # chunks group into one response
    speak(engine, speech_ms=100, silence_ms=0)
    interrupted = rec.wait_for(Interrupted)
    assert interrupted.response_id == first.response_id
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == first.response_id)
    assert done.status == "interrupted"
    seen = len(audio_of(rec, first.response_id))
    speak(engine, speech_ms=0, silence_ms=400)  # caller stops: a new turn follows
    rec.wait_for(SpeechStopped)
    assert rec.wait_for(Transcript, lambda t: t.role == "user").text == "caller speech"
    reply = rec.wait_for(AudioOut, lambda e: e.response_id != first.response_id)
    assert int(reply.response_id) > int(first.response_id)
    assert len(audio_of(rec, first.response_id)) == seen  # stale chunks (ids <= interrupt id) were dropped
    engine.close()


def test_new_turn_closes_the_previous_response(fake, rec):
    engine = make(fake, rec)
    engine.greet()
    greeting = fake.conversation.turns[0]
    fake.changed.wait_until(lambda: greeting.done, 5, "the greeting")
    fake.speak("And one more thing.")  # a second agent turn, no caller turn in between
    rec.wait_for(AudioOut, lambda e: e.response_id != str(greeting.eid))
    done = rec.wait_for(ResponseDone, lambda e: e.response_id == str(greeting.eid))
    assert done.status == "completed"
    engine.close()


def test_bridge_side_interrupt_drops_the_rest_locally_and_sends_nothing(fake, rec):
    fake.reply_ms, fake.chunk_interval = 4000, 0.02
    engine = make(fake, rec)
    engine.greet()
    rid = rec.wait_count(AudioOut, 2)[0].response_id
    before = len(fake.conn.received)
    engine.interrupt(rid, 120)
    seen = len(audio_of(rec, rid))
    assert rec.wait_for(ResponseDone, lambda e: e.response_id == rid).status == "interrupted"
    turn = fake.conversation.turns[0]
    fake.changed.wait_until(lambda: turn.done, 10, "the fake to finish the turn")
    assert len(audio_of(rec, rid)) == seen
    assert fake.conn.received[before:] == []  # the protocol has no truncate or cancel
    engine.close()


def test_every_ping_gets_a_pong_with_its_event_id(fake, rec):
    fake.ping_interval = 0.02
    engine = make(fake, rec)
    conv = fake.conversation
    fake.changed.wait_until(lambda: len(conv.pongs) >= 3, 5, "three pongs")
    assert all(eid in conv.pings for eid in conv.pongs)
    assert all(m == {"type": "pong", "event_id": m["event_id"]} for m in fake.messages("pong"))
    engine.close()


def test_dtmf_as_user_message_gets_a_reply(fake, rec):
    engine = make(fake, rec, greeting="")
    engine.greet()
    engine.send_text("The caller pressed 5.")
    assert fake.wait_message("user_message") == {"type": "user_message", "text": "The caller pressed 5."}
    assert rec.wait_for(AudioOut)
    engine.close()


@pytest.mark.parametrize("where", ["config", "call"])
def test_dtmf_as_contextual_update(fake, rec, where):
    if where == "config":
        engine = make(fake, rec, greeting="", dtmf_mode_unused=None, dtmf_mode="message")
        engine.config = dict(engine.config, dtmf_mode="contextual_update")
    else:
        engine = make(fake, rec, greeting="", dtmf_mode="contextual_update")
    engine.send_text("DTMF 5")
    assert fake.wait_message("contextual_update") == {"type": "contextual_update", "text": "DTMF 5"}
    assert not fake.messages("user_message")
    engine.close()


def test_tool_call_round_trip(fake, rec):
    engine = make(fake, rec, greeting="")
    engine.greet()
    fake.call_tool("transfer", {"target": "billing"}, tool_call_id="toolu_9")
    call = rec.wait_for(ToolCall)
    assert (call.call_id, call.name, dict(call.arguments)) == ("toolu_9", "transfer", {"target": "billing"})
    engine.tool_result("toolu_9", {"ok": False, "error": "not allowed"}, is_error=True)
    result = fake.wait_message("client_tool_result")
    assert result["tool_call_id"] == "toolu_9" and result["is_error"] is True
    assert isinstance(result["result"], str) and "not allowed" in result["result"]
    engine.close()


def test_error_event_then_close_is_fatal_and_unclean(fake, rec):
    make(fake, rec).greet()
    fake.fail("llm_error", 1002, "LLM failed")
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("llm_error", False)
    error = rec.of(EngineError)[0]
    assert (error.code, error.fatal) == ("llm_error", True)


def test_agent_ending_the_call_is_a_clean_close(fake, rec):
    make(fake, rec).greet()
    fake.end_call()
    closed = rec.wait_for(Closed)
    assert closed.clean is True


def test_dropped_connection(fake, rec):
    make(fake, rec).greet()
    fake.drop()
    closed = rec.wait_for(Closed)
    assert (closed.reason, closed.clean) == ("dropped", False)


def test_refused_override_refuses_the_session(fake, rec):
    fake.allowed_overrides = {"prompt"}
    with pytest.raises(EngineRefused, match="override_error"):
        make(fake, rec)


def test_private_agent_via_signed_url(rec):
    key = "xi-secret-key-0123456789"
    server = ElevenLabsFake(agent_id=AGENT, api_key=key).start()
    try:
        engine = make(server, rec, signed_url_endpoint=server.signed_url_endpoint, api_key=key)
        assert server.signed_requests[-1]["key"] == key
        assert server.signed_requests[-1]["agent_id"] == AGENT
        assert server.conn.query.get("conversation_signature")
        engine.close()
    finally:
        server.stop()


def test_private_agent_with_a_wrong_key_is_refused_without_showing_it(rec, caplog):
    caplog.set_level(logging.DEBUG)
    server = ElevenLabsFake(agent_id=AGENT, api_key="xi-right-key-000000").start()
    try:
        with pytest.raises(EngineRefused) as info:
            make(server, rec, signed_url_endpoint=server.signed_url_endpoint, api_key="xi-wrong-key-111111")
        assert "401" in str(info.value)
        assert "xi-wrong-key" not in str(info.value) and "xi-wrong-key" not in caplog.text
    finally:
        server.stop()


def test_public_url_without_agent_id_is_refused(fake, rec):
    engine = make(fake, rec, connect=False, agent_id="")
    with pytest.raises(EngineRefused, match="agent_id"):
        engine.connect()
