"""The fork socket's receive low-water mark (bridge/wakeups.py), on a real loopback TCP connection: the reader
is woken once a piece's worth of frames waits, and never left asleep over a lone short frame."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from gevent.socket import wait_read

from bridge.wakeups import ReadCoalescer

FRAME = 640  # 20 ms of 16 kHz L16
ON_WIRE = FRAME + 8  # a masked binary frame's header is 8 bytes at this size
CLOSE_FRAME = 8  # masked close frame with a status code


@pytest.fixture
def fork() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the module's end, the daemon's end) of one TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        module = socket.create_connection(server.getsockname())
        daemon, _ = server.accept()
    module.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield module, daemon
    module.close()
    daemon.close()


def readable(sock: socket.socket, wait: float = 0.1) -> bool:
    """Whether the daemon's hub (libev, as every gevent socket read waits) reports the socket readable."""
    try:
        wait_read(sock.fileno(), timeout=wait)
    except TimeoutError:
        return False
    return True


def test_the_reader_wakes_when_the_second_frame_of_a_piece_is_there_not_at_the_first(fork):
    module, daemon = fork
    ReadCoalescer(daemon).frames_of(FRAME)
    module.sendall(b"a" * ON_WIRE)
    assert not readable(daemon), "woken by one frame"
    module.sendall(b"b" * ON_WIRE)
    assert readable(daemon)
    assert len(daemon.recv(4 * ON_WIRE)) == 2 * ON_WIRE


def test_a_lone_close_frame_wakes_the_reader_once_the_mark_is_lowered(fork):
    module, daemon = fork
    wakeups = ReadCoalescer(daemon)
    wakeups.frames_of(FRAME)
    module.sendall(b"c" * CLOSE_FRAME)  # the audio stopped: nothing follows the close frame
    assert not readable(daemon)
    wakeups.lower()  # what the session does when the call ends or no frame came for IDLE_S
    assert not wakeups.raised
    assert readable(daemon), "the close frame already waiting did not wake the reader"


def test_the_connection_closing_always_wakes_the_reader(fork):
    module, daemon = fork
    ReadCoalescer(daemon).frames_of(FRAME)
    module.sendall(b"c" * CLOSE_FRAME)
    module.shutdown(socket.SHUT_WR)
    assert readable(daemon)


def test_without_a_socket_nothing_is_tried():
    wakeups = ReadCoalescer(None)
    assert wakeups.raised  # so the session never asks to raise it
    wakeups.lower()
    wakeups.frames_of(FRAME)


def test_pairs_that_arrive_together_leave_the_mark_up_and_never_touch_the_socket_again(fork):
    _module, daemon = fork
    wakeups = ReadCoalescer(daemon)
    wakeups.raised = False  # as attached: any byte wakes the reader
    t = 100.0
    wakeups.gathered(t, FRAME, 1, piece_done=False)
    wakeups.gathered(t + 0.020, FRAME, 2, piece_done=True)  # woke alone (mark down): the pairing starts here
    assert wakeups.raised
    for _ in range(50):  # every later pair in one wake-up, 40 ms apart
        t += 0.040
        wakeups.gathered(t, FRAME, 1, piece_done=False)
        wakeups.gathered(t + 0.0002, FRAME, 2, piece_done=True)
        assert wakeups.raised


def test_a_lag_that_leaves_one_frame_over_is_put_right_by_one_lowering(fork):
    _module, daemon = fork
    wakeups = ReadCoalescer(daemon)
    wakeups.frames_of(FRAME)
    t = 100.0
    # a late wake-up found three frames: a whole piece, and one frame over
    wakeups.gathered(t, FRAME, 1, piece_done=False)
    wakeups.gathered(t + 0.0002, FRAME, 2, piece_done=True)
    wakeups.gathered(t + 0.0004, FRAME, 1, piece_done=False)
    assert wakeups.raised  # nothing shows yet that the reader will sleep on half a piece
    # it did: the piece's second frame only came with the one after it, 40 ms later
    wakeups.gathered(t + 0.040, FRAME, 2, piece_done=True)
    wakeups.gathered(t + 0.0402, FRAME, 1, piece_done=False)
    assert not wakeups.raised, "the next half piece's frame must wake the reader alone"
    wakeups.gathered(t + 0.060, FRAME, 2, piece_done=True)  # it did, 20 ms later: in step again
    assert wakeups.raised
