"""`daemon.workers: 2` on fsim: the parent and its two worker processes as systemd would run them.

Callers are taken by the worker their channel uuid hashes to (each worker forks its calls to its own WebSocket
port) and hear their echo; the parent's /metrics counts every call once; a worker killed mid-call is restarted and
its callers are picked up again while the other worker's callers never notice; SIGHUP reaches both workers (a
broken file neither); SIGTERM drains both and the parent exits 0; outbound calls go through the parent's API to
the one worker that owns the route, so the route's cap holds across workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import re
import signal
import subprocess
import sys
import textwrap
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import ConfigError, parse_config
from controller.shard import Shard, owner
from fsim import Callee, CallerScript, FSim, Silence, Tone
from fsim.audio import write_wav
from tests.harness import SECRET, free_ports
from tests.harness import wait_until as harness_wait_until
from tests.test_outbound_calls import TOKEN, request

REPO = Path(__file__).resolve().parent.parent
TALKING = CallerScript(audio=functools.reduce(operator.add, [Tone(440, 1.0) + Silence(1.5)] * 16),
                       hangup_after=40.0)  # a turn every 2.5 s: an echo to hear every 2.5 s
SHORT = CallerScript(audio=Tone(440, 1.0) + Silence(2.0), hangup_after=3.0)


class Node:
    """The parent process, its log, and what it serves."""

    def __init__(self, proc: subprocess.Popen, log: Path, metrics_port: int, api_port: int) -> None:
        self.proc, self.log, self.metrics_port, self.api_port = proc, log, metrics_port, api_port
        self.call_api = types.SimpleNamespace(url=f"http://127.0.0.1:{api_port}")  # for request()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        _status, text = self.get("/metrics")
        return [(s.labels, s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name]

    def total(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.samples(name) if all(lab.get(k) == x for k, x in labels.items()))

    def worker_pid(self, k: int) -> int:
        """The pid of worker k as the parent last started it (from its log)."""
        pids = re.findall(rf"worker {k} started \(pid (\d+)\)", self.log.read_text())
        assert pids, f"worker {k} never started"
        return int(pids[-1])


def wait_until(predicate: Any, timeout: float, what: str, node: Node | None = None) -> Any:
    """The harness's wait_until, failing at once if the parent `node` exits while it waits."""

    def check() -> Any:
        value = predicate()
        if not value and node is not None and node.proc.poll() is not None:
            raise AssertionError(f"the parent exited ({node.proc.returncode}) while waiting for {what}")
        return value

    return harness_wait_until(check, timeout, what)


def write_config(tmp_path: Path, esl_port: int, metrics_port: int, api_port: int, workers: str = "2") -> Path:
    prompt = tmp_path / "hold.wav"
    write_wav(str(prompt), np.zeros(4000, np.int16), 8000)
    path = tmp_path / "forkbridge.yaml"
    path.write_text(textwrap.dedent(f"""
        esl: {{port: {esl_port}, password: ClueCon, command_timeout: 2s, reconnect_max: 500ms}}
        bridge: {{listen: "127.0.0.1:0", spool_dir: "{tmp_path / 'spool'}", token_secret: {SECRET}}}
        metrics: {{listen: "127.0.0.1:{metrics_port}"}}
        api: {{listen: "127.0.0.1:{api_port}", token: {TOKEN}}}
        logging: {{call_records: "{tmp_path / 'calls.jsonl'}"}}
        daemon: {{shutdown_grace: 2s, orphan_timeout: 10s, workers: {workers}}}
        engines: {{echo: {{type: echo}}}}
        routes:
          - name: front
            did: "7100"
            engine: echo
            no_audio_timeout: 5s
            fallback: {{prompt: "{prompt}", transfer: "1000 XML default"}}
          - name: reminders
            engine: echo
            outbound: {{dial: "loopback/{{to}}/public", allowed: '73\\d\\d', originate_timeout: 60s,
                        max_concurrent: 2}}
        """))
    return path


def start_node(config: Path, metrics_port: int, api_port: int, env: dict[str, str] | None = None) -> Node:
    """`forkbridge run` as systemd would start it, its output in a log file next to the config."""
    log_path = config.with_suffix(".log")
    env = env if env is not None else {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",
                                                                                           "WATCHDOG_USEC")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Node(proc, log_path, metrics_port, api_port)


def stop_node(n: Node) -> None:
    """After a failed test: the parent by its pid, then every worker it started by theirs."""
    if n.proc.poll() is None:
        pids = {int(p) for p in re.findall(r"started \(pid (\d+)\)", n.log.read_text())}
        n.proc.kill()
        n.proc.wait(timeout=10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def node(tmp_path: Path, esl_port: int, workers: str = "2") -> Iterator[Node]:
    metrics_port, api_port = free_ports(2)
    n = start_node(write_config(tmp_path, esl_port, metrics_port, api_port, workers), metrics_port, api_port)
    try:
        wait_until(lambda: n.get("/readyz")[0] == 200, 30, "both workers ready", n)
        yield n
    finally:
        stop_node(n)


def place_spread(sw: FSim, per_worker: int, script: CallerScript, did: str = "7100") -> dict[int, list[Any]]:
    """Calls until each of the two workers owns at least `per_worker` of them (fsim picks the uuids)."""
    calls: dict[int, list[Any]] = {0: [], 1: []}
    for _ in range(40):
        if min(len(c) for c in calls.values()) >= per_worker:
            return calls
        call = sw.place_call(did=did, script=script)
        calls[owner(call.uuid, 2)].append(call)
    raise AssertionError("crc32 never spread 40 uuids over both workers")


def forks(call: Any) -> list[Any]:
    return [bug for bug in call.all_bugs if bug.kind == "fork"]


def fork_port(call: Any) -> int:
    return int(re.match(r"ws://127\.0\.0\.1:(\d+)/", forks(call)[-1].url)[1])


def connected(call: Any) -> bool:
    return bool(forks(call)) and forks(call)[-1].connected.is_set()


def test_calls_are_taken_by_the_worker_that_owns_them_heard_and_counted_once(tmp_path):
    with FSim() as sw, node(tmp_path, sw.esl_port) as parent:
        calls = place_spread(sw, 3, SHORT)
        everyone = calls[0] + calls[1]
        for call in everyone:
            wait_until(lambda c=call: c.ear.heard_seconds("broadcast:") >= 0.3, 10, "every caller's echo", parent)
        # each worker forked its own calls to its own WebSocket port, and only its own
        ports = {k: {fork_port(c) for c in calls[k]} for k in (0, 1)}
        assert len(ports[0]) == 1 and len(ports[1]) == 1 and ports[0] != ports[1], ports
        assert all(len([cmd for cmd in sw.commands_for(c.uuid) if cmd.command == "uuid_audio_fork"]) == 1
                   for c in everyone), "a call was forked by both workers"
        for call in everyone:
            assert call.wait_hangup(10)
        wait_until(lambda: parent.total("forkbridge_calls_total") == len(everyone), 10, "every call counted", parent)
        assert parent.total("forkbridge_calls_total", outcome="completed") == len(everyone)
        assert parent.total("forkbridge_calls_active") == 0
        assert parent.samples("forkbridge_esl_connected") == [({}, 1.0)]
        assert parent.samples("forkbridge_workers") == [({}, 2.0)]
        assert parent.samples("forkbridge_worker_restarts_total") == [({}, 0.0)]
        # both workers appended to the one call records file: one whole JSON line per call
        records = tmp_path / "calls.jsonl"
        wait_until(lambda: records.exists() and len(records.read_text().splitlines()) == len(everyone), 5,
                   "a record per call")
        assert sorted(json.loads(line)["uuid"] for line in records.read_text().splitlines()) == \
            sorted(c.uuid for c in everyone)

        # SIGTERM with a live call on each worker: both drain into the route's fallback, the parent exits 0
        live = place_spread(sw, 1, TALKING)
        talking = live[0] + live[1]
        wait_until(lambda: all(connected(c) for c in talking), 10, "a live call on each worker", parent)
        parent.proc.send_signal(signal.SIGTERM)
        for call in talking:
            wait_until(lambda c=call: c.transferred_to, 20, "the live calls' fallback")
            assert call.transferred_to.startswith("1000")
        assert parent.proc.wait(timeout=30) == 0
    log = parent.log.read_text()
    assert "worker=0" in log and "worker=1" in log  # every worker line says whose it is
    assert log.count("fallback (shutting_down)") == len(talking)


def test_a_killed_worker_is_restarted_and_its_callers_picked_up_while_the_others_carry_on(tmp_path):
    with FSim() as sw, node(tmp_path, sw.esl_port) as parent:
        calls = place_spread(sw, 2, TALKING)
        everyone = calls[0] + calls[1]
        wait_until(lambda: all(connected(c) for c in everyone), 10, "every call forked", parent)
        wait_until(lambda: all(c.ear.heard_seconds("broadcast:") >= 0.3 for c in everyone), 10, "every echo")
        victim = parent.worker_pid(1)
        heard_before = {c.uuid: c.ear.heard_seconds("broadcast:") for c in calls[1]}
        frames = [parent.total("forkbridge_audio_frames_total")]  # what the node counted, scrape after scrape

        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: parent.get("/readyz")[0] == 503, 5, "the node not ready while a worker is down", parent)
        frames.append(parent.total("forkbridge_audio_frames_total"))
        wait_until(lambda: parent.total("forkbridge_worker_restarts_total") == 1, 15, "the restart counted", parent)
        wait_until(lambda: parent.worker_pid(1) != victim, 15, "a new worker 1", parent)
        wait_until(lambda: parent.get("/readyz")[0] == 200, 15, "both workers ready again", parent)
        # the new worker's resync took its calls back: a fresh fork each, and the callers hear their echo again
        for call in calls[1]:
            wait_until(lambda c=call: len(forks(c)) == 2 and connected(c), 15, "the call forked again", parent)
            wait_until(lambda c=call: c.ear.heard_seconds("broadcast:") > heard_before[c.uuid] + 0.3, 15,
                       "the caller to hear the echo again")
            assert call.transferred_to is None and call.alive
        # worker 0's callers never noticed: same fork, never closed, still answered
        for call in calls[0]:
            assert len(forks(call)) == 1 and forks(call)[0].state == "connected"
            assert call.transferred_to is None and call.alive
        # the dead worker's frames still count (a counter that went down would be a reset to Prometheus)
        frames.append(parent.total("forkbridge_audio_frames_total"))
        assert frames == sorted(frames) and frames[0] > 0, frames
        log = parent.log.read_text()
        assert re.search(rf"worker 1 \(pid {victim}\) died after \d+s: killed by SIGKILL", log), log[-2000:]
        assert "answered while ESL was down: picking it up" in log
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(timeout=30) == 0


def test_sighup_reaches_both_workers_and_a_broken_file_neither(tmp_path):
    with FSim() as sw, node(tmp_path, sw.esl_port) as parent:
        config = tmp_path / "forkbridge.yaml"
        original = config.read_text()
        reloaded = original.replace('did: "7100"', 'did: ["7100", "7200"]')
        config.write_text(reloaded.replace("workers: 2", "workers: 3"))
        parent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: parent.total("forkbridge_config_reloads_total", result="ok") == 1, 10, "the reload",
                   parent)
        wait_until(lambda: parent.log.read_text().count("reloaded ") == 2, 10, "both workers to reload")
        assert "daemon.workers changed from 2 to 3: that applies at the next restart" in parent.log.read_text()
        assert parent.samples("forkbridge_workers") == [({}, 2.0)]
        added = place_spread(sw, 1, SHORT, did="7200")
        for call in added[0] + added[1]:  # the new DID answers on both workers
            wait_until(lambda c=call: c.ear.heard_seconds("broadcast:") >= 0.3, 10, "the new route's echo", parent)

        config.write_text(original.replace("engine: echo", "engine: nowhere"))
        parent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: parent.total("forkbridge_config_reloads_total", result="error") == 1, 10,
                   "the refused reload", parent)
        again = place_spread(sw, 1, SHORT, did="7200")
        for call in again[0] + again[1]:  # the workers kept the reloaded routes
            wait_until(lambda c=call: c.ear.heard_seconds("broadcast:") >= 0.3, 10, "the echo", parent)
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(timeout=30) == 0
    log = parent.log.read_text()
    assert log.count("reloaded ") == 2  # one line per worker, for the good file only
    assert "reload refused, the workers keep the running configuration" in log
    assert "engine 'nowhere' is not defined" in log


def test_outbound_calls_go_through_the_parent_and_the_route_cap_holds_across_workers(tmp_path):
    speaks = CallerScript(audio=Silence(1.0) + Tone(660, 1.0) + Silence(8.0), hangup_after=10.0)
    callees = {"7310": Callee(ring_s=0.3, script=speaks), "7320": Callee(ring_s=30.0),
               "7321": Callee(ring_s=30.0), "7322": Callee(ring_s=30.0)}
    with FSim(callees=callees) as sw, node(tmp_path, sw.esl_port) as parent:
        status, answered = request(parent, "POST", "/calls", {"route": "reminders", "to": "7310"})
        assert status == 201, answered
        # placed by the worker that owns the route, under a uuid that worker owns
        assert owner(answered["id"], 2) == owner("reminders", 2)
        channel = wait_until(lambda: sw.channels.get(answered["id"]), 5, "the originated channel", parent)
        assert channel.wait_answered(5)
        wait_until(lambda: channel.ear.heard_seconds("broadcast:") >= 0.5, 10, "the callee to hear the echo")
        assert request(parent, "GET", f"/calls/{answered['id']}")[1]["state"] == "answered"

        assert request(parent, "POST", "/calls", {"route": "reminders", "to": "7320"})[0] == 201
        status, refused = request(parent, "POST", "/calls", {"route": "reminders", "to": "7321"})
        assert status == 429 and "max_concurrent" in refused["error"]
        assert {c["to"] for c in request(parent, "GET", "/calls")[1]["calls"]} == {"7310", "7320"}
        assert request(parent, "DELETE", f"/calls/{answered['id']}")[0] == 202
        wait_until(lambda: request(parent, "GET", f"/calls/{answered['id']}")[1]["state"] == "ended", 10,
                   "the hung-up call to end")
        assert request(parent, "POST", "/calls", {"route": "reminders", "to": "7322"})[0] == 201
        wait_until(lambda: parent.total("forkbridge_outbound_calls_live", route="reminders") == 2, 5,
                   "two live outbound calls in the merged metrics")
        assert len([c for c in sw.commands_log if c.command == "originate"]) == 3
        assert request(parent, "GET", "/calls/nope")[0] == 404
        assert request(parent, "DELETE", "/calls")[0] == 405
        req = urllib.request.Request(f"http://127.0.0.1:{parent.api_port}/calls", method="GET")
        with pytest.raises(urllib.error.HTTPError) as refused_token:
            urllib.request.urlopen(req, timeout=5)
        assert refused_token.value.code == 401
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(timeout=30) == 0


def test_workers_in_the_config(tmp_path):
    base = textwrap.dedent(f"""
        esl: {{password: x}}
        bridge: {{listen: "127.0.0.1:8765", token_secret: {SECRET}}}
        engines: {{echo: {{type: echo}}}}
        routes: [{{did: "7100", engine: echo}}]
        """)
    assert parse_config(base, "f.yaml", {}).daemon.workers == 1
    assert parse_config(base + "daemon: {workers: 3}\n", "f.yaml", {}).daemon.workers == 3
    assert parse_config(base + "daemon: {workers: auto}\n", "f.yaml", {}).daemon.workers == os.cpu_count()
    for bad in ("0", "-2", "many", "1.5", "true"):
        with pytest.raises(ConfigError) as error:
            parse_config(base + f"daemon:\n  workers: {bad}\n", "f.yaml", {})
        assert error.value.problems == [f"f.yaml:7: daemon.workers: expected an integer of at least 1, or auto "
                                        f"(one per core), got {parse_config_value(bad)!r}"]
    with pytest.raises(ConfigError) as error:
        parse_config(base.replace("8765", "65535") + "daemon: {workers: 2}\n", "f.yaml", {})
    assert "bridge.listen: worker K listens on this port + K" in error.value.problems[0]
    # each worker's own view: WebSocket port + K (bridge.url's too), private loopback metrics and API
    config = parse_config(base.replace('token_secret', 'url: "ws://10.0.0.5:9000/fb", token_secret')
                          + "daemon: {workers: 2}\n", "f.yaml", {})
    second = Shard(1, 2).config_for(config)
    assert (second.bridge.listen_port, second.bridge.url) == (8766, "ws://10.0.0.5:9001/fb")
    assert (second.metrics.listen_port, second.api.listen_port) == (0, 0)
    assert Shard().config_for(config) is config


def parse_config_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def test_a_worker_owns_exactly_the_uuids_that_hash_to_it():
    shards = [Shard(k, 3) for k in range(3)]
    for shard in shards:
        for _ in range(20):
            uuid = shard.new_uuid()
            assert [s.owns(uuid) for s in shards].count(True) == 1 and shard.owns(uuid)
    assert Shard().owns("anything") and Shard.parse("1/2") == Shard(1, 2)
    with pytest.raises(ValueError):
        Shard.parse("2/2")


def test_a_worker_that_cannot_come_back_leaves_its_callers_to_the_orphan_timer(tmp_path):
    """Worker 1 is killed and its restarts fail (the file broke meanwhile): FreeSWITCH's own timer gives its
    callers their fallback; worker 0's callers carry on. Once the file is fixed and reloaded the worker comes back."""
    with FSim() as sw, node(tmp_path, sw.esl_port) as parent:
        calls = place_spread(sw, 1, TALKING)
        wait_until(lambda: all(connected(c) for c in calls[0] + calls[1]), 10, "every call forked", parent)
        config = tmp_path / "forkbridge.yaml"
        good = config.read_text()
        config.write_text(good.replace("engine: echo", "engine: nowhere"))
        os.kill(parent.worker_pid(1), signal.SIGKILL)
        wait_until(lambda: parent.total("forkbridge_worker_restarts_total") >= 2, 15, "a failed restart", parent)
        assert parent.total("forkbridge_esl_connected") == 0  # worker 1's share of the calls is taken by nobody
        for call in calls[1]:  # orphan_timeout 10s: within 10 s of the last re-arm, FreeSWITCH transfers them
            wait_until(lambda c=call: c.transferred_to, 15, "the orphan timer's fallback", parent)
            assert call.transferred_to.startswith("1000")
        for call in calls[0]:
            assert call.transferred_to is None and call.alive and forks(call)[0].state == "connected"
        config.write_text(good)  # and reloaded: the worker waiting out its restart backoff starts at once
        parent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "worker 1 is down: starting it now" in parent.log.read_text(), 10, "the reload", parent)
        wait_until(lambda: parent.get("/readyz")[0] == 200, 40, "worker 1 back once the file is fixed", parent)
        later = place_spread(sw, 1, SHORT)
        for call in later[1]:
            wait_until(lambda c=call: c.ear.heard_seconds("broadcast:") >= 0.3, 10, "worker 1 answering again")

        # the parent itself killed: its workers do not go on unsupervised, they drain and exit
        workers = [parent.worker_pid(0), parent.worker_pid(1)]
        parent.proc.kill()
        parent.proc.wait(timeout=10)
        wait_until(lambda: all(gone(pid) for pid in workers), 20, "the orphaned workers to exit")
        for call in calls[0]:
            assert call.transferred_to and call.transferred_to.startswith("1000")  # drained into the fallback


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_only_the_parent_talks_to_systemd(tmp_path):
    """READY=1 once both workers are ready (not before FreeSWITCH is up), watchdog pings from the parent,
    STOPPING=1 at SIGTERM; no worker's own notification ever reaches the socket."""
    from tests.test_ops_daemon import NotifyListener

    esl_port, metrics_port, api_port = free_ports(3)
    config = write_config(tmp_path, esl_port, metrics_port, api_port)
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
    env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    parent = start_node(config, metrics_port, api_port, env)
    try:
        wait_until(lambda: parent.get("/healthz")[0] == 200, 20, "the parent's /healthz", parent)
        wait_until(lambda: "started (pid" in parent.log.read_text() and parent.get("/readyz")[0] == 503, 10,
                   "not ready while FreeSWITCH is down", parent)
        assert "worker(s) 0, 1 not ready" in parent.get("/readyz")[1]
        assert notify.index("READY=1") is None
        with FSim(esl_port=esl_port):
            wait_until(lambda: notify.index("READY=1") is not None, 20, "READY=1", parent)
            assert parent.get("/readyz")[0] == 200
            wait_until(lambda: notify.index("WATCHDOG=1") is not None, 5, "a watchdog ping", parent)
            parent.proc.send_signal(signal.SIGTERM)
            assert parent.proc.wait(timeout=30) == 0
        wait_until(lambda: notify.index("STOPPING=1") is not None, 5, "STOPPING=1")
        assert [m for m in notify.messages if "READY=1" in m.split("\n")] == ["READY=1\nSTATUS=2 workers ready"]
        assert not [m for m in notify.messages if "ESL connected" in m]  # a worker's READY would say so
    finally:
        notify.close()
        stop_node(parent)
