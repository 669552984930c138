"""Logging: plain and JSON lines, call context on every call line, secrets and token= URLs never written."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import logs

SECRET = "sk-live-abcdef0123456789"
ESL_PASSWORD = "Esl-Pa55word!"
UUID = "1f0a6d3e-5c1b-4c8e-9d55-2b7f0a9d1e42"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def capture(fmt: str, monkeypatch: pytest.MonkeyPatch, journald: bool = False) -> io.StringIO:
    if journald:
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    logs.configure_logging("debug", fmt, secrets=[SECRET, ESL_PASSWORD, "", "abc"], stream=out)
    return out


def emit_everything() -> None:
    call = logs.call_logger(UUID, "15557654321")
    call.info("fork started ws://127.0.0.1:8765/calls/%s?token=tok.en-value_123&mono=1", UUID)
    call.warning("engine said %s", {"key": SECRET})
    logging.getLogger("forkbridge.esl").info("auth %s", ESL_PASSWORD)
    logging.getLogger("forkbridge.engine").error("Authorization: Bearer %s", "eyJhbGciOiJIUzI1NiJ9.payload")
    try:
        raise RuntimeError(f"connect failed with key {SECRET}")
    except RuntimeError:
        call.exception("engine connect failed")
    call.bind(route="front-desk").info("route chosen")
    logging.getLogger("forkbridge.daemon").info("no call here")


def test_text_lines_carry_call_context_and_no_secrets(monkeypatch: pytest.MonkeyPatch, restore_root: None) -> None:
    out = capture("text", monkeypatch)
    emit_everything()
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 7, text  # one line per event, tracebacks folded into their line
    assert SECRET not in text and ESL_PASSWORD not in text and "tok.en-value_123" not in text
    assert "eyJhbGciOiJIUzI1NiJ9" not in text
    assert "token=***&mono=1" in lines[0]
    assert f"[uuid={UUID} did=15557654321]" in lines[0]
    assert lines[0][:4].isdigit()  # timestamped outside journald
    assert "Traceback" in lines[4] and "RuntimeError" in lines[4]
    assert f"[uuid={UUID} did=15557654321 route=front-desk]" in lines[5]
    assert lines[6].endswith("INFO forkbridge.daemon: no call here")


def test_journald_lines_have_priority_and_no_timestamp(monkeypatch: pytest.MonkeyPatch, restore_root: None) -> None:
    out = capture("text", monkeypatch, journald=True)
    emit_everything()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("<6>INFO forkbridge.call: fork started")
    assert lines[1].startswith("<4>WARNING")
    assert lines[3].startswith("<3>ERROR")


def test_json_lines(monkeypatch: pytest.MonkeyPatch, restore_root: None) -> None:
    out = capture("json", monkeypatch)
    emit_everything()
    text = out.getvalue()
    assert SECRET not in text and ESL_PASSWORD not in text and "tok.en-value_123" not in text
    docs = [json.loads(line) for line in text.splitlines()]
    assert len(docs) == 7
    first = docs[0]
    assert first["uuid"] == UUID and first["did"] == "15557654321" and first["level"] == "info"
    assert first["logger"] == "forkbridge.call" and "token=***" in first["msg"]
    assert first["ts"].endswith("Z")
    assert "exc" in docs[4] and "RuntimeError" in docs[4]["exc"]
    assert docs[5]["route"] == "front-desk"
    assert "uuid" not in docs[6]


def test_secret_with_json_special_characters(monkeypatch: pytest.MonkeyPatch, restore_root: None) -> None:
    out = capture("json", monkeypatch)
    tricky = 'pa"ss\\word-123'
    logs.register_secret(tricky)
    logging.getLogger("forkbridge.test").info("value=%s", tricky, extra={"detail": tricky})
    text = out.getvalue()
    assert "pa" + '\\"' + "ss" not in text and json.loads(text)["msg"] == "value=***"
    assert json.loads(text)["detail"] == "***"


def test_temporary_secrets_are_bounded_and_forgettable() -> None:
    token = "per-call-token-0123456789"
    logs.register_secret(token, temporary=True)
    assert logs.redact(f"x {token} y") == "x *** y"
    logs.unregister_secret(token)
    assert token in logs.redact(f"x {token} y")
    names = [f"tmp-secret-{i:06d}" for i in range(logs.MAX_TEMPORARY + 10)]
    try:
        for name in names:
            logs.register_secret(name, temporary=True)
        assert "tmp-secret-000000" in logs.redact("tmp-secret-000000")  # the oldest fell out
        assert logs.redact(names[-1]) == "***"
    finally:
        for name in names:
            logs.unregister_secret(name)
    assert logs.redact("digits 1234 stay") == "digits 1234 stay"  # short values are never registered


def test_a_call_token_does_not_rebuild_the_secret_pattern() -> None:
    """Per-call tokens come and go with every call: they are looked up in a set, never compiled into the regex
    of permanent secrets (which grew with every live call: ~0.1 ms per live token on each call start and end)."""
    logs.redact("warm up")
    compiled = logs._pattern
    token = "1796113132.0123456789abcdef0123456789abcdef"
    logs.register_secret(token, temporary=True)
    try:
        assert logs.redact(f"fork url ...?token={token}&x=1 and {token}.") == "fork url ...?token=***&x=1 and ***."
        assert logs._pattern is compiled
    finally:
        logs.unregister_secret(token)
    assert logs._pattern is compiled


def test_bad_format_raises() -> None:
    with pytest.raises(ValueError):
        logs.configure_logging("info", "xml", stream=io.StringIO())


def test_journald_detection_follows_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               restore_root: None) -> None:
    with open(tmp_path / "log", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure_logging("info", "text", stream=f)
        logging.getLogger("forkbridge.t").info("to the journal")
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # inherited, but our stderr is not the journal
        logs.configure_logging("info", "text", stream=f)
        logging.getLogger("forkbridge.t").info("to a file")
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines[0] == "<6>INFO forkbridge.t: to the journal"
    assert lines[1][:4].isdigit() and lines[1].endswith("INFO forkbridge.t: to a file")
