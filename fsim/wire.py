"""Byte-exact ESL framing, FreeSWITCH URL-encoding and argument splitting.

Everything here mirrors a C function of FreeSWITCH (named in each docstring), because clients such as greenswitch
break on small deviations (``\\r\\n`` line ends, header order, double encoding).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

# SWITCH_URL_UNSAFE from src/include/switch_utils.h (plus every byte < 0x20 or > 0x7E).
_URL_UNSAFE = set(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX = b"0123456789abcdefABCDEF"

DISCONNECT_BODY = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
SHUTDOWN_BODY = "The system is being shut down.\n"
LOST_EVENTS_BODY = "killed listener because of lost events\n"
RUDE_REJECTION_BODY = "Access Denied, go away.\n"


def url_encode(value: str) -> str:
    """``switch_url_encode``: upper-case hex, a ``%`` already followed by two hex digits is left alone."""
    raw = value.encode("utf-8")
    out = []
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            out.append("%")
        elif b < 0x20 or b > 0x7E or b in _URL_UNSAFE:
            out.append(f"%{b:02X}")
        else:
            out.append(chr(b))
        i += 1
    return "".join(out)


def header_value(value: str | None) -> str:
    """An empty or missing header value is serialised as ``_undef_`` (``switch_event_serialize``)."""
    if value is None or value == "":
        return "_undef_"
    return url_encode(value)


def serialize_plain(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """The inner text of a ``text/event-plain`` frame: encoded headers, then ``Content-Length`` + raw body."""
    lines = [f"{name}: {header_value(value)}\n" for name, value in headers]
    text = "".join(lines)
    if body:
        b = body.encode("utf-8")
        return text.encode("utf-8") + f"Content-Length: {len(b)}\n\n".encode() + b
    return (text + "\n").encode("utf-8")


def serialize_json(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """``switch_event_serialize_json_obj``: plain values, repeated headers become arrays, body as ``_body``."""
    obj: dict[str, object] = {}
    for name, value in headers:
        if name in obj:
            prev = obj[name]
            obj[name] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            obj[name] = value
    if body:
        obj["Content-Length"] = str(len(body.encode("utf-8")))
        obj["_body"] = body
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def event_frame(inner: bytes, content_type: str = "text/event-plain") -> bytes:
    """Outer event frame: FreeSWITCH writes ``Content-Length`` *before* ``Content-Type`` here."""
    return f"Content-Length: {len(inner)}\nContent-Type: {content_type}\n\n".encode() + inner


def auth_request() -> bytes:
    return b"Content-Type: auth/request\n\n"


def command_reply(text: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """``command/reply``; the extended form (bgapi) carries extra headers such as ``Job-UUID``."""
    head = f"Content-Type: command/reply\nReply-Text: {text}\n"
    head += "".join(f"{k}: {v}\n" for k, v in extra)
    return (head + "\n").encode("utf-8")


def api_response(body: str) -> bytes:
    b = body.encode("utf-8")
    return f"Content-Type: api/response\nContent-Length: {len(b)}\n\n".encode() + b


def disconnect_notice(body: str = DISCONNECT_BODY) -> bytes:
    b = body.encode("utf-8")
    return f"Content-Type: text/disconnect-notice\nContent-Length: {len(b)}\n\n".encode() + b


def rude_rejection() -> bytes:
    b = RUDE_REJECTION_BODY.encode()
    return f"Content-Type: text/rude-rejection\nContent-Length: {len(b)}\n\n".encode() + b


class CommandParser:
    """Splits the client byte stream into commands the way ``read_packet`` does.

    A command ends at an empty line; ``\\r`` is ignored, leading blank lines are skipped, and a ``Content-Length``
    header makes the parser read that many body bytes.
    """

    MAX_BODY = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
        self._buf += data
        out = []
        for _ in range(10_000):
            cmd = self._next()
            if cmd is None:
                break
            out.append(cmd)
        return out

    def _next(self) -> tuple[str, dict[str, str], bytes] | None:
        buf = self._buf.replace(b"\r", b"") if b"\r" in self._buf else self._buf
        stripped = buf.lstrip(b"\n")
        end = stripped.find(b"\n\n")
        if end < 0:
            self._buf = stripped
            return None
        head = stripped[:end].decode("utf-8", "replace").split("\n")
        rest = stripped[end + 2 :]
        headers: dict[str, str] = {}
        for line in head[1:]:
            if ": " in line:
                k, v = line.split(": ", 1)
                headers[k] = v
        body = b""
        length = headers.get("Content-Length") or headers.get("content-length")
        if length and length.isdigit():
            want = min(int(length), self.MAX_BODY)
            if len(rest) < want:
                self._buf = stripped
                return None
            body, rest = rest[:want], rest[want:]
        self._buf = rest
        return head[0].strip(), headers, body


# ---------------------------------------------------------------- switch_separate_string (src/switch_utils.c)

_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "s": " "}


def _cleanup(token: str, delim: str) -> str:
    """``cleanup_separated_string``: drop quotes, process escapes, trim spaces outside quotes."""
    i = 0
    while i < len(token) and token[i] == " ":
        i += 1
    dest: list[str] = []
    end = 0
    inside = False
    n = len(token)
    while i < n:
        c = token[i]
        esc = False
        if c == "\\" and i + 1 < n:
            e = token[i + 1]
            if e in ("'", '"', "\\") or (delim and e == delim) or e in _UNESCAPE:
                i += 1
                dest.append(_UNESCAPE.get(e, e))
                end = len(dest)
                esc = True
        if not esc:
            if c == "'":
                inside = not inside
            else:
                dest.append(c)
                if c != " " or inside:
                    end = len(dest)
        i += 1
    return "".join(dest[:end])


def separate_string(buf: str, max_tokens: int, delim: str = " ") -> list[str]:
    """``switch_separate_string``: the last token is the rest of the line; ``^^X`` switches the delimiter to X."""
    if buf.startswith("^^") and len(buf) >= 4:
        delim = buf[2]
        buf = buf[3:]
    tokens: list[str] = []
    if delim == " ":
        state = "start"
        start = 0
        inside = False
        i = 0
        n = len(buf)
        while i < n and len(tokens) < max_tokens:
            if state == "start":
                start = i
                tokens.append("")
                state = "skip_initial"
                continue
            c = buf[i]
            if state == "skip_initial":
                if c == " ":
                    i += 1
                else:
                    state = "find"
                continue
            if state == "find":
                if c == "\\":
                    i += 1
                elif c == "'":
                    inside = not inside
                elif c == " " and not inside:
                    tokens[-1] = buf[start:i]
                    state = "skip_end"
                    i += 1
                    continue
                i += 1
                continue
            if state == "skip_end":
                if c == " ":
                    i += 1
                else:
                    state = "start"
        if tokens and state in ("skip_initial", "find"):
            tokens[-1] = buf[start:]
    else:
        state = "start"
        start = 0
        inside = False
        i = 0
        n = len(buf)
        while i < n and len(tokens) < max_tokens:
            if state == "start":
                start = i
                tokens.append("")
                state = "find"
                continue
            c = buf[i]
            if c == "\\":
                i += 1
            elif c == "'":
                inside = not inside
            elif c == delim and not inside:
                tokens[-1] = buf[start:i]
                state = "start"
            i += 1
        if tokens and state == "find":
            tokens[-1] = buf[start:]
    return [_cleanup(t, delim) for t in tokens]


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def regex(pattern: str) -> re.Pattern[str]:
    """FreeSWITCH filters accept ``/expr/``; compile once."""
    p = pattern.strip("/")
    if p not in _REGEX_CACHE:
        _REGEX_CACHE[p] = re.compile(p)
    return _REGEX_CACHE[p]
