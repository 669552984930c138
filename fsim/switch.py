"""``FSim``: the simulated switch — channels, the event bus, API commands and the ESL listener."""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool

from . import wire
from .audiofork import api_uuid_audio_fork
from .audiostream import api_uuid_audio_stream
from .caller import CallerScript
from .channel import SHOW_COLUMNS, Callee, Channel
from .control import CONTROL_API
from .eslserver import ESLServer
from .events import WITH_VARIABLES, Event, channel_headers, common_headers
from .faults import Faults
from .record import api_uuid_record

log = logging.getLogger("fsim")


@dataclass
class CommandRecord:
    """One api/bgapi command as received (``uuid`` = the channel it targeted, if any)."""

    kind: str  # api | bgapi | local
    command: str
    args: str
    uuid: str | None
    reply: str | None = None
    job_uuid: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def line(self) -> str:
        return f"{self.command} {self.args}".strip()


def _is_uuid(s: str) -> bool:
    try:
        uuidlib.UUID(s)
        return True
    except ValueError:
        return False


class FSim:
    """A FreeSWITCH stand-in for tests. Start it, point the controller at ``esl_port``, place calls.

    ``dids``: DIDs the simulated dialplan answers (None = every DID). ``others``: DIDs it answers and parks without
    the marker (the switch's other calls, not forkbridge's). ``marker``: the variable the dialplan sets
    to mark calls as ours. ``dialplan_vars``: more variables the extension sets. ``fork_build``: ``drachtio`` (no
    audio back) or ``jambonz`` (bidirectional). ``broadcast_lead_frames``: frames read before each queued
    broadcast starts (FreeSWITCH uses 5).
    """

    def __init__(
        self,
        esl_host: str = "127.0.0.1",
        esl_port: int = 0,
        password: str = "ClueCon",
        spool_dir: str | None = None,
        temp_dir: str | None = None,
        dids: list[str] | None = None,
        others: list[str] | None = None,
        marker: tuple[str, str] = ("forkbridge", "true"),
        dialplan_vars: dict[str, str] | None = None,
        fork_build: str = "drachtio",
        broadcast_lead_frames: int = 5,
        transfer_timeout: float = 60.0,
        max_call_s: float = 3600.0,
        hostname: str = "fsim",
        callees: dict[str, Callee] | None = None,
    ) -> None:
        if fork_build not in ("drachtio", "jambonz"):
            raise ValueError("fork_build must be 'drachtio' or 'jambonz'")
        self.password = password
        self.hostname = hostname
        self.core_uuid = str(uuidlib.uuid4())
        self.spool_dir = spool_dir
        self._own_temp = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="fsim-tmp-")
        self.dids = set(dids) if dids is not None else None
        self.others = set(others or ())  # DIDs the switch's other extensions answer and park, without our marker
        self.callees: dict[str, Callee] = dict(callees or {})  # what each number `originate` dials does
        self.marker = marker
        self.dialplan_vars = dict(dialplan_vars or {})
        self.fork_build = fork_build
        self.broadcast_lead_frames = broadcast_lead_frames
        self.transfer_timeout = transfer_timeout
        self.max_call_s = max_call_s
        self.channels: dict[str, Channel] = {}  # live channels
        self.calls: list[Channel] = []  # every channel ever placed
        self.commands_log: list[CommandRecord] = []
        self.events_log: list[Event] = []
        self.faults = Faults(self)
        self.esl = ESLServer(self, esl_host, esl_port)
        self._seq = itertools.count(1)
        self._temp_index = itertools.count(0)
        self._session_ids = itertools.count(1)
        self._pool = gevent.pool.Group()
        self.tasks: dict[int, tuple[str, gevent.Greenlet]] = {}  # sched_api tasks: id → (group, timer)
        self._task_ids = itertools.count(1)
        self.started = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def esl_port(self) -> int:
        return self.esl.port

    @property
    def esl_host(self) -> str:
        return self.esl.host

    def start(self) -> FSim:
        self.esl.start()
        self.started = True
        return self

    def stop(self) -> None:
        """Hang up every call, send the shutdown notice to ESL clients, close everything."""
        for ch in list(self.channels.values()):
            ch.hangup("SYSTEM_SHUTDOWN", by="switch")
        self.esl.stop_listening()
        self.faults.drop_esl("shutdown")
        self._pool.kill(block=True, timeout=2)
        for _group, timer in self.tasks.values():
            timer.kill(block=False)
        self.tasks.clear()
        if self._own_temp:
            _cleanup_temp(self.temp_dir)
        self.started = False

    def __enter__(self) -> FSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart_esl(self, keep_channels: bool = True) -> None:
        """FreeSWITCH restarted (or mod_event_socket reloaded): every ESL client is dropped (EOF), a fresh listener
        comes up on the same port. ``keep_channels=False`` = the process restarted and calls are gone (silently)."""
        self.esl.stop_listening()
        self.faults.drop_esl("eof")
        if not keep_channels:
            for ch in list(self.channels.values()):
                ch.vanish()
            self.channels.clear()
            self.core_uuid = str(uuidlib.uuid4())
        port = self.esl.port
        self.esl = ESLServer(self, self.esl.host, port)
        for _ in range(50):
            try:
                self.esl.start()
                break
            except OSError:
                gevent.sleep(0.02)
        else:
            raise RuntimeError(f"could not rebind ESL port {port}")

    def spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        return self._pool.spawn(fn, *args)

    # ------------------------------------------------------------------ calls
    def dialplan(self, did: str) -> dict[str, str] | None:
        """Variables the matching extension sets (then answer + park), or None: no route."""
        if self.dids is not None and did not in self.dids:
            return None
        out = {"playback_terminators": "none", "park_timeout": "3600:NORMAL_CLEARING"}
        out.update(self.dialplan_vars)
        # as dialplan/forkbridge.xml does: the marker, the DID without its '+', and the timer
        if self.marker and did not in self.others:
            out[self.marker[0]] = self.marker[1]  # for a call no daemon takes (Channel._run arms it before answer)
            out.setdefault("forkbridge_did", did.lstrip("+"))
            out.setdefault("forkbridge_untaken_after", "60")
            out.setdefault("forkbridge_untaken_to", "1000 XML default")
        return out

    def place_call(
        self,
        did: str = "7100",
        caller_id: str = "+15551234567",
        script: CallerScript | None = None,
        rate: int = 8000,
        ptime_ms: int = 20,
        caller_name: str = "",
        fork_build: str | None = None,
        ring_s: float = 0.0,
        variables: dict[str, str] | None = None,
    ) -> Channel:
        """Start an inbound call; returns at once (wait with ``call.wait_answered()``).

        ``rate`` is the codec rate (8000 = PCMU, 16000 = G722); ``variables`` are SIP-side variables present from
        CHANNEL_CREATE on (e.g. ``MOD_AUDIO_BASIC_AUTH_USERNAME``)."""
        ch = Channel(self, did, caller_id, caller_name, script or CallerScript(), rate, ptime_ms,
                     fork_build or self.fork_build, ring_s, variables)  # fmt: skip
        self.channels[ch.uuid] = ch
        self.calls.append(ch)
        ch.start()
        return ch

    def _channel_gone(self, ch: Channel) -> None:
        self.channels.pop(ch.uuid, None)

    def _next_temp_index(self) -> int:
        return next(self._temp_index)

    def _next_session_id(self) -> int:
        return next(self._session_ids)

    # ------------------------------------------------------------------ events
    def make_event(self, name: str, extra: list[tuple[str, str]] | None = None, body: str | None = None,
                   subclass: str | None = None) -> Event:  # fmt: skip
        h = common_headers(name, self.core_uuid, self.hostname, next(self._seq), subclass)
        return Event(name, h + (extra or []), body, subclass)

    def fire(self, ev: Event) -> None:
        self.events_log.append(ev)
        self.esl.broadcast(ev)

    def fire_channel_event(self, ch: Channel, name: str, extra: list[tuple[str, str]], body: str | None,
                           subclass: str | None) -> None:  # fmt: skip
        h = common_headers(name, self.core_uuid, self.hostname, next(self._seq), subclass)
        h += channel_headers(ch, with_variables=name in WITH_VARIABLES)
        h += extra
        self.fire(Event(name, h, body, subclass, uuid=ch.uuid))

    # ------------------------------------------------------------------ waiting helpers
    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
        """Poll ``predicate`` until truthy (returns its value) or raise TimeoutError; bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / max(interval, 0.001)) + 2):
            v = predicate()
            if v:
                return v
            if time.monotonic() >= deadline:
                break
            gevent.sleep(interval)
        v = predicate()
        if v:
            return v
        raise TimeoutError(f"condition not met within {timeout}s")

    def wait_event(self, name: str, uuid: str | None = None, timeout: float = 5.0, after: int = 0) -> Event:
        """The first event called ``name`` (Event-Name or subclass), optionally for one channel."""

        def find() -> Event | None:
            for ev in self.events_log[after:]:
                if ev.key == name and (uuid is None or ev.uuid == uuid):
                    return ev
            return None

        return self.wait_for(find, timeout)

    def commands_for(self, uuid: str) -> list[CommandRecord]:
        return [c for c in self.commands_log if c.uuid == uuid]

    # ------------------------------------------------------------------ API
    def api(self, line: str) -> str:
        """Run an API command locally, like ``fs_cli -x``."""
        return self.run_api(line, via="local")

    def run_api(self, line: str, via: str = "api", job_uuid: str | None = None) -> str:
        cmd, _, args = line.strip().partition(" ")
        args = args.strip()
        if cmd.lower() in CONTROL_API:
            return CONTROL_API[cmd.lower()](self, args)
        first = args.split(" ", 1)[0] if args else ""
        target = first if _is_uuid(first) else None
        rec = CommandRecord(via, cmd, args, target, job_uuid=job_uuid)
        self.commands_log.append(rec)
        fn = API.get(cmd.lower()) if cmd else None
        if fn is None:
            rec.reply = f"-ERR {cmd} Command not found!\n"
        else:
            try:
                rec.reply = fn(self, args)
            except Exception as e:  # an API must never take the switch down
                log.exception("api %s failed", cmd)
                rec.reply = f"-ERR {e}\n"
        return rec.reply

    def run_bgapi(self, line: str, job: str) -> None:
        delay = self.faults.reply_delay
        if delay:
            gevent.sleep(delay)
        result = self.run_api(line, via="bgapi", job_uuid=job)
        cmd, _, args = line.strip().partition(" ")
        ev = self.make_event(
            "BACKGROUND_JOB",
            [("Job-UUID", job), ("Job-Owner-UUID", ""), ("Job-Command", cmd), ("Job-Command-Arg", args.strip())],
            body=result,
        )
        self.fire(ev)

    def sendmsg(self, target: str, headers: dict[str, str], body: bytes) -> str:
        ch = self.channels.get(target)
        rec = CommandRecord("sendmsg", "sendmsg", json.dumps(headers), target if _is_uuid(target) else None)
        self.commands_log.append(rec)
        if ch is None:
            rec.reply = f"-ERR invalid session id [{target}]"
            return rec.reply
        h = {k.lower(): v for k, v in headers.items()}
        cc = h.get("call-command", "")
        if cc == "execute":
            ch.enqueue(h.get("execute-app-name", ""), h.get("execute-app-arg", body.decode("utf-8", "replace")),
                       int(h.get("lead-frames", "0") or 0), event_lock=_switch_true(h.get("event-lock")),
                       app_uuid=h.get("event-uuid"))  # fmt: skip
        elif cc == "hangup":
            ch.hangup(h.get("hangup-cause", "NORMAL_CLEARING"), by="switch")
        rec.reply = "+OK"
        return rec.reply


# ---------------------------------------------------------------------------------------------- API commands


def _switch_true(value: str | None) -> bool:
    """FreeSWITCH's ``switch_true``: yes/on/true/t/enabled/active/allow or a non-zero number."""
    v = (value or "").strip().lower()
    if v in ("yes", "on", "true", "t", "enabled", "active", "allow"):
        return True
    return v.lstrip("-").isdigit() and int(v) != 0


def _uuid_break(sw: FSim, args: str) -> str:
    a = args.split()
    if not a:
        return "-USAGE: <uuid> [all]\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR No such channel!\n"
    ch.break_playback(flush="all" in a[1:])
    return "+OK\n"


def _uuid_broadcast(sw: FSim, args: str) -> str:
    a = wire.separate_string(args, 4)
    if len(a) < 2:
        return "-USAGE: <uuid> <path> [aleg|bleg|holdb|both]\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR invalid uuid\n"
    path = a[1]
    if "::" in path:
        app, _, arg = path.partition("::")
    else:
        app, arg = "playback", path
    ch.enqueue(app, arg, sw.broadcast_lead_frames)
    return "+OK Message sent\n"


def _uuid_kill(sw: FSim, args: str) -> str:
    a = args.split()
    if not a:
        return "-USAGE: <uuid> [cause]\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR No such channel!\n"
    ch.hangup(a[1] if len(a) > 1 else "NORMAL_CLEARING", by="switch")
    return "+OK\n"


def _uuid_transfer(sw: FSim, args: str) -> str:
    a = wire.separate_string(args, 6)  # quote-aware: an inline dialplan is one quoted argument
    usage = "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
    if len(a) < 2:
        return usage
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR No such channel!\n"
    rest = a[1:]
    if rest and rest[0] in ("-bleg", "-both"):
        return "-ERR\n"  # no bridged leg on a parked channel
    dest = rest[0]
    dialplan = rest[1] if len(rest) > 1 else "XML"
    context = rest[2] if len(rest) > 2 else ch.profile["context"]
    if not ch.alive:
        return "-ERR\n"
    ch.transfer(dest, dialplan, context)
    return "+OK\n"


def _uuid_setvar(sw: FSim, args: str) -> str:
    a = wire.separate_string(args, 3)
    if not a:
        return "-USAGE: <uuid> <var> [value]\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR No such channel!\n"
    if len(a) < 2 or not a[1]:
        return "-ERR No variable specified\n"
    if len(a) > 2 and a[2] != "":
        ch.variables[a[1]] = a[2]
    else:
        ch.variables.pop(a[1], None)
    return "+OK\n"


def _uuid_getvar(sw: FSim, args: str) -> str:
    a = args.split()
    if len(a) < 2:
        return "-USAGE: <uuid> <var>\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR No such channel!\n"
    return ch.variables.get(a[1], "_undef_")


def _uuid_exists(sw: FSim, args: str) -> str:
    a = args.split()
    return "true" if a and a[0] in sw.channels else "false"


def _uuid_send_dtmf(sw: FSim, args: str) -> str:
    a = args.split()
    if len(a) < 2:
        return "-USAGE: <uuid> <dtmf_data>\n"
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR Cannot locate session!\n"
    digits = a[1].split("@")[0]
    ch.send_dtmf_to_caller(digits)
    return f"+OK {ch.uuid} sent DTMF {digits}.\n"


def _uuid_answer(sw: FSim, args: str) -> str:
    a = args.split()
    ch = sw.channels.get(a[0]) if a else None
    return "+OK\n" if ch is not None else "-ERROR\n"


def _uuid_park(sw: FSim, args: str) -> str:
    a = args.split()
    ch = sw.channels.get(a[0]) if a else None
    return "+OK\n" if ch is not None else "-ERR No such channel!\n"


def _show(sw: FSim, args: str) -> str:
    a = args.split()
    if not a or a[0] not in ("channels", "calls"):
        return "-USAGE: codec|endpoint|application|api|dialplan|file|timer|calls [count]|channels [count|like <match string>]|calls|detailed_calls|bridged_calls|detailed_bridged_calls|aliases|complete|chat|management|modules|nat_map|say|interfaces|interface_types|tasks|limits|status\n"  # noqa: E501
    rows = [ch.show_row() for ch in sw.channels.values()]
    if a[0] == "channels" and len(a) > 1 and a[1] == "count":
        return f"\n{len(rows)} total.\n"
    if "as" in a and a[a.index("as") + 1 : a.index("as") + 2] == ["json"]:
        if not rows:
            return json.dumps({"row_count": 0}, separators=(",", ":"))
        return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))
    cols = list(rows[0]) if rows else list(SHOW_COLUMNS)
    lines = [",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]
    return "\n".join(lines) + f"\n\n{len(rows)} total.\n"


def _status(sw: FSim, args: str) -> str:
    return (
        "UP 0 years, 0 days, 0 hours, 0 minutes, 1 second, 0 milliseconds, 0 microseconds\n"
        f"FreeSWITCH (Version 1.10.12 -release 64bit) is ready\n"
        f"{len(sw.calls)} session(s) since startup\n{len(sw.channels)} session(s) - peak {len(sw.calls)}\n"
    )


def _module_exists(sw: FSim, args: str) -> str:
    mods = {"mod_event_socket", "mod_commands", "mod_dptools", "mod_sofia", "mod_sndfile", "mod_audio_fork",
            "mod_audio_stream"}  # fmt: skip
    return "true" if args.strip() in mods else "false"


def _global_getvar(sw: FSim, args: str) -> str:
    values = {"temp_dir": sw.temp_dir, "hostname": sw.hostname, "core_uuid": sw.core_uuid}
    return values.get(args.strip(), "")


def _uuid_buglist(sw: FSim, args: str) -> str:
    a = args.split()
    ch = sw.channels.get(a[0]) if a else None
    if ch is None:
        return "-ERR No such channel!\n"
    return "".join(f"{b.bugname}\n" for b in ch.bugs.values())


def _hostname(sw: FSim, args: str) -> str:
    return sw.hostname or socket.gethostname()


def _version(sw: FSim, args: str) -> str:
    return "FreeSWITCH Version 1.10.12-release~64bit (fsim)\n"


def _hupall(sw: FSim, args: str) -> str:
    a = args.split()
    cause = a[0] if a else "NORMAL_CLEARING"
    for ch in list(sw.channels.values()):
        ch.hangup(cause, by="switch")
    return "+OK\n"


def _sched_api(sw: FSim, args: str) -> str:
    """``sched_api [+@]<time> <group> <command>``: run an API command later (mod_commands' scheduler)."""
    when, _, rest = args.partition(" ")
    group, _, command = rest.strip().partition(" ")
    if not when or not group or not command.strip():
        return "-USAGE: [+@]<time> <group_name> <command_string>[&]\n"
    try:
        delay = float(when.lstrip("+@"))
    except ValueError:
        return "-ERR Invalid time\n"
    if when.startswith("@"):
        delay = max(0.0, delay - time.time())
    task_id = next(sw._task_ids)
    command = command.strip().rstrip("&").strip()

    def run() -> None:
        sw.tasks.pop(task_id, None)
        sw.run_api(command, via="sched")

    sw.tasks[task_id] = (group, gevent.spawn_later(delay, run))
    return f"+OK Added: {task_id}, Group: {group}\n"


def _sched_del(sw: FSim, args: str) -> str:
    """``sched_del <task_id|group>``: cancel scheduled tasks; answers how many."""
    key = args.strip()
    doomed = [tid for tid, (group, _g) in sw.tasks.items() if (key.isdigit() and tid == int(key)) or group == key]
    for tid in doomed:
        sw.tasks.pop(tid)[1].kill(block=False)
    return f"+OK Deleted: {len(doomed)}\n"


def _originate(sw: FSim, args: str) -> str:
    """``originate {vars}<dial string> &park()``: only the parts forkbridge uses. The dial string's number picks
    a ``Callee`` (loopback/<n>/<context> or sofia/gateway/<gw>/<n>); a number fsim knows nothing of ends as a
    loopback leg to an unrouted number did on FreeSWITCH: ``-ERR NORMAL_CLEARING``. The far leg is not
    simulated: the originated channel reads what the callee says."""
    parts = args.split()
    if len(parts) < 2:
        return "-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] [<cid_name>] " \
               "[<cid_num>] [<timeout_sec>]\n"
    dial, app = parts[0], parts[1]
    variables: dict[str, str] = {}
    if dial.startswith("{"):
        block, _, dial = dial[1:].partition("}")
        for pair in block.split(","):
            name, _, value = pair.partition("=")
            if name:
                variables[name] = value
    if app != "&park()":
        return f"-ERR fsim runs only &park() after originate, not {app}\n"
    kind, _, rest = dial.partition("/")
    path = rest.split("/")
    if kind == "loopback" and len(path) >= 1:
        number = path[0]
    elif kind == "sofia" and len(path) >= 3 and path[0] == "gateway":
        number = path[2].split("@")[0]
    else:
        return "-ERR CHAN_NOT_IMPLEMENTED\n"
    callee = sw.callees.get(number) or Callee(answer=False, cause="NORMAL_CLEARING")
    uuid = variables.pop("origination_uuid", "") or str(uuidlib.uuid4())
    if uuid in sw.channels:
        return "-ERR DESTINATION_OUT_OF_ORDER\n"
    caller_id = variables.pop("origination_caller_id_number", "0000000000")
    caller_name = variables.pop("origination_caller_id_name", "FreeSWITCH")
    timeout = float(variables.get("originate_timeout", "60") or 60)
    ch = Channel(sw, number, caller_id, caller_name, callee.script or CallerScript(), callee.rate, 20,
                 sw.fork_build, 0.0, variables, outbound=(callee, timeout), uuid=uuid)
    sw.channels[ch.uuid] = ch
    sw.calls.append(ch)
    ch.start()
    return ch.originated.get(timeout=timeout + 5)


API: dict[str, Callable[[FSim, str], str]] = {
    "uuid_break": _uuid_break,
    "uuid_broadcast": _uuid_broadcast,
    "uuid_kill": _uuid_kill,
    "uuid_transfer": _uuid_transfer,
    "uuid_setvar": _uuid_setvar,
    "uuid_getvar": _uuid_getvar,
    "uuid_exists": _uuid_exists,
    "uuid_send_dtmf": _uuid_send_dtmf,
    "uuid_answer": _uuid_answer,
    "uuid_park": _uuid_park,
    "uuid_buglist": _uuid_buglist,
    "uuid_audio_fork": api_uuid_audio_fork,
    "uuid_audio_stream": api_uuid_audio_stream,
    "uuid_record": api_uuid_record,
    "show": _show,
    "status": _status,
    "module_exists": _module_exists,
    "global_getvar": _global_getvar,
    "hostname": _hostname,
    "version": _version,
    "hupall": _hupall,
    "sched_api": _sched_api,
    "sched_del": _sched_del,
    "originate": _originate,
}


def _cleanup_temp(path: str) -> None:
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass
