"""fsim: a FreeSWITCH simulator (ESL server, mod_audio_fork / mod_audio_stream, scripted caller with an ear).

It never monkey-patches; run it inside a patched process (tests/conftest.py, ``fsim.cli.main``) or rely on its own
gevent sockets.
"""

from .audio import Samples, Sequence, Silence, SpeechLike, Tone, WavFile, dominant_frequency, rms
from .caller import CallerScript
from .channel import Callee, Channel
from .ear import Ear, Gap, Segment
from .switch import CommandRecord, FSim

__all__ = [
    "Callee", "CallerScript", "Channel", "CommandRecord", "Ear", "FSim", "Gap", "Samples", "Segment", "Sequence",
    "Silence", "SpeechLike", "Tone", "WavFile", "dominant_frequency", "rms",
]  # fmt: skip
