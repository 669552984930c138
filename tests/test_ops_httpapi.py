"""/metrics, /healthz, /readyz over real HTTP on loopback, and a real Prometheus scraping us (conf/prometheus.yml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest
import yaml

from controller.httpapi import HttpApi
from controller.metrics import Metrics
from tests.harness import free_ports

ROOT = Path(__file__).resolve().parent.parent


def get(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> object:
    """Poll a condition until it is truthy or the deadline passes (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        gevent.sleep(interval)
    return predicate()


@pytest.fixture
def state() -> dict[str, object]:
    return {"ready": (False, "ESL not connected")}


@pytest.fixture
def api(state: dict[str, object]) -> Iterator[HttpApi]:
    metrics = Metrics()
    metrics.declare_routes([("front-desk", "openai")])

    def ready() -> tuple[bool, str]:
        value = state["ready"]
        if isinstance(value, Exception):
            raise value
        return value  # type: ignore[return-value]

    server = HttpApi("127.0.0.1", 0, metrics, ready)
    server.metrics = metrics  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_healthz_and_unknown_paths(api: HttpApi) -> None:
    assert api.port > 0
    assert get(api.url + "/healthz")[:2] == (200, "ok\n")
    status, body, _ = get(api.url + "/healthz", method="HEAD")
    assert (status, body) == (200, "")
    assert get(api.url + "/nope")[0] == 404
    status, _, headers = get(api.url + "/healthz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_readyz_follows_the_readiness_callable(api: HttpApi, state: dict[str, object]) -> None:
    status, body, _ = get(api.url + "/readyz")
    assert status == 503 and body == "not ready: ESL not connected\n"
    state["ready"] = (True, "")
    assert get(api.url + "/readyz")[:2] == (200, "ready\n")
    state["ready"] = RuntimeError("boom")
    status, body, _ = get(api.url + "/readyz")
    assert status == 503 and "RuntimeError" in body


def test_metrics_endpoint_serves_our_registry(api: HttpApi) -> None:
    api.metrics.esl_up(True)  # type: ignore[attr-defined]
    status, body, headers = get(api.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "forkbridge_esl_connected 1.0" in body
    assert 'forkbridge_calls_total{engine="openai",outcome="completed",route="front-desk"} 0.0' in body
    assert "python_gc" not in body  # our own registry, not the process-global one


def test_stop_releases_the_port() -> None:
    server = HttpApi("127.0.0.1", 0, Metrics(), lambda: (True, ""))
    server.start()
    port = server.port
    server.stop()
    again = HttpApi("127.0.0.1", port, Metrics(), lambda: (True, ""))
    again.start()  # would raise EADDRINUSE if the first server still held it
    again.stop()


def test_real_prometheus_scrapes_us(api: HttpApi, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/system-packages.sh)")
    metrics: Metrics = api.metrics  # type: ignore[attr-defined]
    metrics.esl_up(True)
    metrics.call_started("front-desk")
    metrics.call_finished("front-desk", "openai", "completed", duration=30.0)
    metrics.audio("in", 640)

    # conf/prometheus.yml as shipped, with only the target port and intervals changed for a fast test.
    conf = yaml.safe_load((ROOT / "conf" / "prometheus.yml").read_text())
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "forkbridge")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{api.port}"]
    conf["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job["scrape_timeout"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    shutil.copy(ROOT / "conf" / "alerts.yml", tmp_path / "alerts.yml")

    web = f"127.0.0.1:{free_ports()[0]}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={web}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(expr: str) -> list[dict]:
            url = f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                status, body, _ = get(url, timeout=2.0)
            except OSError:
                return []
            return json.loads(body)["data"]["result"] if status == 200 else []

        result = wait_for(lambda: proc.poll() is None and query("forkbridge_esl_connected"), timeout=15.0)
        assert result, f"no scrape within 15 s; prometheus log:\n{(tmp_path / 'prometheus.log').read_text()}"
        assert result[0]["value"][1] == "1"
        assert result[0]["metric"]["job"] == "forkbridge"
        assert query('up{job="forkbridge"}')[0]["value"][1] == "1"
        calls = query('forkbridge_calls_total{route="front-desk",outcome="completed"}')
        assert calls and calls[0]["value"][1] == "1" and calls[0]["metric"]["engine"] == "openai"
        assert query('forkbridge_audio_bytes_total{direction="in"}')[0]["value"][1] == "640"
        assert query("forkbridge_call_duration_seconds_count")[0]["value"][1] == "1"

        status, body, _ = get(f"http://{web}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        names = {r["name"] for g in groups for r in g["rules"]}
        assert {"ForkbridgeEslDown", "ForkbridgeFallbackRateHigh", "ForkbridgeFirstAudioSlow",
                "ForkbridgeWebSocketRefusals"} <= names
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
