"""On the real switch: every way a call of ours can go wrong ends in the route's fallback, as the caller hears it.

The fallback prompt is a 500 Hz tone file; the transfer target, extension 7300 of the test switch, plays 1000 Hz
forever. So a caller's recording tells the story by pitch: the prompt, then the operator (or silence and a
hangup). FreeSWITCH's own events say where the channel went (the 7300 extension running, no park), and the
daemon's call record says why. The last scenario kills the daemon outright: FreeSWITCH's own scheduler
(`sched_api`, group `forkbridge-<uuid>`) must then carry the caller to the fallback, and while the daemon lives
that timer must never fire. Between them, a caller's plain hangup must stay a completed call, not a fallback or
a transfer.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from controller.calls import Call
from controller.esl import Event
from fsim.audio import Silence, Tone, write_wav
from tests.harness import SECRET, free_ports, load, metric, running_daemon, wait_until, write_config
from tests.realswitch.caller import Caller, real_calls
from tests.realswitch.heard import Piece, pieces
from tests.realswitch.switch import PASSWORD, REPO, UNTAKEN_AFTER_S, FreeSwitch, Probe

PROMPT_HZ = 500.0
PROMPT_S = 0.8
OPERATOR_HZ = 1000.0  # extension 7300 in the test switch's public context
OPERATOR = "7300 XML public"
OPERATOR_TONE = "tone_stream://%(10000,0,1000)"  # what 7300 plays: its CHANNEL_EXECUTE tells the transfer landed
HZ_TOLERANCE = 15.0
SPLIT_S = 0.015  # the prompt and the operator are one frame or more apart: heard as two pieces
PROMPT_LATENCY_S = 1.0  # failure known → prompt starts (tests separate right from wrong; figures are reported)
ORPHAN_TIMEOUT_S = 10  # the smallest daemon.orphan_timeout the config accepts


# ----------------------------------------------------------------------------------------- what the caller heard


def wall(event: Event) -> float:
    """An event's wall-clock time (FreeSWITCH stamps events in microseconds)."""
    return int(event.get("Event-Date-Timestamp", "0")) / 1e6


def heard_so_far(caller: Caller) -> list[Piece]:
    """What the caller has heard up to now, read from its recording while FreeSWITCH is still writing it (the
    WAV header's sizes are only right once it is closed), so a test can wait on what the caller hears."""
    try:
        raw = caller.recording_path.read_bytes()
    except FileNotFoundError:
        return []
    fmt, data = raw.find(b"fmt "), raw.find(b"data")
    if fmt < 0 or data < 0:
        return []
    channels, rate = struct.unpack_from("<HI", raw, fmt + 10)
    body = raw[data + 8:]
    frame = 2 * channels
    samples = np.frombuffer(body[: len(body) // frame * frame], "<i2").reshape(-1, channels)
    return pieces(samples[:, 0].copy(), rate, SPLIT_S)


def near(piece: Piece, hz: float) -> bool:
    return abs(piece.freq - hz) < HZ_TOLERANCE


def hears_operator(caller: Caller, seconds: float = 0.5) -> bool:
    return any(near(p, OPERATOR_HZ) and p.seconds >= seconds for p in heard_so_far(caller))


def tones(heard: list[Piece], min_s: float = 0.2) -> list[float]:
    """The pitches the caller heard, in order, rounded to 10 Hz (clicks shorter than `min_s` left out)."""
    return [round(p.freq, -1) for p in heard if p.seconds >= min_s]


def operator_runs(caller: Caller) -> Callable[[Event], bool]:
    """Matches the 7300 extension starting its tone on the caller's B leg: the transfer landed."""
    return lambda e: (e.name == "CHANNEL_EXECUTE" and e.uuid == caller.b and e.get("Application") == "playback"
                      and e.get("Application-Data").startswith(OPERATOR_TONE))


def fork_bugs(caller: Caller, name: str) -> list[Event]:
    return [e for e in caller.events(name) if e.get("Media-Bug-Function") == "forkbridge"]


def our_task(probe: Probe, caller: Caller) -> bool:
    return f"forkbridge-{caller.b}" in probe.api("show tasks")


def sched_events(probe: Probe, caller: Caller, name: str) -> list[Event]:
    return [e for e in probe.events if e.name == name and e.get("Task-Group") == f"forkbridge-{caller.b}"]


# ----------------------------------------------------------------------------------------- 1. fallbacks


@dataclass(frozen=True)
class Trouble:
    """One way a call goes wrong, and the route's fallback for it."""

    engine: str  # the echo engine's options (flow mapping)
    reason: str  # what the call record must say
    bridge_down: bool = False  # FreeSWITCH is told to dial a port where nothing listens
    prompt_missing: bool = False
    hangup: bool = False  # fallback: prompt, then hang up (else transfer to the operator)
    stop_fork: bool = False  # FreeSWITCH's side stops the live call's fork (`uuid_audio_fork <uuid> stop <bug>`)


TROUBLES = {
    "engine_refused": Trouble("{type: echo, refuse: true}", "engine_refused"),
    "engine_dropped": Trouble("{type: echo, drop_after_s: 1.5}", "engine_dropped"),
    "fork_failed": Trouble("{type: echo}", "fork_failed", bridge_down=True),
    "fork_stopped": Trouble("{type: echo}", "fork_dropped", stop_fork=True),
    "prompt_missing": Trouble("{type: echo, refuse: true}", "engine_refused", prompt_missing=True),
    "hangup": Trouble("{type: echo, refuse: true}", "engine_refused", hangup=True),
}

ROUTE = """
- name: trouble
  did: "7100"
  engine: bot
  sample_rate: 8000
  playback: broadcast
  no_audio_timeout: 20s
  fallback: {{prompt: "{prompt}", {then}}}
"""


def _fallback_config(tmp_path: Path, switch: FreeSwitch, trouble: Trouble) -> tuple[Path, Path]:
    """The daemon's config for one trouble, and the prompt file it names."""
    prompt = tmp_path / ("no-such-prompt.wav" if trouble.prompt_missing else "sorry.wav")
    if not trouble.prompt_missing:
        write_wav(str(prompt), Tone(PROMPT_HZ, PROMPT_S, 0.3).render(8000), 8000)
    then = "hangup: true" if trouble.hangup else f"transfer: {OPERATOR}"
    extra = f"logging:\n  call_records: {tmp_path / 'calls.jsonl'}\n"
    path = write_config(tmp_path, switch.esl_port, ROUTE.format(prompt=prompt, then=then),
                        engines=f"bot: {trouble.engine}", extra=extra, esl_password=PASSWORD)
    if trouble.bridge_down:  # the bridge listens as usual, FreeSWITCH dials elsewhere
        dead_port = free_ports()[0]
        text = path.read_text().replace("  listen: 127.0.0.1:0\n",
                                        f"  listen: 127.0.0.1:0\n  url: ws://127.0.0.1:{dead_port}\n", 1)
        assert "url: ws://" in text
        path.write_text(text)
    return path, prompt


def _landed_rows(probe: Probe, caller: Caller) -> list[dict[str, str]] | None:
    """`show channels` once it has the B leg at 7300 running playback (None until then)."""
    rows = json.loads(probe.api("show channels as json") or "{}").get("rows") or []
    b_row = next((r for r in rows if r.get("uuid") == caller.b), {})
    return rows if (b_row.get("dest"), b_row.get("application")) == ("7300", "playback") else None


def _mark_wall(call: Call, name: str) -> float:
    """Wall-clock time of the first timeline mark `name` (the record's clock starts at its start_time)."""
    t = next(t for t, n, _d in call.timeline if n == name)
    return call.record.start_time + t


@pytest.mark.parametrize("what", list(TROUBLES))
def test_a_failing_call_ends_in_its_fallback_and_never_stays_parked(tmp_path, drachtio, probe, what):
    """The engine refuses, the engine drops mid-call, the fork cannot connect, FreeSWITCH stops the fork under the
    live call, or the prompt file is missing: the caller hears the prompt (if there is one to hear), then the
    operator, or is hung up; never silence."""
    trouble = TROUBLES[what]
    path, prompt = _fallback_config(tmp_path, drachtio, trouble)
    with running_daemon(load(path)) as daemon:
        # the caller says nothing and stays on the line (its script outlasts the scenario): only we end it
        caller = Caller(drachtio, probe, tmp_path, Silence(20.0), hangs_up=True).dial()
        if trouble.reason in ("engine_dropped", "fork_dropped"):  # the call was up before it went wrong
            caller.wait(lambda e: e.subclass == "mod_audio_fork::connect" and e.uuid == caller.b, 5, "the fork")
        if trouble.stop_fork:
            # once the fork's reader is woken only per piece of audio, the module's close frame comes alone: it
            # must still be answered at once and the caller given the fallback
            ours = wait_until(lambda: daemon.controller.calls.get(caller.b), 5, "the daemon to take the call")
            wait_until(lambda: ours.media is not None and ours.media._wakeups.raised, 5, "audio flowing in pieces")
            assert probe.api(f"uuid_audio_fork {caller.b} stop forkbridge").startswith("+OK")
        if trouble.hangup:
            gone = caller.wait_gone(timeout=PROMPT_S + 5)  # both legs destroyed, long before the caller's script ends
            wait_until(lambda: not our_task(probe, caller), 3, "the hung-up call's timer to be deleted")
        else:
            landed = caller.wait(operator_runs(caller), 5 + PROMPT_S, "the operator extension to run")
            # where every channel is now (FreeSWITCH's channel table lags its events a little): the B leg runs
            # 7300's tone, nothing sits in park
            rows = wait_until(lambda: _landed_rows(probe, caller), 3, "the channel table to show the B leg at 7300")
            assert not [r for r in rows if r.get("application") == "park"], rows
            wait_until(lambda: hears_operator(caller), 5, "the caller to hear the operator")
            # the fork does not follow the caller to the operator, and no timer of ours is left on the call
            assert len(fork_bugs(caller, "MEDIA_BUG_STOP")) == len(fork_bugs(caller, "MEDIA_BUG_START"))
            assert not our_task(probe, caller), probe.api("show tasks")
            caller.hang_up()
            caller.wait_gone()
        call = wait_until(lambda: next((c for c in daemon.ended_calls if c.uuid == caller.b), None), 10,
                          "the daemon to record the call")
    rec = caller.recording()
    heard = rec.heard(join_s=SPLIT_S)
    pitches = tones(heard)

    # why, in the daemon's own words: the call and its written record
    outcome = "fallback_hangup" if trouble.hangup else "fallback_transfer"
    assert (call.outcome, call.end_reason) == (outcome, trouble.reason), call.timeline
    records = real_calls([json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()])
    assert [(r["uuid"], r["outcome"], r["hangup_cause"]) for r in records] == [(caller.b, outcome, trouble.reason)]
    failed_at = _mark_wall(call, "ending")

    prompt_starts = [e for e in caller.events("PLAYBACK_START") if e.get("Playback-File-Path") == str(prompt)]
    figures = {"answer → failure": failed_at - wall(caller.events("CHANNEL_ANSWER")[0])}
    if trouble.prompt_missing:
        # FreeSWITCH could not play it: logged and skipped, the operator comes at once; only the operator heard
        assert not prompt_starts
        assert any(n == "playback_failed" for _t, n, _d in call.timeline), call.timeline
        assert pitches == [OPERATOR_HZ], [str(p) for p in heard]
        figures["failure → operator runs"] = wall(landed) - failed_at
        assert wall(landed) - failed_at < PROMPT_LATENCY_S, figures
    else:
        assert len(prompt_starts) == 1, caller.playbacks()
        figures["failure → prompt starts"] = wall(prompt_starts[0]) - failed_at
        # (FreeSWITCH stamps events from its 20 ms timer tick: a prompt may seem to start a hair before the failure)
        assert -0.025 <= figures["failure → prompt starts"] < PROMPT_LATENCY_S, figures
        spoken = [p for p in heard if near(p, PROMPT_HZ)]
        assert len(spoken) == 1 and abs(spoken[0].seconds - PROMPT_S) < 0.1, [str(p) for p in heard]
        if trouble.hangup:
            assert pitches == [PROMPT_HZ], [str(p) for p in heard]
            assert gone.get("Hangup-Cause") == "NORMAL_CLEARING"
            prompt_stop = next(e for e in caller.events("PLAYBACK_STOP")
                               if e.get("Playback-File-Path") == str(prompt))
            assert prompt_stop.get("Playback-Status") == "done"  # heard to the end, then hung up
            figures["prompt end → hangup"] = wall(gone) - wall(prompt_stop)
        else:
            assert pitches == [PROMPT_HZ, OPERATOR_HZ], [str(p) for p in heard]
            figures["prompt end → operator heard"] = heard[pitches.index(OPERATOR_HZ)].start - spoken[0].end
            assert figures["prompt end → operator heard"] < PROMPT_LATENCY_S, figures
    if trouble.bridge_down:
        # the first attempt and one retry, then the fallback
        assert [e.subclass for e in caller.events("CUSTOM")].count("mod_audio_fork::connect_failed") == 2
    print(f"\n{what}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in figures.items()))


def test_a_caller_hanging_up_is_a_completed_call_not_a_transfer(tmp_path, drachtio, probe):
    """When the caller hangs up, FreeSWITCH may end the B leg's park (CHANNEL_UNPARK, CHANNEL_EXECUTE_COMPLETE for
    park, `Answer-State: answered`, the number unchanged) before it sends CHANNEL_HANGUP. That is the caller
    leaving, not someone moving the call out of our park: the record must say completed. (A race whose odds vary
    from run to run, from none to every call of six on a loopback caller: six calls make it likely to show.)"""
    route = "- {name: line, did: \"7100\", engine: echo, sample_rate: 8000}"
    extra = f"logging:\n  call_records: {tmp_path / 'calls.jsonl'}\n"
    config = load(write_config(tmp_path, drachtio.esl_port, route, extra=extra, esl_password=PASSWORD))
    with running_daemon(config) as daemon:
        callers = [Caller(drachtio, probe, tmp_path, Silence(1.0), name=f"caller{i}", hangs_up=True).dial()
                   for i in range(6)]
        for caller in callers:
            caller.wait_gone()
        wait_until(lambda: len(daemon.ended_calls) == len(callers), 10, "the daemon to record every call")
    seen = []
    for caller in callers:
        call = next(c for c in daemon.ended_calls if c.uuid == caller.b)
        order = [f"{e.name}{'(park)' if e.get('Application') else ''}({e.get('Answer-State')}, "
                 f"{e.get('Caller-Destination-Number')})" for e in probe.events if e.uuid == caller.b
                 and (e.name == "CHANNEL_HANGUP" or e.get("Application") == "park" and e.name.endswith("_COMPLETE"))]
        seen.append((call.outcome, call.end_reason, " then ".join(order)))
    assert [s[0] for s in seen] == ["completed"] * len(callers), seen


# ----------------------------------------------------------------------------------------- 2. the orphan timer


@contextlib.contextmanager
def daemon_process(tmp_path: Path, switch: FreeSwitch) -> Iterator[subprocess.Popen]:
    """`forkbridge run` as its own process (so it can be SIGKILLed) with the smallest orphan timeout; killed
    by its PID at the end if still running. Its output goes to a file, shown when a test fails."""
    prompt = tmp_path / "sorry.wav"
    write_wav(str(prompt), Tone(PROMPT_HZ, PROMPT_S, 0.3).render(8000), 8000)
    bridge_port, metrics_port = free_ports(2)
    config = tmp_path / "forkbridge.yaml"
    config.write_text(textwrap.dedent(f"""
        esl: {{port: {switch.esl_port}, password: {PASSWORD}, command_timeout: 2s, reconnect_max: 500ms}}
        bridge: {{listen: "127.0.0.1:{bridge_port}", spool_dir: "{tmp_path / 'spool'}", token_secret: {SECRET}}}
        metrics: {{listen: "127.0.0.1:{metrics_port}"}}
        logging: {{call_records: "{tmp_path / 'calls.jsonl'}"}}
        daemon: {{shutdown_grace: 2s, orphan_timeout: {ORPHAN_TIMEOUT_S}s}}
        engines: {{echo: {{type: echo}}}}
        routes:
          - name: line
            did: "7100"
            engine: echo
            sample_rate: 8000
            no_audio_timeout: 60s
            fallback: {{prompt: "{prompt}", transfer: "{OPERATOR}"}}
        """))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    proc.log_path = log_path
    try:
        wait_until(lambda: metric(metrics_port, "forkbridge_esl_connected 1.0") or proc.poll() is not None,
                   20, "the daemon to connect to FreeSWITCH")
        assert proc.poll() is None, log_path.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_killed_daemon_leaves_its_caller_to_freeswitchs_timer_and_a_live_one_never_lets_it_fire(
        tmp_path, drachtio, probe):
    """Two callers on one daemon. The first stays 1.5 orphan timeouts and hangs up: the timer, re-armed
    all along, never fires (nor the dialplan's 10 s one for calls nobody takes: the daemon replaced it), and
    nothing of ours is left scheduled. Then the daemon is SIGKILLed under the second: FreeSWITCH's timer
    transfers that caller to the operator within orphan_timeout (+2 s); and a third caller, answered with no
    daemon at all, is sent there by the timer the dialplan armed before answering."""
    lifetime = 1.5 * ORPHAN_TIMEOUT_S  # four re-arms, and half a timeout past the first one's end
    with daemon_process(tmp_path, drachtio) as proc:
        long = Caller(drachtio, probe, tmp_path, Silence(lifetime), name="long", hangs_up=True).dial()
        orphan = Caller(drachtio, probe, tmp_path, Silence(lifetime + ORPHAN_TIMEOUT_S + 15), name="orphan",
                        hangs_up=True).dial()
        for caller in (long, orphan):
            caller.wait(lambda e, c=caller: e.subclass == "mod_audio_fork::connect" and e.uuid == c.b, 5,
                        "the fork to connect")

        # the long call: up well past the timeout with the daemon alive, then the caller hangs up
        long.wait_gone(timeout=lifetime + 5)
        wait_until(lambda: not our_task(probe, long), 5, "the ended call's timer to be deleted")
        assert not probe.find(operator_runs(long)) and not probe.find(operator_runs(orphan)), "transferred"
        # no transfer: the B legs never left 7100 (a hangup may unpark a leg too, but never moves it)
        assert not [e for e in probe.events if e.name == "CHANNEL_UNPARK" and e.uuid in (long.b, orphan.b)
                    and e.get("Caller-Destination-Number") != "7100"]
        armed = sched_events(probe, long, "ADD_SCHEDULE")
        assert len(armed) >= 4, f"the timer was armed {len(armed)} time(s) in {lifetime}s"  # every timeout/3
        assert our_task(probe, orphan), probe.api("show tasks")

        # the daemon dies with the second caller parked on our fork
        last = sched_events(probe, orphan, "ADD_SCHEDULE")[-1]
        last_arm, runs_at = wall(last), int(last.get("Task-Runtime"))
        proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        proc.wait(10)
        # a caller answered now is taken by nobody: the dialplan's own timer (10 s here) sends it on
        untaken = Caller(drachtio, probe, tmp_path, Silence(UNTAKEN_AFTER_S + 15), name="untaken",
                         hangs_up=True).dial()
        wait_until(lambda: our_task(probe, untaken), 5, "the dialplan's timer to be armed")
        # the timer's uuid_transfer: the B leg leaves our park for 7300 (FreeSWITCH sends no EXE_SCHEDULE event)
        fired = orphan.wait(lambda e: e.name == "CHANNEL_UNPARK" and e.uuid == orphan.b
                            and e.get("Caller-Destination-Number") == "7300", ORPHAN_TIMEOUT_S + 4,
                            "the orphan timer to transfer the call")
        landed = orphan.wait(operator_runs(orphan), 3, "the operator extension to run")
        wait_until(lambda: hears_operator(orphan), 5, "the orphaned caller to hear the operator")
        assert not our_task(probe, orphan), probe.api("show tasks")  # it ran once and is gone
        orphan.hang_up()
        orphan.wait_gone()
        untaken.wait(lambda e: e.name == "CHANNEL_UNPARK" and e.uuid == untaken.b
                     and e.get("Caller-Destination-Number") == "7300", UNTAKEN_AFTER_S + 5, "the dialplan's timer")
        wait_until(lambda: hears_operator(untaken), 5, "the untaken caller to hear the operator")
        untaken.hang_up()
        untaken.wait_gone()
        daemon_log = proc.log_path.read_text()

    long_heard = long.recording().heard(join_s=SPLIT_S)
    assert not [p for p in long_heard if near(p, OPERATOR_HZ)], [str(p) for p in long_heard]

    rec = orphan.recording()
    heard = rec.heard(join_s=SPLIT_S)
    operator = next(p for p in heard if near(p, OPERATOR_HZ) and p.seconds >= 0.5)
    assert not [p for p in heard if near(p, OPERATOR_HZ) and p.start < orphan.at(killed_at)], "before the kill"
    heard_after = operator.start - orphan.at(killed_at)
    print(f"\norphan: kill → timer fires {wall(fired) - killed_at:.2f} s, → 7300 runs {wall(landed) - killed_at:.2f} s,"
          f" → caller hears 1000 Hz {heard_after:.2f} s (timer last armed {killed_at - last_arm:.2f} s before "
          f"the kill; the long call's timer armed {len(armed)} times)")
    # FreeSWITCH's own clock for the transfer; the recording's (aligned at the call's start, and a few frames
    # short by now) for what the caller heard
    assert wall(landed) - killed_at <= ORPHAN_TIMEOUT_S + 2, wall(landed) - killed_at
    assert heard_after <= ORPHAN_TIMEOUT_S + 2, heard_after
    # what fired was the timer armed last, when it said it would (Task-Runtime: whole epoch seconds)
    assert abs(wall(fired) - runs_at) < 1.5, (wall(fired), runs_at)
    # the killed daemon wrote nothing for the orphan (its outcome for the long call: see the hang-up test above)
    records = real_calls([json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()])
    assert [r["uuid"] for r in records] == [long.b], daemon_log[-2000:]


