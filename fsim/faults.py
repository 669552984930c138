"""Fault injection: the ways a real FreeSWITCH (or the network) lets a controller down."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import wire

if TYPE_CHECKING:
    from .switch import FSim

log = logging.getLogger("fsim.faults")


@dataclass
class Crash:
    reason: str
    channels_lost: list[str] = field(default_factory=list)


class Faults:
    """``sw.faults``: every knob is off by default. Each method says which real failure it stands for."""

    def __init__(self, sw: FSim) -> None:
        self.sw = sw
        self.reply_delay = 0.0  # seconds before every api/bgapi reply
        self.fork_connect_delay = 0.0  # seconds before a fork/stream dials (slow network)
        self.fork_write_lag = 0.0  # seconds the ws writer stalls before each send: lws lag → coalesced frames
        self.rude_reject = False  # new ESL connections get text/rude-rejection (ACL)
        self.hangups_before_filter = 0  # the next N channels filtered by Unique-ID hang up just before it applies
        self._refusals: list[tuple[int, Callable[[str, str], bool] | None]] = []
        self.crashes: list[Crash] = []

    # ------------------------------------------------------------------ ESL
    def drop_esl(self, mode: str = "notice") -> int:
        """Drop every ESL connection: ``notice`` (disconnect notice, clean close), ``shutdown`` (the shutdown
        notice), ``eof`` (TCP close, as when FreeSWITCH is killed) or ``mid_body`` (cut inside an event body —
        greenswitch 0.0.19 then spins forever). Returns how many connections were dropped."""
        conns = list(self.sw.esl.connections)
        for conn in conns:
            if mode == "notice":
                conn.close(wire.DISCONNECT_BODY)
            elif mode == "shutdown":
                conn.close(wire.SHUTDOWN_BODY)
            elif mode == "eof":
                conn.abort()
            elif mode == "mid_body":
                conn.cut_mid_body()
            else:
                raise ValueError(f"unknown drop mode {mode!r}")
        return len(conns)

    def hang_up_before_filter(self, count: int = 1) -> None:
        """The caller hangs up between the CHANNEL_ANSWER a client saw and the `filter Unique-ID <uuid>` it sent
        for that channel: the hangup's events fire while the filter is not yet in, so that client never gets
        them (a connection with filters is sent only what matches one)."""
        self.hangups_before_filter = count

    def delay_replies(self, seconds: float) -> None:
        """Every api/bgapi reply waits ``seconds`` (a loaded switch); 0 turns it off."""
        self.reply_delay = max(0.0, seconds)

    # ------------------------------------------------------------------ forks
    def refuse_fork(self, count: int = 1, match: Callable[[str, str], bool] | None = None) -> None:
        """The next ``count`` fork/stream dials (optionally only those where ``match(uuid, url)``) are refused
        without touching the network, exactly like a refused TCP connect."""
        self._refusals.append((count, match))

    def _take_refusal(self, uuid: str, url: str) -> bool:
        for i, (count, match) in enumerate(self._refusals):
            if match is None or match(uuid, url):
                if count <= 1:
                    self._refusals.pop(i)
                else:
                    self._refusals[i] = (count - 1, match)
                return True
        return False

    def cut_fork(self, uuid: str, bugname: str | None = None) -> bool:
        """Break the TCP connection under a live fork (network failure); the module reports a disconnect."""
        ch = self.sw.channels.get(uuid)
        if ch is None:
            return False
        done = False
        for bug in list(ch.bugs.values()):
            if bugname is None or bug.bugname == bugname:
                bug.cut()
                done = True
        return done

    def slow_forks(self, write_lag: float = 0.0, connect_delay: float = 0.0) -> None:
        self.fork_write_lag = write_lag
        self.fork_connect_delay = connect_delay

    # ------------------------------------------------------------------ the whole switch
    def crash(self, reason: str = "killed") -> Crash:
        """FreeSWITCH dies: ESL sockets EOF, fork sockets drop without a close frame, every channel vanishes
        without events, the listener goes away until ``sw.restart_esl()``."""
        log.warning("fsim crash: %s", reason)
        c = Crash(reason, list(self.sw.channels))
        self.crashes.append(c)
        self.sw.esl.stop_listening()
        self.drop_esl("eof")
        for ch in list(self.sw.channels.values()):
            ch.vanish()
        self.sw.channels.clear()
        return c
