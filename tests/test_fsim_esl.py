"""fsim's ESL server against greenswitch (the client the controller uses) and against raw bytes."""

from __future__ import annotations

import json
from urllib.parse import unquote

import gevent
import greenswitch
import pytest
from fsim_helpers import RawESL, esl_client, parse_event_body

from fsim import CallerScript, FSim, wire


def test_greenswitch_auth_api_and_events(sw):
    esl = esl_client(sw)
    seen: list[greenswitch.esl.ESLEvent] = []
    for name in ("CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_PARK", "CHANNEL_HANGUP_COMPLETE"):
        esl.register_handle(name, seen.append)
    assert esl.send("event plain CHANNEL_CREATE CHANNEL_ANSWER CHANNEL_PARK CHANNEL_HANGUP_COMPLETE").data == (
        "+OK event listener enabled plain"
    )
    call = sw.place_call(did="7100", caller_id="+15551234567", script=CallerScript(hangup_after=0.2))
    assert call.wait_hangup(3)
    sw.wait_for(lambda: len(seen) == 4, 3)
    names = [e.headers["Event-Name"] for e in seen]
    assert names == ["CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_PARK", "CHANNEL_HANGUP_COMPLETE"]
    ans = seen[1].headers
    assert ans["Unique-ID"] == call.uuid
    assert ans["Caller-Destination-Number"] == "7100"
    assert ans["Caller-Caller-ID-Number"] == "+15551234567"
    assert ans["variable_forkbridge"] == "true"
    assert ans["variable_sip_to_user"] == "7100"
    assert ans["Answer-State"] == "answered"
    assert seen[3].headers["Hangup-Cause"] == "NORMAL_CLEARING"
    assert "variable_forkbridge" not in seen[0].headers  # dialplan variables are set after CHANNEL_CREATE
    assert esl.send("api uuid_exists 00000000-0000-0000-0000-000000000000").data == "false"
    assert esl.send("api nosuchcommand x").data == "-ERR nosuchcommand Command not found!\n"
    esl.stop()


def test_greenswitch_bgapi_background_job(sw):
    esl = esl_client(sw)
    jobs = []
    esl.register_handle("BACKGROUND_JOB", jobs.append)
    esl.send("event plain BACKGROUND_JOB")
    r = esl.send("bgapi uuid_kill 11111111-1111-1111-1111-111111111111")
    assert r.data.startswith("+OK Job-UUID: ")
    job = r.headers["Job-UUID"]
    sw.wait_for(lambda: jobs, 3)
    assert jobs[0].headers["Job-UUID"] == job
    assert jobs[0].headers["Job-Command"] == "uuid_kill"
    rec = [c for c in sw.commands_log if c.kind == "bgapi"][0]
    assert rec.uuid == "11111111-1111-1111-1111-111111111111" and rec.reply == "-ERR No such channel!\n"
    esl.stop()


def test_greenswitch_wrong_password(sw):
    esl = greenswitch.InboundESL("127.0.0.1", sw.esl_port, "nope", timeout=3)
    with pytest.raises(ValueError):
        esl.connect()


def test_raw_framing_auth_and_replies(sw):
    c = RawESL(sw.esl_port)
    headers, body, raw = c.read_frame()
    assert raw == b"Content-Type: auth/request\n\n"
    c.send("api status")  # before auth
    assert c.read_frame()[2] == b"Content-Type: command/reply\nReply-Text: -ERR command not found\n\n"
    c.send("auth ClueCon")
    assert c.read_frame()[2] == b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
    c.sock.sendall(b"api uuid_getvar 1 x\r\n\r\n")  # \r tolerated
    headers, body, raw = c.read_frame()
    assert headers == [("Content-Type", "api/response"), ("Content-Length", str(len(body)))]
    assert body == b"-ERR No such channel!\n"
    c.send("bgapi status\nJob-UUID: my-job-1")
    assert c.read_frame()[2] == (
        b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: my-job-1\nJob-UUID: my-job-1\n\n"
    )
    c.send("event plain")
    assert ("Reply-Text", "-ERR no keywords supplied") in c.read_frame()[0]
    c.send("noevents")
    assert ("Reply-Text", "-ERR not listening for events") in c.read_frame()[0]
    c.send("frobnicate")
    assert ("Reply-Text", "-ERR command not found") in c.read_frame()[0]
    c.send("exit")
    assert ("Reply-Text", "+OK bye") in c.read_frame()[0]
    headers, body, raw = c.read_frame()
    assert headers[0] == ("Content-Type", "text/disconnect-notice")
    assert body == wire.DISCONNECT_BODY.encode() and len(body) == 67
    assert c.read_frame() is None
    c.close()


def test_raw_event_plain_encoding_and_order(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    c.send("event plain DTMF CUSTOM mod_audio_fork::connect")
    c.read_frame()
    call = sw.place_call(script=CallerScript(dtmf=[("#", 0.05)], hangup_after=0.3), caller_name="Joe Bloggs")
    headers, body, raw = c.read_until(lambda h, b: b"Event-Name: DTMF" in b)
    assert [k for k, _ in headers] == ["Content-Length", "Content-Type"]
    assert headers[1] == ("Content-Type", "text/event-plain")
    assert int(headers[0][1]) == len(body)
    assert b"DTMF-Digit: %23\n" in body
    assert b"Caller-Caller-ID-Name: Joe%20Bloggs\n" in body
    assert b"variable_" not in body  # DTMF events carry no channel variables
    assert body.endswith(b"\n\n")
    lines = body.decode().split("\n")
    assert [ln.split(": ")[0] for ln in lines[:13]] == [
        "Event-Name", "Core-UUID", "FreeSWITCH-Hostname", "FreeSWITCH-Switchname", "FreeSWITCH-IPv4",
        "FreeSWITCH-IPv6", "Event-Date-Local", "Event-Date-GMT", "Event-Date-Timestamp", "Event-Calling-File",
        "Event-Calling-Function", "Event-Calling-Line-Number", "Event-Sequence",
    ]  # fmt: skip
    assert dict(parse_event_body(body)[0])["Unique-ID"] == call.uuid
    assert call.wait_hangup(3)
    c.close()


def test_url_encoding_matches_freeswitch():
    assert wire.url_encode("mod_audio_fork::play_audio") == "mod_audio_fork%3A%3Aplay_audio"
    assert wire.url_encode("2025-01-01 12:00:00") == "2025-01-01%2012%3A00%3A00"
    assert wire.url_encode("a+b=c&d?e@f") == "a%2Bb%3Dc%26d%3Fe%40f"
    assert wire.url_encode("100%25") == "100%25"  # an existing escape is not double-encoded
    assert wire.url_encode("50%") == "50%25"
    assert wire.url_encode("é\n") == "%C3%A9%0A"
    assert wire.header_value("") == "_undef_"
    assert unquote(wire.url_encode('{"k": "v|w"}')) == '{"k": "v|w"}'


def test_custom_event_body_and_json_format(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    c.send("event json CHANNEL_ANSWER BACKGROUND_JOB")
    assert ("Reply-Text", "+OK event listener enabled json") in c.read_frame()[0]
    call = sw.place_call()
    headers, body, _ = c.read_until(lambda h, b: True)
    assert headers[1] == ("Content-Type", "text/event-json")
    ev = json.loads(body)
    assert ev["Event-Name"] == "CHANNEL_ANSWER" and ev["Unique-ID"] == call.uuid
    assert ev["Caller-Destination-Number"] == "7100"
    c.send("bgapi uuid_getvar " + call.uuid + " forkbridge")
    c.read_frame()
    headers, body, _ = c.read_until(lambda h, b: b"BACKGROUND_JOB" in b)
    ev = json.loads(body)
    assert ev["_body"] == "true" and ev["Content-Length"] == "4"
    sw.api(f"uuid_kill {call.uuid}")
    c.close()


def test_filters(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    c.send("event plain CHANNEL_ANSWER CHANNEL_HANGUP")
    c.read_frame()
    a = sw.place_call(did="7100")
    a.wait_answered(2)
    c.read_until(lambda h, b: b"CHANNEL_ANSWER" in b)
    c.send(f"filter Unique-ID {a.uuid}")
    assert c.read_frame()[0][1] == ("Reply-Text", f"+OK filter added. [Unique-ID]=[{a.uuid}]")
    b = sw.place_call(did="7101")
    b.wait_answered(2)
    sw.api(f"uuid_kill {b.uuid}")
    sw.api(f"uuid_kill {a.uuid}")
    headers, body, _ = c.read_frame()
    h = dict(parse_event_body(body)[0])
    assert h["Unique-ID"] == a.uuid and h["Event-Name"] == "CHANNEL_HANGUP"
    c.send("filter delete all")
    assert ("Reply-Text", "+OK filter deleted. [all][]") in c.read_frame()[0]
    c.send("filter Unique-ID")
    assert ("Reply-Text", "-ERR invalid syntax") in c.read_frame()[0]
    c.close()


def test_api_reply_comes_before_events_it_caused(sw):
    c = RawESL(sw.esl_port)
    c.auth()
    call = sw.place_call()
    call.wait_answered(2)
    c.send("event plain CHANNEL_HANGUP")
    c.read_frame()
    c.send(f"api uuid_kill {call.uuid} USER_BUSY")
    headers, body, _ = c.read_frame()
    assert headers[0] == ("Content-Type", "api/response") and body == b"+OK\n"
    headers, body, _ = c.read_frame()
    assert b"Hangup-Cause: USER_BUSY" in body
    c.close()


def test_uuid_command_replies(sw):
    bogus = "22222222-2222-2222-2222-222222222222"
    assert sw.api(f"uuid_break {bogus}") == "-ERR No such channel!\n"
    assert sw.api(f"uuid_broadcast {bogus} /x.wav aleg") == "-ERR invalid uuid\n"
    assert sw.api(f"uuid_kill {bogus}") == "-ERR No such channel!\n"
    assert sw.api(f"uuid_transfer {bogus} 1000") == "-ERR No such channel!\n"
    assert sw.api(f"uuid_setvar {bogus} a b") == "-ERR No such channel!\n"
    assert sw.api(f"uuid_getvar {bogus} a") == "-ERR No such channel!\n"
    assert sw.api(f"uuid_send_dtmf {bogus} 1") == "-ERR Cannot locate session!\n"
    assert sw.api(f"uuid_exists {bogus}") == "false"
    assert sw.api(f"uuid_audio_fork {bogus} start ws://127.0.0.1:1/x mono 16k") == "-ERR Operation Failed\n"
    assert sw.api(f"uuid_audio_stream {bogus} start ws://127.0.0.1:1/x mono 16k") == "-ERR Operation Failed\n"
    assert sw.api("show channels as json") == '{"row_count":0}'
    call = sw.place_call(did="7100", caller_id="+15550001111")
    call.wait_answered(2)
    u = call.uuid
    assert sw.api(f"uuid_exists {u}") == "true"
    assert sw.api(f"uuid_setvar {u} my_var hello world") == "+OK\n"
    assert sw.api(f"uuid_getvar {u} my_var") == "hello world"
    assert sw.api(f"uuid_setvar {u} my_var") == "+OK\n"
    assert sw.api(f"uuid_getvar {u} my_var") == "_undef_"
    assert sw.api(f"uuid_send_dtmf {u} 12#") == f"+OK {u} sent DTMF 12#.\n"
    assert [d for d, _t in call.ear.dtmf_received] == ["1", "2", "#"]
    shown = json.loads(sw.api("show channels as json"))
    assert shown["row_count"] == 1
    row = shown["rows"][0]
    assert (row["uuid"], row["direction"], row["dest"], row["cid_num"], row["callstate"]) == (
        u, "inbound", "7100", "+15550001111", "ACTIVE",
    )  # fmt: skip
    assert sw.api(f"uuid_break {u}") == "+OK\n"
    assert sw.api(f"uuid_break {u} all") == "+OK\n"
    assert sw.api(f"uuid_kill {u}") == "+OK\n"
    assert call.wait_hangup(2)
    assert sw.commands_for(u)[0].command == "uuid_exists"


def test_unrouted_did_is_never_answered():
    with FSim(dids=["7100"]) as sw:
        call = sw.place_call(did="9999")
        assert call.wait_hangup(2)
        assert call.hangup_cause == "NO_ROUTE_DESTINATION"
        assert not call.events("CHANNEL_ANSWER")


def test_marker_variable_is_configurable():
    with FSim(marker=("voicebot", "yes"), dialplan_vars={"voicebot_did": "7100"}) as sw:
        call = sw.place_call()
        call.wait_answered(2)
        ev = sw.wait_event("CHANNEL_ANSWER", call.uuid)
        assert ev.get("variable_voicebot") == "yes" and ev.get("variable_voicebot_did") == "7100"
        assert ev.get("variable_forkbridge") is None
        gevent.sleep(0)
