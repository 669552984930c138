"""Wake a fork's reader once per two caller frames instead of once per frame (SO_RCVLOWAT).

mod_audio_fork writes one 20 ms frame per message, and the caller's audio goes to the engine in pieces of two
(session.ENGINE_CHUNK_MS): waking on the first frame of a pair does nothing useful, yet each wake-up costs a
poll, a recv and two greenlet switches, the largest single cost of a call under load. With the socket's receive
low-water mark above one frame and below two, the kernel reports it readable only once the pair is there, so a
piece leaves for the engine exactly when it did before.

The mark must come down whenever the audio stops, or a lone short frame (the fork's close frame, a module's
text frame, mod_audio_fork's zero-length graceful-shutdown frame) would wait for audio that never comes: a FIN
always wakes the reader, but a close frame the module sends before its own close timeout would not. The session
lowers it when the call ends, when a new fork replaces this one, when it finds the pairing off by a frame (see
`gathered`), and when no frame came for IDLE_S (its no-audio watch looks that often while the mark is up); it
is raised again at the next whole piece. Linux re-checks readiness when the mark changes, so a frame already
waiting wakes the reader at once.
"""

from __future__ import annotations

import contextlib
import socket

IDLE_S = 0.25  # no frame for this long: the stream has paused or is ending, so any byte must wake the reader
WAITED_S = 0.01  # frames gathered further apart than this came in different wake-ups (they arrive 20 ms apart)
_HEADER = 8  # a masked binary frame of 126..65535 bytes: 2 + 2 (length) + 4 (mask)


class ReadCoalescer:
    """The low-water mark of one fork socket. `raised` is read on every frame, so it is a plain attribute."""

    __slots__ = ("_sock", "raised", "_last", "_realign")

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self.raised = sock is None  # no socket (tests' fakes): never try
        self._last = 0.0  # when the last frame was gathered
        self._realign = False

    @property
    def holding(self) -> bool:
        """The mark is up on a real socket: a pause must then be noticed within IDLE_S."""
        return self.raised and self._sock is not None

    def gathered(self, now: float, size: int, frames: int, piece_done: bool) -> None:
        """After each audio frame: `frames` of the piece so far, `piece_done` when this one completed it.

        In step, the two frames of a piece arrive in one wake-up and nothing is changed. A frame that completes
        a piece after a wait with the mark up was held back by it (a lag left an odd frame over, and the reader
        slept on half a piece): the next half-gathered piece gets the mark lowered, so its second frame wakes
        the reader alone, and the next whole piece raises it again. Lowering on every half piece instead costs
        two setsockopt() per piece, each also re-checking the socket's readiness (6 % of the daemon's samples
        with 40 calls)."""
        waited = now - self._last > WAITED_S
        self._last = now
        if piece_done:
            if waited and self.raised and frames > 1:
                self._realign = True
            elif not self.raised:
                self.frames_of(size)
        elif self._realign:
            self._realign = False
            self.lower()

    def frames_of(self, size: int) -> None:
        """Frames of `size` bytes are flowing: wake when more than one is waiting (tolerates frames a few
        samples longer or shorter, as the resampling build sends)."""
        self.raised = True
        self._set(size * 3 // 2 + _HEADER)

    def lower(self) -> None:
        """Any byte wakes the reader again (the stream paused, or the call is ending)."""
        if self.raised and self._sock is not None:
            self.raised = False
            self._set(1)

    def _set(self, level: int) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # a socket already closed: nothing left to wake
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, level)
