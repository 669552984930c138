"""Audio helpers: read files the way mod_sndfile would, resample, and generate caller signals.

All sample arrays are mono ``numpy.int16``.
"""

from __future__ import annotations

import os
import wave
from dataclasses import dataclass, field

import numpy as np
import soxr

# mod_sndfile's raw extensions: .r8/.r16 are 16-bit; .r24/.r32 are 24/32-*bit* samples (not rates), see
# mod_audio_fork.md §4. .r48/.r64 are not registered at all.
RAW_RATES = {".r8": 8000, ".r16": 16000}


class UnplayableFile(Exception):
    """The file exists but no format module would open it (``PLAYBACK ERROR`` in FreeSWITCH)."""


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate or len(samples) == 0:
        return samples.astype(np.int16, copy=False)
    out = soxr.resample(samples.astype(np.int16, copy=False), src_rate, dst_rate)
    return np.asarray(out, dtype=np.int16)


def read_audio_file(path: str) -> tuple[np.ndarray, int]:
    """Samples and native rate of a playable file. Raises FileNotFoundError or UnplayableFile."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in RAW_RATES:
        with open(path, "rb") as f:
            data = f.read()
        data = data[: len(data) - (len(data) % 2)]
        return np.frombuffer(data, dtype="<i2").astype(np.int16), RAW_RATES[ext]
    if ext == ".r24":
        with open(path, "rb") as f:
            data = f.read()
        data = data[: len(data) - (len(data) % 3)]
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        return (v >> 8).astype(np.int16), 24000
    if ext == ".r32":
        with open(path, "rb") as f:
            data = f.read()
        data = data[: len(data) - (len(data) % 4)]
        return (np.frombuffer(data, dtype="<i4") >> 16).astype(np.int16), 32000
    if ext == ".wav":
        try:
            with wave.open(path, "rb") as w:
                rate, width, chans = w.getframerate(), w.getsampwidth(), w.getnchannels()
                frames = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as e:
            raise UnplayableFile(f"{path}: {e}") from e
        if width == 2:
            s = np.frombuffer(frames, dtype="<i2").astype(np.int32)
        elif width == 1:
            s = (np.frombuffer(frames, dtype=np.uint8).astype(np.int32) - 128) << 8
        elif width == 4:
            s = np.frombuffer(frames, dtype="<i4").astype(np.int64) >> 16
        else:
            raise UnplayableFile(f"{path}: {width}-byte samples")
        if chans > 1:
            s = s.reshape(-1, chans).mean(axis=1)
        return np.clip(s, -32768, 32767).astype(np.int16), rate
    raise UnplayableFile(f"{path}: no format module for {ext or 'no extension'}")


def ulaw_encode(samples: np.ndarray) -> bytes:
    """Linear samples to G.711 mu-law (ITU-T G.711: bias 0x84, clip 32635, inverted bits), written independently
    of the bridge's codec tables: what a caller's phone or a fake engine sends."""
    x = samples.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def g711_decode(data: bytes, law: str) -> np.ndarray:
    """G.711 bytes to linear samples (ITU-T G.711 expansion), for native PCMU/PCMA files."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    if law == "PCMU":
        b = ~b & 0xFF
        exponent, mantissa = (b >> 4) & 0x07, b & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        return np.where(b & 0x80, -magnitude, magnitude).astype(np.int16)
    b = b ^ 0x55
    exponent, mantissa = (b >> 4) & 0x07, b & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(b & 0x80, magnitude, -magnitude).astype(np.int16)


def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the strongest FFT bin, DC excluded; 0.0 for silence or too little audio."""
    if len(samples) < 16 or not np.any(samples):
        return 0.0
    x = samples.astype(np.float64)
    x = (x - x.mean()) * np.hanning(len(x))
    spec = np.abs(np.fft.rfft(x))
    spec[0] = 0.0
    return float(np.argmax(spec) * rate / len(x))


def rms(samples: np.ndarray) -> float:
    if len(samples) == 0:
        return 0.0
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


# ------------------------------------------------------------------------------------------ caller signals


class Signal:
    """Something a scripted caller can say; rendered once at the channel's rate."""

    def render(self, rate: int) -> np.ndarray:
        raise NotImplementedError

    def __add__(self, other: Signal) -> Sequence:
        return Sequence([self, other])


@dataclass
class Tone(Signal):
    freq: float
    seconds: float
    amplitude: float = 0.3

    def render(self, rate: int) -> np.ndarray:
        t = np.arange(int(self.seconds * rate)) / rate
        return (np.sin(2 * np.pi * self.freq * t) * self.amplitude * 32767).astype(np.int16)


@dataclass
class Silence(Signal):
    seconds: float

    def render(self, rate: int) -> np.ndarray:
        return np.zeros(int(self.seconds * rate), dtype=np.int16)


@dataclass
class SpeechLike(Signal):
    """Bursts of amplitude-modulated harmonics with pauses, loud enough to trip a VAD, deterministic by seed."""

    bursts: int = 3
    burst_s: float = 0.8
    pause_s: float = 0.6
    pitch: float = 160.0
    amplitude: float = 0.3
    seed: int = 1

    def render(self, rate: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        parts = []
        for _ in range(self.bursts):
            n = int(self.burst_s * rate)
            t = np.arange(n) / rate
            f0 = self.pitch * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            v = sum(np.sin(k * phase) / k for k in range(1, 6))
            env = 0.5 * (1 - np.cos(2 * np.pi * np.arange(n) / max(n, 1))) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
            noise = rng.normal(0, 0.05, n)
            parts.append(((v / 2.3) * env + noise) * self.amplitude * 32767)
            parts.append(np.zeros(int(self.pause_s * rate)))
        return np.clip(np.concatenate(parts), -32768, 32767).astype(np.int16) if parts else np.zeros(0, np.int16)


@dataclass
class WavFile(Signal):
    path: str

    def render(self, rate: int) -> np.ndarray:
        samples, src = read_audio_file(self.path)
        return resample(samples, src, rate)


@dataclass
class Samples(Signal):
    samples: np.ndarray
    rate: int

    def render(self, rate: int) -> np.ndarray:
        return resample(np.asarray(self.samples, dtype=np.int16), self.rate, rate)


@dataclass
class Sequence(Signal):
    parts: list[Signal] = field(default_factory=list)

    def render(self, rate: int) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, np.int16)
        return np.concatenate([p.render(rate) for p in self.parts]).astype(np.int16)

    def __add__(self, other: Signal) -> Sequence:
        return Sequence([*self.parts, other])
