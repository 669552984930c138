"""Several FreeSWITCH + forkbridge nodes behind a real Kamailio dispatcher, all on loopback.

The parts of `make scale-demo` (tools/scale_demo.py) and of tests/realswitch/test_rs_scale.py, built from the files
an operator copies (deploy/scale/): Kamailio runs deploy/scale/kamailio.cfg (only its defines overridden), each node
is a FreeSwitch of the harness with deploy's SIP profile and fallback extension on its own loopback address, and
its daemon is `forkbridge run` with deploy's forkbridge.yaml (the same file for every node; ports, secrets and the
orphan timeout through the environment). SIPp callers reach the nodes through the proxy only. Every process is
ours, started with Popen and ended by its own handle.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gevent

from controller.esl import Event
from tests.harness import free_ports
from tests.realswitch.sipp import _read, why_sipp_unusable
from tests.realswitch.switch import PASSWORD, REPO, FreeSwitch, Probe, find_prefix

DEPLOY = REPO / "deploy" / "scale"
DID = "7100"


def why_unusable() -> str:
    """Why a cluster cannot run here ("" when it can)."""
    for tool in ("kamailio", "kamcmd"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (apt-get install kamailio; `make test` does it as root)"
    prefix, why = find_prefix()
    return why_sipp_unusable() or ("" if prefix is not None else why)


def free_sip_port(ip: str) -> int:
    """A port free for both UDP and TCP on `ip` (sofia binds both), for runs that must not collide with others."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((ip, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((ip, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free port on {ip}")


def _wait(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll until predicate() is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        gevent.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal our own process by its handle and reap it (SIGKILL if it outlives `timeout`)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ----------------------------------------------------------------------------------------- the proxy


class Kamailio:
    """deploy/scale/kamailio.cfg on `listen`, dispatching to `nodes` (SIP URIs), with kamcmd on its own socket."""

    def __init__(self, workdir: Path, listen: tuple[str, int], nodes: list[str], ping_interval: int = 1,
                 fr_timer_ms: int = 1000) -> None:
        self.dir = workdir / "kamailio"
        self.listen = listen
        self.nodes = nodes
        self.ping_interval = ping_interval
        self.fr_timer_ms = fr_timer_ms
        self.ctl = f"unix:{self.dir / 'ctl.sock'}"
        self.proc: subprocess.Popen | None = None
        self.output: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "kamailio.log"

    def _defines(self) -> list[str]:
        host, port = self.listen
        defines = {"LISTEN": f"udp:{host}:{port}", "DS_LIST": f'"{self.dir / "dispatcher.list"}"',
                   "CTL_SOCKET": f'"{self.ctl}"', "DS_PING_FROM": f'"sip:dispatcher@{host}"',
                   "DS_PING_INTERVAL": str(self.ping_interval), "FR_TIMER": str(self.fr_timer_ms), "CHILDREN": "2"}
        return [arg for name, value in defines.items() for arg in ("-A", f"{name}={value}")]

    def start(self, timeout: float = 20.0) -> Kamailio:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f"1 {uri} 0 0 name=node{i}" for i, uri in enumerate(self.nodes)]
        (self.dir / "dispatcher.list").write_text("\n".join(lines) + "\n")
        cmd = ["kamailio", "-f", str(DEPLOY / "kamailio.cfg"), "-DD", "-E", "-m", "32", "-M", "8",
               "-Y", str(self.dir), "-P", str(self.dir / "kamailio.pid"), *self._defines()]
        self.output = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait(lambda: self.proc.poll() is not None or "URI:" in self.kamcmd("dispatcher.list"), timeout,
              "kamailio's control socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"kamailio exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        return self

    def kamcmd(self, *args: str) -> str:
        """One kamcmd command on our control socket ("" when it does not answer)."""
        try:
            done = subprocess.run(["kamcmd", "-s", self.ctl, *args], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout if done.returncode == 0 else ""

    def states(self) -> dict[str, str]:
        """Each node's dispatcher flags: A active, I inactive, D disabled, P probing (e.g. 'AP', 'IP', 'DX')."""
        text = self.kamcmd("dispatcher.list")
        return dict(re.findall(r"URI:\s*(\S+)\s+FLAGS:\s*(\S+)", text))

    def set_state(self, state: str, uri: str) -> None:
        """`kamcmd dispatcher.set_state <state> 1 <uri>`: 'd' drains (probing leaves it alone), 'a' restores."""
        self.kamcmd("dispatcher.set_state", state, "1", uri)

    def wait_state(self, uri: str, flag: str, timeout: float) -> float:
        """Seconds until the node's flags start with `flag` ('A', 'I', 'D')."""
        t0 = time.monotonic()
        _wait(lambda: self.states().get(uri, "").startswith(flag), timeout, f"{uri} to be {flag} in the dispatcher",
              poll=0.05)
        return time.monotonic() - t0

    def log_lines(self, text: str) -> int:
        """How many lines of the proxy's log so far contain `text`."""
        return sum(text in line for line in _read(self.log_path).splitlines())

    def stop(self) -> None:
        _stop(self.proc)
        if self.output is not None:
            self.output.close()


# ----------------------------------------------------------------------------------------- one node


def node_profile(ip: str, sip_port: int, proxy_ip: str) -> str:
    """deploy's SIP profile with this node's address and the proxy's, as an operator fills it in."""
    text = (DEPLOY / "freeswitch" / "sip_profiles" / "forkbridge-node.xml").read_text()
    for name, value in (("fb_node_ip", ip), ("fb_node_sip_port", str(sip_port)), ("fb_proxy_cidr", f"{proxy_ip}/32")):
        text, n = re.subn(rf'data="{name}=[^"]*"', f'data="{name}={value}"', text)
        assert n == 1, f"deploy profile has no single {name}"
    return text


@dataclass
class NodeCall:
    """One call as its node's FreeSWITCH saw it (from its ESL events)."""

    uuid: str
    call_id: str
    answered: float  # wall clock
    ended: float | None = None


class Node:
    """One FreeSWITCH (deploy's profile on `ip`:`sip_port`) and its forkbridge daemon (deploy's YAML)."""

    def __init__(self, name: str, prefix: Path, workdir: Path, ip: str, sip_port: int, proxy_ip: str) -> None:
        self.name = name
        self.ip = ip
        self.sip_port = sip_port
        self.dir = workdir / name
        self.switch = FreeSwitch(prefix, workdir, name=f"{name}-fs")
        self.switch.extra_files = {
            "sip_profiles/forkbridge-node.xml": node_profile(ip, sip_port, proxy_ip),
            "dialplan/public/20_forkbridge_fallback.xml":
                (DEPLOY / "freeswitch" / "dialplan" / "public" / "20_forkbridge_fallback.xml").read_text()}
        self.bridge_port, self.metrics_port = free_ports(2)
        self.token_secret = secrets.token_hex(16)  # per node, as in production
        self.daemon: subprocess.Popen | None = None
        self.daemon_log: IO[bytes] | None = None
        self.probe: Probe | None = None
        self.calls: dict[str, NodeCall] = {}

    @property
    def uri(self) -> str:
        return f"sip:{self.ip}:{self.sip_port}"

    @property
    def records_path(self) -> Path:
        return self.dir / "calls.jsonl"

    def start_switch(self) -> None:
        self.switch.start()
        self.probe = self.switch.probe()
        self.probe.esl.register_handle("*", self._on_event)
        status = self.probe.api("sofia status")
        assert re.search(rf"forkbridge-node\s+profile\s+sip:mod_sofia@{re.escape(self.ip)}:{self.sip_port}\s+RUNNING",
                         status), f"{self.name}: profile forkbridge-node not running:\n{status}"

    def _on_event(self, raw) -> None:
        """Calls the node took from the proxy (inbound sofia legs of our profile): answer and end times."""
        event: Event | None = getattr(raw, "parsed", None)
        if event is None or not event.get("Channel-Name").startswith("sofia/forkbridge-node/"):
            return
        when = int(event.get("Event-Date-Timestamp", "0")) / 1e6
        if event.name == "CHANNEL_ANSWER" and event.uuid not in self.calls:
            self.calls[event.uuid] = NodeCall(event.uuid, event.get("variable_sip_call_id"), when)
        elif event.name == "CHANNEL_HANGUP_COMPLETE" and event.uuid in self.calls:
            self.calls[event.uuid].ended = when

    def start_daemon(self, orphan_timeout: str = "10s", timeout: float = 20.0) -> None:
        """`forkbridge run` on deploy/scale/forkbridge.yaml, this node's values in its environment."""
        self.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FORKBRIDGE_ESL_PASSWORD=PASSWORD, FORKBRIDGE_TOKEN_SECRET=self.token_secret,
                   FB_ESL_PORT=str(self.switch.esl_port), FB_BRIDGE_LISTEN=f"127.0.0.1:{self.bridge_port}",
                   FB_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}", FB_SPOOL_DIR=str(self.dir / "spool"),
                   FB_CALL_RECORDS=str(self.records_path), FB_ORPHAN_TIMEOUT=orphan_timeout)
        self.daemon_log = open(self.dir / "daemon.log", "ab")  # noqa: SIM115 - closed in stop_daemon()
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "run", "--config", str(DEPLOY / "forkbridge.yaml")],
            env=env, cwd=REPO, stdout=self.daemon_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait(lambda: self.daemon.poll() is not None or "forkbridge_esl_connected 1.0" in self.metrics(), timeout,
              f"{self.name}'s daemon to connect to its FreeSWITCH")
        if self.daemon.poll() is not None:
            raise RuntimeError(f"{self.name}'s daemon exited: {(self.dir / 'daemon.log').read_text()[-2000:]}")

    def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        code = _stop(self.daemon, sig, timeout=45.0)  # SIGTERM may wait shutdown_grace (20 s) and the fallbacks
        if self.daemon_log is not None:
            self.daemon_log.close()
        return code

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as reply:
                return reply.read().decode()
        except OSError:
            return ""

    def calls_active(self) -> float | None:
        """forkbridge_calls_active summed over routes (None when the daemon does not answer)."""
        text = self.metrics()
        if not text:
            return None
        return sum(float(v) for v in re.findall(r"^forkbridge_calls_active\{[^}]*\} (\S+)$", text, re.M))

    def records(self) -> list[dict]:
        """The daemon's call records (every daemon this node ran: the file is appended to)."""
        with contextlib.suppress(OSError):
            return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]
        return []

    def live_calls_armed(self) -> list[str]:
        """The uuids of the node's live calls when every one has its orphan timer (sched_api group
        forkbridge-<uuid>) scheduled on the switch; [] while one has not."""
        live = [c.uuid for c in self.calls.values() if c.ended is None]
        tasks = self.probe.api("show tasks") if self.probe is not None else ""
        return live if live and all(f"forkbridge-{uuid}" in tasks for uuid in live) else []

    def channels(self) -> int | None:
        """Channels on the switch now (None when it is down)."""
        if not self.switch.running:
            return None
        probe = self.switch.probe()
        try:
            reply = probe.api("show channels count").strip()
        finally:
            probe.close()
        match = re.match(r"(\d+) total", reply)
        return int(match.group(1)) if match else None

    def wait_no_channels(self, timeout: float = 15.0) -> None:
        _wait(lambda: not self.switch.running or self.channels() == 0, timeout, f"{self.name} to have no channels",
              poll=0.25)

    def stop(self) -> None:
        """The daemon by SIGTERM, the switch killed (nothing of it needs FreeSWITCH's ~7 s clean shutdown)."""
        self.stop_daemon()
        if self.probe is not None:
            with contextlib.suppress(Exception):
                self.probe.close()
        self.switch.kill()
        self.switch.stop()


# ----------------------------------------------------------------------------------------- the whole cluster


@dataclass
class Cluster:
    """The proxy and its nodes, started together and stopped together (each process by its own handle)."""

    kamailio: Kamailio
    nodes: list[Node]

    @property
    def proxy(self) -> tuple[str, int]:
        return self.kamailio.listen

    def node(self, contact: str) -> Node | None:
        """The node a SIPp call's Contact (ip:port) names."""
        return next((n for n in self.nodes if f"{n.ip}:{n.sip_port}" == contact), None)

    def label(self, contact: str) -> str:
        node = self.node(contact)
        return node.name if node else contact or "-"


@contextlib.contextmanager
def running_cluster(workdir: Path, prefix: Path, proxy: tuple[str, int], nodes: list[tuple[str, str, int]],
                    ping_interval: int = 1, fr_timer_ms: int = 1000, orphan_timeout: str = "10s"):
    """Kamailio on `proxy` and one node per (name, ip, sip_port), every node active in the dispatcher."""
    kamailio = Kamailio(workdir, proxy, [f"sip:{ip}:{port}" for _n, ip, port in nodes], ping_interval, fr_timer_ms)
    started = Cluster(kamailio, [Node(name, prefix, workdir, ip, port, proxy[0]) for name, ip, port in nodes])
    try:
        for node in started.nodes:
            node.start_switch()
        for node in started.nodes:
            node.start_daemon(orphan_timeout)
        started.kamailio.start()
        for node in started.nodes:
            started.kamailio.wait_state(node.uri, "A", 5 * ping_interval + 5)
        yield started
    finally:
        started.kamailio.stop()
        for node in started.nodes:
            node.stop()
