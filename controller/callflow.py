"""What the controller does with FreeSWITCH's events: take our calls, fork them, route DTMF, fall back.

Every event handler here runs in the ESL handler greenlet and must not block: anything that waits on
FreeSWITCH (fork start, fallback prompt, resync) runs in its own greenlet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from bridge.engine import CallInfo
from bridge.session import HANGUP_AFTER_PLAYBACK_MAX, MediaOptions, MediaSession, SessionHooks
from bridge.tokens import TokenBook
from controller.actions import EslCallControl
from controller.calls import Call, CallRegistry, CallState
from controller.config import Config, Route
from controller.dtmf import DtmfAction, DtmfHandler
from controller.esl import EslClient, EslError, Event
from controller.logs import call_logger, register_secret, unregister_secret
from controller.recording import EVENTS as RECORD_EVENTS
from controller.recording import STOP_WAIT, Recording, recording_path
from controller.shard import Shard

log = logging.getLogger("forkbridge.controller")

BUGNAME = "forkbridge"
EVENTS = ("CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "DTMF", "PLAYBACK_START",
          "PLAYBACK_STOP", "CHANNEL_EXECUTE_COMPLETE", "BACKGROUND_JOB", *RECORD_EVENTS)
# Delivered for every channel on the switch (a new call may be ours; bgapi results name no channel); every other
# event comes only for the channels we own, which the controller watches from its take to its end.
EVERY_CHANNEL = ("CHANNEL_ANSWER", "BACKGROUND_JOB")
PLAYBACK_FAILURES = ("FILE NOT FOUND", "PLAYBACK ERROR")
# mod_audio_fork::error is a message our own server sent; mod_audio_stream::error is a failed connection
CONNECT_FAILED = ("mod_audio_fork::connect_failed", "mod_audio_stream::error")
OWN_STOP_WINDOW = 5.0  # seconds during which a fork close is taken to be the stop we just sent
CUSTOM = ("mod_audio_fork::connect", "mod_audio_fork::connect_failed", "mod_audio_fork::disconnect",
          "mod_audio_fork::error", "mod_audio_fork::buffer_overrun",
          "mod_audio_stream::connect", "mod_audio_stream::disconnect", "mod_audio_stream::error")
PROMPT_WAIT = 15.0  # the longest we let a fallback prompt play before acting anyway
HANGUP_RACE_WAIT = 1.5  # how long a fork close waits for the CHANNEL_HANGUP it may have beaten


class Controller:
    def __init__(self, config: Config, esl: EslClient | None, tokens: TokenBook,
                 on_call_end: Callable[[Call], None] | None = None,
                 observe: Callable[[Call, str, dict[str, Any]], None] | None = None,
                 shard: Shard | None = None) -> None:
        self.config = config
        self.shard = shard or Shard()  # with workers: the calls this process takes (the others take theirs)
        self.esl = esl  # set by the daemon once built (the client needs our on_event)
        self.tokens = tokens
        self.calls = CallRegistry()
        self.draining = False
        self.on_call_end = on_call_end or (lambda _call: None)
        self.observe = observe or (lambda _call, _name, _detail: None)
        self._prompt_done: dict[str, gevent.event.Event] = {}
        self.bridge_url = config.bridge_url  # the daemon corrects it once the server knows its port
        self.stats: Any = None  # audio counters handed to each media session
        self.stream_supported: bool | None = None  # can mod_audio_fork stream audio back? (None: not known yet)
        self.unrouted_counter: Any = None  # the metric of marked calls no route matched
        self.dialer: Any = None  # controller.outbound.Dialer: the outbound attempts whose answers we take
        self._closing_recordings: dict[str, Call] = {}  # ended calls whose RECORD_STOP is still to come

    # ---- event dispatch -----------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if event.name == "CHANNEL_ANSWER":
            self._on_answer(event)
            return
        if event.name in RECORD_EVENTS:
            self._on_record_event(event)
            return
        call = self.calls.get(event.uuid)
        if call is None:
            return  # not ours: never act on another channel
        if event.name in ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE"):
            self._ended(call, event.get("Hangup-Cause", "NORMAL_CLEARING"))
        elif event.name == "DTMF":
            digit = event.get("DTMF-Digit")
            if digit and call.live and call.dtmf_handler is not None:
                call.dtmf.append(digit)
                self._mark(call, "dtmf", digit=digit)
                call.dtmf_handler.digit(digit)
        elif event.name in ("PLAYBACK_START", "PLAYBACK_STOP"):
            path = event.get("Playback-File-Path")
            status = event.get("Playback-Status")
            if event.name == "PLAYBACK_START":
                call.started.add(path)
            waiter = self._prompt_done.get(call.uuid)
            if waiter is not None and event.name == "PLAYBACK_STOP" and path == call.route.fallback.prompt:
                waiter.set()
            if call.media is not None:
                samples = event.get("variable_playback_samples")  # bytes read, for a native file
                call.media.playback_event(event.name, path, status, int(samples) if samples.isdigit() else -1)
        elif event.name == "CHANNEL_EXECUTE_COMPLETE":
            self._on_execute_complete(call, event)
        elif event.name == "CUSTOM":
            self._on_module_event(call, event)

    def _on_execute_complete(self, call: Call, event: Event) -> None:
        """A file FreeSWITCH could not play (spool permissions, a missing prompt) must not mean silence."""
        if event.get("Application") == "park":
            self._left_park(call, event)
            return
        if event.get("Application") != "playback":
            return
        path = event.get("Application-Data")
        started = path in call.started
        call.started.discard(path)
        if event.get("Application-Response") not in PLAYBACK_FAILURES:
            return
        if started:
            # A file that opened and played cannot be unreadable: FreeSWITCH answers PLAYBACK ERROR for a playback
            # the hangup cut, usually before CHANNEL_HANGUP and while the channel still looks answered (observed).
            call.log.debug("playback of %s ended with %s after it started: the channel is going",
                           path, event.get("Application-Response"))
            return
        if call.media is not None and call.media.deleted_chunk(path):
            call.media.playback_event("FAILED", path, "cancelled")  # a chunk we dropped at barge-in: expected
            return
        call.log.error("FreeSWITCH could not play %s (%s): check that it can read this file",
                       path, event.get("Application-Response"))
        self._mark(call, "playback_failed", path=path, response=event.get("Application-Response"))
        waiter = self._prompt_done.get(call.uuid)
        if waiter is not None and path == call.route.fallback.prompt:
            waiter.set()  # go on to the transfer or hangup at once
        elif call.media is not None:
            call.media.playback_event("FAILED", path, event.get("Application-Response"))

    def _on_module_event(self, call: Call, event: Event) -> None:
        kind = event.subclass.split("::", 1)[-1]
        self._mark(call, f"fork_{kind}", body=event.body[:200])
        if event.subclass in CONNECT_FAILED and call.live:
            gevent.spawn(self._retry_fork, call)
        elif kind == "disconnect" and call.live:
            # the same close the bridge saw, or one of ours (mod_audio_stream reports either side's close)
            gevent.spawn(self._fork_gone, call, "fork_dropped")

    # ---- answer → engine + fork -----------------------------------------------------------------------

    def _owned_route(self, event: Event) -> Route | None:
        marker = event.get(f"variable_{self.config.esl.marker_variable}")
        if marker.lower() != "true":
            return None
        did = self._did(event)
        outbound = event.get("variable_forkbridge_outbound")
        if outbound and outbound != event.uuid:
            return None  # the far leg of a call we placed (a loopback destination copies our variables to it)
        route = self.config.route_named(event.get("variable_forkbridge_route")) if outbound \
            else self.config.route_for(did)
        if route is None:
            self._unrouted(event.uuid, did)
        return route

    def _unrouted(self, uuid: str, did: str) -> None:
        """The dialplan marked the call as ours but no route matches its DID (dialplan and routes drifted apart,
        e.g. a SIGHUP removed a route): never leave that caller parked. FreeSWITCH itself plays defaults'
        fallback prompt and transfers or hangs up (one inline-dialplan transfer, nothing for us to wait on);
        our marker is released first so a resync never looks at the call again."""
        fallback = self.config.unrouted
        call_logger(uuid, did).error(
            "the dialplan marked this call as ours but no route matches DID %s: defaults.fallback (%s); align "
            "dialplan/forkbridge.xml with the routes", did, fallback.describe())
        if self.unrouted_counter is not None:
            self.unrouted_counter.inc()
        if self.dialer is not None:  # a call we placed whose route a reload removed: its attempt ends here
            self.dialer.call_ended(uuid, "unrouted", "UNROUTED")
        apps = [f"playback:{fallback.prompt}"] if fallback.prompt else []
        apps.append(f"transfer:{fallback.transfer}" if fallback.transfer else f"hangup:{fallback.hangup_cause}")
        marker = self.config.esl.marker_variable
        gevent.spawn(self._quiet_apis, f"uuid_setvar {uuid} {marker} released",
                     f"uuid_transfer {uuid} '{','.join(apps)}' inline")

    def _on_answer(self, event: Event) -> None:
        if self.calls.get(event.uuid) is not None or not self.shard.owns(event.uuid):
            return
        route = self._owned_route(event)
        if route is None:
            return
        outbound = event.get("variable_forkbridge_outbound") == event.uuid
        call = self.take(event.uuid, self._did(event), event.get("Caller-Caller-ID-Number"), route,
                         codec=(event.get("Channel-Read-Codec-Name"), _int(event.get("Channel-Read-Codec-Rate"))),
                         outbound=outbound)
        call.profile_index = event.get("Caller-Profile-Index")

    @staticmethod
    def _did(event: Event) -> str:
        """The dialled number: the dialplan's normalised capture (forkbridge_did) if it set one."""
        return event.get("variable_forkbridge_did") or event.get("Caller-Destination-Number")

    def take(self, uuid: str, did: str, caller_id: str, route: Route, stale_fork: bool = False,
             codec: tuple[str, int] = ("", 0), outbound: bool = False) -> Call:
        """Own a call: its media session, fork, timers. `codec` is the channel's read codec and rate (what a
        native playback file must be written in); `outbound`: a call we placed (did is the number called),
        whose placement may carry context for the model."""
        engine_cfg = self.config.engines[route.engine]
        call = Call(uuid=uuid, did=did, caller_id=caller_id, route=route, engine=engine_cfg,
                    direction="outbound" if outbound else "inbound")
        attempt = self.dialer.answered(uuid) if outbound and self.dialer is not None else None
        context = attempt.context if attempt is not None else ""
        call.log = call_logger(uuid, did, route=route.name)
        self.calls.add(call)
        assert self.esl is not None
        gevent.spawn(self._still_there, call, self.esl.watch(uuid))  # before any command for the call
        call.control = EslCallControl(self.esl, uuid, on_sent=lambda kind, t: self._sent(call, kind, t),
                                      log=call.log, stop_fork=self._stop_fork_command(call),
                                      marker=self.config.esl.marker_variable)
        self._mark(call, "answered", did=did, route=route.name, **({"direction": "outbound"} if outbound else {}))
        call.log.info("answered: ours, route %s, engine %s", route.name, engine_cfg.name)
        if route.record:
            call.recording = Recording(recording_path(route.record, uuid, did, route.name, call.answered_wall))
            gevent.spawn(self._start_recording, call)
        if self.draining:
            self.fallback(call, "shutting_down")
            return call
        if route.playback == "stream" and self.stream_supported is False:
            call.log.error("route %s streams audio back, but this FreeSWITCH's mod_audio_fork cannot (it needs the "
                           "jambonz build); the caller gets the fallback", route.name)
            self.fallback(call, "stream_unsupported")
            return call
        # A greeting file is played as it is; the engine must not speak a greeting of its own on top of it.
        greeting = "" if route.greeting_file else route.greeting
        instructions = "\n\n".join(text for text in (route.instructions, context) if text)
        info = CallInfo(uuid=uuid, did=did, caller_id=caller_id, sample_rate=route.sample_rate,
                        instructions=instructions, voice=route.voice, greeting=greeting, channel_rate=codec[1])
        options = MediaOptions(engine_type=engine_cfg.type, engine_options=engine_cfg.options,
                               playback=route.playback, spool_dir=self.config.bridge.spool_dir,
                               greeting_file=route.greeting_file, no_audio_timeout=route.no_audio_timeout,
                               tools_allow=route.tools.allow, transfer_targets=route.tools.transfer_targets,
                               channel_codec=codec[0], channel_rate=codec[1])
        hooks = SessionHooks(fail=lambda reason: self.fallback(call, reason),
                             mark=lambda name, detail: self._mark(call, name, **detail),
                             end=lambda action, target: self._model_ends(call, action, target))
        call.media = MediaSession(info, options, call.control, hooks, stats=self.stats, log=call.log)
        call.dtmf_handler = DtmfHandler(route.dtmf, lambda action: self._dtmf_action(call, action))
        self._arm_orphan_timer(call)
        call.media.start()  # engine opens now, in parallel with the fork
        # A call picked up after a restart may still carry our old fork: a second start would fail (or worse).
        gevent.spawn(self.refork if stale_fork else self._start_fork, call)
        call.timer = gevent.spawn_later(route.max_duration, self._max_duration_reached, call)
        return call

    def _still_there(self, call: Call, watching: gevent.event.AsyncResult) -> None:
        """The channel's events come from when FreeSWITCH applied our filter: a caller who hung up between the
        answer and that moment sent a hangup we never saw, so ask once the filter is in."""
        assert self.esl is not None
        try:
            reply = watching.get(timeout=self.config.esl.command_timeout)
            gone = self.esl.api(f"uuid_exists {call.uuid}").strip() == "false"
        except (EslError, gevent.Timeout):
            return  # no connection: the resync after the reconnect asks about every call
        if not reply.startswith("+OK"):
            call.log.error("FreeSWITCH refused this call's event filter (%s): its events may not reach us",
                           reply.strip())
        if gone and call.state != CallState.ENDED:
            self._ended(call, "GONE_BEFORE_WATCHED")

    def _forget(self, call: Call) -> None:
        """Nothing more is needed from FreeSWITCH about this channel (its recording, if any, is closed too)."""
        if self.esl is not None:
            self.esl.unwatch(call.uuid)
        self.on_call_end(call)

    # ---- the recording (FreeSWITCH's, beside the fork) ---------------------------------------------------

    def _start_recording(self, call: Call) -> None:
        """Both sides in stereo, written by FreeSWITCH; a recording that fails is logged and counted, and the
        call goes on without it."""
        assert self.esl is not None
        rec = call.recording
        try:
            self.esl.api(f"uuid_setvar {call.uuid} RECORD_STEREO true")
            reply = self.esl.api(f"uuid_record {call.uuid} start {rec.path}")
        except EslError as exc:
            reply = f"-ERR {exc}"
        if rec.started_ok(reply):
            self._mark(call, "recording_started", path=rec.path)
        else:
            self._recording_failed(call)

    def _recording_failed(self, call: Call) -> None:
        call.log.error("recording %s failed (%s): its directory must exist or be creatable, and be writable by "
                       "FreeSWITCH; the call goes on unrecorded", call.recording.path, call.recording.error)
        self._mark(call, "recording_failed", error=call.recording.error)

    def _on_record_event(self, event: Event) -> None:
        call = self.calls.get(event.uuid) or self._closing_recordings.get(event.uuid)
        if call is not None and call.recording is not None and call.recording.on_event(event) == "failed":
            self._recording_failed(call)

    def _report(self, call: Call) -> None:
        """The call record, once FreeSWITCH has closed the recording (its RECORD_STOP follows the hangup)."""
        rec = call.recording
        if rec is not None:
            if rec.started is not None:
                rec.done.wait(STOP_WAIT)
            self._closing_recordings.pop(call.uuid, None)
            call.record.recording = rec.summary()
        self._forget(call)

    def _arm_orphan_timer(self, call: Call, extra: float = 0.0) -> None:
        timeout = self.config.daemon.orphan_timeout + extra
        if call.control is None:
            return
        if self.config.daemon.orphan_timeout <= 0:  # no safety net wanted: not even the dialplan's untaken timer
            call.control.disarm_orphan_timer()
            return
        fallback = call.route.fallback
        action = (f"uuid_transfer {call.uuid} {fallback.transfer}" if fallback.transfer
                  else f"uuid_kill {call.uuid} {fallback.hangup_cause}")
        call.control.arm_orphan_timer(timeout, action)

    def keep_vouching(self) -> None:
        """Re-arm every live call's orphan timer well before it fires (run periodically by the daemon)."""
        if self.esl is None or not self.esl.connected:
            return
        for call in self.calls:
            if call.live:
                self._arm_orphan_timer(call)

    def fork_command(self, call: Call) -> str:
        route = call.route
        token = self.tokens.mint(call.uuid)
        register_secret(token, temporary=True)  # the URL may reach FreeSWITCH's logs, never ours
        call.tokens.append(token)
        url = f"{self.bridge_url}/calls/{call.uuid}?token={token}"
        rate = "16k" if route.sample_rate == 16000 else "8k"
        meta = json.dumps({"uuid": call.uuid, "did": _safe(call.did), "route": _safe(route.name)},
                          separators=(",", ":"))
        if route.module == "audio_stream":
            return f"uuid_audio_stream {call.uuid} start {url} mono {rate} {meta}"
        command = f"uuid_audio_fork {call.uuid} start {url} mono {rate} {BUGNAME} {meta}"
        if route.playback == "stream":  # jambonz build: bidirectional, streamed back at the rate the session says
            rate = call.media.stream_rate if call.media is not None else route.sample_rate
            command += f" true true {rate}"
        return command

    def _stop_fork_command(self, call: Call) -> str:
        if call.route.module == "audio_stream":
            return f"uuid_audio_stream {call.uuid} stop"
        return f"uuid_audio_fork {call.uuid} stop {BUGNAME}"

    def _start_fork(self, call: Call) -> None:
        if not call.move(CallState.FORKING):
            return
        call.fork_attempts += 1
        assert self.esl is not None
        self._mark(call, "fork_start", attempt=call.fork_attempts)
        try:
            reply = self.esl.bgapi(self.fork_command(call))
        except EslError as exc:
            call.log.warning("fork start not confirmed: %s", exc)
            call.fork_pending = True  # the resync after the reconnect starts it again
            return
        if not reply.startswith("+OK"):
            call.log.warning("fork start refused: %s", reply.strip())
            self._retry_fork(call)

    def _retry_fork(self, call: Call) -> None:
        """connect_failed: the bug stays attached, so stop it first; one retry, then the fallback."""
        if not call.live:
            return
        if call.fork_attempts >= 2:
            self.fallback(call, "fork_failed")
            return
        assert self.esl is not None
        call.own_stop_until = time.monotonic() + OWN_STOP_WINDOW  # closing the fork we stop is no failure
        with contextlib.suppress(EslError):
            self.esl.api(self._stop_fork_command(call))
        self._start_fork(call)

    def refork(self, call: Call) -> None:
        """After an ESL outage the fork may be gone: stop whatever is left and start a fresh one."""
        call.fork_attempts = 0
        self._retry_fork(call)

    def fork_closed(self, uuid: str, why: str) -> None:
        call = self.calls.get(uuid)
        if call is not None and call.live:
            gevent.spawn(self._fork_gone, call, "fork_dropped" if why != "oversized" else "fork_refused")

    def _fork_gone(self, call: Call, reason: str) -> None:
        """FreeSWITCH closes the fork when the caller hangs up, and that close can beat CHANNEL_HANGUP over
        ESL: give the hangup a moment to arrive (and ask) before treating the close as a failure."""
        if time.monotonic() < call.own_stop_until:
            return
        if call.gone.wait(HANGUP_RACE_WAIT) or not call.live:
            return
        assert self.esl is not None
        try:
            exists = self.esl.api(f"uuid_exists {call.uuid}").strip()
        except EslError:
            # ESL is down too (FreeSWITCH crashed or restarts, or the link broke): the resync after the reconnect
            # ends the call if its channel is gone, or re-forks it if it still lives; not a fallback now
            call.fork_pending = True
            return
        if exists == "false":
            self._ended(call, "GONE")
        elif call.live:
            self.fallback(call, reason)

    def _max_duration_reached(self, call: Call) -> None:
        if call.live:
            self.fallback(call, "max_duration")

    # ---- DTMF -----------------------------------------------------------------------------------------

    def _dtmf_action(self, call: Call, action: DtmfAction) -> None:
        if action.kind == "text" and call.media is not None:
            self._mark(call, "dtmf_to_engine", text=action.value)
            gevent.spawn(call.media.send_text, action.value)
        elif action.kind == "transfer":
            destination = call.route.tools.transfer_targets.get(action.value, action.value)
            if self._let_go(call, "transferred", "dtmf_transfer"):
                call.transfer_target = destination
                call.control.transfer(destination)
                gevent.spawn(self._release_after_transfer, call)
        elif action.kind == "hangup":
            self._let_go(call, "completed", "dtmf_hangup")
            call.control.hangup("NORMAL_CLEARING")
            call.control.finish()

    # ---- endings --------------------------------------------------------------------------------------

    def _let_go(self, call: Call, outcome: str, reason: str, keep_media: bool = False) -> bool:
        """The call is ending our way. Media teardown runs in its own greenlet: closing an engine socket can
        block, and this often runs in the ESL handler greenlet that every call's events go through."""
        if not call.move(CallState.ENDING):
            return False
        # the timer must not fire while the prompt or the goodbye plays: one last, longer arm
        self._arm_orphan_timer(call, extra=PROMPT_WAIT + HANGUP_AFTER_PLAYBACK_MAX + self.config.esl.command_timeout)
        call.outcome, call.end_reason = outcome, reason
        self._mark(call, "ending", outcome=outcome, reason=reason)
        if call.dtmf_handler is not None:
            call.dtmf_handler.close()
        if call.media is not None and not keep_media:
            gevent.spawn(call.media.close, reason)
        return True

    def _left_park(self, call: Call, event: Event) -> None:
        """The channel left our park while we still held it: either the caller hung up (on a loopback leg the
        park's CHANNEL_EXECUTE_COMPLETE can come *before* CHANNEL_HANGUP, still `Answer-State: answered`) or
        someone else (another ESL client's uuid_transfer, an operator at fs_cli) moved it. A transfer gives the
        channel a new caller profile (`Caller-Profile-Index` one higher): then it is theirs at once. Without that
        evidence (a call picked up by the resync), the hangup gets a moment to arrive, then `uuid_exists` decides."""
        if not call.live or event.get("Answer-State") == "hangup" or event.get("Hangup-Cause"):
            return  # our own transfer or hangup, or the caller leaving
        index = event.get("Caller-Profile-Index")
        if call.profile_index and index and index != call.profile_index:
            self._transferred_away(call, event.get("Caller-Destination-Number"))
        elif not call.profile_index:
            gevent.spawn(self._maybe_transferred_away, call, event.get("Caller-Destination-Number"))

    def _maybe_transferred_away(self, call: Call, where: str) -> None:
        if call.gone.wait(HANGUP_RACE_WAIT) or not call.live:
            return
        assert self.esl is not None
        with contextlib.suppress(EslError):
            if self.esl.api(f"uuid_exists {call.uuid}").strip() == "true" and call.live:
                self._transferred_away(call, where)

    def _transferred_away(self, call: Call, where: str) -> None:
        """The call is someone else's now: stop the fork, close the engine, delete the orphan timer, release our
        marker; never a fallback, and nothing of ours played on the new owner's channel."""
        if not self._let_go(call, "transferred_away", "transferred_away"):
            return
        call.log.warning("the call was moved out of our park by someone else (now at %s): letting it go", where)
        call.transfer_target = where
        control: EslCallControl = call.control
        control.drop_queued_plays()  # no uuid_break: what plays now is the new owner's
        control.disarm_orphan_timer()
        control.stop_forking()
        if control.marker:
            control.setvar(control.marker, "released")
        gevent.spawn(self._release_after_transfer, call)

    def fallback(self, call: Call, reason: str) -> None:
        """Engine/fork/timeout/shutdown trouble: the route's prompt, then transfer or hangup. Never silence."""
        if reason == "no_audio" and self.esl is not None and not self.esl.connected and call.live:
            # FreeSWITCH is away (crashed, restarting, or the link broke) and the caller's audio went with it: a
            # fallback could not be carried out now, and the call may not even exist any more. The resync after the
            # reconnect ends it if its channel is gone, or forks it again; meanwhile the watch goes on.
            call.log.warning("no caller audio while ESL is down: leaving it to the resync")
            self._mark(call, "no_audio_while_esl_down")
            call.fork_pending = True
            if call.media is not None:
                call.media.watch_audio_again()
            return
        fallback = call.route.fallback
        outcome = "fallback_transfer" if fallback.transfer else "fallback_hangup"
        if not self._let_go(call, outcome, reason):
            return
        call.log.warning("fallback (%s) → %s", reason, fallback.describe())
        gevent.spawn(self._run_fallback, call)

    def _run_fallback(self, call: Call) -> None:
        fallback = call.route.fallback
        control: EslCallControl = call.control
        control.break_all()
        control.stop_forking()
        if fallback.prompt:
            done = self._prompt_done.setdefault(call.uuid, gevent.event.Event())
            control.play(fallback.prompt)
            done.wait(PROMPT_WAIT)
            self._prompt_done.pop(call.uuid, None)
        if call.state == CallState.ENDED:
            return
        if fallback.transfer:
            call.transfer_target = fallback.transfer
            control.transfer(fallback.transfer)
        else:
            control.disarm_orphan_timer()
            control.hangup(fallback.hangup_cause)
        self._mark(call, "fallback_done", action=fallback.action)
        if fallback.transfer:
            self._release_after_transfer(call)
        else:
            control.finish()

    def _release_after_transfer(self, call: Call) -> None:
        """Once the transfer is sent the channel is no longer ours: nothing more goes out for it."""
        control: EslCallControl = call.control
        if call.recording is not None and call.recording.started is not None:
            control.stop_recording(call.recording.path)  # what follows is no longer our call
        control.finish()
        control.drain(self.config.esl.command_timeout + 1)
        self._ended(call, "TRANSFERRED")

    def _ended(self, call: Call, cause: str) -> None:
        """The channel is gone (or no longer ours): release everything, record the call."""
        if call.state == CallState.ENDED:
            return
        if call.live:
            call.outcome, call.end_reason = "completed", cause
            if call.dtmf_handler is not None:
                call.dtmf_handler.close()
        call.state = CallState.ENDED
        call.ended_at = time.monotonic()
        call.gone.set()
        if call.timer is not None:
            call.timer.kill(block=False)
        self._mark(call, "hangup", cause=cause)
        waiter = self._prompt_done.pop(call.uuid, None)
        if waiter is not None:
            waiter.set()
        if call.media is not None:
            gevent.spawn(call.media.close, "hangup")
        if call.control is not None:
            call.control.close()
        if cause != "TRANSFERRED" and self.esl is not None and self.config.daemon.orphan_timeout > 0:
            # the channel is gone or going: its timer would only find nothing, but leave no task behind
            gevent.spawn(self._quiet_api, f"sched_del forkbridge-{call.uuid}")
        self.calls.remove(call.uuid)
        for token in call.tokens:
            unregister_secret(token)
        call.log.info("ended (%s), outcome %s", cause, call.outcome)
        if call.recording is not None:
            self._closing_recordings[call.uuid] = call  # its RECORD_STOP may be the very next event
            gevent.spawn(self._report, call)
        else:
            self._forget(call)

    # ---- after (re)connecting ---------------------------------------------------------------------------

    def check_modules(self) -> None:
        """Routes with `playback: stream` need the jambonz mod_audio_fork (its usage text names stop_play);
        the drachtio build drops audio sent back, which would leave callers in silence."""
        if not any(route.playback == "stream" for route in self.config.routes):
            return
        assert self.esl is not None
        with contextlib.suppress(EslError):
            usage = self.esl.api("uuid_audio_fork")
            self.stream_supported = "stop_play" in usage
            if not self.stream_supported:
                log.error("playback: stream routes need the jambonz build of mod_audio_fork; this FreeSWITCH has "
                          "another (%s): those calls get their fallback", usage.strip()[:60] or "no reply")

    def resync(self) -> None:
        """Find live calls we own; clean up those that ended while we were away; re-fork or pick up."""
        assert self.esl is not None
        self.check_modules()
        try:
            # bgapi: with many channels `show` is slow, and an api would hold every call's events meanwhile
            rows = json.loads(self.esl.bgapi("show channels as json") or "{}").get("rows") or []
        except (EslError, ValueError) as exc:
            log.warning("resync failed: %s", exc)
            return
        live = {row.get("uuid", ""): row for row in rows if isinstance(row, dict)}
        for call in self.calls:
            if call.live and call.media is not None:
                call.media.reconcile_playback()  # the PLAYBACK events of the outage are lost
            if call.uuid not in live:
                # FreeSWITCH fills this table asynchronously: ask about the channel itself before letting go
                with contextlib.suppress(EslError):
                    if self.esl.api(f"uuid_exists {call.uuid}").strip() == "false":
                        self._ended(call, "GONE_DURING_OUTAGE")
            elif call.live and call.fork_pending:
                call.fork_pending = False
                gevent.spawn(self.refork, call)
            elif call.state == CallState.ENDING and call.control is not None and call.control.lost:
                gevent.spawn(self._finish_ending, call)
        for uuid, row in live.items():
            # only calls still parked by our dialplan: a transferred call is someone else's now
            # still in our park loop (whose last app may show as the playback we queued); a call someone else
            # transferred runs other apps, and one we handed over has its marker released
            if self.calls.get(uuid) is not None or not self.shard.owns(uuid) or row.get("callstate") != "ACTIVE" \
                    or row.get("application") not in ("park", "playback"):
                continue
            try:
                marker = self.esl.api(f"uuid_getvar {uuid} {self.config.esl.marker_variable}")
                did_var = _defined(self.esl.api(f"uuid_getvar {uuid} forkbridge_did"))
                outbound = _defined(self.esl.api(f"uuid_getvar {uuid} forkbridge_outbound"))
                route_var = _defined(self.esl.api(f"uuid_getvar {uuid} forkbridge_route")) if outbound else ""
            except EslError:
                continue
            if outbound and outbound != uuid:
                continue  # the far leg of a call we placed
            # the same DID as live routing: the dialplan's normalised capture, else the dialled number
            did = did_var or row.get("dest", "")
            route = self.config.route_named(route_var) if outbound else self.config.route_for(did)
            if route is None:
                if marker.strip().lower() == "true":
                    self._unrouted(uuid, did)
                continue
            if marker.strip().lower() == "true" and self.calls.get(uuid) is None:  # its ANSWER may have come
                call_logger(uuid, did).info("answered while ESL was down: picking it up")
                self.take(uuid, did, row.get("cid_num", ""), route, stale_fork=True,
                          codec=(row.get("read_codec", ""), _int(row.get("read_rate", ""))), outbound=bool(outbound))

    def _quiet_api(self, command: str) -> None:
        assert self.esl is not None
        with contextlib.suppress(EslError):
            self.esl.api(command)

    def _quiet_apis(self, *commands: str) -> None:
        for command in commands:
            self._quiet_api(command)

    def _finish_ending(self, call: Call) -> None:
        """A fallback or hangup whose commands were lost with the connection: send its last step again."""
        assert self.esl is not None
        fallback = call.route.fallback
        transfer = call.transfer_target or (fallback.transfer if call.outcome == "fallback_transfer" else "")
        call.control.lost = False  # once per loss, not on every later reconnect
        control = EslCallControl(self.esl, call.uuid, log=call.log, stop_fork=self._stop_fork_command(call),
                                 marker=self.config.esl.marker_variable)
        call.log.warning("ESL came back while the call was ending: sending its %s again",
                         "transfer" if transfer else "hangup")
        if transfer:
            control.transfer(transfer)
            control.finish()
            control.drain(self.config.esl.command_timeout + 1)
            self._ended(call, "TRANSFERRED")
        else:
            control.hangup(fallback.hangup_cause if call.outcome == "fallback_hangup" else "NORMAL_CLEARING")
            control.finish()

    # ---- shutdown -----------------------------------------------------------------------------------------

    def drain(self, grace: float) -> None:
        """Stop taking calls; let live ones finish for `grace`; fall back the rest; wait for them to go."""
        self.draining = True
        deadline = time.monotonic() + grace
        while len(self.calls) and time.monotonic() < deadline:
            gevent.sleep(0.1)
        for call in self.calls:
            if call.live:
                self.fallback(call, "shutting_down")
        deadline = time.monotonic() + PROMPT_WAIT + 5
        while len(self.calls) and time.monotonic() < deadline:  # each leaves at its hangup or transfer
            gevent.sleep(0.05)

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def _mark(self, call: Call, name: str, /, **detail: Any) -> None:
        call.mark(name, **detail)
        self.observe(call, name, detail)
        if name == "fork_connected" and call.move(CallState.BRIDGED):
            call.mark("bridged")

    def _model_ends(self, call: Call, action: str, target: str) -> bool:
        """The model (or the agent closing its session) ends the call. Only one ending wins: during a
        fallback or another ending this answers False and the session sends nothing."""
        if action == "transfer":
            if not self._let_go(call, "transferred", "model_transfer"):
                return False
            call.transfer_target = call.route.tools.transfer_targets.get(target, "")
            self._mark(call, "model_transfer", target=target)
            gevent.spawn_later(0, self._release_after_transfer, call)  # after the session queued the transfer
            return True
        if not self._let_go(call, "completed", "model_hangup", keep_media=True):  # the goodbye plays first
            return False
        self._mark(call, "model_hangup")
        return True

    def _sent(self, call: Call, kind: str, when: float) -> None:
        self.observe(call, f"sent_{kind}", {"at": when})


def _defined(reply: str) -> str:
    """A uuid_getvar answer, with FreeSWITCH's "_undef_" (and errors) as empty."""
    value = reply.strip()
    return "" if value == "_undef_" or value.startswith("-ERR") else value


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _safe(text: str) -> str:
    """Metadata travels space-split through FreeSWITCH: keep it to characters that survive."""
    return "".join(ch for ch in text if ch.isalnum() or ch in "+-_.@")[:64]
