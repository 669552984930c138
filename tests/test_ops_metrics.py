"""Metrics: exposition is valid for promtool, labels stay bounded, alert rules use our names and fire."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import OTHER, Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "conf" / "alerts.yml"


def exercise(m: Metrics) -> Metrics:
    """Touch every metric once, so every series family appears in the exposition."""
    m.declare_routes([("front-desk", "openai"), ("line-check", "line-check")])
    m.call_started("front-desk")
    m.call_finished("front-desk", "openai", "completed", duration=42.0)
    m.call_started("line-check")
    m.call_finished("line-check", "line-check", "fallback_transfer", duration=3.0)
    m.call_finished(None, None, "error", was_active=False)
    m.first_audio("front-desk", 0.72)
    m.playout("front-desk", 0.08)
    m.bargein("front-desk", stop_seconds=0.04)
    m.dtmf("front-desk", 2)
    m.fork_connect_failed("line-check")
    m.engine_error("openai", "rate_limit_exceeded")
    m.ws_refused("bad_token")
    m.esl_up(True)
    m.esl_reconnected()
    m.audio("in", 640)
    m.audio("out", 1280, frames=2)
    m.playback_chunk("front-desk", 3)
    m.playback_underrun("front-desk")
    m.config_reloaded(False)
    return m


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


def test_values_and_names() -> None:
    m = exercise(Metrics())
    assert value(m, "forkbridge_calls_total", route="front-desk", engine="openai", outcome="completed") == 1
    assert value(m, "forkbridge_calls_total", route="front-desk", engine="openai", outcome="error") == 0
    assert value(m, "forkbridge_calls_total", route="none", engine="none", outcome="error") == 1
    assert value(m, "forkbridge_calls_active", route="front-desk") == 0
    assert value(m, "forkbridge_esl_connected") == 1
    assert value(m, "forkbridge_audio_bytes_total", direction="out") == 1280
    assert value(m, "forkbridge_audio_frames_total", direction="out") == 2
    assert value(m, "forkbridge_dtmf_digits_total", route="front-desk") == 2
    assert value(m, "forkbridge_first_audio_latency_seconds_bucket", route="front-desk", le="0.75") == 1
    assert value(m, "forkbridge_first_audio_latency_seconds_bucket", route="front-desk", le="0.5") == 0
    names = {name for name, _ in samples(m)}
    assert all(n.startswith("forkbridge_") for n in names)


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.esl_up(True)
    a.ws_refused("bad_path")
    assert value(a, "forkbridge_esl_connected") == 1
    assert value(b, "forkbridge_esl_connected") == 0
    assert not any(n == "forkbridge_ws_refusals_total" for n, _ in samples(b))


def test_labels_stay_bounded() -> None:
    m = Metrics(max_label_values=3)
    for i in range(10):
        m.engine_error("openai", f"code-{i}")
    codes = {dict(lbl)["code"] for n, lbl in samples(m) if n == "forkbridge_engine_errors_total"}
    assert codes == {"code-0", "code-1", "code-2", OTHER}
    assert value(m, "forkbridge_engine_errors_total", engine="openai", code=OTHER) == 7
    m.ws_refused('evil"\nreason{}')  # odd characters are folded, never break the exposition
    text = m.exposition().decode()
    assert 'reason="evil__reason__"' in text
    with pytest.raises(ValueError):
        m.call_finished("r", "e", "bogus")
    with pytest.raises(ValueError):
        m.audio("sideways", 1)


def test_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/system-packages.sh)")
    text = exercise(Metrics()).exposition()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout, proc.stderr)


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/system-packages.sh)")
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_expressions_use_defined_metrics() -> None:
    exposed = {name for name, _ in samples(exercise(Metrics()))}
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    used = {name for r in rules for name in re.findall(r"\bforkbridge_[a-z_]+", r["expr"])}
    assert used, "alerts reference no forkbridge metric"
    assert used <= exposed, f"alerts use undefined metrics: {sorted(used - exposed)}"
    for rule in rules:
        assert rule["alert"].startswith("Forkbridge") and rule["labels"]["severity"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool unit tests of the expressions (annotations stripped: their wording is not under test)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/system-packages.sh)")
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    inst = 'instance="fb:9464",job="forkbridge"'

    def calls(outcome: str, per_min: int) -> dict[str, str]:
        return {"series": f'forkbridge_calls_total{{{inst},route="front-desk",engine="openai",outcome="{outcome}"}}',
                "values": f"0+{per_min}x40"}

    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"forkbridge_esl_connected{{{inst}}}", "values": "1 1 0 0 0 0 0"},
                    calls("completed", 2), calls("fallback_transfer", 2), calls("fallback_hangup", 0),
                    calls("error", 0),
                    {"series": f'forkbridge_ws_refusals_total{{{inst},reason="bad_token"}}', "values": "0+1x20"},
                    {"series": f'forkbridge_recordings_total{{{inst},route="front-desk",result="failed"}}',
                     "values": "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "ForkbridgeEslDown",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "fb:9464",
                                                    "job": "forkbridge"}}]},
                    {"eval_time": "1m", "alertname": "ForkbridgeEslDown", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "ForkbridgeFallbackRateHigh",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "fb:9464",
                                                    "route": "front-desk"}}]},
                    {"eval_time": "15m", "alertname": "ForkbridgeWebSocketRefusals",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "fb:9464",
                                                    "reason": "bad_token"}}]},
                    {"eval_time": "15m", "alertname": "ForkbridgeEngineErrors", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "ForkbridgeRecordingFailures",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "fb:9464",
                                                    "route": "front-desk"}}]},
                    {"eval_time": "2m", "alertname": "ForkbridgeRecordingFailures", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": [calls("completed", 5), calls("fallback_transfer", 0)],
                "alert_rule_test": [{"eval_time": "30m", "alertname": "ForkbridgeFallbackRateHigh",
                                     "exp_alerts": []}],
            },
        ],
    }
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_audio_counted_per_frame_is_all_in_the_next_scrape():
    from controller.daemon import AudioCounters

    m = Metrics()
    counters = AudioCounters(m)
    for _ in range(3):
        counters.audio_in(640)
    counters.audio_out(1280)
    assert value(m, "forkbridge_audio_bytes_total", direction="in") == 1920
    assert value(m, "forkbridge_audio_frames_total", direction="in") == 3
    for _ in range(AudioCounters.FLUSH_FRAMES + 1):
        counters.audio_in(2)
    # /metrics renders the registry itself (prometheus-client's WSGI app): the same counts
    assert 'forkbridge_audio_frames_total{direction="in"} 504.0' in generate_latest(m.registry).decode()
    assert value(m, "forkbridge_audio_bytes_total", direction="out") == 1280


def test_a_node_of_workers_never_counts_backwards_when_one_dies():
    """The parent's merged /metrics: a worker that died hands what it had counted to its successor (counters and
    histograms only: its calls_active is gone with it), so no counter of the node ever goes down."""
    from controller.metricsmerge import counters, merge

    def worker(calls: int, active: int, esl: int) -> str:
        """One worker's /metrics as prometheus-client writes it."""
        registry = CollectorRegistry()
        Counter("forkbridge_calls", "", ["route"], registry=registry).labels("a").inc(calls)
        Gauge("forkbridge_calls_active", "", ["route"], registry=registry).labels("a").set(active)
        Gauge("forkbridge_esl_connected", "", registry=registry).set(esl)
        return generate_latest(registry).decode()

    def value(families, name):
        return [s.value for f in families for s in f.samples if s.name == name]

    before = merge([worker(100, 3, 1), worker(50, 2, 1)])
    assert value(before, "forkbridge_calls_total") == [150] and value(before, "forkbridge_calls_active") == [5]
    assert value(before, "forkbridge_esl_connected") == [1]
    carried = counters(worker(50, 2, 1))  # worker 1 died; its successor starts from zero
    assert [f.name for f in carried] == ["forkbridge_calls"]
    after = merge([worker(104, 3, 1), worker(2, 1, 0)], carried)
    assert value(after, "forkbridge_calls_total") == [156]  # 104 + 2 + the 50 the dead one had counted
    assert value(after, "forkbridge_calls_active") == [4]
    assert value(after, "forkbridge_esl_connected") == [0]  # the lowest: one worker is not connected
    assert len(value(after, "forkbridge_calls_created")) == 1  # the earliest stamp, not a sum
