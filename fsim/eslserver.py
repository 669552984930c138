"""Inbound mod_event_socket: auth, subscriptions, filters, api/bgapi, and event delivery per connection."""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid as uuidlib
from collections import Counter
from typing import TYPE_CHECKING

import gevent
import gevent.queue
import gevent.server
import gevent.socket

from . import wire
from .events import EVENT_NAMES, Event

if TYPE_CHECKING:
    from .switch import FSim

log = logging.getLogger("fsim.esl")

ABORT = b"<abort>"  # sentinel in the write queue: drop the TCP connection at this point of the stream


class ESLConnection:
    """One client connection. Replies are written in command order; events never split a frame."""

    def __init__(self, server: ESLServer, sock: gevent.socket.socket, addr: tuple[str, int]) -> None:
        self.server = server
        self.sw = server.sw
        self.sock = sock
        self.addr = addr
        self.authed = False
        self.format = "plain"
        self.events: set[str] = set()
        self.all_events = False
        self.subclasses: set[str] = set()
        self.all_custom = False
        self.filters: list[tuple[str, str]] = []
        self.closed = False
        self._out: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        self._writer: gevent.Greenlet
        self._held: list[bytes] | None = None
        self._writer = gevent.spawn(self._write_loop)
        self.commands: list[str] = []
        self.delivered: Counter[tuple[str, str]] = Counter()  # (event name, Unique-ID) → events sent to this client

    # ------------------------------------------------------------------ output
    def _write_loop(self) -> None:
        try:
            for _ in range(10**12):
                item = self._out.get()
                if item is None:
                    return
                if item is ABORT:
                    self.abort()
                    return
                self.sock.sendall(item)
        except (OSError, gevent.GreenletExit):
            pass
        finally:
            self.closed = True

    def write_now(self, data: bytes) -> None:
        """Write a reply in order with queued events (flushing them first keeps the byte stream unsplit)."""
        if self.closed:
            return
        self._out.put(data)

    @property
    def listening(self) -> bool:
        return self.all_events or bool(self.events) or self.all_custom or bool(self.subclasses)

    def wants(self, ev: Event) -> bool:
        if not self.authed or self.closed:
            return False
        if ev.name == "CUSTOM":
            if not (self.all_events or self.all_custom or (ev.subclass or "") in self.subclasses):
                return False
        elif not (self.all_events or ev.name in self.events):
            return False
        return self._pass_filters(ev)

    def _pass_filters(self, ev: Event) -> bool:
        """``event_handler`` in mod_event_socket.c: any matching filter admits; a ``-`` filter excludes."""
        if not self.filters:
            return True
        send = False
        for name, value in self.filters:
            hval = ev.get_ci(name)
            if hval is None:
                continue
            comp = value
            pos = True
            while comp and comp[0] in "+- ":
                if comp[0] == "+":
                    pos = True
                elif comp[0] == "-":
                    pos = False
                comp = comp[1:]
            if send and pos:
                continue
            cmp = bool(wire.regex(comp).search(hval)) if value.startswith("/") else hval.lower() == comp.lower()
            if cmp:
                if pos:
                    send = True
                else:
                    send = False
                    break
        return send

    def deliver(self, ev: Event) -> None:
        if not self.wants(ev):
            return
        self.delivered[(ev.name, ev.uuid or "")] += 1
        if self.format == "json":
            frame = wire.event_frame(ev.json(), "text/event-json")
        else:
            frame = wire.event_frame(ev.plain(), "text/event-plain")
        if self._held is not None:
            self._held.append(frame)
        else:
            self.write_now(frame)

    # ------------------------------------------------------------------ input
    def serve(self) -> None:
        parser = wire.CommandParser()
        self.write_now(wire.auth_request())
        try:
            for _ in range(10**12):
                data = self.sock.recv(65536)
                if not data:
                    break
                for line, headers, body in parser.feed(data):
                    if not self.handle(line, headers, body):
                        return
                    if self.closed:
                        return
        except (OSError, gevent.GreenletExit):
            pass
        finally:
            self.close()

    def close(self, notice: str | None = None) -> None:
        if notice is not None and not self.closed:
            self.write_now(wire.disconnect_notice(notice))
        self._out.put(None)
        if self._writer is not gevent.getcurrent():
            self._writer.join(timeout=2.0)
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server.connections.discard(self)

    def abort(self) -> None:
        """EOF without a notice, as when FreeSWITCH is killed."""
        self.closed = True
        if self._writer is not gevent.getcurrent():
            self._writer.kill(block=False)
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server.connections.discard(self)

    def cut_mid_body(self) -> None:
        """Write the head and half the body of an event frame, then drop the connection (a crash mid-write)."""
        ev = self.sw.make_event("HEARTBEAT", [("Event-Info", "System Ready"), ("Up-Time", "0 years, 0 days")])
        frame = wire.event_frame(ev.plain())
        head_end = frame.index(b"\n\n") + 2
        self.write_now(frame[: head_end + (len(frame) - head_end) // 2])
        self._out.put(ABORT)

    def reply(self, text: str, extra: list[tuple[str, str]] | None = None) -> None:
        self.write_now(wire.command_reply(text, extra or []))

    def handle(self, line: str, headers: dict[str, str], body: bytes) -> bool:
        """Run one command; False ends the connection."""
        self.commands.append(line)
        word, _, rest = line.partition(" ")
        cmd = word.lower()
        delay = self.sw.faults.reply_delay
        if not self.authed:
            if cmd == "auth":
                if rest.strip() == self.sw.password:
                    self.authed = True
                    self.reply("+OK accepted")
                    return True
                self.reply("-ERR invalid")
                self.close(wire.DISCONNECT_BODY)
                return False
            if cmd == "exit":
                self.reply("+OK bye")
                self.close(wire.DISCONNECT_BODY)
                return False
            self.reply("-ERR command not found")
            return True
        if cmd == "exit":
            self.reply("+OK bye")
            self.close(wire.DISCONNECT_BODY)
            return False
        if cmd == "api":
            # An api runs in the connection's own thread: events fired meanwhile are written after the reply.
            self._held = []
            try:
                if delay:
                    gevent.sleep(delay)
                result = self.sw.run_api(rest, via="api")
            finally:
                held, self._held = self._held, None
            self.write_now(wire.api_response(result))
            for frame in held:
                self.write_now(frame)
            return True
        if cmd == "bgapi":
            job = headers.get("Job-UUID") or str(uuidlib.uuid4())
            if delay:
                gevent.sleep(delay)
            self.reply(f"+OK Job-UUID: {job}", [("Job-UUID", job)])
            self.sw.spawn(self.sw.run_bgapi, rest, job)
            return True
        if cmd == "event":
            self._event(rest)
            return True
        if cmd == "nixevent":
            self._nixevent(rest)
            return True
        if cmd == "noevents":
            if self.listening:
                self.events.clear()
                self.subclasses.clear()
                self.all_events = self.all_custom = False
                self.reply("+OK no longer listening for events")
            else:
                self.reply("-ERR not listening for events")
            return True
        if cmd == "filter":
            self._filter(rest)
            return True
        if cmd in ("linger", "nolinger"):
            self.reply("-ERR not controlling a session")
            return True
        if cmd == "divert_events":
            self.reply("-ERR not controlling a session.")
            return True
        if cmd == "log":
            level = rest.strip() or "debug"
            self.reply(f"+OK log level {level} [7]")
            return True
        if cmd == "nolog":
            self.reply("+OK no longer logging")
            return True
        if cmd == "sendmsg":
            self.reply(self.sw.sendmsg(rest.strip(), headers, body))
            return True
        if cmd == "sendevent":
            self.reply(f"+OK {uuidlib.uuid4()}")
            return True
        self.reply("-ERR command not found")
        return True

    def _event(self, rest: str) -> None:
        words = rest.split()
        fmt = "plain"
        if words and words[0].lower() in ("plain", "json", "xml"):
            fmt = words.pop(0).lower()
        custom = False
        any_valid = False
        for w in words:
            if custom:
                self.subclasses.add(w)
                any_valid = True
                continue
            name = w.upper()
            if name.startswith("SWITCH_EVENT_"):
                name = name[len("SWITCH_EVENT_") :]
            if name == "ALL":
                self.all_events = True
                any_valid = True
            elif name == "CUSTOM":
                custom = True
                any_valid = True
            elif name in EVENT_NAMES:
                self.events.add(name)
                any_valid = True
        if not any_valid:
            self.reply("-ERR no keywords supplied")
            return
        self.format = fmt
        self.reply(f"+OK event listener enabled {fmt}")

    def _nixevent(self, rest: str) -> None:
        custom = False
        for w in rest.split():
            if custom:
                self.subclasses.discard(w)
                continue
            name = w.upper()
            if name == "CUSTOM":
                custom = True
            elif name == "ALL":
                self.all_events = False
                self.events.clear()
            else:
                self.events.discard(name)
        self.reply("+OK events nixed")

    def _filter(self, rest: str) -> None:
        parts = rest.strip().split(None, 1)
        if parts and parts[0] == "delete":
            sub = parts[1].split(None, 1) if len(parts) > 1 else []
            if not sub:
                self.reply("-ERR invalid syntax")
                return
            if sub[0] == "all":
                self.filters.clear()
                self.reply("+OK filter deleted. [all][]")
                return
            name = sub[0]
            value = sub[1] if len(sub) > 1 else ""
            self.filters = [(k, v) for k, v in self.filters if not (k == name and (not value or v == value))]
            self.reply(f"+OK filter deleted. [{name}][{value}]")
            return
        if len(parts) < 2:
            self.reply("-ERR invalid syntax")
            return
        faults = self.sw.faults
        if faults.hangups_before_filter and parts[0].lower() == "unique-id" and parts[1] in self.sw.channels:
            faults.hangups_before_filter -= 1
            self.sw.channels[parts[1]].hangup("NORMAL_CLEARING", by="caller")
        self.filters.append((parts[0], parts[1]))
        self.reply(f"+OK filter added. [{parts[0]}]=[{parts[1]}]")


class ESLServer:
    """The listener; ``restart`` replaces it with a fresh one on the same port."""

    def __init__(self, sw: FSim, host: str, port: int) -> None:
        self.sw = sw
        self.host = host
        self.port = port
        self.connections: set[ESLConnection] = set()
        self._server: gevent.server.StreamServer | None = None

    def start(self) -> None:
        self._server = gevent.server.StreamServer((self.host, self.port), self._accept)
        self._server.init_socket()
        self._server.start()
        self.port = self._server.server_port

    def _accept(self, sock: gevent.socket.socket, addr: tuple[str, int]) -> None:
        if self.sw.faults.rude_reject:
            sock.sendall(wire.rude_rejection())
            sock.close()
            return
        with contextlib.suppress(OSError):  # mod_event_socket sets SWITCH_SO_TCP_NODELAY on its listeners
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ESLConnection(self, sock, addr)
        self.connections.add(conn)
        conn.serve()

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def broadcast(self, ev: Event) -> None:
        for conn in list(self.connections):
            conn.deliver(ev)
