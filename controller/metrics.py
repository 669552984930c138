"""Prometheus metrics of one daemon, in its own registry.

Every series is defined here, once, so names, help texts, buckets and labels stay consistent and the alert rules
in conf/alerts.yml can rely on them. Each daemon builds its own `Metrics` (its own CollectorRegistry), so tests can
run several daemons in one process. Labels are bounded: route and engine names from the config, a fixed set of
outcomes and directions; free-form values (engine error codes, refusal reasons) pass through `_Bounded`, which
folds anything past a small number of distinct values into "other". Never label by call uuid or caller number.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("completed", "fallback_transfer", "fallback_hangup", "transferred_away", "error")
ATTEMPT_OUTCOMES = ("answered", "busy", "no_answer", "rejected", "failed", "cancelled")  # controller.outbound
DIRECTIONS = ("in", "out")
NO_ROUTE = "none"
OTHER = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Telephony latencies: 10 ms .. 5 s. Dense around 100 ms - 1.5 s where conversational turn-taking lives.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
# Call durations: 1 s (hang-up at the greeting) .. 1 h (max_duration ceiling).
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 180, 300, 600, 900, 1800, 3600)

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.:+-]")


class _Bounded:
    """Caps the distinct values one label may take; later newcomers become "other" (a leak guard, not a filter)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = _LABEL_VALUE.sub("_", str(value if value not in (None, "") else "unknown"))[:64]
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(text)
            return text


class _BeforeCollect:
    """A collector with no metrics of its own: runs the flushes when a scrape begins."""

    def __init__(self, flushes: list[Callable[[], None]]) -> None:
        self._flushes = flushes

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        for flush in self._flushes:
            flush()
        return []


class Metrics:
    """All forkbridge series, registered in a private CollectorRegistry (`self.registry`).

    The metric objects are public attributes for direct use; the small helper methods apply label hygiene and
    are what call code should normally use.
    """

    def __init__(self, registry: CollectorRegistry | None = None, max_label_values: int = 50) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._route = _Bounded(max_label_values)
        self._engine = _Bounded(max_label_values)
        self._flushes: list[Callable[[], None]] = []
        r.register(_BeforeCollect(self._flushes))  # first, so the flushed counts are in the same scrape
        self._code = _Bounded(max_label_values)
        self._reason = _Bounded(max_label_values)

        # ---- calls
        self.calls_active = Gauge(
            "forkbridge_calls_active", "Calls currently handled (answered and ours, not yet ended), by route.",
            ["route"], registry=r)
        self.calls_total = Counter(
            "forkbridge_calls", "Finished calls by route, engine and outcome "
            "(completed, fallback_transfer, fallback_hangup, transferred_away, error).",
            ["route", "engine", "outcome"], registry=r)
        self.call_duration = Histogram(
            "forkbridge_call_duration_seconds", "Answered call duration, from answer to hangup.",
            ["route"], buckets=DURATION_BUCKETS, registry=r)

        # ---- conversational latency
        self.first_audio_latency = Histogram(
            "forkbridge_first_audio_latency_seconds",
            "Caller stops speaking -> caller hears the first audio of the reply (the turn gap the caller feels).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.playout_latency = Histogram(
            "forkbridge_playout_latency_seconds",
            "Engine's first audio of a response received -> caller hears it (our share: conversion, spool, "
            "FreeSWITCH queueing).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.bargeins = Counter(
            "forkbridge_bargeins", "Barge-ins: the caller spoke over the reply and playback was stopped.",
            ["route"], registry=r)
        self.bargein_stop_latency = Histogram(
            "forkbridge_bargein_stop_latency_seconds",
            "Engine reports the caller started speaking -> playback to the caller stopped.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.dtmf_digits = Counter(
            "forkbridge_dtmf_digits", "DTMF digits received from callers.", ["route"], registry=r)

        # ---- outbound
        self.outbound_calls = Counter(
            "forkbridge_outbound_calls", "Finished outbound attempts by route and outcome (answered, busy, "
            "no_answer, rejected, failed, cancelled).", ["route", "outcome"], registry=r)
        self.outbound_live = Gauge(
            "forkbridge_outbound_calls_live", "Outbound calls placed and not yet ended (ringing or answered), by "
            "route: what outbound.max_concurrent caps.", ["route"], registry=r)

        # ---- failures
        self.fork_connect_failures = Counter(
            "forkbridge_fork_connect_failures",
            "Fork starts that did not reach the bridge (mod_audio_fork::connect_failed, "
            "mod_audio_stream::error).", ["route"], registry=r)
        self.unrouted_calls = Counter(
            "forkbridge_unrouted_calls", "Calls the dialplan marked as ours that no route matches (given "
            "defaults.fallback at once): the dialplan and the routes disagree.", registry=r)
        self.engine_errors = Counter(
            "forkbridge_engine_errors", "Errors reported by or about an AI engine, by engine and error code.",
            ["engine", "code"], registry=r)
        self.ws_refusals = Counter(
            "forkbridge_ws_refusals", "WebSocket connections or frames refused by the bridge, by reason "
            "(not_websocket, bad_path, no_token, bad_token, expired, replayed, unknown_call, oversized_frame).",
            ["reason"], registry=r)

        # ---- ESL
        self.esl_connected = Gauge(
            "forkbridge_esl_connected", "1 while the Event Socket connection to FreeSWITCH is up and "
            "authenticated, else 0.", registry=r)
        self.esl_reconnects = Counter(
            "forkbridge_esl_reconnects", "Event Socket reconnections after a lost or failed connection.",
            registry=r)

        # ---- audio and playback
        self.audio_frames = Counter(
            "forkbridge_audio_frames", "Audio frames moved by the bridge (in: from the caller, "
            "out: towards the caller).", ["direction"], registry=r)
        self.audio_bytes = Counter(
            "forkbridge_audio_bytes", "Audio payload bytes moved by the bridge (in: from the caller, "
            "out: towards the caller).", ["direction"], registry=r)
        self._audio_children = {d: (self.audio_frames.labels(direction=d), self.audio_bytes.labels(direction=d))
                                for d in DIRECTIONS}
        self.playback_chunks = Counter(
            "forkbridge_playback_chunks", "Audio chunks queued for playback to callers (spooled files, "
            "broadcast mode).", ["route"], registry=r)
        self.playback_underruns = Counter(
            "forkbridge_playback_underruns", "Playback ran dry mid-response (the caller heard a gap).",
            ["route"], registry=r)

        # ---- recordings and long calls
        self.recordings = Counter(
            "forkbridge_recordings", "Call recordings asked of FreeSWITCH (uuid_record), by result (started, "
            "failed: bad path or permissions; the call goes on unrecorded).", ["route", "result"], registry=r)
        self.continuations = Counter(
            "forkbridge_engine_continuations", "Engine sessions replaced by a new one at their session limit, "
            "by result (ok; failed: the call took its fallback).", ["route", "result"], registry=r)

        # ---- daemon
        self.config_reloads = Counter(
            "forkbridge_config_reloads", "Route reloads on SIGHUP, by result (ok, error).", ["result"], registry=r)

        self.esl_connected.set(0)
        for d in DIRECTIONS:
            self.audio_frames.labels(direction=d)
            self.audio_bytes.labels(direction=d)
        for result in ("ok", "error"):
            self.config_reloads.labels(result=result)

    # ---- label hygiene

    def declare_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Create zero-valued series for (route, engine) pairs so rate() and ratios work before the first call."""
        for route_name, engine_name in routes:
            route, engine = self._route(route_name), self._engine(engine_name)
            self.calls_active.labels(route=route)
            for outcome in ATTEMPT_OUTCOMES:
                self.outbound_calls.labels(route=route, outcome=outcome)
            self.outbound_live.labels(route=route)
            for outcome in OUTCOMES:
                self.calls_total.labels(route=route, engine=engine, outcome=outcome)
            for m in (self.bargeins, self.dtmf_digits, self.fork_connect_failures, self.playback_chunks,
                      self.playback_underruns):
                m.labels(route=route)
            for result in ("started", "failed"):
                self.recordings.labels(route=route, result=result)
            for result in ("ok", "failed"):
                self.continuations.labels(route=route, result=result)
            for h in (self.call_duration, self.first_audio_latency, self.playout_latency,
                      self.bargein_stop_latency):
                h.labels(route=route)

    def route(self, name: str | None) -> str:
        return self._route(name or NO_ROUTE)

    # ---- helpers for call code

    def call_started(self, route: str | None) -> None:
        self.calls_active.labels(route=self.route(route)).inc()

    def call_finished(self, route: str | None, engine: str | None, outcome: str,
                      duration: float | None = None, was_active: bool = True) -> None:
        """Count a finished call; `was_active` says whether call_started() was called for it."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown call outcome {outcome!r}; expected one of {OUTCOMES}")
        r = self.route(route)
        if was_active:
            self.calls_active.labels(route=r).dec()
        self.calls_total.labels(route=r, engine=self._engine(engine or NO_ROUTE), outcome=outcome).inc()
        if duration is not None and duration >= 0:
            self.call_duration.labels(route=r).observe(duration)

    def outbound(self, route: str, live: int, ended_with: str = "") -> None:
        """An outbound attempt changed: the route's live count, and its outcome once it ended."""
        r = self.route(route)
        self.outbound_live.labels(route=r).set(live)
        if ended_with:
            outcome = ended_with if ended_with in ATTEMPT_OUTCOMES else "failed"
            self.outbound_calls.labels(route=r, outcome=outcome).inc()

    def first_audio(self, route: str | None, seconds: float) -> None:
        self.first_audio_latency.labels(route=self.route(route)).observe(max(0.0, seconds))

    def playout(self, route: str | None, seconds: float) -> None:
        self.playout_latency.labels(route=self.route(route)).observe(max(0.0, seconds))

    def bargein(self, route: str | None, stop_seconds: float | None = None) -> None:
        r = self.route(route)
        self.bargeins.labels(route=r).inc()
        if stop_seconds is not None:
            self.bargein_stop_latency.labels(route=r).observe(max(0.0, stop_seconds))

    def dtmf(self, route: str | None, digits: int = 1) -> None:
        self.dtmf_digits.labels(route=self.route(route)).inc(digits)

    def fork_connect_failed(self, route: str | None) -> None:
        self.fork_connect_failures.labels(route=self.route(route)).inc()

    def engine_error(self, engine: str | None, code: object) -> None:
        self.engine_errors.labels(engine=self._engine(engine or "unknown"), code=self._code(code)).inc()

    def ws_refused(self, reason: str) -> None:
        self.ws_refusals.labels(reason=self._reason(reason)).inc()

    def esl_up(self, connected: bool) -> None:
        self.esl_connected.set(1 if connected else 0)

    def esl_reconnected(self) -> None:
        self.esl_reconnects.inc()

    def audio(self, direction: str, nbytes: int, frames: int = 1) -> None:
        """Called per frame: the labelled children are looked up once, not on every call."""
        try:
            frames_counter, bytes_counter = self._audio_children[direction]
        except KeyError:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}") from None
        frames_counter.inc(frames)
        bytes_counter.inc(nbytes)

    def playback_chunk(self, route: str | None, chunks: int = 1) -> None:
        self.playback_chunks.labels(route=self.route(route)).inc(chunks)

    def playback_underrun(self, route: str | None) -> None:
        self.playback_underruns.labels(route=self.route(route)).inc()

    def recording(self, route: str | None, result: str) -> None:
        self.recordings.labels(route=self.route(route), result=result).inc()

    def continuation(self, route: str | None, result: str) -> None:
        self.continuations.labels(route=self.route(route), result=result).inc()

    def config_reloaded(self, ok: bool) -> None:
        self.config_reloads.labels(result="ok" if ok else "error").inc()

    # ---- exposition

    def before_exposition(self, flush: Callable[[], None]) -> None:
        """`flush` runs before each exposition: for counts kept outside the registry on a hot path."""
        self._flushes.append(flush)

    def exposition(self) -> bytes:
        """The text exposition format of this registry (what /metrics serves)."""
        return generate_latest(self.registry)


_default: Metrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """A process-wide Metrics for code that is not handed one (tools, the simulator); daemons build their own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default
