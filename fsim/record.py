"""`uuid_record`: the channel's audio to a WAV file, as FreeSWITCH 1.10.12 does it (measured there).

`uuid_record <uuid> start <path>` answers `+OK Success` (missing directories are created) or `-ERR Cannot record
session!` (a path that cannot be opened); `stop <path|all>` answers `+OK Success` or `-ERR Cannot stop record
session!`. With the channel variable `RECORD_STEREO=true` channel 0 is what the channel reads (the caller) and
channel 1 what it writes (what the caller's ear heard); else both mixed in one. `RECORD_START` fires at start,
`RECORD_STOP` (after `CHANNEL_HANGUP` when the call ends) with `record_ms`, `record_samples`, `record_seconds` set
on the channel. fsim writes the file when the recording stops.
"""

from __future__ import annotations

import os
import wave
from typing import TYPE_CHECKING

import numpy as np

from . import wire

if TYPE_CHECKING:
    from .channel import Channel
    from .switch import FSim

USAGE = "-USAGE: <uuid> [start|stop|mask|unmask] <path> [<limit>] [<recording_vars>]\n"


class RecordBug:
    def __init__(self, ch: Channel, path: str, stereo: bool) -> None:
        self.ch = ch
        self.path = path
        self.stereo = stereo
        self.frames: list[np.ndarray] = []

    def on_frame(self, read: np.ndarray, write: np.ndarray | None) -> None:
        heard = write if write is not None else np.zeros(len(read), np.int16)
        if self.stereo:
            self.frames.append(np.stack([read, heard], axis=1).reshape(-1))
        else:
            self.frames.append(np.clip(read.astype(np.int32) + heard, -32768, 32767).astype(np.int16))

    def stop(self, cause: str = "success-maxtime") -> None:
        data = np.concatenate(self.frames).astype("<i2") if self.frames else np.zeros(0, "<i2")
        channels = 2 if self.stereo else 1
        with wave.open(self.path, "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(self.ch.rate)
            w.writeframes(data.tobytes())
        samples = len(data) // channels
        ms = samples * 1000 // self.ch.rate
        self.ch.variables.update(record_samples=str(samples), record_ms=str(ms), record_seconds=str(ms // 1000))
        self.ch.fire("RECORD_STOP", [("Record-File-Path", self.path), ("Record-Completion-Cause", cause)])


def api_uuid_record(sw: FSim, args: str) -> str:
    a = wire.separate_string(args, 5)
    if len(a) < 3:
        return USAGE
    ch = sw.channels.get(a[0])
    if ch is None:
        return "-ERR Cannot locate session!\n"
    action, path = a[1].lower(), a[2]
    if action == "start":
        if not os.path.isabs(path) or not path.endswith(".wav"):
            return "-ERR Cannot record session!\n"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()  # can FreeSWITCH open it?
        except OSError:
            return "-ERR Cannot record session!\n"
        stereo = ch.variables.get("RECORD_STEREO", "").lower() in ("true", "yes", "on", "1")
        ch.recordings[path] = RecordBug(ch, path, stereo)
        ch.fire("RECORD_START", [("Record-File-Path", path)])
        return "+OK Success\n"
    if action == "stop":
        doomed = list(ch.recordings) if path == "all" else [path] if path in ch.recordings else []
        for p in doomed:
            ch.recordings.pop(p).stop()
        return "+OK Success\n" if doomed else "-ERR Cannot stop record session!\n"
    return USAGE
