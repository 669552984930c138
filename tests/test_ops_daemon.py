"""The daemon as systemd runs it: a subprocess with secrets only in its environment, against fsim on loopback.

One call to a routed DID (echo engine), then SIGTERM. What an operator relies on is checked from the outside:
/readyz and /metrics while it runs, sd_notify READY=1/STOPPING=1, exit code 0, every call log line carrying the
call's uuid and DID (text and json formats), one call record per call, and no secret anywhere in its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fsim import CallerScript, FSim, Silence, Tone
from tests.harness import free_ports

REPO = Path(__file__).resolve().parent.parent
DID = "15557654321"
# Distinct, long enough to be registered for redaction (>= 6 chars), and unlikely to occur by chance.
SECRETS = {
    "ESL_PW": "esl-pw-5c1f0e9a7b3d",
    "TOKEN_SECRET": "token-secret-8e2a4c6f0b1d3957",
    "OPENAI_API_KEY": "sk-test-0f9e8d7c6b5a4321",
    "MODEL_TOKEN": "model-token-a1b2c3d4e5",
}
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", *SECRETS)
_LEAK_LINE = re.compile(r"^(nanobind: |See https://nanobind|\s+- (leaked|\.\.\. skipped))")


def write_config(tmp_path: Path, esl_port: int, bridge_port: int, metrics_port: int, fmt: str) -> Path:
    text = f"""
    esl:
      port: {esl_port}
      password: ${{ESL_PW}}
      command_timeout: 2s
      reconnect_max: 500ms
    bridge:
      listen: 127.0.0.1:{bridge_port}
      spool_dir: {tmp_path / "spool"}
      token_secret: ${{TOKEN_SECRET}}
    metrics:
      listen: 127.0.0.1:{metrics_port}
    logging:
      level: info
      format: {fmt}
      call_records: {tmp_path / "records" / "calls.jsonl"}
    daemon:
      shutdown_grace: 2s
    engines:
      echo:
        type: echo
      openai:
        type: openai_realtime
        api_key: ${{OPENAI_API_KEY}}
        url: ws://127.0.0.1:9/v1/realtime
      own-model:
        type: generic
        url: ws://127.0.0.1:9/v1/call
        token: ${{MODEL_TOKEN}}
    routes:
      - name: line-check
        did: "{DID}"
        engine: echo
        sample_rate: 8000
        no_audio_timeout: 5s
      - name: front-desk
        did: "7100"
        engine: openai
      - name: own
        did: "7200"
        engine: own-model
    """
    path = tmp_path / "forkbridge.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def http_get(url: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def wait_until(predicate: Callable[[], object], proc: subprocess.Popen | None, timeout: float, what: str) -> object:
    """Poll until truthy; fail early if the daemon (when given) exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} while waiting for {what}")
        gevent.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sample_values(exposition: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(exposition)
            for s in family.samples if s.name == name]


class NotifyListener:
    """A fake $NOTIFY_SOCKET: collects the datagrams the daemon sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def index(self, field: str) -> int | None:
        return next((i for i, m in enumerate(self.messages) if field in m.split("\n")), None)

    def close(self) -> None:
        self._reader.kill(block=True, timeout=2)
        self.sock.close()


def stop_process(proc: subprocess.Popen) -> None:
    """Last resort for a daemon a failed test left running: by its own pid only."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_daemon_subprocess_one_call(tmp_path: Path, fmt: str) -> None:
    esl_port, bridge_port, metrics_port = free_ports(3)
    config = write_config(tmp_path, esl_port, bridge_port, metrics_port, fmt)
    config_text = config.read_text()
    assert not any(value in config_text for value in SECRETS.values()), "secrets must come from the environment"
    base = f"http://127.0.0.1:{metrics_port}"
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(SECRETS, NOTIFY_SOCKET=notify.path, PYTHONUNBUFFERED="1")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    sw: FSim | None = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        # FreeSWITCH is not up yet: alive, but not ready, and systemd is not told READY.
        wait_until(lambda: http_get(base + "/healthz")[0] == 200, proc, 20, "/healthz")
        status, body = http_get(base + "/readyz")
        assert status == 503 and "ESL not connected" in body
        assert notify.index("READY=1") is None

        sw = FSim(esl_port=esl_port, password=SECRETS["ESL_PW"])
        sw.start()
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, proc, 10, "/readyz 200 once ESL is up")
        wait_until(lambda: notify.index("READY=1") is not None, proc, 5, "READY=1")
        assert notify.index("STOPPING=1") is None

        metrics = http_get(base + "/metrics")[1]
        assert sample_values(metrics, "forkbridge_esl_connected") == [({}, 1.0)]
        assert sum(v for _, v in sample_values(metrics, "forkbridge_calls_total")) == 0

        script = CallerScript(audio=Tone(440, 1.0) + Silence(3.0), hangup_after=4.0)
        call = sw.place_call(did=DID, caller_id="+15551230000", script=script, rate=8000)
        assert call.wait_answered(5)
        sw.wait_for(lambda: call.fork, timeout=5)
        assert call.fork.wait_connected(5), "mod_audio_fork never reached the bridge"
        fork_token = re.search(r"[?&]token=([^&\s]+)", call.fork.url).group(1)
        wait_until(lambda: call.ear.heard_seconds("broadcast:") >= 0.3, proc, 8, "the echo to be heard")
        assert call.wait_hangup(10)

        def finished() -> str | None:
            text = http_get(base + "/metrics")[1]
            return text if sum(v for _, v in sample_values(text, "forkbridge_calls_total")) >= 1 else None

        metrics = str(wait_until(finished, proc, 10, "forkbridge_calls_total after the call"))
        totals = {labels["outcome"]: v for labels, v in sample_values(metrics, "forkbridge_calls_total")
                  if labels["route"] == "line-check"}
        assert sum(totals.values()) == 1 and totals["completed"] + totals["fallback_hangup"] == 1
        assert sample_values(metrics, "forkbridge_calls_active") and all(
            v == 0 for _, v in sample_values(metrics, "forkbridge_calls_active"))
        assert sample_values(metrics, "forkbridge_dtmf_digits_total")  # declared per route before any digit

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        assert rc == 0, f"exit code {rc}"
        wait_until(lambda: notify.index("STOPPING=1") is not None, None, 5, "STOPPING=1")
        assert notify.index("READY=1") < notify.index("STOPPING=1")
    finally:
        stop_process(proc)
        notify.close()
        if sw is not None:
            sw.stop()

    stdout, stderr = out_path.read_text(), err_path.read_text()
    records_path = tmp_path / "records" / "calls.jsonl"
    records_text = records_path.read_text()

    # ---- no secret anywhere: not the env values, not the per-call token, no token=<value>
    for where, text in (("stdout", stdout), ("stderr", stderr), ("call records", records_text),
                        ("/metrics", metrics)):
        for name, value in SECRETS.items():
            assert value not in text, f"{name} leaked into {where}"
        assert fork_token not in text, f"the call's WebSocket token leaked into {where}"
        assert not re.search(r"token=(?!\*\*\*)", text), f"an unmasked token= in {where}"

    # ---- logs: the format asked for, and every call line carries the uuid and DID
    log_lines = [line for line in stderr.splitlines() if line.strip() and not _LEAK_LINE.match(line)]
    assert log_lines, "the daemon logged nothing"
    call_lines = []
    for line in log_lines:
        if fmt == "json":
            doc = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(doc), line
            if "uuid" in doc or call.uuid in line or doc["logger"] == "forkbridge.call":
                assert doc.get("uuid") == call.uuid and doc.get("did") == DID, f"call line without uuid/DID: {line}"
                call_lines.append(doc["msg"])
        else:
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} [A-Z]+ [\w.]+: ", line), line
            if call.uuid in line or " forkbridge.call: " in line:
                assert f"[uuid={call.uuid} did={DID}" in line, f"call line without uuid/DID: {line}"
                call_lines.append(line)
    assert any("answered" in line for line in call_lines), call_lines
    assert any("ended" in line for line in call_lines), call_lines

    # ---- the call record: one line for the call, with outcome, timeline and latencies
    records = [json.loads(line) for line in records_text.splitlines()]
    assert [r["uuid"] for r in records] == [call.uuid]
    record = records[0]
    assert record["did"] == DID and record["route"] == "line-check" and record["engine"] == "echo"
    assert record["caller_id"] == "+15551230000"
    assert record["start"] and record["answer"] and record["end"] and record["duration"] > 0
    names = [name for _t, name, _detail in record["timeline"]]
    assert names[0] == "answered" and names[-1] == "end"
    assert {"fork_start", "fork_connected", "first_caller_audio", "hangup"} <= set(names)
    times = [t for t, _name, _detail in record["timeline"]]
    assert times == sorted(times)
    assert record["latencies"].get("first_audio"), record["latencies"]

    # stderr holds nothing but log lines (json: one object per line), even after "stopped"
    stray = [line for line in stderr.splitlines() if _LEAK_LINE.match(line)]
    assert not stray, stray[:3]
    # a caller hanging up is a completed call, not a fallback
    assert record["outcome"] == "completed", record["outcome"]
    assert totals["completed"] == 1


def test_a_restarted_daemon_removes_the_audio_files_a_crash_left_and_nothing_else(tmp_path):
    """Chunks and growing native files of calls a killed daemon was playing are removed at the next start (no call
    of ours can play them any more); other files in the spool are not ours to touch. A worker removes only its
    own calls' files: the other workers' calls are still playing theirs."""
    from controller.daemon import Daemon
    from controller.shard import Shard, owner
    from tests.harness import load, write_config

    config = load(write_config(tmp_path, free_ports()[0], '- did: "7100"\n  engine: echo\n'))
    spool = Path(config.bridge.spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    uuids = [f"0c5e9a52-1d7e-4c61-9a3e-7f1b2c3d4e{i:02d}" for i in range(8)]
    left = [f"{u}-00001{ext}" for u, ext in zip(uuids, [".r8", ".r16", ".L16", ".PCMU", ".PCMA"] * 2, strict=False)]
    for name in [*left, "operator-greeting.wav", "notes.txt"]:
        (spool / name).write_bytes(b"\0" * 320)
    worker = Shard(1, 2)
    Daemon(config, worker)._clean_spool()
    mine = {n for n in left if owner(n.rsplit("-", 1)[0], 2) == 1}
    assert mine and mine != set(left)  # the sample has files of both workers
    assert sorted(os.listdir(spool)) == sorted(set(left) - mine | {"operator-greeting.wav", "notes.txt"})
    Daemon(config)._clean_spool()  # a single daemon owns every call
    assert sorted(os.listdir(spool)) == ["notes.txt", "operator-greeting.wav"]
