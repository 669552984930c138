"""What a scripted caller does: speak (a Signal), press digits, hang up; all times relative to the answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .audio import Signal, WavFile


@dataclass
class CallerScript:
    """``audio`` starts at answer and is followed by silence; ``dtmf`` is ``[(digit, seconds), ...]``.

    ``dtmf_source`` is what FreeSWITCH would report (``RTP`` for RFC 2833, ``ENDPOINT`` for SIP INFO).
    ``hangup_after`` None means the caller stays until the switch hangs up (or the channel's ``max_call_s``).
    """

    audio: Signal | None = None
    dtmf: list[tuple[str, float]] = field(default_factory=list)
    hangup_after: float | None = None
    dtmf_duration_ms: int = 250
    dtmf_source: str = "RTP"
    hangup_cause: str = "NORMAL_CLEARING"

    def __post_init__(self) -> None:
        for digit, _t in self.dtmf:
            if len(digit) != 1 or digit not in "0123456789*#ABCDabcd":
                raise ValueError(f"not a DTMF digit: {digit!r}")


_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


def parse_seconds(text: str) -> float:
    """``'3s'``, ``'250ms'`` or ``'2.5'`` → seconds."""
    m = _DUR.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    v = float(m.group(1))
    return v / 1000.0 if m.group(2) == "ms" else v


def parse_dtmf_spec(spec: str) -> list[tuple[str, float]]:
    """``'5@3s'`` or ``'1@2s,#@4.5s'`` → ``[('5', 3.0)]``."""
    out = []
    for part in spec.split(","):
        if not part.strip():
            continue
        digit, _, when = part.strip().partition("@")
        out.append((digit, parse_seconds(when or "0")))
    return out


def script_from_cli(say: str | None, dtmf: list[str], hangup: str | None) -> CallerScript:
    events: list[tuple[str, float]] = []
    for spec in dtmf:
        events.extend(parse_dtmf_spec(spec))
    return CallerScript(
        audio=WavFile(say) if say else None,
        dtmf=events,
        hangup_after=parse_seconds(hangup) if hangup else None,
    )
