"""The daemon hands its C heap's free pages back to the kernel now and then (controller/heap.py)."""

from __future__ import annotations

import gevent.event

from controller.heap import _malloc_trim, trim_periodically
from tests.harness import wait_until


def test_this_c_library_has_malloc_trim_and_it_runs():
    trim = _malloc_trim()
    assert trim is not None, "glibc without malloc_trim: the daemon's RSS would keep every freed page"
    assert trim(0) in (0, 1)


def test_the_heap_is_trimmed_at_every_interval_until_the_daemon_stops():
    stopped = gevent.event.Event()
    calls: list[int] = []
    trimmer = trim_periodically(stopped, every=0.01, trim=lambda pad: calls.append(pad) or 1)
    assert trimmer is not None
    wait_until(lambda: len(calls) >= 3, 2, "three trims")
    stopped.set()
    trimmer.join(1)
    assert trimmer.dead and set(calls) == {0}  # the loop ended with the daemon; it always asked for all pages
