"""Wake a fork's reader once per two caller frames instead of once per frame (SO_RCVLOWAT).

mod_audio_fork writes one 20 ms frame per message, and the caller's audio goes to the engine in pieces of two
(session.ENGINE_CHUNK_MS): waking on the first frame of a pair does nothing useful, yet each wake-up costs a
poll, a recv and two greenlet switches, the largest single cost of a call under load. With the socket's receive
low-water mark above one frame and below two, the kernel reports it readable only once the pair is there, so a
piece leaves for the engine exactly when it did before.

The mark must come down whenever the audio stops, or a lone short frame (the fork's close frame, a module's
text frame, mod_audio_fork's zero-length graceful-shutdown frame) would wait for audio that never comes: a FIN
always wakes the reader, but a close frame the module sends before its own close timeout would not. The session
lowers it when the call ends, when a new fork replaces this one, while a piece is half-gathered (its next frame
must wake the reader alone, or every later piece would leave a frame late), and when no frame came for IDLE_S
(its no-audio watch looks that often while the mark is up); it is raised again at the next whole piece.
"""

from __future__ import annotations

import contextlib
import socket

IDLE_S = 0.25  # no frame for this long: the stream has paused or is ending, so any byte must wake the reader
_HEADER = 8  # a masked binary frame of 126..65535 bytes: 2 + 2 (length) + 4 (mask)


class ReadCoalescer:
    """The low-water mark of one fork socket. `raised` is read on every frame, so it is a plain attribute."""

    __slots__ = ("_sock", "raised")

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = None if __import__("os").environ.get("FB_NO_LOWAT") else sock
        self.raised = self._sock is None

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
