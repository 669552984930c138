"""What a digit does, per the route's policy: forwarded as text, collected into one message, or acted on here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gevent

from controller.config import DtmfPolicy


@dataclass(frozen=True)
class DtmfAction:
    kind: str  # text | transfer | hangup
    value: str = ""


class DtmfHandler:
    """Feed digits in arrival order; `deliver` receives what must happen, in order."""

    def __init__(self, policy: DtmfPolicy, deliver: Callable[[DtmfAction], None]) -> None:
        self.policy = policy
        self.deliver = deliver
        self._digits: list[str] = []
        self._timer: gevent.Greenlet | None = None

    def digit(self, digit: str) -> None:
        action = self.policy.actions.get(digit)
        if action is not None:
            self.flush()
            kind, _, target = action.partition(":")
            self.deliver(DtmfAction(kind, target))
            return
        if self.policy.mode == "forward":
            self.deliver(DtmfAction("text", digit))
            return
        if digit == self.policy.terminator:
            self.flush()
            return
        self._digits.append(digit)
        if len(self._digits) >= self.policy.max_digits:
            self.flush()
            return
        self._restart_timer()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        if self._digits:
            text, self._digits = "".join(self._digits), []
            self.deliver(DtmfAction("text", text))

    def _restart_timer(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
        self._timer = gevent.spawn_later(self.policy.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        self._digits = []
