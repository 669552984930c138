"""`make scale-demo`: forkbridge scaled out behind a real Kamailio dispatcher, on this machine's loopback.

Kamailio (deploy/scale/kamailio.cfg) on 127.0.0.1, two FreeSWITCH nodes (deploy's SIP profile) on 127.0.0.2 and
127.0.0.3, one forkbridge daemon per node (deploy's forkbridge.yaml, echo engine), SIPp callers through the proxy.
Four phases: calls spread over both nodes; node A drained mid-load (then restarted and put back, as after an
upgrade); node B's FreeSWITCH killed mid-load (then restarted); node A's daemon killed under live calls (the orphan
timer sends them to the fallback). Prints what each caller saw per node and exits 1 if any call was lost or ended
otherwise than the README says it does. Needs root (SIPp's RTP), kamailio, sipp and a FreeSWITCH as the
real-switch tests find it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.realswitch.cluster import Cluster, running_cluster, why_unusable  # noqa: E402
from tests.realswitch.scaleout import Phase, daemon_loss, drain, node_loss, spread  # noqa: E402
from tests.realswitch.switch import find_prefix  # noqa: E402

ORPHAN_TIMEOUT_S = 10  # the config's minimum: the daemon-loss phase waits this long


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def table(cluster: Cluster, phase: Phase) -> list[str]:
    """Per node: calls taken, how they ended (the callers' view)."""
    rows = []
    for contact in sorted({c.node for c in phase.load.calls.values() if c.node}):
        calls = phase.load.on(contact)
        ends = Counter("fallback" if c.fallback else c.end for c in calls)
        rows.append(f"    {cluster.label(contact)}: taken {len(calls):3d}, completed {ends['completed']:3d}, "
                    f"fallbacks {ends['fallback']:3d}, cut by node loss {ends['lost'] + ends['far_bye']:3d}")
    if phase.load.unanswered():
        rows.append(f"    never answered: {phase.load.unanswered()}")
    return rows


def report(cluster: Cluster, phase: Phase, elapsed: float) -> None:
    print(f"\n[{phase.name}] {phase.load.placed} calls, {elapsed:.0f} s")
    for line in table(cluster, phase) + [f"    {note}" for note in phase.notes]:
        print(line)
    print("    " + ("OK" if not phase.problems else "PROBLEMS: " + "; ".join(phase.problems)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", type=address, default=("127.0.0.1", 5060), help="Kamailio's ip:port")
    parser.add_argument("--nodes", default="127.0.0.2:5060,127.0.0.3:5060", help="node A and B, ip:port each")
    parser.add_argument("--calls", type=int, default=12, help="calls per phase")
    args = parser.parse_args()
    why = why_unusable()
    if why:
        print(f"scale-demo: cannot run: {why}", file=sys.stderr)
        return 2
    prefix, _ = find_prefix()
    (a_ip, a_port), (b_ip, b_port) = (address(n) for n in args.nodes.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="forkbridge-scale-"))
    print(f"scale-demo: Kamailio on {args.proxy[0]}:{args.proxy[1]}, node A {a_ip}:{a_port}, node B {b_ip}:{b_port}"
          f" (FreeSWITCH {prefix}); logs in {workdir}", flush=True)
    phases: list[Phase] = []
    with running_cluster(workdir, prefix, args.proxy, [("A", a_ip, a_port), ("B", b_ip, b_port)],
                         ping_interval=1, fr_timer_ms=1000, orphan_timeout=f"{ORPHAN_TIMEOUT_S}s") as cluster:
        a, b = cluster.nodes
        print("scale-demo: both nodes active in the dispatcher (OPTIONS every 1 s); round-robin", flush=True)
        steps = [lambda: spread(cluster, calls=args.calls),
                 lambda: drain(cluster, a, calls=args.calls, after=6),
                 lambda: node_loss(cluster, b, calls=args.calls),
                 lambda: daemon_loss(cluster, a, ORPHAN_TIMEOUT_S, calls=max(4, args.calls // 2))]
        for step in steps:
            t0 = time.monotonic()
            phases.append(step())
            report(cluster, phases[-1], time.monotonic() - t0)
        a.start_daemon(f"{ORPHAN_TIMEOUT_S}s")  # the node as it was, for the final count
        for node in cluster.nodes:
            node.wait_no_channels(20)
        print("\nper node, the whole run (callers' view; the daemons' call records in brackets):")
        for node in cluster.nodes:
            calls = [c for p in phases for c in p.load.on(f"{node.ip}:{node.sip_port}")]
            ends = Counter("fallback" if c.fallback else c.end for c in calls)
            outcomes = Counter(r["outcome"] for r in node.records())
            print(f"  node {node.name} ({node.ip}): taken {len(calls)}, completed {ends['completed']}, "
                  f"fallbacks {ends['fallback']}, cut by node loss {ends['lost'] + ends['far_bye']} "
                  f"[records: {dict(outcomes)}]; channels left: {node.channels()}")
    problems = [f"{p.name}: {problem}" for p in phases for problem in p.problems]
    lost = sum(p.load.unanswered() for p in phases)
    print(f"\ncalls placed {sum(p.load.placed for p in phases)}, never answered {lost}")
    if problems:
        print("scale-demo: FAILED\n  " + "\n  ".join(problems))
        return 1
    print("scale-demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
