"""Tests run the daemon's parts inside one gevent hub, as the daemon does (patching here mirrors the entry point)."""

from gevent import monkey

monkey.patch_all()
