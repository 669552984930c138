"""`forkbridge run`: the controller, the bridge's WebSocket server and the metrics endpoint in one process.

SIGTERM stops taking calls (newly answered ones get their fallback at once), lets live calls finish for
`daemon.shutdown_grace`, falls back the rest and exits 0. SIGHUP reloads routes and engines: live calls keep
what they started with; a broken file is refused and the old configuration stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any

import gevent
import gevent.event

from bridge.server import BridgeServer
from bridge.tokens import TokenBook
from controller.callapi import CallApi
from controller.callflow import CUSTOM, EVENTS, EVERY_CHANNEL, Controller
from controller.callrecords import CallRecordWriter
from controller.calls import Call
from controller.config import Config, ConfigError, load_config
from controller.esl import EslClient, EslSettings
from controller.heap import trim_periodically
from controller.httpapi import HttpApi
from controller.logs import configure_logging, register_secret
from controller.metrics import OUTCOMES, Metrics
from controller.outbound import Attempt, Dialer
from controller.sdnotify import Notifier
from controller.shard import Shard

log = logging.getLogger("forkbridge")
SPOOL_CHUNK = re.compile(r"[0-9A-Za-z-]{1,64}-\d{5}\.(r8|r16|PCMU|PCMA|L16)")  # what bridge.playback writes


class Daemon:
    """One process taking calls: the whole daemon, or with `daemon.workers` above 1 the worker `shard` (whose
    config is already its own view of the file: Shard.config_for)."""

    def __init__(self, config: Config, shard: Shard | None = None) -> None:
        self.shard = shard or Shard()
        self.config = config
        self.metrics = Metrics()
        self.metrics.declare_routes((r.name, r.engine) for r in config.routes)
        self.tokens = TokenBook(config.bridge.token_secret, config.bridge.token_ttl)
        self.ended_calls: list[Call] = []
        self.controller = Controller(config, None, self.tokens, on_call_end=self._call_ended,
                                     observe=self._observe, shard=self.shard)
        esl = config.esl
        self.esl = EslClient(
            EslSettings(host=esl.host, port=esl.port, password=esl.password, command_timeout=esl.command_timeout,
                        reconnect_max=esl.reconnect_max, events=EVENTS, custom=CUSTOM,
                        every_channel=EVERY_CHANNEL),
            on_event=self.controller.on_event, on_connected=lambda _again: self.controller.resync(),
            on_state=self._esl_state)
        self.controller.esl = self.esl
        self.controller.stats = AudioCounters(self.metrics)
        self.controller.unrouted_counter = self.metrics.unrouted_calls
        self.bridge = BridgeServer(config.bridge.listen_host, config.bridge.listen_port, self.tokens,
                                   lookup=self._media_for, max_frame_bytes=config.bridge.max_frame_bytes,
                                   on_fork_closed=self.controller.fork_closed,
                                   on_refused=self.metrics.ws_refused)
        self.http = HttpApi(config.metrics.listen_host, config.metrics.listen_port, self.metrics, self.ready)
        self.dialer = Dialer(lambda: self.config, self.esl, changed=self._attempt_changed,
                             accepting=lambda: not self._shutting_down, new_uuid=self.shard.new_uuid)
        self.controller.dialer = self.dialer
        api = config.api
        self.call_api = CallApi(api.listen_host, api.listen_port, api.token, self.dialer) if api.token else None
        self.stopped = gevent.event.Event()
        self._reconnects_seen = 0
        self._shutting_down = False
        self._barge_signals: dict[str, float] = {}  # uuid → when the engine said "caller speaking"
        self.records = CallRecordWriter(config.logging.call_records) if config.logging.call_records else None
        self.notifier = Notifier()

    def _media_for(self, uuid: str) -> Any:
        call = self.controller.calls.get(uuid)
        return call.media if call is not None and call.live else None

    def _esl_state(self, up: bool) -> None:
        self.metrics.esl_up(up)
        if up and self.esl.reconnects > self._reconnects_seen:
            self._reconnects_seen = self.esl.reconnects
            self.metrics.esl_reconnected()

    def _observe(self, call: Call, name: str, detail: dict[str, Any]) -> None:
        """Call milestones → metrics and the call record (its timeline has every milestone already)."""
        m, route, record = self.metrics, call.route.name, call.record
        if name == "answered":
            m.call_started(route)
        elif name == "dtmf":
            m.dtmf(route)
            record.digit(detail.get("digit", ""))
        elif name == "transcript":
            record.transcript(detail.get("role", ""), detail.get("text", ""), detail.get("response", ""))
        elif name == "tool_call":
            record.tool_call(detail.get("name", ""), detail.get("arguments"),
                             result="refused" if detail.get("refused") else "ok")
        elif name in ("fork_connect_failed", "fork_error"):
            m.fork_connect_failed(route)
        elif name == "engine_error":
            m.engine_error(call.engine.name, detail.get("code"))
        elif name in ("recording_started", "recording_failed"):
            m.recording(route, name.partition("_")[2])
        elif name in ("engine_continued", "engine_continuation_failed"):
            m.continuation(route, "ok" if name == "engine_continued" else "failed")
            record.continuations += name == "engine_continued"
        elif name == "barge_in":
            m.bargein(route)
            record.cut(detail.get("response", ""), detail.get("played_ms", 0), detail.get("received_ms", 0))
            if "stop_ms" in detail:
                self._barge_stopped(call, detail["stop_ms"] / 1000.0)
            else:
                self._barge_signals[call.uuid] = detail["signal_at"]
        elif name == "sent_break" and call.uuid in self._barge_signals:
            self._barge_stopped(call, detail["at"] - self._barge_signals.pop(call.uuid))
        elif name == "caller_heard":
            if "since_speech_stopped_ms" in detail:
                m.first_audio(route, detail["since_speech_stopped_ms"] / 1000.0)
                record.latency("first_audio", detail["since_speech_stopped_ms"] / 1000.0)
            started = call.first_named("engine_first_audio", detail.get("response", ""))
            if started is not None:
                m.playout(route, record.now() - started)
                record.latency("playout", record.now() - started)
        elif name == "chunk_queued":
            m.playback_chunk(route)
        elif name == "playback_underrun":
            m.playback_underrun(route)

    def _attempt_changed(self, attempt: Attempt) -> None:
        self.metrics.outbound(attempt.route, self.dialer.live(attempt.route),
                              attempt.outcome if attempt.state == "ended" else "")

    def _barge_stopped(self, call: Call, seconds: float) -> None:
        """Barge-in signal from the engine → the stop actually written (uuid_break, or killAudio)."""
        m = self.metrics
        m.bargein_stop_latency.labels(route=m.route(call.route.name)).observe(max(0.0, seconds))
        call.record.latency("bargein_stop", seconds)

    def _call_ended(self, call: Call) -> None:
        self._barge_signals.pop(call.uuid, None)
        outcome = call.outcome if call.outcome in OUTCOMES else "completed"
        duration = (call.ended_at or time.monotonic()) - call.answered_at
        self.metrics.call_finished(call.route.name, call.engine.name, outcome, duration)
        call.record.finish(call.outcome or "completed", call.end_reason, call.ended_at)
        if call.direction == "outbound":
            self.dialer.call_ended(call.uuid, call.outcome or "completed", call.end_reason)
        if self.records is not None:
            self.records.write(call.record)
        call.media = None  # its engine and resamplers go now, not when this short history forgets the call
        self.ended_calls.append(call)
        del self.ended_calls[:-100]

    def ready(self) -> tuple[bool, str]:
        if not self.esl.connected:
            return False, "ESL not connected"
        if not self.bridge.listening:
            return False, "WebSocket server not listening"
        return True, "ready"

    def start(self) -> None:
        os.makedirs(self.config.bridge.spool_dir, exist_ok=True)
        self._clean_spool()
        self.bridge.start()
        bridge = self.config.bridge
        self.controller.bridge_url = bridge.url or f"ws://{bridge.listen_host}:{self.bridge.port}"
        self.esl.start()
        self.http.start()
        if self.call_api is not None:
            self.call_api.start()
        gevent.spawn(self._announce_ready)
        if self.config.daemon.orphan_timeout > 0:
            gevent.spawn(self._vouch)
        trim_periodically(self.stopped)
        log.info("forkbridge listening for FreeSWITCH on %s:%s, ESL %s:%s, %d route(s)",
                 self.config.bridge.listen_host, self.bridge.port, self.config.esl.host, self.config.esl.port,
                 len(self.config.routes))

    def _vouch(self) -> None:
        """Every live call's orphan timer in FreeSWITCH is re-armed at a third of its timeout."""
        while not self.stopped.is_set():
            self.stopped.wait(self.config.daemon.orphan_timeout / 3)
            if not self.stopped.is_set():
                self.controller.keep_vouching()

    def _clean_spool(self) -> None:
        """Chunks left by a daemon that died mid-call: no call of ours can play them any more. A worker
        removes only its own calls' chunks: the other workers' live calls are still playing theirs."""
        spool = self.config.bridge.spool_dir
        for name in os.listdir(spool):
            if SPOOL_CHUNK.fullmatch(name) and self.shard.owns(name.rsplit("-", 1)[0]):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(spool, name))

    def _announce_ready(self) -> None:
        """systemd READY=1 once ESL is connected and the WebSocket server listens; then watchdog pings."""
        while not self.stopped.is_set() and not self.ready()[0]:
            gevent.sleep(0.1)
        if self.stopped.is_set():
            return
        self.notifier.ready("ESL connected, WebSocket server listening")
        self.notifier.start_watchdog(lambda: self.bridge.listening and not self.stopped.is_set())

    def reload(self, path: str) -> bool:
        self.notifier.reloading()
        try:
            new = self.shard.config_for(load_config(path))
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            self.metrics.config_reloaded(False)
            self.notifier.ready("reload refused; running configuration kept")
            return False
        if self.shard.sole and new.daemon.workers != self.config.daemon.workers:  # (a worker's parent says it)
            log.warning("daemon.workers changed to %d: that applies at the next restart", new.daemon.workers)
        for secret in new.secrets:
            register_secret(secret)
        if self.records is not None:
            self.records.reopen()  # after logrotate moved the file
        self.notifier.ready(f"reloaded: {len(new.routes)} route(s)")
        self.metrics.config_reloaded(True)
        self.metrics.declare_routes((r.name, r.engine) for r in new.routes)
        self.config = new
        self.controller.config = new  # live calls hold their own Route; new calls see the new routes
        log.info("reloaded %s: %d route(s)", path, len(new.routes))
        return True

    def shutdown(self, grace: float | None = None) -> None:
        if self._shutting_down:  # a second SIGTERM while draining changes nothing
            return
        self._shutting_down = True
        grace = self.config.daemon.shutdown_grace if grace is None else grace
        log.info("shutting down: draining %d call(s) for up to %.0fs", len(self.controller.calls), grace)
        self.notifier.stopping(f"draining {len(self.controller.calls)} call(s)")
        for attempt in list(self.dialer.attempts.values()):
            if attempt.state == "dialing":  # nobody would talk to them: stop the ringing now
                with contextlib.suppress(Exception):
                    self.dialer.cancel(attempt.id)
        self.controller.drain(grace)
        self.esl.stop()
        self.bridge.stop()
        self.http.stop()
        if self.call_api is not None:
            self.call_api.stop()
        self.notifier.stop_watchdog()
        if self.records is not None:
            self.records.close()
        self.stopped.set()


class AudioCounters:
    """What a media session counts (bytes and frames), without knowing about Prometheus.

    Counted in plain integers and added to the Prometheus counters every FLUSH_FRAMES frames and before each
    exposition: a prometheus-client inc() takes a lock (a gevent lock once monkey-patched), which per caller
    frame was about 5 % of the daemon's CPU under load. A scrape always sees every frame counted so far."""

    FLUSH_FRAMES = 500

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._pending = {"in": [0, 0], "out": [0, 0]}  # direction -> [bytes, frames]
        metrics.before_exposition(self.flush)

    def audio_in(self, nbytes: int, frames: int = 1) -> None:
        self._count(self._pending["in"], nbytes, frames)

    def audio_out(self, nbytes: int) -> None:
        self._count(self._pending["out"], nbytes, 1)

    def _count(self, pending: list[int], nbytes: int, frames: int) -> None:
        pending[0] += nbytes
        pending[1] += frames
        if pending[1] >= self.FLUSH_FRAMES:
            self.flush()

    def flush(self) -> None:
        for direction, pending in self._pending.items():
            if pending[1]:
                nbytes, frames = pending
                pending[0] = pending[1] = 0
                self.metrics.audio(direction, nbytes, frames)


def run_daemon(path: str, shard: Shard | None = None, report_fd: int | None = None) -> int:
    """`forkbridge run`: the daemon itself, or with `daemon.workers` above 1 the parent of that many workers;
    a worker (`shard` given) tells the parent its private ports on `report_fd`."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if shard is None and config.daemon.workers > 1:
        from controller.workers import run_supervisor

        return run_supervisor(path, config)
    shard = shard or Shard()
    config = shard.config_for(config)
    configure_logging(config.logging.level, config.logging.format, config.secrets,
                      worker="" if shard.sole else str(shard.index))
    daemon = Daemon(config, shard)
    daemon.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(daemon.shutdown))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(daemon.shutdown))
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(daemon.reload, path))
    if report_fd is not None:  # only now: the parent sends a worker SIGHUP once it has reported
        report_ports(report_fd, daemon)
    daemon.stopped.wait()
    log.info("stopped")
    return 0


def report_ports(fd: int, daemon: Daemon) -> None:
    """One JSON line to the parent: where this worker's metrics and call API answer."""
    api = daemon.call_api.port if daemon.call_api is not None else None
    with open(fd, "w", encoding="utf-8") as pipe:
        pipe.write(json.dumps({"metrics": daemon.http.port, "api": api}) + "\n")
