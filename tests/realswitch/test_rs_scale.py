"""Scale-out on the real parts: Kamailio's dispatcher (deploy/scale/kamailio.cfg) in front of two FreeSWITCH +
forkbridge nodes (deploy's SIP profile and YAML), SIPp callers through the proxy, one node drained mid-load.

The small version of `make scale-demo`: 10 calls spread over both nodes; after the third is answered node A is
drained (`dispatcher.set_state d`), its daemon SIGTERMed once its forkbridge_calls_active is 0. No call may reach
A after the drain, none may be cut, every call completes, no channel is left. Skipped, loudly, without kamailio,
sipp (as root) or a FreeSWITCH; under CI (`make test` installs kamailio) it must run.
"""

from __future__ import annotations

import pytest

from tests.harness import wait_until
from tests.realswitch.cluster import free_sip_port, running_cluster, why_unusable
from tests.realswitch.scaleout import drain
from tests.realswitch.switch import find_prefix, must_run


@pytest.fixture
def cluster(tmp_path):
    why = why_unusable()
    if why:
        if must_run():
            pytest.fail(f"the scale-out scenario must run under CI, but: {why}", pytrace=False)
        pytest.skip(f"SCALE-OUT (KAMAILIO) SCENARIO SKIPPED: {why}")
    prefix, _ = find_prefix()
    proxy = ("127.0.0.1", free_sip_port("127.0.0.1"))
    nodes = [("A", "127.0.0.2", free_sip_port("127.0.0.2")), ("B", "127.0.0.3", free_sip_port("127.0.0.3"))]
    with running_cluster(tmp_path, prefix, proxy, nodes, ping_interval=1, fr_timer_ms=1000) as running:
        yield running


@pytest.mark.timeout(120)
def test_calls_spread_over_two_nodes_and_a_drain_cuts_no_live_call(cluster):
    a, b = cluster.nodes
    phase = drain(cluster, a, calls=10, rate=2.0, talk_s=4.0, after=3, restore=False)
    print("\n" + "\n".join(phase.notes))
    assert not phase.problems, (phase.problems, phase.load.output[-2000:])
    taken = {node.name: len(phase.load.on(f"{node.ip}:{node.sip_port}")) for node in cluster.nodes}
    assert taken["A"] >= 1 and taken["B"] >= 1 and sum(taken.values()) == 10, taken
    assert phase.load.count("completed") == 10
    for node in cluster.nodes:
        node.wait_no_channels(10)
    # the daemons' own view: every call they took completed, none fell back (B may write its last record a
    # moment after its caller saw the 200 to the BYE)
    wait_until(lambda: len(a.records() + b.records()) == 10, 5, "a call record per call")
    assert {r["outcome"] for r in a.records() + b.records()} == {"completed"}, a.records() + b.records()
