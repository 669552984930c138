"""Audio conversion: streaming resampling, G.711 against the reference, converters, helpers."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import soxr

from bridge import audio
from bridge.audio import AudioFormatError, Converter, Rechunker, Resampler
from bridge.engine import PCM16, PCMA, PCMU, AudioFormat

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # oracle only (deprecated in 3.11, gone in 3.13)


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.3) -> bytes:
    n = int(rate * seconds)
    t = np.arange(n) / rate
    return (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype("<i2").tobytes()


def peak_hz(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def run_chunked(conv: Converter | Resampler, data: bytes, sizes: list[int]) -> bytes:
    """Feed `data` cut into `sizes` (cycled), then flush."""
    out = bytearray()
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        i += 1
        out += conv.convert(data[pos : pos + n]) if isinstance(conv, Converter) else conv.process(data[pos : pos + n])
        pos += n
    out += conv.flush()
    return bytes(out)


# ---- resampling -----------------------------------------------------------------------------------------------------


def test_resample_round_trip_keeps_pitch_and_length() -> None:
    src = tone(440, 16000, 1.0)
    up = Converter(AudioFormat(PCM16, 16000), AudioFormat(PCM16, 24000))
    down = Converter(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 16000))
    mid = run_chunked(up, src, [640])
    back = run_chunked(down, mid, [960])
    assert abs(peak_hz(mid, 24000) - 440) < 2
    assert abs(peak_hz(back, 16000) - 440) < 2
    assert abs(audio.bytes_to_ms(len(mid), AudioFormat(PCM16, 24000)) - 1000) <= 3
    assert abs(audio.bytes_to_ms(len(back), AudioFormat(PCM16, 16000)) - 1000) <= 3
    # the signal itself survives (compare away from the edges): error well below the signal level
    a = np.frombuffer(src, "<i2")[1600:-1600].astype(float)
    b = np.frombuffer(back, "<i2")[1600 : 1600 + len(a)].astype(float)
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.01 * np.sqrt(np.mean(a**2))


@pytest.mark.parametrize("sizes", [[1], [3, 7, 640, 1], [0, 641, 0, 319], [4801], [2, 1000, 5]])
def test_any_chunking_gives_the_same_output(sizes: list[int]) -> None:
    src = tone(440, 16000, 0.5) + tone(1000, 16000, 0.3, 0.5)
    whole = run_chunked(Resampler(16000, 24000), src, [len(src)])
    chunked = run_chunked(Resampler(16000, 24000), src, sizes)
    assert len(chunked) == len(whole)
    diff = np.abs(np.frombuffer(whole, "<i2").astype(int) - np.frombuffer(chunked, "<i2").astype(int))
    assert diff.max() <= 1


def test_odd_bytes_are_carried_not_lost() -> None:
    src = tone(440, 24000, 0.2)
    r = Resampler(24000, 16000)
    out = r.process(src[:1]) + r.process(src[1:4]) + r.process(b"") + r.process(src[4:]) + r.flush()
    ref = Resampler(24000, 16000)
    assert out == ref.process(src) + ref.flush()
    assert len(out) % 2 == 0


def test_empty_frames_and_empty_flush() -> None:
    r = Resampler(16000, 24000)
    assert r.process(b"") == b""
    assert r.flush() == b""
    conv = Converter(AudioFormat(PCM16, 16000), AudioFormat(PCM16, 24000))
    assert conv.convert(b"") == b""
    assert conv.flush() == b""


def test_silence_stays_silent() -> None:
    r = Resampler(24000, 16000)
    out = r.process(bytes(4800)) + r.flush()
    assert out and not any(out)


def test_reset_drops_interrupted_audio_and_restarts_cleanly() -> None:
    conv = Converter(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 16000))
    conv.convert(tone(440, 24000, 0.1) + b"\x01")  # leaves filter state and an odd byte behind
    conv.reset()
    fresh = Converter(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 16000))
    src = tone(880, 24000, 0.2)
    assert run_chunked(conv, src, [960]) == run_chunked(fresh, src, [960])


def test_flush_emits_the_held_back_tail() -> None:
    conv = Converter(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 16000))
    body = conv.convert(tone(440, 24000, 0.1))
    tail = conv.flush()
    assert tail
    assert len(body) + len(tail) == 3200  # 100 ms at 16 kHz, nothing lost at the end of a response


def test_clipping_is_saturated_not_wrapped() -> None:
    n = 4800
    square = np.where(np.arange(n) % 48 < 24, 32767, -32768).astype("<i2").tobytes()
    r = Resampler(24000, 16000)
    out = np.frombuffer(r.process(square) + r.flush(), "<i2")
    # a full-scale square overshoots (Gibbs); the overshoot must saturate at the int16 limits, not wrap around
    ref = soxr.resample(np.frombuffer(square, "<i2").astype(np.float32), 24000, 16000, quality="MQ")
    assert len(out) == len(ref) and ref.max() > 32767
    assert np.abs(out.astype(int) - np.clip(np.rint(ref), -32768, 32767).astype(int)).max() <= 1


# ---- G.711 ----------------------------------------------------------------------------------------------------------

ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()
ALL_CODES = bytes(range(256))


def test_ulaw_matches_reference_for_every_input() -> None:
    assert audio.ulaw_encode(ALL_PCM) == audioop.lin2ulaw(ALL_PCM, 2)
    assert audio.ulaw_decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_alaw_matches_reference_for_every_input() -> None:
    assert audio.alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM, 2)
    assert audio.alaw_decode(ALL_CODES) == audioop.alaw2lin(ALL_CODES, 2)


def test_g711_known_values() -> None:
    # ITU-T G.711: mu-law 0 -> 0xFF, A-law 0 -> 0xD5; extremes saturate to the end codes
    assert audio.ulaw_encode(np.array([0, 32767, -32768], dtype="<i2")) == b"\xff\x80\x00"
    assert audio.alaw_encode(np.array([0, 32767, -32768], dtype="<i2")) == b"\xd5\xaa\x2a"
    assert np.frombuffer(audio.ulaw_decode(b"\x80\x00\xff\x7f"), "<i2").tolist() == [32124, -32124, 0, 0]
    assert np.frombuffer(audio.alaw_decode(b"\xaa\x2a\xd5"), "<i2").tolist() == [32256, -32256, 8]


@pytest.mark.parametrize(
    ("enc", "dec"), [(audio.ulaw_encode, audio.ulaw_decode), (audio.alaw_encode, audio.alaw_decode)]
)
def test_g711_round_trip(enc: Callable[[bytes], bytes], dec: Callable[[bytes], bytes]) -> None:
    # decode(encode(decode(c))) == decode(c): every code is a fixed point of the quantiser
    levels = dec(ALL_CODES)
    assert dec(enc(levels)) == levels
    # and speech-level audio survives with ~38 dB SNR (8-bit log PCM)
    src = tone(440, 8000, 0.25, 0.5)
    back = dec(enc(src))
    a = np.frombuffer(src, "<i2").astype(float)
    b = np.frombuffer(back, "<i2").astype(float)
    snr = 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))
    assert snr > 30


# ---- converters -----------------------------------------------------------------------------------------------------


def test_8k_call_to_pcmu_engine_is_companding_only() -> None:
    to_engine = Converter.to_engine(8000, AudioFormat(PCMU, 8000))
    from_engine = Converter.from_engine(AudioFormat(PCMU, 8000), 8000)
    assert to_engine.resampler is None and from_engine.resampler is None
    src = tone(440, 8000, 0.1)
    coded = to_engine.convert(src)
    assert coded == audioop.lin2ulaw(src, 2)
    assert from_engine.convert(coded) == audioop.ulaw2lin(coded, 2)


def test_same_format_is_passthrough_without_resampler() -> None:
    conv = Converter(AudioFormat(PCM16, 16000), AudioFormat(PCM16, 16000))
    assert conv.passthrough and conv.resampler is None
    frame = tone(440, 16000, 0.02)
    assert conv.convert(frame) == frame
    # L16 stays sample-aligned even in passthrough
    assert conv.convert(frame[:3]) == frame[:2]
    assert conv.convert(frame[3:]) == frame[2:]
    g711 = Converter(AudioFormat(PCMA, 8000), AudioFormat(PCMA, 8000))
    assert g711.resampler is None and g711.convert(b"\x01\x02\x03") == b"\x01\x02\x03"


def test_g711_transcoding_without_resampler() -> None:
    conv = Converter(AudioFormat(PCMU, 8000), AudioFormat(PCMA, 8000))
    assert conv.resampler is None and not conv.passthrough
    assert conv.convert(ALL_CODES) == audioop.lin2alaw(audioop.ulaw2lin(ALL_CODES, 2), 2)


def test_16k_call_to_pcmu_engine_resamples_then_encodes() -> None:
    conv = Converter.to_engine(16000, AudioFormat(PCMU, 8000))
    assert conv.resampler is not None and (conv.resampler.in_rate, conv.resampler.out_rate) == (16000, 8000)
    out = run_chunked(conv, tone(440, 16000, 0.5), [640])
    assert len(out) == 4000  # 0.5 s at 8 kHz, one byte per sample
    assert abs(peak_hz(audio.ulaw_decode(out), 8000) - 440) < 3


def test_pcma_engine_to_16k_call() -> None:
    conv = Converter.from_engine(AudioFormat(PCMA, 8000), 16000)
    out = run_chunked(conv, audio.alaw_encode(tone(440, 8000, 0.5)), [161])
    assert len(out) == 16000  # 0.5 s of L16 16 kHz
    assert abs(peak_hz(out, 16000) - 440) < 3


@pytest.mark.parametrize(
    "fmt",
    [
        AudioFormat(PCMU, 16000),
        AudioFormat(PCMA, 24000),
        AudioFormat("opus", 48000),
        AudioFormat(PCM16, 0),
        AudioFormat(PCM16, -8000),
    ],
)
def test_impossible_formats_raise_clearly(fmt: AudioFormat) -> None:
    with pytest.raises(AudioFormatError, match=str(fmt.encoding) if fmt.rate > 0 else "rate"):
        Converter(AudioFormat(PCM16, 16000), fmt)
    with pytest.raises(AudioFormatError):
        Converter(fmt, AudioFormat(PCM16, 16000))


def test_pcmu_at_16k_names_the_problem() -> None:
    with pytest.raises(AudioFormatError, match=r"pcmu.*8000 Hz.*16000"):
        Converter.to_engine(16000, AudioFormat(PCMU, 16000))


def test_unknown_quality_rejected() -> None:
    with pytest.raises(ValueError, match="quality"):
        Resampler(16000, 24000, quality="best")


# ---- helpers --------------------------------------------------------------------------------------------------------


def test_ms_and_bytes() -> None:
    l16_16k = AudioFormat(PCM16, 16000)
    assert audio.bytes_to_ms(640, l16_16k) == 20.0
    assert audio.bytes_to_ms(48, AudioFormat(PCM16, 24000)) == 1.0
    assert audio.bytes_to_ms(8, AudioFormat(PCMU, 8000)) == 1.0
    assert audio.ms_to_bytes(20, l16_16k) == 640
    assert audio.ms_to_bytes(0.1, l16_16k) == 2  # whole samples only (1.6 samples -> 1)
    assert audio.ms_to_bytes(20, AudioFormat(PCMA, 8000)) == 160


def test_rechunker_emits_exact_chunks_and_keeps_the_rest() -> None:
    fmt = AudioFormat(PCM16, 8000)
    rc = Rechunker(fmt, chunk_ms=100, first_chunk_ms=20)
    data = bytes(range(250)) * 16  # 4000 bytes = 250 ms
    chunks: list[bytes] = []
    for i in range(0, len(data), 77):
        chunks += rc.push(data[i : i + 77])
    assert [len(c) for c in chunks] == [320, 1600, 1600]
    assert rc.pending_bytes == 480 and rc.pending_ms == 30.0
    assert b"".join(chunks) + rc.flush() == data
    assert rc.pending_bytes == 0
    assert [len(c) for c in rc.push(bytes(400))] == [320]  # first chunk small again after flush


def test_rechunker_flush_drops_a_half_sample() -> None:
    rc = Rechunker(AudioFormat(PCM16, 16000), chunk_ms=20)
    assert rc.push(b"\x01\x02\x03") == []
    assert rc.flush() == b"\x01\x02"


def test_rms_dbfs() -> None:
    assert audio.rms_dbfs(b"") == audio.SILENCE_DBFS
    assert audio.rms_dbfs(bytes(640)) == audio.SILENCE_DBFS
    assert audio.rms_dbfs(tone(440, 16000, 0.1, 1.0)) == pytest.approx(-3.01, abs=0.05)
    assert audio.rms_dbfs(tone(440, 16000, 0.1, 0.01)) == pytest.approx(-43.01, abs=0.1)
    assert audio.rms_dbfs(np.full(160, -32768, dtype="<i2")) == pytest.approx(0.0, abs=1e-6)


def test_iter_chunks() -> None:
    assert [len(c) for c in audio.iter_chunks(bytes(10), 4)] == [4, 4, 2]
