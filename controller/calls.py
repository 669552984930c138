"""The calls we own: an explicit lifecycle and the per-call context, keyed by channel uuid."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent.event

from controller.callrecords import CallRecord
from controller.config import EngineConfig, Route


class CallState(enum.Enum):
    ANSWERED = "answered"  # ours, engine opening
    FORKING = "forking"  # uuid_audio_fork sent, waiting for the socket
    BRIDGED = "bridged"  # caller audio flowing through the bridge
    ENDING = "ending"  # fallback or hangup under way; no new work
    ENDED = "ended"


_NEXT = {
    CallState.ANSWERED: {CallState.FORKING, CallState.ENDING, CallState.ENDED},
    CallState.FORKING: {CallState.BRIDGED, CallState.FORKING, CallState.ENDING, CallState.ENDED},
    CallState.BRIDGED: {CallState.FORKING, CallState.ENDING, CallState.ENDED},
    CallState.ENDING: {CallState.ENDED},
    CallState.ENDED: set(),
}


@dataclass
class Call:
    uuid: str
    did: str
    caller_id: str
    route: Route
    engine: EngineConfig
    state: CallState = CallState.ANSWERED
    answered_at: float = field(default_factory=time.monotonic)
    answered_wall: float = field(default_factory=time.time)
    ended_at: float | None = None
    outcome: str = ""  # completed | fallback_transfer | fallback_hangup | transferred | transferred_away | error
    end_reason: str = ""
    fork_attempts: int = 0
    transfer_target: str = ""  # where the call was sent, once it was
    profile_index: str = ""  # Caller-Profile-Index when we took it (a transfer makes a new profile)
    own_stop_until: float = 0.0  # we stopped the fork ourselves (retry, refork): a close before this is ours
    fork_pending: bool = False  # a fork start that ESL never confirmed (outage): redo after the resync
    direction: str = "inbound"  # outbound: placed by us (controller.outbound), the callee is `did`
    record: CallRecord = field(init=False)
    dtmf: list[str] = field(default_factory=list)
    media: Any = None  # bridge.session.MediaSession
    control: Any = None  # controller.actions.EslCallControl
    dtmf_handler: Any = None
    log: Any = None  # a logger whose lines carry this call's uuid and DID
    tokens: list[str] = field(default_factory=list)
    gone: gevent.event.Event = field(default_factory=gevent.event.Event)  # set when the call has ended
    timer: Any = None  # the max_duration greenlet, killed when the call ends
    recording: Any = None  # controller.recording.Recording when the route records
    started: set[str] = field(default_factory=set)  # files FreeSWITCH has started playing and not yet finished

    def __post_init__(self) -> None:
        self.record = CallRecord(uuid=self.uuid, did=self.did, caller_id=self.caller_id, route=self.route.name,
                                 engine=self.engine.name, direction=self.direction)
        self.record.answer_time = self.answered_wall  # the "answered" mark itself comes from the controller

    @property
    def timeline(self) -> list[tuple[float, str, dict[str, Any]]]:
        return self.record.timeline

    def move(self, state: CallState) -> bool:
        """Change state if the lifecycle allows it; False means the call is already past that point."""
        if state not in _NEXT[self.state]:
            return False
        self.state = state
        return True

    def mark(self, name: str, /, **detail: Any) -> None:
        self.record.event(name, **detail)

    def first_named(self, name: str, response: str) -> float | None:
        """When `name` was first marked for one engine response."""
        return next((t for t, n, d in self.timeline if n == name and d.get("response") == response), None)

    @property
    def live(self) -> bool:
        return self.state not in (CallState.ENDING, CallState.ENDED)


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}

    def add(self, call: Call) -> None:
        self._calls[call.uuid] = call

    def get(self, uuid: str) -> Call | None:
        return self._calls.get(uuid)

    def remove(self, uuid: str) -> Call | None:
        return self._calls.pop(uuid, None)

    def __iter__(self) -> Iterator[Call]:
        return iter(list(self._calls.values()))

    def __len__(self) -> int:
        return len(self._calls)
