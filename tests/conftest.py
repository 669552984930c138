"""Tests run the daemon's parts inside one gevent hub, as the daemon does (patching here mirrors the entry point)."""

from gevent import monkey

monkey.patch_all()


import pytest  # noqa: E402

from fsim import FSim  # noqa: E402
from tests.fakes import Recorder  # noqa: E402


@pytest.fixture
def sw():
    """A running FreeSWITCH simulator on an ephemeral ESL port."""
    s = FSim(esl_port=0).start()
    yield s
    s.stop()


@pytest.fixture
def rec():
    """Collects the events an engine emits."""
    return Recorder()


def _real_switch_line() -> str:
    from tests.realswitch.switch import find_prefix, must_run

    prefix, why = find_prefix()
    if prefix is not None:
        from tests.realswitch.cluster import why_unusable

        line, scale = f"real FreeSWITCH suite: RUNS against {why}", why_unusable()
        if scale:
            line += f"; its scale-out scenario {'FAILS (CI)' if must_run() else 'SKIPPED'}: {scale}"
        return line
    return f"real FreeSWITCH suite: {'FAILS (CI)' if must_run() else 'SKIPPED'}: {why}"


def pytest_terminal_summary(terminalreporter):
    """One loud line at the end of every run: whether the real-switch suite ran, and against what."""
    terminalreporter.write_sep("=", _real_switch_line())
