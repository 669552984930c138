"""`forkbridge run` with `daemon.workers` above 1: the parent that systemd sees, and its N worker processes.

One gevent process uses one core. With workers, each worker is the whole daemon (controller.daemon.Daemon) for
the calls it owns (controller.shard): its own ESL connection, its own WebSocket port (bridge.listen + K), its own
metrics and call API on private loopback ports that it reports on a pipe when it has started. The parent takes no
call itself; it

- starts the workers (`forkbridge run --worker K/N`, a fresh interpreter each: no fork of a gevent hub) and
  restarts one that dies, after 1 s, doubling to 30 s while it keeps dying quickly (a SIGHUP whose file loads
  starts it at once). Its calls are picked up by
  the restarted worker's resync (they are still parked and marked as ours); if it cannot come back, each call's
  orphan timer in FreeSWITCH gives it its fallback;
- is the only one talking to systemd (READY=1 once every worker is ready, watchdog pings while workers live);
- forwards SIGTERM/SIGINT (every worker drains as a single daemon does; the parent exits 0 once all have) and
  SIGHUP (only a file that loads: a broken one is refused here and never reaches the workers);
- serves `metrics.listen` (the workers' series merged: controller.metricsmerge) and `api.listen` (each request
  forwarded to the worker that owns it: controller.apirouter).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.os
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from controller.apirouter import TO_WORKER, ApiRouter
from controller.callflow import PROMPT_WAIT
from controller.config import Config, ConfigError, load_config
from controller.httpapi import HttpApi
from controller.logs import configure_logging, register_secret
from controller.metricsmerge import counters, merge
from controller.sdnotify import Notifier

log = logging.getLogger("forkbridge.workers")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 60.0  # a worker that lived this long before dying is not "dying quickly": back to 1 s
REPORT_TIMEOUT = 60.0  # the longest a worker may take to say where it listens
POLL_INTERVAL = 0.5  # how often the parent asks each worker's /readyz
SCRAPE_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1  # prctl(2)
PARENT_PID_ENV = "FORKBRIDGE_PARENT_PID"
_SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # the parent's alone


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None
    metrics_port: int | None = None
    api_port: int | None = None
    ready: bool = False
    started_at: float = 0.0
    backoff: float = 0.0
    wake: gevent.event.Event = field(default_factory=gevent.event.Event)  # a reload ends its restart backoff
    reload_pending: bool = False  # a SIGHUP came before this worker could take one: sent once it reports
    exposition: str = ""  # its last /metrics, used while it does not answer a scrape
    carried: list[Metric] = field(default_factory=list)  # what its dead predecessors counted (carry_counters)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = config
        self.count = config.daemon.workers
        self.workers = [Worker(k) for k in range(self.count)]
        self.restarts = 0
        self.reloads_refused = 0
        self.stopping = gevent.event.Event()
        self.stopped = gevent.event.Event()
        self.notifier = Notifier()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_MergedWorkers(self))
        self.http = HttpApi(config.metrics.listen_host, config.metrics.listen_port, self.registry, self.ready)
        api = config.api
        self.api = ApiRouter(api.listen_host, api.listen_port, api.token, self.count,
                             lambda k: self.workers[k].api_port) if api.token else None

    # ---- the workers

    def start(self) -> None:
        self.http.start()
        if self.api is not None:
            self.api.start()
        for worker in self.workers:
            gevent.spawn(self._keep, worker)
        gevent.spawn(self._announce_ready)
        log.info("forkbridge parent: %d workers, WebSocket ports from %s:%s", self.count,
                 self.config.bridge.listen_host, self.config.bridge.listen_port or "(ephemeral)")

    def _keep(self, worker: Worker) -> None:
        """Run worker K for as long as the parent runs; restart it whenever it dies unasked."""
        while not self.stopping.is_set():
            try:
                proc = self._spawn(worker)
            except OSError as exc:  # no process at all (out of memory, pids): tried again like a quick death
                proc, how = None, f"could not be started ({exc})"
            else:
                how = describe_exit(proc.wait())
            worker.ready, worker.metrics_port, worker.api_port = False, None, None
            carry_counters(worker)
            pid = proc.pid if proc is not None else "-"
            if self.stopping.is_set():
                log.info("worker %d (pid %s) stopped: %s", worker.index, pid, how)
                return
            lived = time.monotonic() - worker.started_at
            if lived >= STABLE_AFTER:
                worker.backoff = 0.0
            worker.backoff = min(BACKOFF_MAX, worker.backoff * 2) if worker.backoff else BACKOFF_FIRST
            self.restarts += 1
            log.error("worker %d (pid %s) died after %.0fs: %s; restarting it in %.0fs (its calls are picked up "
                      "again by the new worker, or get their fallback from the orphan timer)", worker.index, pid,
                      lived, how, worker.backoff)
            gevent.wait([self.stopping, worker.wake], timeout=worker.backoff, count=1)

    def _spawn(self, worker: Worker) -> subprocess.Popen:
        worker.started_at = time.monotonic()
        worker.wake.clear()  # a reload from here on reaches the new process (reload_pending)
        read_end, write_end = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ONLY}
        env[PARENT_PID_ENV] = str(os.getpid())  # the worker exits at once if it outlived us before it could tell
        command = [sys.executable, "-m", "controller.cli", "run", "--config", self.path,
                   "--worker", f"{worker.index}/{self.count}", "--report-fd", str(write_end)]
        try:
            proc = subprocess.Popen(command, env=env, pass_fds=(write_end,), stdin=subprocess.DEVNULL)
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        worker.proc = proc
        log.info("worker %d started (pid %d)", worker.index, proc.pid)
        if self.stopping.is_set():  # SIGTERM came while it was being started: it drains like the others
            proc.send_signal(signal.SIGTERM)
        gevent.spawn(self._follow, worker, proc, read_end)
        return proc

    def _follow(self, worker: Worker, proc: subprocess.Popen, read_end: int) -> None:
        """Learn where the worker listens, then keep asking it whether it is ready, while it lives."""
        try:
            ports = _read_report(read_end)
        finally:
            os.close(read_end)
        if ports is None:
            if proc.poll() is None:
                log.error("worker %d (pid %d) never said where it listens", worker.index, proc.pid)
            return
        if worker.proc is not proc or proc.poll() is not None:
            return  # it reported and died at once: its ports are nobody's
        worker.metrics_port, worker.api_port = ports.get("metrics"), ports.get("api")
        if worker.reload_pending:  # a SIGHUP came while it was starting (it had read the file before, or not)
            worker.reload_pending = False
            proc.send_signal(signal.SIGHUP)
        while worker.proc is proc and proc.poll() is None:
            worker.ready = _get(worker.metrics_port, "/readyz", 1.0) is not None
            gevent.sleep(POLL_INTERVAL)

    def live(self) -> int:
        return sum(worker.alive for worker in self.workers)

    def ready(self) -> tuple[bool, str]:
        waiting = [str(w.index) for w in self.workers if not (w.ready and w.alive)]
        if waiting:
            return False, f"worker(s) {', '.join(waiting)} not ready"
        return True, f"{self.count} workers ready"

    def _announce_ready(self) -> None:
        while not self.stopping.is_set() and not self.ready()[0]:
            self.stopping.wait(0.1)
        if self.stopping.is_set():
            return
        self.notifier.ready(f"{self.count} workers ready")
        self.notifier.start_watchdog(lambda: self.live() > 0 and not self.stopping.is_set())

    def scrape(self) -> tuple[list[str], bool]:
        """Every worker's exposition, asked in parallel; a worker that does not answer (restarting, slow) is
        represented by its last one, so no summed counter ever goes down between two scrapes. Also whether
        every worker answered."""
        asked = [(w, w.proc, gevent.spawn(_get, w.metrics_port, "/metrics", SCRAPE_TIMEOUT)) for w in self.workers]
        gevent.joinall([job for _w, _proc, job in asked], timeout=SCRAPE_TIMEOUT + 1)
        answered = True
        for worker, proc, job in asked:
            if job.value is not None and worker.proc is proc and worker.alive:
                worker.exposition = job.value
            else:  # no answer, or from a process that died meanwhile (its counts are carried already)
                answered = False
        return [w.exposition for w in self.workers if w.exposition], answered

    # ---- signals

    def reload(self) -> bool:
        """SIGHUP: check the file here; only a file that loads goes on to the workers."""
        self.notifier.reloading()
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            log.error("reload refused, the workers keep the running configuration:\n%s", exc)
            self.reloads_refused += 1
            self.notifier.ready("reload refused; running configuration kept")
            return False
        if new.daemon.workers != self.count:
            log.warning("daemon.workers changed from %d to %d: that applies at the next restart", self.count,
                        new.daemon.workers)
        for secret in new.secrets:
            register_secret(secret)
        self.config = dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, workers=self.count))
        for worker in self.workers:
            if worker.alive and worker.metrics_port is not None:
                worker.proc.send_signal(signal.SIGHUP)
            elif worker.alive:  # still starting: SIGHUP would end it before it has a handler
                worker.reload_pending = True
            else:  # dead and waiting out its backoff (e.g. the file it failed on was just fixed): start it now
                log.info("worker %d is down: starting it now with the reloaded file", worker.index)
                worker.wake.set()
        self.notifier.ready(f"reloaded: {len(new.routes)} route(s)")
        log.info("reload of %s forwarded to %d worker(s)", self.path, self.live())
        return True

    def shutdown(self) -> None:
        """SIGTERM: every worker drains as a single daemon would; the parent waits for all of them."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("shutting down: %d worker(s) draining", self.live())
        self.notifier.stopping(f"draining {self.live()} worker(s)")
        for worker in self.workers:
            if worker.alive:
                worker.proc.send_signal(signal.SIGTERM)
        # a worker drains for shutdown_grace, then waits for fallback prompts (PROMPT_WAIT) and the hangups
        deadline = time.monotonic() + self.config.daemon.shutdown_grace + PROMPT_WAIT + 30
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not finish draining: killing it", worker.index, worker.proc.pid)
                worker.proc.kill()
                worker.proc.wait()
        self.http.stop()
        if self.api is not None:
            self.api.stop()
        self.notifier.stop_watchdog()
        self.stopped.set()


class _MergedWorkers:
    """The parent's /metrics: every worker's series merged, plus the parent's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        sup = self.supervisor
        own: list[Metric] = [
            GaugeMetricFamily("forkbridge_workers", "Worker processes running (daemon.workers when all are up).",
                              value=sup.live()),
            CounterMetricFamily("forkbridge_worker_restarts", "Worker processes that died unasked and were "
                                "restarted by the parent.", value=sup.restarts)]
        if sup.reloads_refused:
            refused = CounterMetricFamily("forkbridge_config_reloads", "Route reloads on SIGHUP, by result (ok, "
                                          "error).", labels=["result"])
            refused.add_metric(["error"], sup.reloads_refused)
            own.append(refused)
        expositions, answered = sup.scrape()
        if not answered or sup.live() < sup.count:  # a worker down is calls nobody takes: not connected
            own.append(GaugeMetricFamily("forkbridge_esl_connected", "", value=0))
        return merge(expositions, [*own, *(family for w in sup.workers for family in w.carried)])


def carry_counters(worker: Worker) -> None:
    """A worker died: its counters restart from zero in the next process. What the dead one had counted (its
    last exposition) is carried and added to the new one's, so the node's counters never go down: Prometheus
    would take a drop for a reset and count the other workers' whole totals again in rate()."""
    worker.carried = merge([], [*worker.carried, *counters(worker.exposition)])
    worker.exposition = ""


def _read_report(fd: int) -> dict[str, int | None] | None:
    """The worker's one JSON line on its pipe; None if it closed the pipe (died) or took too long."""
    gevent.os.make_nonblocking(fd)
    data = b""
    with gevent.Timeout(REPORT_TIMEOUT, False):
        while not data.endswith(b"\n"):
            chunk = gevent.os.nb_read(fd, 4096)
            if not chunk:
                break
            data += chunk
    try:
        report = json.loads(data)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _get(port: int | None, path: str, timeout: float) -> str | None:
    """The body of a 200 answer from a worker's private endpoint, else None."""
    if port is None:
        return None
    try:
        with TO_WORKER.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def supervised() -> None:
    """First thing in a worker. A parent that dies without forwarding SIGTERM (SIGKILL, a crash) sends it anyway
    (Linux's PR_SET_PDEATHSIG), so no worker goes on taking calls with nobody supervising it: it drains and exits
    (before its handlers are installed, SIGTERM just ends it: it has no call yet). A parent that died before
    that was set is seen in getppid(). SIGHUP is ignored until the worker's own handler is in place: the parent
    sends it only to workers that have reported, and a reload meanwhile once they do."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(PARENT_PID_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        raise SystemExit("forkbridge worker: its parent is gone; exiting")


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def run_supervisor(path: str, config: Config) -> int:
    configure_logging(config.logging.level, config.logging.format, config.secrets)
    supervisor = Supervisor(path, config)
    supervisor.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(supervisor.shutdown))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(supervisor.shutdown))
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(supervisor.reload))
    supervisor.stopped.wait()
    log.info("stopped")
    return 0
