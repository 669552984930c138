"""The ESL connection: greenswitch, with its known defects handled, under a reconnecting supervisor.

greenswitch 0.0.19 (see the ESL reference, §7) parses event bodies wrongly, spins forever when the socket
closes inside a body, leaves a pending `send()` blocked forever after EOF, fires no DISCONNECT on EOF, and
cannot be reused after a drop. `EslConnection` fixes the first four; `EslClient` owns reconnection with
capped exponential backoff and jitter, a timeout on every command, and builds a new connection each time.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import gevent
import gevent.event
import gevent.lock
from greenswitch.esl import ESLEvent, InboundESL, NotConnectedError

log = logging.getLogger("forkbridge.esl")

DEAD_AFTER = 3  # a connection silent this many command timeouts while a command waits is dead


class EslError(Exception):
    """A command could not be completed: not connected, timed out, or the connection dropped."""


@dataclass
class Event:
    """One FreeSWITCH event: URL-decoded headers and the raw body (JSON for mod_audio_fork, results for bgapi)."""

    name: str
    headers: dict[str, str]
    body: str = ""
    subclass: str = ""

    def get(self, key: str, default: str = "") -> str:
        return self.headers.get(key, default)

    @property
    def uuid(self) -> str:
        return self.headers.get("Unique-ID", "")


def parse_plain_event(text: str) -> Event:
    """Split a text/event-plain body as libesl does: decode header values only, keep the body raw."""
    head, sep, rest = text.partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.split("\n"):
        name, colon, value = line.partition(": ")
        if colon:
            headers.setdefault(name, unquote(value))
    body = ""
    if sep and "Content-Length" in headers:
        body = rest[: int(headers["Content-Length"])] if headers["Content-Length"].isdigit() else rest
    name = headers.get("Event-Name", "")
    return Event(name=name, headers=headers, body=body, subclass=headers.get("Event-Subclass", ""))


class EslConnection(InboundESL):
    """One connection's life. `lost` is set exactly once, however the connection ends."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0) -> None:
        super().__init__(host, port, password, timeout=timeout)
        self.lost = gevent.event.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()  # when FreeSWITCH last sent anything on this connection
        self._send_lock = gevent.lock.Semaphore()

    def connect(self) -> None:
        super().connect()
        # A uuid_break must not wait behind the previous command's ACK (Nagle + delayed ACK: up to 40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _read_exact(self, length: int) -> str:
        """Read a body; a short read means the peer is gone (greenswitch would spin here forever)."""
        chunks: list[bytes] = []
        remaining = length
        while remaining > 0:
            data = self.sock_file.read(remaining)
            if not data:
                raise EOFError(f"connection closed with {remaining} of {length} body bytes unread")
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def handle_event(self, event: ESLEvent) -> None:
        self.last_rx = time.monotonic()
        ctype = event.headers.get("Content-Type", "")
        length = event.headers.get("Content-Length")
        try:
            if ctype.startswith("text/event-plain"):
                parsed = parse_plain_event(self._read_exact(int(length or 0)))
                event.headers = dict(parsed.headers)
                event.parsed = parsed  # type: ignore[attr-defined]
                self._esl_event_queue.put(event)
            elif ctype == "api/response":
                event.data = self._read_exact(int(length or 0))
                self._commands_sent.pop(0).set(event)
            elif ctype == "text/disconnect-notice":
                if length:
                    event.data = self._read_exact(int(length))
                self._mark_lost("disconnect notice")
                super().handle_event(event)
            elif ctype in ("text/event-json", "text/event-xml", "log/data"):
                self._read_exact(int(length or 0))  # not subscribed; skip cleanly
            else:
                super().handle_event(event)
        except (EOFError, OSError, ValueError) as exc:
            self._mark_lost(f"broken frame: {exc}")

    def receive_events(self) -> None:
        try:
            super().receive_events()
        finally:
            self._mark_lost("connection closed")

    def _mark_lost(self, reason: str) -> None:
        """Stop reading, fail every waiting command, tell the supervisor (greenswitch does none of this on EOF)."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self._run = False
        self.connected = False
        pending, self._commands_sent = self._commands_sent, []
        for result in pending:
            result.set_exception(NotConnectedError(reason))
        self._auth_request_event.set()  # a connect() still waiting for FreeSWITCH's greeting fails now, not later
        self.lost.set()
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: str):
        """sendall instead of send: a long command must not be cut."""
        return self.post(data).get()

    def post(self, data: str) -> gevent.event.AsyncResult:
        """Write a command now (commands go out, and are answered, in the order posted); its reply comes later."""
        if not self.connected:
            raise NotConnectedError("not connected")
        result = gevent.event.AsyncResult()
        with self._send_lock:
            self._commands_sent.append(result)
            self.sock.sendall((data + "\n\n").encode("utf-8"))
        return result

    def close(self) -> None:
        self._mark_lost("closed by us")
        for greenlet in (self._receive_events_greenlet, self._process_events_greenlet):
            if greenlet is not None:
                greenlet.kill(block=False)


@dataclass
class EslSettings:
    host: str
    port: int
    password: str
    command_timeout: float = 5.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    events: tuple[str, ...] = ()
    custom: tuple[str, ...] = ()
    # With these set, only these events come for every channel; the others only for channels `watch`ed (ESL
    # filters: a switch's other calls, and another worker's, cost nothing to parse). Empty: everything comes.
    every_channel: tuple[str, ...] = ()


class EslClient:
    """Keeps one authenticated, subscribed connection alive; every command has a timeout.

    `on_event(Event)` runs in greenswitch's handler greenlet, one event at a time in arrival order: it must
    not block. `on_connected()` runs in its own greenlet after each (re)connect, for the resync.
    """

    def __init__(self, settings: EslSettings, on_event: Callable[[Event], None],
                 on_connected: Callable[[bool], None] | None = None,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.on_event = on_event
        self.on_connected = on_connected
        self.on_state = on_state
        self.reconnects = 0
        self._conn: EslConnection | None = None
        self._jobs: dict[str, gevent.event.AsyncResult] = {}
        self._watched: set[str] = set()
        self._stopping = False
        self._runner: gevent.Greenlet | None = None
        self._ready = gevent.event.Event()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._ready.is_set() and not self._conn.lost.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """True once a connection is up (at once if it is); False after `timeout` or when stopping."""
        deadline = time.monotonic() + timeout
        while not self._stopping:
            if self.connected:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ready.wait(min(left, 0.5))
            if not self.connected:
                gevent.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return False

    def start(self) -> None:
        self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        conn = self._conn
        if conn is not None and conn.connected:
            try:
                with gevent.Timeout(1.0):
                    conn.send("exit")
            except (gevent.Timeout, NotConnectedError, OSError):
                pass
        if conn is not None:
            conn.close()
        if self._runner is not None:
            self._runner.kill(block=True, timeout=2)

    # ---- connection supervision -----------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stopping:
            conn = EslConnection(self.settings.host, self.settings.port, self.settings.password,
                                 timeout=self.settings.command_timeout)
            try:
                with gevent.Timeout(self.settings.command_timeout * 2, EslError("connect/auth timed out")):
                    conn.connect()
                    self._subscribe(conn)
            except (Exception, gevent.Timeout) as exc:
                conn.close()
                attempt += 1
                delay = self._backoff(attempt)
                log.warning("ESL %s:%s not available (%s); retrying in %.1fs", self.settings.host,
                            self.settings.port, _describe(exc), delay)
                gevent.sleep(delay)
                continue
            attempt = 0
            self._conn = conn
            self._ready.set()
            if not first:
                self.reconnects += 1
            log.info("ESL connected to %s:%s%s", self.settings.host, self.settings.port,
                     "" if first else " (reconnected)")
            self._notify_state(True)
            if self.on_connected is not None:
                gevent.spawn(self.on_connected, not first)
            first = False
            conn.lost.wait()
            self._ready.clear()
            self._fail_jobs(conn.lost_reason)
            if self._stopping:
                break
            log.warning("ESL connection lost (%s); reconnecting", conn.lost_reason)
            self._notify_state(False)
            conn.close()
            gevent.sleep(self._backoff(1))
        self._notify_state(False)

    def _backoff(self, attempt: int) -> float:
        base = min(self.settings.reconnect_max, self.settings.reconnect_min * (2 ** (attempt - 1)))
        return base * random.uniform(0.5, 1.0)

    def _notify_state(self, up: bool) -> None:
        if self.on_state is not None:
            self.on_state(up)

    def _subscribe(self, conn: EslConnection) -> None:
        conn.register_handle("*", self._dispatch)
        words = " ".join(self.settings.events)
        if self.settings.custom:
            words += " CUSTOM " + " ".join(self.settings.custom)
        reply = conn.send(f"event plain {words}")
        if not reply.data.startswith("+OK"):
            raise EslError(f"subscription refused: {reply.data}")
        if not self.settings.every_channel:
            return
        # posted together (one round trip, not one per call), then every answer checked; a call taken meanwhile
        # (its watch() found no connection) is added in the next round, before the connection is handed out
        commands = [f"filter Event-Name {name}" for name in self.settings.every_channel]
        added: set[str] = set()
        while commands:
            for reply in [conn.post(command) for command in commands]:
                if not reply.get().data.startswith("+OK"):
                    raise EslError(f"filter refused: {reply.get().data}")
            fresh = self._watched - added
            added |= fresh
            commands = [f"filter Unique-ID {uuid}" for uuid in fresh]

    # ---- which channels' events come ----------------------------------------------------------------

    def watch(self, uuid: str) -> gevent.event.AsyncResult:
        """Deliver this channel's events from now on (and after every reconnect) until `unwatch`. The command is
        written before this returns, so it goes ahead of anything sent for the call after it; the result is set
        once FreeSWITCH has applied it (from then on, none of the channel's events is missed): the reply text,
        or an EslError (the filter is added again at the next connect)."""
        done = gevent.event.AsyncResult()
        already = uuid in self._watched  # one filter per channel, however often asked
        self._watched.add(uuid)
        if already or not self.settings.every_channel:
            done.set("+OK")
            return done
        conn = self._conn
        if conn is None or not self.connected:
            done.set_exception(EslError("ESL not connected"))
            return done
        try:
            reply = conn.post(f"filter Unique-ID {uuid}")
        except (NotConnectedError, OSError) as exc:
            done.set_exception(EslError(f"connection lost: {_describe(exc)}"))
            return done
        reply.rawlink(lambda r: done.set(r.get().data or "") if r.successful()
                      else done.set_exception(EslError(f"connection lost: {_describe(r.exception)}")))
        return done

    def unwatch(self, uuid: str) -> None:
        """The channel is no longer ours: its events stop (nobody waits for FreeSWITCH's reply)."""
        if uuid not in self._watched:
            return
        self._watched.discard(uuid)
        conn = self._conn
        if self.settings.every_channel and conn is not None and self.connected:
            with contextlib.suppress(NotConnectedError, OSError):
                conn.post(f"filter delete Unique-ID {uuid}")

    def _fail_jobs(self, reason: str) -> None:
        jobs, self._jobs = self._jobs, {}
        for result in jobs.values():
            result.set_exception(EslError(f"connection lost: {reason}"))

    def _dispatch(self, raw: ESLEvent) -> None:
        event = getattr(raw, "parsed", None)
        if event is None:
            return  # disconnect notice: the supervisor handles it through `lost`
        if event.name == "BACKGROUND_JOB":
            job = self._jobs.pop(event.get("Job-UUID"), None)
            if job is not None:
                job.set(event.body)
                return
        try:
            self.on_event(event)
        except Exception:
            log.exception("error handling %s for %s", event.name, event.uuid)

    # ---- commands ---------------------------------------------------------------------------------

    def _command(self, text: str, timeout: float | None = None):
        conn = self._conn
        if conn is None or not self.connected:
            raise EslError("ESL not connected")
        timeout = timeout or self.settings.command_timeout
        try:
            with gevent.Timeout(timeout):
                return conn.send(text)
        except gevent.Timeout:
            # FreeSWITCH runs an `api` in the connection's own thread: a slow one holds this connection's replies
            # and events, it does not end it. The abandoned waiter stays first in line, so its late reply is
            # matched to it (replies are FIFO) and the next command gets its own. Only a socket that has said
            # nothing at all for DEAD_AFTER command timeouts is taken for dead.
            silent = time.monotonic() - conn.last_rx
            if silent > timeout * DEAD_AFTER:
                conn._mark_lost(f"nothing from FreeSWITCH for {silent:.1f}s with a command waiting")
            raise EslError(f"timed out after {timeout:.1f}s") from None
        except (NotConnectedError, OSError) as exc:
            raise EslError(f"connection lost: {_describe(exc)}") from None

    def api(self, command: str, timeout: float | None = None) -> str:
        """`api <command>`: the body FreeSWITCH answered (e.g. '+OK\\n' or '-ERR No such channel!\\n')."""
        return self._command(f"api {command}", timeout).data or ""

    def execute(self, uuid: str, app: str, arg: str, lock: bool = True, timeout: float | None = None) -> str:
        """Queue an application on a channel with `sendmsg` (no lead frames, unlike uuid_broadcast's five).

        `lock` sends `event-lock: true`: without it, the running playback parses the channel's queued events
        on every frame and would play the next queued file inside itself, newest first."""
        command = f"sendmsg {uuid}\ncall-command: execute\nexecute-app-name: {app}\nexecute-app-arg: {arg}"
        if lock:
            command += "\nevent-lock: true"
        return self._command(command, timeout).data or ""

    def bgapi(self, command: str, timeout: float | None = None) -> str:
        """`bgapi <command>` and wait for its BACKGROUND_JOB result (the module's real verdict comes later)."""
        job_id = str(uuidlib.uuid4())
        result = gevent.event.AsyncResult()
        self._jobs[job_id] = result
        try:
            self._command(f"bgapi {command}\nJob-UUID: {job_id}", timeout)
            return result.get(timeout=timeout or self.settings.command_timeout)
        except gevent.Timeout:
            raise EslError("no BACKGROUND_JOB result in time") from None
        finally:
            self._jobs.pop(job_id, None)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

