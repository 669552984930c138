"""The scale-out scenarios on a running cluster: spread, drain, node loss, daemon loss.

Each runs a SIPp load through the proxy, does its one thing to a node mid-load, and returns a Phase: the
callers' view of every call (which node answered, how it ended), what was measured, and every way the run
differs from what the README promises (`problems`, empty when it went as it should). `make scale-demo` runs all
four; the real-switch test runs a spread with one drain.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from tests.realswitch.cluster import Cluster, Node, _wait
from tests.realswitch.sippload import LoadResult, SippLoad

GRACE_S = 0.5  # an INVITE the proxy dispatched just before a drain reaches the node this much later at most


@dataclass
class Phase:
    name: str
    load: LoadResult
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def _start(cluster: Cluster, name: str, calls: int, rate: float, talk_s: float) -> SippLoad:
    return SippLoad(cluster.kamailio.dir.parent, cluster.proxy, calls, rate, talk_s, name=name).start()


def _all_answered(phase: Phase) -> None:
    phase.check(phase.load.unanswered() == 0, f"{phase.load.unanswered()} call(s) never answered")


def spread(cluster: Cluster, calls: int = 10, rate: float = 2.0, talk_s: float = 5.0) -> Phase:
    """Calls over every node; each completes (the caller hangs up after talk_s)."""
    phase = Phase("spread", _start(cluster, "load-spread", calls, rate, talk_s).wait())
    _all_answered(phase)
    for node in cluster.nodes:
        taken = phase.load.on(f"{node.ip}:{node.sip_port}")
        phase.check(bool(taken), f"{node.name} took no call")
    phase.check(phase.load.count("completed") == calls, "not every call completed")
    return phase


def drain(cluster: Cluster, node: Node, calls: int = 12, rate: float = 2.0, talk_s: float = 6.0,
          after: int = 4, restore: bool = True) -> Phase:
    """Mid-load: `dispatcher.set_state d` for the node, wait for its forkbridge_calls_active to reach 0, SIGTERM
    its daemon. No new call may reach it after the drain, no live call may be cut. `restore`: start the daemon
    again and set the node active (as after an upgrade)."""
    load = _start(cluster, f"load-drain-{node.name}", calls, rate, talk_s)
    _wait(lambda: load.answered() >= after, after / rate + 10, f"{after} calls answered")
    cluster.kamailio.set_state("d", node.uri)
    drained_at = time.time()
    flags = cluster.kamailio.states().get(node.uri, "")
    live = node.calls_active()
    _wait(lambda: node.calls_active() == 0, talk_s + 15, f"{node.name}'s calls_active to reach 0")
    idle_s = time.time() - drained_at
    code = node.stop_daemon(signal.SIGTERM)
    phase = Phase(f"drain {node.name}", load.wait())
    late = [c for c in node.calls.values() if c.answered > drained_at + GRACE_S]
    mine = phase.load.on(f"{node.ip}:{node.sip_port}")
    phase.notes += [f"dispatcher.set_state d -> flags {flags}; {live:.0f} live call(s) on {node.name} then",
                    f"{node.name}'s forkbridge_calls_active reached 0 after {idle_s:.1f} s; SIGTERM -> exit {code}",
                    f"calls answered by {node.name} after the drain: {len(late)}"]
    _all_answered(phase)
    phase.check(not late, f"{len(late)} call(s) reached {node.name} after the drain")
    phase.check(code == 0, f"{node.name}'s daemon exited {code} on SIGTERM")
    phase.check(all(c.end == "completed" for c in mine), f"a live call on {node.name} was cut by the drain")
    phase.check(phase.load.count("completed") == calls, "not every call completed")
    if restore:
        node.start_daemon()
        cluster.kamailio.set_state("a", node.uri)
        cluster.kamailio.wait_state(node.uri, "A", 5)
        phase.notes.append(f"{node.name}: daemon restarted, dispatcher.set_state a -> active again")
    return phase


def node_loss(cluster: Cluster, node: Node, calls: int = 12, rate: float = 2.0, talk_s: float = 6.0,
              after: int = 4, restore: bool = True) -> Phase:
    """Mid-load: SIGKILL the node's FreeSWITCH. The proxy must stop routing to it within its probing interval
    (an INVITE it sends there meanwhile fails over to another node after fr_timer); the calls the node held end
    for their callers (BYE answered 408 by the proxy: counted as lost). `restore`: start the switch again; its
    daemon reconnects and the proxy's OPTIONS bring the node back."""
    load = _start(cluster, f"load-kill-{node.name}", calls, rate, talk_s)
    _wait(lambda: load.answered() >= after, after / rate + 10, f"{after} calls answered")
    failovers = cluster.kamailio.log_lines("(failover)")
    node.switch.kill()
    killed_at = time.time()
    detect_s = cluster.kamailio.wait_state(node.uri, "I", 3 * cluster.kamailio.ping_interval + 10)
    phase = Phase(f"kill {node.name}'s FreeSWITCH", load.wait())
    addr = f"{node.ip}:{node.sip_port}"
    over = {c.call_id for c in node.calls.values() if c.ended is not None and c.ended < killed_at}
    cut = [c for c in phase.load.on(addr) if c.call_id not in over]  # the calls the node held when it died
    others = [c for c in phase.load.calls.values() if c.node and c.node != addr]
    phase.notes += [f"SIGKILL with {len(cut)} call(s) on {node.name}; the proxy marked it inactive "
                    f"{detect_s:.1f} s later (ping interval {cluster.kamailio.ping_interval} s)",
                    f"calls {node.name} held: {len(cut)} -> " + ", ".join(sorted({c.end for c in cut}) or ["-"]),
                    f"calls answered elsewhere: {len(others)}; "
                    f"{cluster.kamailio.log_lines('(failover)') - failovers} sent to {node.name} first "
                    f"and failed over after fr_timer ({cluster.kamailio.fr_timer_ms} ms)"]
    _all_answered(phase)
    phase.check(all(c.end in ("lost", "far_bye") for c in cut), f"a call on the dead {node.name} 'completed'")
    phase.check(all(c.end == "completed" for c in others), "a call on another node did not complete")
    phase.check(detect_s <= 2 * cluster.kamailio.ping_interval + 2, "the proxy was slow to mark the node down")
    if restore:
        node.switch.stop()
        t0 = time.monotonic()
        node.start_switch()
        up_s = time.monotonic() - t0
        back_s = up_s + cluster.kamailio.wait_state(node.uri, "A", 3 * cluster.kamailio.ping_interval + 10)
        _wait(lambda: "forkbridge_esl_connected 1.0" in node.metrics(), 20, f"{node.name}'s daemon to reconnect")
        phase.notes.append(f"{node.name}: FreeSWITCH restarted (up in {up_s:.1f} s), active in the dispatcher "
                           f"{back_s:.1f} s after the restart, its daemon reconnected by itself "
                           f"{time.monotonic() - t0:.1f} s after it")
    return phase


def daemon_loss(cluster: Cluster, node: Node, orphan_timeout_s: float, calls: int = 8, rate: float = 2.0) -> Phase:
    """Once every call is up, SIGKILL the node's daemon (not its switch): FreeSWITCH's orphan timer must send
    each of its calls to the fallback extension within orphan_timeout; the other nodes' calls complete."""
    talk_s = orphan_timeout_s + 12
    load = _start(cluster, f"load-daemon-{node.name}", calls, rate, talk_s)
    _wait(lambda: load.answered() >= calls, calls / rate + 10, "every call answered")
    # every live call of the node has its orphan timer (a call answered in the last milliseconds before the
    # daemon dies has none yet: README, "Scale out")
    addr = f"{node.ip}:{node.sip_port}"
    live = _wait(lambda: len(armed := node.live_calls_armed()) == load.answered(addr) and armed, 10,
                 f"the orphan timer of every call on {node.name}")
    mine_live = len(live)
    node.stop_daemon(signal.SIGKILL)
    killed_at = time.time()
    phase = Phase(f"kill {node.name}'s daemon", load.wait())
    mine = phase.load.on(addr)
    ends = [c.ended - killed_at for c in node.calls.values() if c.ended and c.ended > killed_at]
    phase.notes += [f"SIGKILL with {mine_live} call(s) on {node.name}; orphan_timeout {orphan_timeout_s:.0f} s",
                    f"{node.name}'s calls: {sum(c.fallback for c in mine)} of {len(mine)} ended in the fallback "
                    f"extension, {min(ends, default=0):.1f}-{max(ends, default=0):.1f} s after the kill"]
    _all_answered(phase)
    phase.check(bool(mine) and all(c.end == "far_bye" and c.fallback for c in mine),
                f"a call on {node.name} did not reach its fallback")
    phase.check(max(ends, default=0) <= orphan_timeout_s + 5, "a fallback came later than orphan_timeout")
    phase.check(all(c.end == "completed" for c in phase.load.calls.values() if c.node != addr),
                "a call on another node did not complete")
    return phase
