"""The call-control actions the bridge may ask of the controller. The bridge never builds ESL strings."""

from __future__ import annotations

from typing import Protocol


class CallControl(Protocol):
    def play(self, path: str) -> None:
        """Queue a file for the caller (after whatever is queued already)."""

    def keep_writing(self) -> None:
        """Keep something writing to the caller's leg (silence), under streamed audio."""

    def break_all(self) -> None:
        """Stop what the caller hears now and drop everything queued."""

    def break_current(self) -> None:
        """Stop only the file playing now."""

    def hangup(self, cause: str = "NORMAL_CLEARING") -> None: ...

    def transfer(self, target: str) -> None:
        """Hand the call to a destination the route allows (validated before this is called); the call is
        no longer ours afterwards."""

    def send_dtmf(self, digits: str) -> None: ...

    def setvar(self, name: str, value: str) -> None: ...
