"""Logging: one line per event, the call's uuid and DID on every call line, and secrets never written.

Under systemd (JOURNAL_STREAM set) lines carry no timestamp (journald adds one) and start with a `<N>` syslog
priority prefix, so `journalctl -p warning -u forkbridge` filters by level. Elsewhere lines have a timestamp.
`format: json` writes one JSON object per line for log shippers.

Redaction works on the rendered text (message, args, exception text, extra fields): every registered secret
value becomes `***`, and so do `token=`/`api_key=`/... URL query values and `Bearer` credentials. Secrets from the
config are registered at start; per-call tokens are registered `temporary=True` into a bounded set (the oldest
fall out, by which time their call is long over and the URL pattern still masks them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "***"
MIN_SECRET_LEN = 6  # shorter values would mask ordinary text (DIDs, digits); such secrets are weak anyway
MAX_TEMPORARY = 4096

_URL_SECRET = re.compile(r"(?i)([?&;](?:token|access_token|api_key|apikey|key|password|secret|signature|sig)=)"
                         r"[^&\s\"'#<>]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# Temporary secrets (per-call tokens, thousands live at once) are not compiled into a pattern: every word-like run
# of a line is looked up in a set instead, so a call's start and end cost O(1) however many calls are live.
_WORD = re.compile(r"[A-Za-z0-9._~-]{" + str(MIN_SECRET_LEN - 1) + r",}[A-Za-z0-9_~-]")  # no trailing full stop

_lock = threading.Lock()
_permanent: set[str] = set()
_temporary: OrderedDict[str, None] = OrderedDict()
_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None, temporary: bool = False) -> None:
    """Mask `value` wherever it appears in a log line from now on (values under 6 characters are ignored)."""
    global _pattern
    if not value or len(value) < MIN_SECRET_LEN:
        return
    with _lock:
        if temporary:
            if value in _permanent:
                return
            _temporary[value] = None
            _temporary.move_to_end(value)
            while len(_temporary) > MAX_TEMPORARY:
                _temporary.popitem(last=False)
            return  # the compiled pattern holds only permanent secrets: nothing to rebuild
        _permanent.add(value)
        _pattern = None


def unregister_secret(value: str) -> None:
    """Forget a temporary secret (e.g. a call's token at hangup)."""
    global _pattern
    with _lock:
        _temporary.pop(value, None)


def redact(text: str) -> str:
    """`text` with every registered secret, URL secret parameter and Bearer credential replaced by ***.

    A temporary secret is masked where it stands as a whole word (letters, digits and `._~-`), which is how a
    per-call token appears; a permanent one anywhere."""
    global _pattern
    pattern = _pattern
    if pattern is None:
        with _lock:
            values = sorted(_permanent, key=len, reverse=True)
            pattern = re.compile("|".join(map(re.escape, values))) if values else re.compile(r"(?!x)x")
            _pattern = pattern
    text = pattern.sub(MASK, text)
    if _temporary:
        text = _WORD.sub(lambda m: MASK if m.group(0) in _temporary else m.group(0), text)
    text = _URL_SECRET.sub(r"\1" + MASK, text)
    return _BEARER.sub(r"\1 " + MASK, text)


class RedactingFilter(logging.Filter):
    """Renders msg % args once and stores the redacted result, so no handler or formatter sees a raw secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        return True


# ---- call context


class CallLogger(logging.LoggerAdapter):
    """Adds call_uuid / did to every record (as `extra`), merging with any extra the caller passes."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    def bind(self, **fields: Any) -> CallLogger:
        """A logger with more context (e.g. route=..., once it is known)."""
        return CallLogger(self.logger, {**(self.extra or {}), **fields})


def call_logger(uuid: str, did: str | None = None, name: str = "forkbridge.call", **fields: Any) -> CallLogger:
    """A logger whose lines carry the call's uuid and (when known) DID."""
    extra = {"call_uuid": uuid, **({"did": did} if did else {}), **fields}
    return CallLogger(logging.getLogger(name), extra)


_CONTEXT_KEYS = ("call_uuid", "did", "route", "worker")
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in _CONTEXT_KEYS if getattr(record, k, None) not in (None, "")}


class TextFormatter(logging.Formatter):
    """`[<N>]LEVEL logger: message [uuid=… did=…]`, timestamped unless journald stamps it."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        ctx = _context(record)
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if ctx:
            line += " [" + " ".join(f"{'uuid' if k == 'call_uuid' else k}={v}" for k, v in ctx.items()) + "]"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journald:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        else:
            line = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d} {line}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, call context, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if "call_uuid" in record.__dict__:
            doc["uuid"] = record.__dict__["call_uuid"]
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and key != "call_uuid" and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(_scrub(doc), default=str, ensure_ascii=False))


def _scrub(value: Any) -> Any:
    """Redact strings inside a structure before JSON escaping could hide a secret (quotes, backslashes)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value if isinstance(value, int | float | bool) or value is None else redact(str(value))


_handler: logging.Handler | None = None


def _to_journald(stream: Any) -> bool:
    """True when `stream` is systemd's journal connection (JOURNAL_STREAM names its device:inode, per systemd.exec)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True  # not a real file (tests, wrappers): trust the environment
    return value == f"{st.st_dev}:{st.st_ino}"


class _WorkerTag(logging.Filter):
    """Stamps every line of a worker process with its number (`worker=K` in text, "worker" in JSON)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure_logging(level: str | int = "info", fmt: str = "text", secrets: Iterable[str] = (),
                      stream: Any = None, worker: str = "") -> logging.Handler:
    """Install the one root handler (replacing the one a previous call installed); returns it. `worker`: the
    number of a worker process (daemon.workers above 1), on each of its lines."""
    global _handler
    for value in secrets:
        register_secret(value)
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    journald = _to_journald(handler.stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    handler.addFilter(RedactingFilter())
    if worker:
        handler.addFilter(_WorkerTag(worker))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    _handler = handler
    logging.captureWarnings(True)
    return handler
