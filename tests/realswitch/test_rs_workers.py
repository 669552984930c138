"""On the real switch: `forkbridge run` with `daemon.workers: 2`, four echo calls at once.

Each caller says a 440 Hz tone and must hear it back (judged from a recording of the caller's leg); the calls are
taken by the worker their B-leg uuid hashes to, and both workers take some. SIGTERM then stops the parent and both
workers, exit 0.
"""

from __future__ import annotations

import re
import signal
import textwrap

from controller.shard import owner
from fsim.audio import Silence, Tone
from tests.harness import SECRET, free_ports, wait_until
from tests.realswitch.caller import Caller, wait_no_channels
from tests.realswitch.switch import PASSWORD
from tests.test_workers import start_node, stop_node

PER_WORKER = 2


def test_four_echo_calls_on_two_workers_each_hear_their_reply(tmp_path, drachtio, probe):
    metrics_port = free_ports()[0]
    config = tmp_path / "forkbridge.yaml"
    config.write_text(textwrap.dedent(f"""
        esl: {{port: {drachtio.esl_port}, password: {PASSWORD}, command_timeout: 2s, reconnect_max: 1s}}
        bridge: {{listen: "127.0.0.1:0", spool_dir: "{tmp_path / 'spool'}", token_secret: {SECRET}}}
        metrics: {{listen: "127.0.0.1:{metrics_port}"}}
        daemon: {{shutdown_grace: 2s, workers: 2}}
        engines: {{echo: {{type: echo}}}}
        routes:
          - {{name: line-check, did: "7100", engine: echo, sample_rate: 8000, no_audio_timeout: 20s}}
        """))
    node = start_node(config, metrics_port, 0)
    try:
        wait_until(lambda: node.get("/readyz")[0] == 200, 30, "both workers ready")
        # FreeSWITCH picks the B-leg uuids: dial until each worker owns two live calls; the extras go at once
        callers: dict[int, list[Caller]] = {0: [], 1: []}
        for i in range(16):
            if min(len(c) for c in callers.values()) >= PER_WORKER:
                break
            caller = Caller(drachtio, probe, tmp_path, Tone(440, 1.0, 0.3) + Silence(6.0), name=f"caller{i}").dial()
            mine = callers[owner(caller.b, 2)]
            if len(mine) < PER_WORKER:
                mine.append(caller)
            else:
                caller.hang_up()
                caller.wait_gone()
        everyone = callers[0] + callers[1]
        assert len(everyone) == 2 * PER_WORKER, "crc32 never gave both workers two calls in 16 dials"
        for caller in everyone:  # the echo (one spooled chunk in broadcast mode) has played out
            caller.wait(lambda e, c=caller: e.name == "PLAYBACK_STOP" and e.uuid == c.b
                        and "/spool/" in e.get("Playback-File-Path"), 15, "the echo played to the caller")
        for caller in everyone:
            caller.hang_up()
            caller.wait_gone()
        for caller in everyone:
            heard = caller.recording().heard()
            assert len(heard) == 1 and abs(heard[0].freq - 440) < 15, [str(p) for p in heard]
        log_text = node.log.read_text()
        for k, mine in callers.items():
            for caller in mine:  # taken by the worker that owns it, and by that one only
                taken = re.findall(rf"answered: ours.*\[uuid={caller.b} .*worker=(\d)\]", log_text)
                assert taken == [str(k)], (caller.b, taken)
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=30) == 0
    finally:
        stop_node(node)
    wait_no_channels(probe)
