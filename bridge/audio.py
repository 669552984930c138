"""Audio conversion for one call: streaming resampling, G.711 companding, timing helpers, an energy measure.

The call side is always L16 (signed 16-bit little-endian mono) at the fork rate; engines declare their own
`AudioFormat`. One `Converter` per direction per call turns one into the other. This is the hot path (hundreds of
calls at 50 frames/s each), so everything works on whole frames with numpy and never loops per sample in Python.

Why a streaming resampler: resampling each frame on its own restarts the filter at every frame edge, which is heard
as a click every 20 ms. `soxr.ResampleStream` keeps the filter state between frames, so a stream cut into any
chunking gives the same samples as the whole signal in one go. The price is a short algorithmic delay (about 15 ms
at the default "MQ" quality): the newest input is held back until the filter has seen what follows it, which is why
a response's tail must be `flush()`ed when the response ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import soxr

from bridge.engine import PCM16, PCMA, PCMU, AudioFormat

__all__ = [
    "G711_RATE",
    "SILENCE_DBFS",
    "AudioFormatError",
    "Converter",
    "Rechunker",
    "Resampler",
    "alaw_decode",
    "alaw_encode",
    "bytes_to_ms",
    "check_format",
    "iter_chunks",
    "ms_to_bytes",
    "rms_dbfs",
    "ulaw_decode",
    "ulaw_encode",
]

G711_RATE = 8000  # G.711 is defined at 8 kHz only
SILENCE_DBFS = -120.0  # what rms_dbfs reports for digital silence (instead of -inf, so comparisons stay simple)

_I16 = np.dtype("<i2")  # L16 on the wire is little-endian whatever the host
_MAX_PCM_RATE = 192_000
_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
# "MQ": flat to 7 kHz at 16 kHz out and to 3.4 kHz at 8 kHz out, aliasing below -110 dB, ~15 ms delay.
# "HQ" adds 20-bit precision (pointless for int16 out) for ~21 ms; "LQ" already dulls 3.4 kHz at 8 kHz out.
DEFAULT_QUALITY = "MQ"


class AudioFormatError(ValueError):
    """An audio format the bridge cannot produce or consume (unknown encoding, G.711 not at 8 kHz, bad rate)."""


def check_format(fmt: AudioFormat) -> None:
    """Raise AudioFormatError unless `fmt` is something the bridge can convert to or from."""
    if fmt.encoding not in (PCM16, PCMU, PCMA):
        raise AudioFormatError(f"unknown audio encoding {fmt.encoding!r} (expected {PCM16}, {PCMU} or {PCMA})")
    if not isinstance(fmt.rate, int) or isinstance(fmt.rate, bool) or not 0 < fmt.rate <= _MAX_PCM_RATE:
        raise AudioFormatError(f"bad sample rate {fmt.rate!r} for {fmt.encoding} (expected 1..{_MAX_PCM_RATE} Hz)")
    if fmt.encoding != PCM16 and fmt.rate != G711_RATE:
        raise AudioFormatError(f"{fmt.encoding} is G.711 and only exists at {G711_RATE} Hz, not {fmt.rate} Hz")


def _sample_width(fmt: AudioFormat) -> int:
    return 2 if fmt.encoding == PCM16 else 1


def bytes_to_ms(nbytes: int, fmt: AudioFormat) -> float:
    """Duration of `nbytes` of audio in `fmt`, in milliseconds (e.g. 640 bytes of L16 16 kHz -> 20.0)."""
    return nbytes / fmt.bytes_per_ms


def ms_to_bytes(ms: float, fmt: AudioFormat) -> int:
    """Bytes for `ms` of audio in `fmt`, rounded down to a whole sample (so slices never split a sample)."""
    width = _sample_width(fmt)
    samples = int(ms * fmt.rate // 1000)
    return max(samples, 0) * width


# ---- G.711 ------------------------------------------------------------------------------------------------------
# Tables are built once, vectorised, from the ITU-T G.711 reference algorithm (the same one CPython's audioop and
# the ITU G.191 software tools use). Encoding indexes a 64 Ki table with the int16 samples reinterpreted as uint16,
# decoding a 256-entry table with the code bytes: one numpy gather per frame, bit-exact with the reference.


def _build_ulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    # decode: u-law code -> int16
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    dec = np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)
    # encode: int16 (viewed as uint16) -> u-law code; 14-bit magnitude, bias 33, clip 8159
    pcm = np.arange(65536, dtype=np.int64).astype(np.uint16).view(np.int16).astype(np.int64) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    enc = ((code ^ mask) & 0xFF).astype(np.uint8)
    return enc, dec


def _build_alaw_tables() -> tuple[np.ndarray, np.ndarray]:
    # decode: A-law code -> int16
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    dec = np.where(a & 0x80, t, -t).astype(np.int16)
    # encode: int16 (viewed as uint16) -> A-law code; 13-bit magnitude
    pcm = np.arange(65536, dtype=np.int64).astype(np.uint16).view(np.int16).astype(np.int64) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag, side="left")
    shift = np.where(seg < 2, 1, seg)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> shift) & 0x0F))
    enc = ((code ^ mask) & 0xFF).astype(np.uint8)
    return enc, dec


_ULAW_ENC, _ULAW_DEC = _build_ulaw_tables()
_ALAW_ENC, _ALAW_DEC = _build_alaw_tables()
for _table in (_ULAW_ENC, _ULAW_DEC, _ALAW_ENC, _ALAW_DEC):
    _table.flags.writeable = False


def _pcm_array(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """int16 view of L16 bytes without copying; a trailing odd byte is ignored."""
    if isinstance(pcm, np.ndarray):
        return pcm.astype(_I16, copy=False)
    return np.frombuffer(pcm, dtype=_I16, count=len(pcm) // 2)


def ulaw_encode(pcm: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """L16 -> G.711 mu-law, one byte per sample."""
    return _ULAW_ENC[_pcm_array(pcm).view(np.uint16)].tobytes()


def ulaw_decode(data: bytes | bytearray | memoryview) -> bytes:
    """G.711 mu-law -> L16 (little-endian)."""
    return _ULAW_DEC[np.frombuffer(data, dtype=np.uint8)].astype(_I16, copy=False).tobytes()


def alaw_encode(pcm: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """L16 -> G.711 A-law, one byte per sample."""
    return _ALAW_ENC[_pcm_array(pcm).view(np.uint16)].tobytes()


def alaw_decode(data: bytes | bytearray | memoryview) -> bytes:
    """G.711 A-law -> L16 (little-endian)."""
    return _ALAW_DEC[np.frombuffer(data, dtype=np.uint8)].astype(_I16, copy=False).tobytes()


# ---- energy -----------------------------------------------------------------------------------------------------

_FULL_SCALE_DB = 20.0 * math.log10(32768.0)


def rms_dbfs(pcm: bytes | bytearray | memoryview | np.ndarray) -> float:
    """RMS level of L16 audio in dBFS (full-scale square wave = 0, full-scale sine = -3.01).

    Silence (or no samples) reports SILENCE_DBFS rather than -inf so a VAD can compare without special cases.
    """
    x = _pcm_array(pcm)
    if x.size == 0:
        return SILENCE_DBFS
    xf = x.astype(np.float64)
    mean_sq = float(np.dot(xf, xf)) / x.size
    if mean_sq <= 0.0:
        return SILENCE_DBFS
    return max(10.0 * math.log10(mean_sq) - _FULL_SCALE_DB, SILENCE_DBFS)


# ---- resampling -------------------------------------------------------------------------------------------------


class _SampleAligner:
    """Turns a byte stream cut anywhere (odd sizes included) into whole int16 samples, carrying the odd byte."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def take(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        if self._carry:
            data = self._carry + bytes(data)
            self._carry = b""
        if len(data) & 1:
            self._carry = bytes(data[-1:])
        return np.frombuffer(data, dtype=_I16, count=len(data) // 2)

    @property
    def pending(self) -> int:
        return len(self._carry)

    def reset(self) -> None:
        self._carry = b""


class Resampler:
    """Streaming L16 resampler for one direction of one call (int16 in, int16 out, state kept between frames).

    Processes in float32 internally: soxr's int16 output path adds TPDF dither (so silence would not stay silent
    and output would depend on the dither generator); rounding and clipping ourselves keeps it deterministic.

    The soxr stream exists only while it holds audio: a flush (a response ended) or a reset (barge-in) frees it,
    and the next frame makes a new one (about 35 us). soxr keeps 75-90 KiB of C memory per stream, and an
    engine's speech comes in bursts (a reply several times faster than real time, then nothing while the caller
    speaks), so the speech direction of a call mostly holds none.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = DEFAULT_QUALITY) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise AudioFormatError(f"bad resampling rates {in_rate} -> {out_rate}")
        if quality not in _QUALITIES:
            raise ValueError(f"unknown soxr quality {quality!r} (one of {', '.join(_QUALITIES)})")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality = quality
        self._stream: soxr.ResampleStream | None = None  # None: nothing held (no flush/clear needed)
        self._aligner = _SampleAligner()

    def process_samples(self, x: np.ndarray) -> np.ndarray:
        """Resample int16 samples; returns whatever output the filter can produce so far (possibly none)."""
        if x.size == 0:
            return np.zeros(0, dtype=_I16)
        stream = self._stream
        if stream is None:
            stream = self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32",
                                                        quality=self.quality)
        return self._to_int16(stream.resample_chunk(x.astype(np.float32)))

    def process(self, data: bytes | bytearray | memoryview) -> bytes:
        """Resample a frame of L16 bytes of any length (an odd trailing byte waits for the next frame)."""
        if not data:
            return b""
        return self.process_samples(self._aligner.take(data)).tobytes()

    def flush_samples(self) -> np.ndarray:
        """End of a continuous stretch (e.g. a response finished): return the held-back tail, then start fresh."""
        self._aligner.reset()
        stream, self._stream = self._stream, None
        if stream is None:
            return np.zeros(0, dtype=_I16)
        return self._to_int16(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))

    def flush(self) -> bytes:
        return self.flush_samples().tobytes()

    def reset(self) -> None:
        """Barge-in: drop everything held (filter state, odd byte) without producing output."""
        self._aligner.reset()
        self._stream = None

    def delay_ms(self) -> float:
        """Output currently held back inside the filter, in ms (soxr's own figure)."""
        return 0.0 if self._stream is None else float(self._stream.delay()) * 1000.0 / self.out_rate

    @staticmethod
    def _to_int16(y: np.ndarray) -> np.ndarray:
        if y.size == 0:
            return np.zeros(0, dtype=_I16)
        # the ufuncs themselves: np.clip's Python wrappers cost more than the work on a 20-40 ms block
        np.rint(y, out=y)
        np.minimum(y, 32767.0, out=y)
        np.maximum(y, -32768.0, out=y)
        return y.astype(_I16)


# ---- per-direction converter --------------------------------------------------------------------------------------


class Converter:
    """Converts one direction of one call's audio, e.g. call L16 16 kHz -> engine PCM16 24 kHz.

    Steps, each only when needed: decode G.711 -> resample (streaming) -> encode G.711. Same format both sides is a
    pure passthrough (L16 input is still kept sample-aligned); an 8 kHz call to a G.711 engine is companding only.
    `resampler` is None when no rate change is needed, so no soxr state exists for such calls.
    """

    def __init__(self, src: AudioFormat, dst: AudioFormat, quality: str = DEFAULT_QUALITY) -> None:
        check_format(src)
        check_format(dst)
        self.src = src
        self.dst = dst
        self.passthrough = src == dst
        self.resampler: Resampler | None = None
        if src.rate != dst.rate:
            self.resampler = Resampler(src.rate, dst.rate, quality)
        self._aligner = _SampleAligner() if src.encoding == PCM16 else None

    @classmethod
    def to_engine(cls, call_rate: int, engine_input: AudioFormat, quality: str = DEFAULT_QUALITY) -> Converter:
        """Caller audio (L16 at the fork rate) -> what the engine takes."""
        return cls(AudioFormat(PCM16, call_rate), engine_input, quality)

    @classmethod
    def from_engine(cls, engine_output: AudioFormat, call_rate: int, quality: str = DEFAULT_QUALITY) -> Converter:
        """Engine speech -> L16 at the call's rate, for playback."""
        return cls(engine_output, AudioFormat(PCM16, call_rate), quality)

    def convert(self, data: bytes | bytearray | memoryview) -> bytes:
        """Convert one frame of any size; output may be shorter or empty while the resampler fills."""
        if not data:
            return b""
        if self.passthrough:
            if self._aligner is None:
                return bytes(data)
            if not self._aligner.pending and not len(data) & 1:
                return bytes(data)
            return self._aligner.take(data).tobytes()
        pcm = self._decode(data)
        if self.resampler is not None:
            pcm = self.resampler.process_samples(pcm)
        return self._encode(pcm)

    def flush(self) -> bytes:
        """End of a stretch of audio (e.g. ResponseDone): emit the resampler's held-back tail and start fresh."""
        if self._aligner is not None:
            self._aligner.reset()
        if self.resampler is None:
            return b""
        return self._encode(self.resampler.flush_samples())

    def reset(self) -> None:
        """Barge-in: drop held audio of an interrupted response without emitting it."""
        if self._aligner is not None:
            self._aligner.reset()
        if self.resampler is not None:
            self.resampler.reset()

    def _decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        if self._aligner is not None:
            return self._aligner.take(data)
        table = _ULAW_DEC if self.src.encoding == PCMU else _ALAW_DEC
        return table[np.frombuffer(data, dtype=np.uint8)]

    def _encode(self, pcm: np.ndarray) -> bytes:
        if self.dst.encoding == PCM16:
            return pcm.astype(_I16, copy=False).tobytes()
        table = _ULAW_ENC if self.dst.encoding == PCMU else _ALAW_ENC
        return table[pcm.astype(_I16, copy=False).view(np.uint16)].tobytes()

    def __repr__(self) -> str:
        kind = "passthrough" if self.passthrough else ("resample" if self.resampler else "compand")
        return (
            f"Converter({self.src.encoding}@{self.src.rate} -> {self.dst.encoding}@{self.dst.rate}, {kind})"
        )


# ---- re-chunking ----------------------------------------------------------------------------------------------------


class Rechunker:
    """Accumulates audio bytes and hands out chunks of exactly `chunk_ms` (whole samples).

    `first_chunk_ms` makes the first chunk after construction/reset smaller (fast first word in broadcast
    playback, larger chunks after). Chunks are cut on sample boundaries counted from the stream start.
    """

    def __init__(self, fmt: AudioFormat, chunk_ms: float, first_chunk_ms: float | None = None) -> None:
        check_format(fmt)
        self.fmt = fmt
        self.chunk_bytes = ms_to_bytes(chunk_ms, fmt)
        self.first_chunk_bytes = ms_to_bytes(first_chunk_ms, fmt) if first_chunk_ms is not None else self.chunk_bytes
        if self.chunk_bytes <= 0 or self.first_chunk_bytes <= 0:
            raise ValueError(f"chunk of {chunk_ms} ms (first {first_chunk_ms} ms) is less than one sample")
        self._buf = bytearray()
        self._first = True

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    @property
    def pending_ms(self) -> float:
        return bytes_to_ms(len(self._buf), self.fmt)

    def push(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add audio; return the complete chunks now available (often none), oldest first."""
        if data:
            self._buf += data
        out: list[bytes] = []
        start = 0
        buf = self._buf
        while True:
            size = self.first_chunk_bytes if self._first else self.chunk_bytes
            if len(buf) - start < size:
                break
            out.append(bytes(buf[start : start + size]))
            start += size
            self._first = False
        if start:
            del buf[:start]
        return out

    def flush(self) -> bytes:
        """Whatever is left (shorter than a chunk, whole samples only); the next chunk is a 'first' one again."""
        width = _sample_width(self.fmt)
        n = len(self._buf) - len(self._buf) % width
        rest = bytes(self._buf[:n])
        self.reset()
        return rest

    def reset(self) -> None:
        self._buf.clear()
        self._first = True


def iter_chunks(data: bytes, chunk_bytes: int) -> Iterable[bytes]:
    """Slices of `data` of `chunk_bytes` (the last one may be shorter)."""
    view = memoryview(data)
    for i in range(0, len(data), chunk_bytes):
        yield bytes(view[i : i + chunk_bytes])
