"""`make demo`: one whole simulated call through the real daemon, with its timeline and latencies.

fsim (the FreeSWITCH simulator) runs in this process; the daemon runs as its own process (`forkbridge run`)
with the echo engine in broadcast mode, everything on 127.0.0.1. The caller speaks, hears themself echoed,
talks over the echo, presses 1 2 #, and hangs up. The timeline comes from the daemon's call record and from
what fsim's caller actually heard. Exits 1 if the call did not go as scripted.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fsim import CallerScript, FSim, Silence, Tone  # noqa: E402

DID = "7100"
SCRIPT = CallerScript(audio=Tone(440, 1.0) + Silence(1.3) + Tone(660, 0.8) + Silence(10.0),
                      dtmf=[("1", 6.0), ("2", 6.4), ("#", 6.8)], hangup_after=9.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        gevent.sleep(0.05)
    raise SystemExit(f"demo: FAILED: no {what} within {timeout:.0f}s")


def esl_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def config_text(work: Path, esl_port: int, metrics_port: int) -> str:
    return textwrap.dedent(f"""
        esl: {{port: {esl_port}, password: ClueCon}}
        bridge: {{listen: "127.0.0.1:{free_port()}", spool_dir: "{work / 'spool'}",
                  token_secret: demo-secret-not-for-production}}
        metrics: {{listen: "127.0.0.1:{metrics_port}"}}
        logging: {{level: warning, call_records: "{work / 'calls.jsonl'}"}}
        engines: {{echo: {{type: echo}}}}
        routes:
          - did: "{DID}"
            engine: echo
            sample_rate: 16000
            playback: broadcast
            dtmf: collect
            fallback: hangup
        """)


def timeline(record: dict, heard_t0: float, segments: list, answered_at: float) -> list[tuple[float, str]]:
    marks = {}
    for t, name, detail in record["timeline"]:
        marks.setdefault(name, (t, detail))
    rows: list[tuple[float, str]] = []

    def add(name: str, label: str) -> None:
        if name in marks:
            rows.append((marks[name][0], label))

    add("answered", f"answered, DID {record['did']}, route {record['route']}")
    add("fork_start", "uuid_audio_fork sent (bgapi)")
    add("fork_connected", "fork connected to the bridge")
    add("first_caller_audio", "first caller audio at the bridge")
    add("speech_stopped", "caller stopped speaking (engine VAD)")
    add("engine_first_audio", "engine's first audio")
    add("caller_heard", "caller first heard the reply (PLAYBACK_START)")
    if segments:
        first = segments[0]
        rows.append((first.start - answered_at, f"fsim: caller's ear hears {first.frequency():.0f} Hz"))
    add("barge_in", "barge-in: caller spoke over the reply → uuid_break all")
    for seg in segments:
        if seg.status == "break":
            rows.append((seg.end - answered_at, "fsim: playback stopped (Playback-Status: break)"))
            break
    for t, name, detail in record["timeline"]:
        if name == "dtmf":
            rows.append((t, f"DTMF {detail['digit']}"))
        if name == "dtmf_to_engine":
            rows.append((t, f"digits sent to the engine as text: {detail['text']!r}"))
    add("hangup", f"hangup ({record['hangup_cause'] or 'caller'})")
    return sorted(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="forkbridge-demo-"))
    metrics_port = free_port()
    with FSim(spool_dir=str(work / "spool")) as sw:
        config = work / "forkbridge.yaml"
        config.write_text(config_text(work, sw.esl_port, metrics_port))
        print(f"demo: fsim (FreeSWITCH simulator) ESL on 127.0.0.1:{sw.esl_port}; starting forkbridge")
        daemon = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            wait_for(lambda: esl_up(metrics_port), 20, "daemon readiness (/readyz)")
            print(f"demo: daemon ready; calling DID {DID}: speak 440 Hz, talk over the echo at 660 Hz, "
                  "press 1 2 #, hang up\n")
            call = sw.place_call(did=DID, script=SCRIPT, rate=8000)  # a PSTN leg: PCMU, forked at 16 kHz
            wait_for(lambda: call.hungup.is_set(), 20, "hangup")
            records = work / "calls.jsonl"
            wait_for(lambda: records.exists() and records.read_text().strip(), 10, "call record")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    record = json.loads(records.read_text().splitlines()[-1])
    segments = call.ear.broadcasts()
    answered_at = call.t_answer or 0.0
    print(f"{'t (s)':>7}  event")
    for t, label in timeline(record, answered_at, segments, answered_at):
        print(f"{t:7.3f}  {label}")
    lat = record.get("latencies", {})
    print("\nlatencies:")
    for kind, label in (("first_audio", "caller stops speaking → hears the reply"),
                        ("playout", "engine's first audio → caller hears it"),
                        ("bargein_stop", "barge-in signal → stop sent")):
        values = ", ".join(f"{v * 1000:.0f} ms" for v in lat.get(kind, [])) or "n/a"
        print(f"  {label:42s} {values}")
    print(f"\noutcome: {record['outcome']}; DTMF {''.join(d['digit'] for d in record['dtmf'])}; "
          f"caller heard {call.ear.heard_seconds('broadcast:'):.2f}s of audio in {len(segments)} file(s)")
    return check(record, segments)


def check(record: dict, segments: list) -> int:
    names = [name for _, name, _ in record["timeline"]]
    problems = []
    if not segments or abs(segments[0].frequency() - 440) > 15:
        problems.append("the caller did not hear their 440 Hz tone echoed")
    if "barge_in" not in names or not any(s.status == "break" for s in segments):
        problems.append("talking over the echo did not stop it")
    texts = [d.get("text") for _, n, d in record["timeline"] if n == "dtmf_to_engine"]
    if texts != ["12"]:
        problems.append(f"digits 1 2 # did not reach the engine as one message (got {texts})")
    if record["outcome"] != "completed":
        problems.append(f"the call ended as {record['outcome']}, not completed")
    for problem in problems:
        print(f"demo: FAILED: {problem}")
    if not problems:
        print("demo: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
