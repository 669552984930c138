"""Call records: one parseable JSON line per call, concurrent writers never interleave, no secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gevent

from controller import logs
from controller.callrecords import CallRecord, CallRecordWriter

UUID = "1f0a6d3e-5c1b-4c8e-9d55-2b7f0a9d1e42"


def full_record(uuid: str = UUID) -> CallRecord:
    rec = CallRecord(uuid=uuid, did="15557654321", caller_id="+15551230000", route="front-desk", engine="openai")
    rec.event("fork_start", url="ws://127.0.0.1:8765/calls/x?token=abc.def-123", token="abc.def-123")
    rec.answered()
    rec.event("first_audio", ms=640)
    rec.transcript("caller", "I'd like an appointment\non Monday")
    rec.transcript("agent", "Sure, which time?")
    rec.digit("5", source="RTP")
    rec.tool_call("transfer", {"target": "operator", "api_key": "sk-should-not-appear"}, result="ok")
    rec.latency("first_audio", 0.64).latency("first_audio", 0.71).latency("bargein_stop", 0.05)
    rec.finish("fallback_transfer", "NORMAL_CLEARING")
    return rec


def test_record_json_line(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "calls.jsonl"
    writer = CallRecordWriter(str(path))
    assert writer.write(full_record())
    writer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["uuid"] == UUID and doc["did"] == "15557654321" and doc["caller_id"] == "+15551230000"
    assert doc["route"] == "front-desk" and doc["engine"] == "openai" and doc["outcome"] == "fallback_transfer"
    assert doc["start"].endswith("Z") and doc["answer"] and doc["end"] and doc["duration"] >= 0
    assert [e[1] for e in doc["timeline"]] == ["fork_start", "answered", "first_audio", "end"]
    assert all(isinstance(e[0], float | int) for e in doc["timeline"])
    assert doc["timeline"][-1][2] == {"outcome": "fallback_transfer", "cause": "NORMAL_CLEARING"}
    assert doc["transcripts"][0]["text"] == "I'd like an appointment\non Monday"
    assert doc["dtmf"][0]["digit"] == "5" and doc["tool_calls"][0]["name"] == "transfer"
    assert doc["latencies"] == {"first_audio": [0.64, 0.71], "bargein_stop": [0.05]}
    assert "abc.def-123" not in lines[0] and "sk-should-not-appear" not in lines[0]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)


def test_registered_secrets_never_reach_the_file(tmp_path: Path) -> None:
    secret = "esl-password-xyz-987"
    logs.register_secret(secret)
    rec = CallRecord(uuid=UUID).event("esl", detail=f"auth {secret}").finish("error")
    writer = CallRecordWriter(str(tmp_path / "calls.jsonl"))
    writer.write(rec)
    writer.close()
    assert secret not in (tmp_path / "calls.jsonl").read_text()


def test_concurrent_writers_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    writer = CallRecordWriter(str(path))
    jobs = [gevent.spawn(writer.write, full_record(f"call-{i:03d}")) for i in range(50)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert all(j.value for j in jobs)
    os.rename(path, tmp_path / "calls.jsonl.1")  # logrotate moves the file away
    assert writer.write(full_record("after-rotation"))
    writer.close()
    old = [json.loads(line)["uuid"] for line in (tmp_path / "calls.jsonl.1").read_text().splitlines()]
    new = [json.loads(line)["uuid"] for line in path.read_text().splitlines()]
    assert sorted(old) == [f"call-{i:03d}" for i in range(50)]
    assert new == ["after-rotation"]


def test_unwritable_path_reports_false(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = CallRecordWriter(str(blocker / "calls.jsonl"))  # parent is a file: cannot create
    assert writer.write(CallRecord(uuid=UUID).finish("completed")) is False


def test_a_reply_cut_by_barge_in_is_marked_with_what_was_heard_whichever_comes_first():
    rec = CallRecord(uuid="u1")
    rec.transcript("assistant", "We open at nine and close at five on weekdays.", response="r1")
    rec.cut("r1", heard_ms=1000, received_ms=4000)  # the text came first (a faster-than-real-time engine)
    rec.cut("r2", heard_ms=700, received_ms=1000)
    rec.transcript("assistant", "Saturdays too.", response="r2")  # the cut came first
    rec.transcript("user", "And Sunday?", response="")
    first, second, third = rec.to_dict()["transcripts"]
    assert first["interrupted"] == {"heard_ms": 1000, "of_ms": 4000, "heard_text": "We open at"}
    assert second["interrupted"] == {"heard_ms": 700, "of_ms": 1000, "heard_text": "Saturdays"}  # whole words
    assert "interrupted" not in third and "response" not in third
