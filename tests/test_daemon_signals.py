"""`forkbridge run` as a process: SIGTERM drains live calls into their fallback and exits 0; SIGHUP reroutes
new calls only, and a broken file keeps the running routes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fsim import CallerScript, FSim, SpeechLike
from fsim.audio import write_wav
from tests.harness import SECRET, free_ports, metric, wait_until

TALKING = CallerScript(audio=SpeechLike(bursts=20), hangup_after=30.0)


def write_config(tmp_path: Path, esl_port: int, metrics_port: int, dids: str, orphan_timeout: str = "60s") -> Path:
    prompt = tmp_path / "hold.wav"
    write_wav(str(prompt), np.zeros(4000, np.int16), 8000)
    path = tmp_path / "forkbridge.yaml"
    path.write_text(textwrap.dedent(f"""
        esl: {{port: {esl_port}, password: ClueCon, command_timeout: 2s, reconnect_max: 500ms}}
        bridge: {{listen: "127.0.0.1:{free_ports()[0]}", spool_dir: "{tmp_path / 'spool'}", token_secret: {SECRET}}}
        metrics: {{listen: "127.0.0.1:{metrics_port}"}}
        daemon: {{shutdown_grace: 2s, orphan_timeout: {orphan_timeout}}}
        engines: {{echo: {{type: echo}}}}
        routes:
          - did: {dids}
            engine: echo
            fallback: {{prompt: "{prompt}", transfer: "1000 XML default"}}
        """))
    return path


@contextlib.contextmanager
def daemon_process(config: Path, metrics_port: int) -> Iterator[subprocess.Popen]:
    """The daemon as its own process; its output goes to a file (`proc.log_path`) so it can never block."""
    log_path = config.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    try:
        wait_until(lambda: metric(metrics_port, "forkbridge_esl_connected 1.0"), timeout=20,
                   what="the daemon to connect to fsim")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def forked(call) -> bool:
    return call.fork is not None and call.fork.connected.is_set()


def test_sigterm_drains_live_calls_into_their_fallback_and_exits_0(tmp_path):
    port = free_ports()[0]
    with FSim() as sw, daemon_process(write_config(tmp_path, sw.esl_port, port, '"7100"'), port) as proc:
        live = sw.place_call(did="7100", script=TALKING)
        wait_until(lambda: forked(live), what="the live call's fork")
        proc.send_signal(signal.SIGTERM)
        late = sw.place_call(did="7100", script=TALKING)  # answered while draining: straight to the fallback
        wait_until(lambda: late.transferred_to, timeout=10, what="the late call's fallback")
        assert not [c for c in sw.commands_for(late.uuid) if c.command == "uuid_audio_fork" and "start" in c.args]
        wait_until(lambda: live.transferred_to, timeout=15, what="the live call's fallback after the grace period")
        assert live.transferred_to.startswith("1000") and live.hangup_cause is None
        assert proc.wait(timeout=20) == 0
        assert "fallback (shutting_down)" in proc.log_path.read_text()


def test_sighup_reroutes_new_calls_only_and_a_broken_file_keeps_the_routes(tmp_path):
    port = free_ports()[0]
    with FSim() as sw:
        config = write_config(tmp_path, sw.esl_port, port, '"7100"')
        with daemon_process(config, port) as proc:
            before = sw.place_call(did="7100", script=TALKING)
            wait_until(lambda: forked(before), what="the first call's fork")

            config.write_text(config.read_text().replace('did: "7100"', 'did: "7200"'))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: metric(port, 'forkbridge_config_reloads_total{result="ok"} 1.0'), what="the reload")
            moved = sw.place_call(did="7200", script=TALKING)
            old = sw.place_call(did="7100", script=TALKING)
            wait_until(lambda: forked(moved), what="a call to the new DID to be forked")
            # no longer routed, but the dialplan still marks it: not forked, given defaults' fallback (a hangup)
            assert old.wait_hangup(5)
            assert not [c for c in sw.commands_for(old.uuid) if c.command == "uuid_audio_fork"]
            assert forked(before) and before.transferred_to is None  # the live call kept its route

            config.write_text(config.read_text().replace("engine: echo", "engine: nowhere"))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: metric(port, 'forkbridge_config_reloads_total{result="error"} 1.0'),
                       what="the refused reload")
            again = sw.place_call(did="7200", script=TALKING)
            wait_until(lambda: forked(again), what="the old routes to still work")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            output = proc.log_path.read_text()
        assert "reload refused" in output and "engine 'nowhere' is not defined" in output


def test_a_daemon_killed_mid_call_does_not_leave_its_caller_parked(tmp_path):
    port = free_ports()[0]
    with FSim() as sw:
        config = write_config(tmp_path, sw.esl_port, port, '"7100"', orphan_timeout="10s")
        with daemon_process(config, port) as proc:
            done = sw.place_call(did="7100", script=CallerScript(audio=SpeechLike(bursts=2), hangup_after=3.0))
            orphan = sw.place_call(did="7100", script=TALKING)
            wait_until(lambda: forked(orphan) and done.hungup.is_set(), what="one call up, one call over")
            wait_until(lambda: all(group != f"forkbridge-{done.uuid}" for group, _t in sw.tasks.values()),
                       what="the finished call's timer to be deleted")
            proc.kill()  # no drain, no fallback from the daemon
            proc.wait(timeout=10)
        # FreeSWITCH's own scheduler runs the route's fallback once the daemon stops vouching for the call
        wait_until(lambda: orphan.transferred_to, timeout=20, what="the orphaned call's fallback transfer")
        assert orphan.transferred_to.startswith("1000")


def test_a_call_no_daemon_takes_is_sent_on_by_the_dialplans_timer_and_a_taken_one_never(tmp_path):
    """dialplan/forkbridge.xml arms a timer before it answers (group forkbridge-<uuid>): a caller nobody takes
    (the daemon down, or the worker that owns the call) is transferred by FreeSWITCH itself. The daemon replaces
    that timer when it takes a call, and deletes it when orphan_timeout is 0 (no safety net wanted)."""
    untaken = {"forkbridge_untaken_after": "2", "forkbridge_untaken_to": "7300 XML public"}
    short = CallerScript(audio=SpeechLike(bursts=4), hangup_after=3.5)
    with FSim(dialplan_vars=untaken) as sw:
        nobodys = sw.place_call(did="7100", script=TALKING)  # no daemon at all yet
        wait_until(lambda: nobodys.transferred_to, timeout=10, what="the untaken call's transfer")
        assert nobodys.transferred_to.startswith("7300")
        for orphan_timeout in ("10s", "0"):
            port = free_ports()[0]
            config = write_config(tmp_path, sw.esl_port, port, '"7100"', orphan_timeout=orphan_timeout)
            with daemon_process(config, port):
                taken = sw.place_call(did="7100", script=short)
                wait_until(lambda c=taken: forked(c), what="the daemon to take the call")
                assert taken.wait_hangup(10)  # past the dialplan's 2 s: the caller hung up, nobody moved it
                assert taken.transferred_to is None, orphan_timeout
