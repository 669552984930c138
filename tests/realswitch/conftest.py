"""Fixtures of the real-switch suite: one FreeSWITCH per module build per test session, started on first use."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realswitch.caller import wait_no_channels
from tests.realswitch.switch import FreeSwitch, Probe, find_prefix, must_run

_switches: dict[str, FreeSwitch] = {}


def _switch(build: str, tmp_path_factory: pytest.TempPathFactory) -> FreeSwitch:
    prefix, why = find_prefix()
    if prefix is None:
        if must_run():
            pytest.fail(f"real-switch suite must run under CI, but: {why}", pytrace=False)
        pytest.skip(f"REAL FREESWITCH SUITE SKIPPED: {why}")
    if build not in _switches:
        module_dir = "mod-jambonz" if build == "jambonz" else "mod"
        if not (prefix / module_dir).is_dir():
            pytest.skip(f"REAL FREESWITCH SUITE SKIPPED ({build}): {prefix / module_dir} missing")
        workdir = tmp_path_factory.mktemp(f"freeswitch-{build}", numbered=True)
        _switches[build] = FreeSwitch(prefix, workdir, module_dir, name=build).start()
    switch = _switches[build]
    if not switch.running:
        switch.start()
    return switch


@pytest.fixture(scope="session", autouse=False)
def _stop_switches() -> Iterator[None]:
    yield
    switches = list(_switches.values())
    for switch in switches:  # all at once: each takes seconds to shut down
        if switch.running:
            switch.proc.send_signal(signal.SIGTERM)
    for switch in switches:
        switch.stop()


@pytest.fixture
def drachtio(request, tmp_path_factory, _stop_switches) -> FreeSwitch:
    """FreeSWITCH with drachtio's mod_audio_fork (and mod_audio_stream)."""
    return _switch("drachtio", tmp_path_factory)


@pytest.fixture
def jambonz(request, tmp_path_factory, _stop_switches) -> FreeSwitch:
    """FreeSWITCH with jambonz's bidirectional mod_audio_fork (and mod_audio_stream)."""
    return _switch("jambonz", tmp_path_factory)


@contextlib.contextmanager
def _probed(switch: FreeSwitch) -> Iterator[Probe]:
    probe = switch.probe()
    try:
        yield probe
    finally:
        if switch.running:
            with contextlib.suppress(Exception):
                probe.api("hupall NORMAL_CLEARING")
                wait_no_channels(probe, 10)
        probe.close()


@pytest.fixture
def probe(drachtio) -> Iterator[Probe]:
    """The test's own ESL connection to the drachtio switch; every channel is hung up after the test."""
    with _probed(drachtio) as p:
        yield p


@pytest.fixture
def jprobe(jambonz) -> Iterator[Probe]:
    with _probed(jambonz) as p:
        yield p


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep the switch's log with a failed test: its tail in the report, the whole file kept on disk."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("call", "setup"):
        for switch in _switches.values():
            keep = Path(item.config.rootpath) / ".cache" / "realswitch-failures" / item.name
            keep.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(switch.log_path, keep / f"{switch.name}-freeswitch.log")
            report.sections.append((f"freeswitch ({switch.name}) log tail; whole log in {keep}",
                                    switch.log_tail(60)))
