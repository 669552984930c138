"""`forkbridge run`: the controller, the bridge's WebSocket server and the metrics endpoint in one process.

SIGTERM stops taking calls (newly answered ones get their fallback at once), lets live calls finish for
`daemon.shutdown_grace`, falls back the rest and exits 0. SIGHUP reloads routes and engines: live calls keep
what they started with; a broken file is refused and the old configuration stays.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import gevent
import gevent.event

from bridge.server import BridgeServer
from bridge.tokens import TokenBook
from controller.callflow import CUSTOM, EVENTS, Controller
from controller.calls import Call
from controller.config import Config, ConfigError, load_config
from controller.esl import EslClient, EslSettings

log = logging.getLogger("forkbridge")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = TokenBook(config.bridge.token_secret, config.bridge.token_ttl)
        self.ended_calls: list[Call] = []
        self.controller = Controller(config, None, self.tokens, on_call_end=self._call_ended,
                                     observe=self._observe)
        esl = config.esl
        self.esl = EslClient(
            EslSettings(host=esl.host, port=esl.port, password=esl.password, command_timeout=esl.command_timeout,
                        reconnect_max=esl.reconnect_max, events=EVENTS, custom=CUSTOM),
            on_event=self.controller.on_event, on_connected=lambda _again: self.controller.resync(),
            on_state=self._esl_state)
        self.controller.esl = self.esl
        self.bridge = BridgeServer(config.bridge.listen_host, config.bridge.listen_port, self.tokens,
                                   lookup=self._media_for, max_frame_bytes=config.bridge.max_frame_bytes,
                                   on_fork_closed=self.controller.fork_closed)
        self.stopped = gevent.event.Event()

    def _media_for(self, uuid: str) -> Any:
        call = self.controller.calls.get(uuid)
        return call.media if call is not None and call.live else None

    def _esl_state(self, up: bool) -> None:
        log.info("ESL %s", "up" if up else "down")

    def _observe(self, call: Call, name: str, detail: dict[str, Any]) -> None:
        pass

    def _call_ended(self, call: Call) -> None:
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
        self.bridge.start()
        bridge = self.config.bridge
        self.controller.bridge_url = bridge.url or f"ws://{bridge.listen_host}:{self.bridge.port}"
        self.esl.start()
        log.info("forkbridge listening for FreeSWITCH on %s:%s, ESL %s:%s, %d route(s)",
                 self.config.bridge.listen_host, self.bridge.port, self.config.esl.host, self.config.esl.port,
                 len(self.config.routes))

    def reload(self, path: str) -> bool:
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return False
        self.config = new
        self.controller.config = new  # live calls hold their own Route; new calls see the new routes
        log.info("reloaded %s: %d route(s)", path, len(new.routes))
        return True

    def shutdown(self, grace: float | None = None) -> None:
        grace = self.config.daemon.shutdown_grace if grace is None else grace
        log.info("shutting down: draining %d call(s) for up to %.0fs", len(self.controller.calls), grace)
        self.controller.drain(grace)
        self.esl.stop()
        self.bridge.stop()
        self.stopped.set()


def run_daemon(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    logging.basicConfig(level=config.logging.level.upper(), format="%(levelname)s %(name)s: %(message)s")
    daemon = Daemon(config)
    daemon.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(daemon.shutdown))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(daemon.shutdown))
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(daemon.reload, path))
    daemon.stopped.wait()
    log.info("stopped")
    return 0
