"""The caller's ear: a timeline of everything played to the caller, for assertions about what was heard and when."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .audio import dominant_frequency, rms


@dataclass
class Segment:
    """One contiguous piece of heard audio: a broadcast file (``broadcast:<path>``) or a run of streamed audio."""

    source: str
    start: float  # time.monotonic() of the first frame
    end: float  # time.monotonic() after the last frame
    rate: int  # rate of ``samples`` (the channel's codec rate: what the caller's phone got)
    chunks: list[np.ndarray] = field(default_factory=list, repr=False)
    status: str = "playing"  # playing | paused (a file queued later plays inside it) | done | break | hangup

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.chunks).astype(np.int16) if self.chunks else np.zeros(0, np.int16)

    @property
    def duration(self) -> float:
        return sum(len(c) for c in self.chunks) / self.rate

    def frequency(self) -> float:
        return dominant_frequency(self.samples, self.rate)

    def rms(self) -> float:
        return rms(self.samples)


@dataclass
class Gap:
    before: Segment
    after: Segment
    seconds: float


class Ear:
    """Collects segments as the channel plays them; read it from tests (all times are ``time.monotonic()``)."""

    def __init__(self) -> None:
        self.timeline: list[Segment] = []
        self._open: dict[str, Segment] = {}
        self.dtmf_received: list[tuple[str, float]] = []  # digits sent *to* the caller (uuid_send_dtmf)

    # -- recording side (the channel calls these)
    def hear(self, key: str, source: str, chunk: np.ndarray, rate: int, now: float, frame_s: float) -> None:
        seg = self._open.get(key)
        if seg is None:
            seg = Segment(source=source, start=now, end=now, rate=rate)
            self._open[key] = seg
            self.timeline.append(seg)
        seg.chunks.append(chunk.astype(np.int16, copy=True))
        seg.end = now + frame_s

    def close(self, key: str, status: str = "done") -> Segment | None:
        seg = self._open.pop(key, None)
        if seg is not None:
            seg.status = status
        return seg

    def close_all(self, status: str) -> None:
        for key in list(self._open):
            self.close(key, status)

    # -- query side
    def segments(self, prefix: str = "") -> list[Segment]:
        return [s for s in self.timeline if s.source.startswith(prefix)]

    def broadcasts(self) -> list[Segment]:
        return self.segments("broadcast:")

    def heard_audio(self, prefix: str = "") -> np.ndarray:
        segs = self.segments(prefix)
        if not segs:
            return np.zeros(0, np.int16)
        return np.concatenate([s.samples for s in segs]).astype(np.int16)

    def heard_seconds(self, prefix: str = "") -> float:
        return sum(s.duration for s in self.segments(prefix))

    def first_heard(self, prefix: str = "", after: float = 0.0) -> Segment | None:
        for s in self.segments(prefix):
            if s.start >= after:
                return s
        return None

    def gaps(self, prefix: str = "broadcast:") -> list[Gap]:
        segs = sorted(self.segments(prefix), key=lambda s: s.start)
        return [Gap(a, b, max(0.0, b.start - a.end)) for a, b in zip(segs, segs[1:], strict=False)]

    def max_gap(self, prefix: str = "broadcast:") -> float:
        return max((g.seconds for g in self.gaps(prefix)), default=0.0)

    def is_hearing(self) -> bool:
        return bool(self._open)

    def summary(self, t0: float | None = None) -> str:
        base = t0 if t0 is not None else (self.timeline[0].start if self.timeline else time.monotonic())
        lines = []
        for s in self.timeline:
            f = s.frequency()
            lines.append(
                f"{s.start - base:8.3f}s .. {s.end - base:8.3f}s  {s.duration:6.3f}s  {s.rate} Hz  "
                f"peak {f:7.1f} Hz  rms {s.rms():7.1f}  {s.status:6s}  {s.source}"
            )
        for d, t in self.dtmf_received:
            lines.append(f"{t - base:8.3f}s  DTMF {d} sent to the caller")
        return "\n".join(lines) if lines else "(heard nothing)"
