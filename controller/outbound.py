"""Outbound calls: place a call onto a route and follow it to an outcome an operator reads.

FreeSWITCH dials: `bgapi originate {vars}<dial string> &park()` with our own `origination_uuid`, so the call is
ours from its first event. Its variables carry our marker, `forkbridge_route` (the route the call runs) and
`forkbridge_outbound=<its own uuid>`: once answered, the controller takes it exactly like an inbound call. A
loopback destination copies the variables to its far leg, whose uuid differs: that is how the two are told
apart. The BACKGROUND_JOB answers `+OK <uuid>` once the call is answered, or `-ERR <hangup cause>`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from controller.config import SAFE_VALUE, VARIABLE_NAME, Config, Route
from controller.esl import EslClient, EslError
from controller.metrics import ATTEMPT_OUTCOMES as OUTCOMES  # noqa: F401 - the outcomes an attempt ends with

log = logging.getLogger("forkbridge.outbound")

_CAUSES = {
    "USER_BUSY": "busy",
    "NO_ANSWER": "no_answer", "NO_USER_RESPONSE": "no_answer", "ALLOTTED_TIMEOUT": "no_answer",
    "PROGRESS_TIMEOUT": "no_answer", "RECOVERY_ON_TIMER_EXPIRE": "no_answer", "MEDIA_TIMEOUT": "no_answer",
    "CALL_REJECTED": "rejected", "USER_CHALLENGE": "rejected",
    "ORIGINATOR_CANCEL": "cancelled", "LOSE_RACE": "cancelled",
}
MAX_CONTEXT = 4000  # characters of per-call context for the model
HISTORY = 1000  # finished attempts kept for GET /calls/<id>
JOB_MARGIN = 15.0  # beyond originate_timeout, how long a BACKGROUND_JOB may take before we stop waiting


def outcome_for(cause: str) -> str:
    """FreeSWITCH's hangup cause of an unanswered originate → busy, no_answer, rejected, cancelled or failed."""
    return _CAUSES.get(cause.strip().upper(), "failed")


class OutboundError(Exception):
    """A call that was not placed: `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Attempt:
    """One outbound call from placement to its end."""

    id: str  # the channel uuid (origination_uuid)
    route: str
    to: str
    context: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    state: str = "dialing"  # dialing | answered | ended
    outcome: str = ""  # one of OUTCOMES, once known (answered is set at answer)
    cause: str = ""  # FreeSWITCH's hangup cause of an unanswered attempt
    call_outcome: str = ""  # an answered call's own outcome (completed, fallback_transfer, ...)
    created: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    done: gevent.event.Event = field(default_factory=gevent.event.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        duration = round(self.ended_at - self.answered_at, 3) if self.ended_at and self.answered_at else None
        return {"id": self.id, "route": self.route, "to": self.to, "state": self.state, "outcome": self.outcome,
                "cause": self.cause, "call_outcome": self.call_outcome, "created": _iso(self.created),
                "answered": _iso(self.answered_at), "ended": _iso(self.ended_at), "duration": duration,
                "variables": self.variables}


def _iso(epoch: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else None


class Dialer:
    """Places calls within each route's cap and keeps every attempt's fate (live ones and a bounded history).

    `changed(attempt)` is told of each placement, answer and end (the daemon turns it into metrics); `config()`
    is the running configuration, so a SIGHUP's new routes apply to the next call placed."""

    def __init__(self, config: Callable[[], Config], esl: EslClient,
                 changed: Callable[[Attempt], None] | None = None, accepting: Callable[[], bool] | None = None,
                 new_uuid: Callable[[], str] | None = None) -> None:
        self._config = config
        self._new_uuid = new_uuid or (lambda: str(uuidlib.uuid4()))  # a worker's: one it owns (controller.shard)
        self.esl = esl
        self._changed = changed or (lambda _attempt: None)
        self._accepting = accepting or (lambda: True)
        self.attempts: dict[str, Attempt] = {}

    def live(self, route: str) -> int:
        return sum(1 for a in self.attempts.values() if a.route == route and a.state != "ended")

    def get(self, attempt_id: str) -> Attempt | None:
        return self.attempts.get(attempt_id)

    def place(self, route_name: str, to: str, variables: dict[str, str] | None = None, context: str = "") -> Attempt:
        """Check everything, then originate in the background; raises OutboundError with nothing placed."""
        config = self._config()
        route = config.route_named(route_name)
        if route is None:
            raise OutboundError(404, f"no route named {route_name!r}")
        policy = route.outbound
        if policy is None:
            raise OutboundError(400, f"route {route_name!r} has no outbound: block; it only answers")
        if not policy.allows(to):
            raise OutboundError(403, f"{to!r} is not a number route {route_name!r} may call (outbound.allowed)")
        variables = dict(variables or {})
        for name, value in variables.items():
            if not VARIABLE_NAME.fullmatch(name) or name.startswith(("forkbridge", "origination_")):
                raise OutboundError(400, f"variable {name!r}: expected a channel variable name of your own")
            if not isinstance(value, str) or not SAFE_VALUE.fullmatch(value):
                raise OutboundError(400, f"variable {name!r}: the value must be a string without spaces, commas, "
                                         "quotes, braces, backslashes or ^")
        if len(context) > MAX_CONTEXT:
            raise OutboundError(400, f"context is longer than {MAX_CONTEXT} characters")
        if not self._accepting():
            raise OutboundError(503, "the daemon is shutting down")
        if not self.esl.connected:
            raise OutboundError(503, "not connected to FreeSWITCH")
        if self.live(route.name) >= policy.max_concurrent:
            raise OutboundError(429, f"route {route.name!r} has {policy.max_concurrent} outbound call(s) already "
                                     "(outbound.max_concurrent)")
        attempt = Attempt(id=self._new_uuid(), route=route.name, to=to, context=context, variables=variables)
        self.attempts[attempt.id] = attempt
        self._forget_old()
        log.info("placing a call to %s on route %s (%s)", to, route.name, attempt.id)
        self._changed(attempt)
        gevent.spawn(self._originate, attempt, route, config.esl.marker_variable)
        return attempt

    def originate_command(self, attempt: Attempt, route: Route, marker: str) -> str:
        policy = route.outbound
        assert policy is not None
        park_timeout = int(route.max_duration + 60)  # FreeSWITCH's own net if nobody ever takes the call
        pairs = {marker: "true", "forkbridge_route": route.name, "forkbridge_outbound": attempt.id,
                 "forkbridge_did": attempt.to, "origination_uuid": attempt.id,
                 "originate_timeout": str(max(1, round(policy.originate_timeout))),
                 "park_timeout": f"{park_timeout}:NORMAL_CLEARING", "playback_terminators": "none"}
        if policy.caller_id:
            pairs["origination_caller_id_number"] = policy.caller_id
        if policy.caller_id_name:
            pairs["origination_caller_id_name"] = policy.caller_id_name
        pairs.update({k: v for k, v in policy.variables.items() if k not in pairs})
        pairs.update({k: v for k, v in attempt.variables.items() if k not in pairs})
        variables = ",".join(f"{k}={v}" for k, v in pairs.items())
        return f"originate {{{variables}}}{policy.dial_string(attempt.to)} &park()"

    def _originate(self, attempt: Attempt, route: Route, marker: str) -> None:
        assert route.outbound is not None
        wait = route.outbound.originate_timeout + JOB_MARGIN
        try:
            reply = self.esl.bgapi(self.originate_command(attempt, route, marker), timeout=wait).strip()
        except EslError as exc:
            # ESL went away mid-dial: an answered call is picked up by the resync (its variables say it is ours);
            # one that never shows up within its ring time is over as far as anyone can tell
            log.warning("call to %s (%s): originate not confirmed: %s", attempt.to, attempt.id, exc)
            if not attempt.done.wait(wait) and attempt.state == "dialing":
                with contextlib.suppress(EslError):
                    self.esl.api(f"uuid_kill {attempt.id} ORIGINATOR_CANCEL")
                self._finish(attempt, "failed", "ESL_LOST")
            return
        if reply.startswith("+OK"):
            self.answered(attempt.id)  # normally the CHANNEL_ANSWER came first and this changes nothing
            return
        cause = reply.removeprefix("-ERR").strip().split()[0] if reply.startswith("-ERR") and reply[4:].strip() \
            else "UNKNOWN"
        log.info("call to %s on route %s not answered: %s", attempt.to, attempt.route, cause)
        self._finish(attempt, outcome_for(cause), cause)

    def answered(self, uuid: str) -> Attempt | None:
        """The controller saw our outbound channel answer (or the job said +OK): the call is on."""
        attempt = self.attempts.get(uuid)
        if attempt is not None and attempt.state == "dialing":
            attempt.state, attempt.outcome, attempt.answered_at = "answered", "answered", time.time()
            self._changed(attempt)
        return attempt

    def call_ended(self, uuid: str, call_outcome: str, cause: str) -> None:
        attempt = self.attempts.get(uuid)
        if attempt is not None and attempt.state != "ended":
            attempt.call_outcome = call_outcome
            self._finish(attempt, attempt.outcome or "answered", cause)

    def cancel(self, attempt_id: str) -> Attempt:
        """Hang up: a ringing attempt ends as cancelled, an answered call ends as it would at a caller's hangup."""
        attempt = self.attempts.get(attempt_id)
        if attempt is None:
            raise OutboundError(404, f"no call {attempt_id!r}")
        if attempt.state == "ended":
            raise OutboundError(409, f"call {attempt_id} has already ended ({attempt.outcome})")
        cause = "ORIGINATOR_CANCEL" if attempt.state == "dialing" else "NORMAL_CLEARING"
        try:
            self.esl.api(f"uuid_kill {attempt.id} {cause}")
        except EslError as exc:
            raise OutboundError(503, f"FreeSWITCH did not take the hangup: {exc}") from None
        return attempt

    def _finish(self, attempt: Attempt, outcome: str, cause: str) -> None:
        if attempt.state == "ended":
            return
        attempt.state, attempt.outcome, attempt.cause, attempt.ended_at = "ended", outcome, cause, time.time()
        attempt.done.set()
        self._changed(attempt)

    def _forget_old(self) -> None:
        ended = [a for a in self.attempts.values() if a.state == "ended"]
        for attempt in ended[:-HISTORY]:
            del self.attempts[attempt.id]
