"""Campaigns and `forkbridge call`: the command-line client, run as a process, against the daemon on fsim."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.campaign import CampaignError, Hours, parse_rate, read_rows
from controller.config import Config, load_config
from fsim import Callee, CallerScript, FSim, Silence, Tone
from tests.harness import free_ports, running_daemon, wait_until, write_config

REPO = Path(__file__).resolve().parents[1]
TOKEN = "campaign-api-token-0123456789"
ROUTE = """
- name: followup
  did: "7100"
  engine: echo
  sample_rate: 8000
  no_audio_timeout: 5s
  outbound:
    dial: loopback/{to}/public
    allowed: '\\+1555\\d{7}'
    originate_timeout: 2s
    max_concurrent: 10
"""


def numbers(n: int) -> list[str]:
    return [f"+1555000{i:04d}" for i in range(n)]


def callees(n: int, busy_every: int = 0) -> dict[str, Callee]:
    short = CallerScript(audio=Tone(500, 0.3) + Silence(1.0), hangup_after=1.0)
    out = {}
    for i, number in enumerate(numbers(n)):
        busy = busy_every and i % busy_every == busy_every - 1
        out[number] = Callee(cause="USER_BUSY") if busy else Callee(ring_s=0.2, script=short)
    return out


def setup(tmp_path: Path, sw: FSim) -> tuple[Path, int]:
    port = free_ports(1)[0]
    extra = f"api:\n  listen: 127.0.0.1:{port}\n  token: ${{FB_API_TOKEN}}\n"
    return write_config(tmp_path, sw.esl_port, ROUTE, extra=extra), port


def load(path: Path) -> Config:
    return load_config(str(path), env={"FB_API_TOKEN": TOKEN})


def forkbridge(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, FB_API_TOKEN=TOKEN)  # the CLI reads api.token from the same YAML as the daemon
    return subprocess.Popen([sys.executable, "-m", "controller.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("to,context,customer_id\n" + "\n".join(rows) + "\n")
    return path


def max_live_outbound(sw: FSim) -> int:
    """The most outbound channels FreeSWITCH (fsim) had at once, from its own CREATE/HANGUP_COMPLETE events."""
    live = peak = 0
    for event in sw.events_log:
        channel = next((c for c in sw.calls if c.uuid == event.uuid), None)
        if channel is None or channel.direction != "outbound":
            continue
        if event.name == "CHANNEL_CREATE":
            live += 1
            peak = max(peak, live)
        elif event.name == "CHANNEL_HANGUP_COMPLETE":
            live -= 1
    return peak


def originated(sw: FSim) -> list[str]:
    return [c.did for c in sw.calls if c.direction == "outbound"]


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_campaign_of_30_rows_never_has_more_than_5_calls_up(tmp_path):
    with FSim(callees=callees(30, busy_every=6)) as sw:
        config_path, _ = setup(tmp_path, sw)
        with running_daemon(load(config_path)):
            csv_path = write_csv(tmp_path / "list.csv", [f"{n},Your order {i} shipped.,C{i}" for i, n in
                                                         enumerate(numbers(30))])
            proc = forkbridge("campaign", "run", str(csv_path), "--config", str(config_path), "--route", "followup",
                              "--concurrency", "5", "--rate", "50/s")
            code, _, err = finish(proc)
            assert code == 0, err
            assert sorted(originated(sw)) == numbers(30)  # every row once, no more
            assert max_live_outbound(sw) == 5
            lines = results(Path(f"{csv_path}.results.jsonl"))
            assert len(lines) == 30
            outcomes = [line["outcome"] for line in lines]
            assert outcomes.count("busy") == 5 and outcomes.count("answered") == 25
            assert "placed 30 · answered 25 · failed 5 · remaining 0 · live 0" in err
            variables = [c.variables.get("customer_id") for c in sw.calls]
            assert sorted(variables) == sorted(f"C{i}" for i in range(30))


def test_a_campaign_killed_mid_run_resumes_without_calling_a_row_twice(tmp_path):
    with FSim(callees=callees(12)) as sw:
        config_path, _ = setup(tmp_path, sw)
        with running_daemon(load(config_path)):
            csv_path = write_csv(tmp_path / "list.csv", [f"{n},,C{i}" for i, n in enumerate(numbers(12))])
            args = ("campaign", "run", str(csv_path), "--config", str(config_path), "--route", "followup",
                    "--concurrency", "3", "--rate", "20/s")
            journal = Path(f"{csv_path}.results.jsonl.placed")
            first = forkbridge(*args)
            # killed outright while calls are up: placed rows are journaled, their ends were never seen
            wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 5, 20, "5 placements")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            before = len(originated(sw))
            assert 5 <= before < 12
            code, _, err = finish(forkbridge(*args))
            assert code == 0, err
            assert "resuming" in err or before == 0
            assert sorted(originated(sw)) == numbers(12)  # each exactly once across both runs
            lines = results(Path(f"{csv_path}.results.jsonl"))
            assert sorted(line["to"] for line in lines) == numbers(12)
            assert all(line["outcome"] == "answered" for line in lines)
            # a third run finds nothing left to do
            code, _, err = finish(forkbridge(*args))
            assert code == 0 and len(originated(sw)) == 12
            assert "resuming: 12 of 12" in err


def test_ctrl_c_stops_placing_and_lets_live_calls_finish(tmp_path):
    with FSim(callees=callees(10)) as sw:
        config_path, _ = setup(tmp_path, sw)
        with running_daemon(load(config_path)):
            csv_path = write_csv(tmp_path / "list.csv", [f"{n},," for n in numbers(10)])
            proc = forkbridge("campaign", "run", str(csv_path), "--config", str(config_path), "--route", "followup",
                              "--concurrency", "2", "--rate", "20/s")
            journal = Path(f"{csv_path}.results.jsonl.placed")
            wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 3, 20, "3 placements")
            proc.send_signal(signal.SIGINT)
            code, _, err = finish(proc)
            assert code == 0, err
            placed = len(journal.read_text().splitlines())
            assert placed < 10 and "stopping" in err
            lines = results(Path(f"{csv_path}.results.jsonl"))
            assert len(lines) == placed  # every live call was followed to its end
            assert not sw.channels


def test_malformed_rows_are_reported_by_line_and_the_rest_are_called(tmp_path):
    with FSim(callees=callees(3)) as sw:
        config_path, _ = setup(tmp_path, sw)
        with running_daemon(load(config_path)):
            a, b, c = numbers(3)
            csv_path = write_csv(tmp_path / "list.csv", [f"{a},,C1", "not a number,,C2", f"{b},,has space",
                                                         f"{c},,C3,extra", "+4930123456,,C5", f"{b},,C6"])
            code, _, err = finish(forkbridge("campaign", "run", str(csv_path), "--config", str(config_path),
                                             "--route", "followup", "--rate", "20/s"))
            assert code == 0, err
            assert "list.csv:3: 'to' must be a number" in err
            assert "list.csv:4: customer_id" in err
            assert "list.csv:5: more fields" in err
            assert "line 6: +4930123456: refused" in err  # outside outbound.allowed: the daemon refused it
            assert sorted(originated(sw)) == [a, b]
            lines = results(Path(f"{csv_path}.results.jsonl"))
            assert {line["to"]: line["outcome"] for line in lines} == {a: "answered", b: "answered",
                                                                       "+4930123456": "refused"}


def test_forkbridge_call_places_one_call_and_waits_for_its_outcome(tmp_path):
    with FSim(callees=callees(2)) as sw:
        config_path, _ = setup(tmp_path, sw)
        with running_daemon(load(config_path)):
            code, out, err = finish(forkbridge("call", "--config", str(config_path), "--route", "followup",
                                               "--to", numbers(1)[0], "--var", "ticket=T-1", "--wait", "20"))
            assert code == 0, err
            final = json.loads(out.splitlines()[-1])
            assert final["outcome"] == "answered" and final["variables"] == {"ticket": "T-1"}
            code, _, err = finish(forkbridge("call", "--config", str(config_path), "--route", "nope", "--to",
                                             numbers(1)[0]))
            assert code == 1 and "no route named 'nope'" in err
    # the daemon is gone: a clear error, nothing placed
    code, _, err = finish(forkbridge("call", "--config", str(config_path), "--route", "followup", "--to",
                                     numbers(1)[0]))
    assert code == 2 and "not reachable" in err


def test_campaign_arguments_and_files_are_checked(tmp_path):
    assert parse_rate("30/m") == 0.5 and parse_rate("2/s") == 2
    with pytest.raises(CampaignError):
        parse_rate("fast")
    hours = Hours.parse("09:00-18:00", "Europe/Paris")
    assert hours is not None
    assert hours.open_at(1764547200 + 9 * 3600)  # 2025-12-01 10:00 in Paris (09:00 UTC)
    assert not hours.open_at(1764547200 + 20 * 3600)  # 21:00 in Paris
    overnight = Hours.parse("20:00-08:00", "UTC")
    assert overnight is not None and overnight.open_at(1764547200 + 23 * 3600)
    with pytest.raises(CampaignError, match="time zone"):
        Hours.parse("09:00-18:00", "Mars/Olympus")
    bad = tmp_path / "bad.csv"
    bad.write_text("number,context\n+15550000001,\n")
    with pytest.raises(CampaignError, match="'to' column"):
        read_rows(str(bad), [])
