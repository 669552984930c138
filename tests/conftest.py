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
