"""What the caller heard, read from a stereo recording of the caller's leg.

On the caller's (loopback A) leg with RECORD_STEREO=true, channel 0 is what the leg reads (what FreeSWITCH sent
to the caller: the bot) and channel 1 what it writes (the caller's own voice). A recording is cut into *pieces*
(sound separated by at least `join_s` of silence: a reply, a prompt, a tone after a transfer); inside a piece,
every run of silence of 1 ms or more is a *hole* (a click or a stutter to the caller), measured to the sample.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsim.audio import dominant_frequency

SILENT = 300  # |sample| below this is silence (tones in the tests are ~10000 peak; FreeSWITCH's silence is 0)
MIN_HOLE_S = 0.001


@dataclass
class Piece:
    start: float  # seconds from the start of the recording
    end: float
    freq: float
    holes: list[tuple[float, float]] = field(default_factory=list)  # (where, ms)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def sound_seconds(self) -> float:
        """How much was heard: the piece less its holes."""
        return self.seconds - sum(ms for _at, ms in self.holes) / 1000.0

    @property
    def max_hole_ms(self) -> float:
        return max((ms for _at, ms in self.holes), default=0.0)

    def __str__(self) -> str:
        holes = ", ".join(f"{ms:.1f}ms@{at:.2f}" for at, ms in self.holes)
        return f"{self.start:.3f}-{self.end:.3f}s {self.freq:.0f}Hz holes[{holes}]"


@dataclass
class Recording:
    path: Path
    rate: int
    ear: np.ndarray  # what the caller heard
    mouth: np.ndarray  # what the caller said

    @classmethod
    def read(cls, path: Path) -> Recording:
        with wave.open(str(path), "rb") as w:
            rate, chans = w.getframerate(), w.getnchannels()
            data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        if chans != 2:
            raise AssertionError(f"{path}: {chans} channel(s), expected a stereo recording (RECORD_STEREO=true)")
        frames = data.reshape(-1, 2)
        return cls(path, rate, frames[:, 0].copy(), frames[:, 1].copy())

    def heard(self, join_s: float = 0.2) -> list[Piece]:
        return pieces(self.ear, self.rate, join_s)

    def said(self, join_s: float = 0.2) -> list[Piece]:
        return pieces(self.mouth, self.rate, join_s)

    def heard_between(self, start: float, end: float) -> np.ndarray:
        return self.ear[int(start * self.rate): int(end * self.rate)]

    def loud_at(self, t: float, window_s: float = 0.01) -> bool:
        seg = self.heard_between(t, t + window_s)
        return bool(len(seg)) and int(np.max(np.abs(seg))) >= SILENT


def pieces(samples: np.ndarray, rate: int, join_s: float = 0.2) -> list[Piece]:
    """Sound runs joined across silences shorter than `join_s`; those silences are the piece's holes."""
    loud = np.abs(samples.astype(np.int32)) >= SILENT
    idx = np.flatnonzero(loud)
    if len(idx) == 0:
        return []
    # silent runs between loud samples: the gaps in idx
    gaps = np.flatnonzero(np.diff(idx) > 1)
    starts = [idx[0]]
    ends: list[int] = []
    holes: list[list[tuple[float, float]]] = [[]]
    min_hole = int(MIN_HOLE_S * rate)
    for g in gaps:
        a, b = idx[g], idx[g + 1]  # last loud sample before the silence, first after it
        silent = b - a - 1
        if silent >= join_s * rate:
            ends.append(a + 1)
            starts.append(b)
            holes.append([])
        elif silent >= min_hole:
            holes[-1].append(((a + 1) / rate, silent * 1000.0 / rate))
    ends.append(idx[-1] + 1)
    return [Piece(s / rate, e / rate, dominant_frequency(samples[s:e], rate), h)
            for s, e, h in zip(starts, ends, holes, strict=True)]
