"""A caller on the real switch: a loopback leg that plays its script and records what it hears.

`originate loopback/<DID>/public` makes two channels: the A leg (ours: it runs an inline dialplan that records
the leg in stereo, plays the caller's audio, then waits) and the B leg, which goes through the public context
to dialplan/forkbridge.xml and is the call forkbridge owns.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from pathlib import Path

import numpy as np

from controller.esl import Event
from fsim.audio import Signal, write_wav
from tests.realswitch.heard import SILENT, Recording
from tests.realswitch.switch import FreeSwitch, Probe

CALLER_RATE = 8000
ABANDONED: set[str] = set()  # B legs of dials placed again (the loopback race): not the test's calls
RACE_WAIT_S = 3.0  # the A leg starts its playback within ~50 ms of the originate; not at all in the race


def real_calls(records: list[dict]) -> list[dict]:
    """Call records without those of abandoned dials (the daemon took and recorded their B legs too)."""
    return [r for r in records if r.get("uuid") not in ABANDONED]


def _when(event: Event) -> float:
    """The event's wall-clock time (FreeSWITCH stamps events in microseconds)."""
    return int(event.get("Event-Date-Timestamp", "0")) / 1e6


class Caller:
    def __init__(self, switch: FreeSwitch, probe: Probe, workdir: Path, audio: Signal, did: str = "7100",
                 name: str = "caller", hangs_up: bool = False) -> None:
        """`hangs_up`: the caller hangs up when its audio ends (else it stays on the line, silent)."""
        self.switch = switch
        self.probe = probe
        self.did = did
        self.a = str(uuidlib.uuid4())
        self.b = ""
        self.wav = workdir / f"{name}-says.wav"
        self.samples = audio.render(CALLER_RATE)
        write_wav(str(self.wav), self.samples, CALLER_RATE)
        self.recording_path = workdir / f"{name}-heard.wav"
        self._mark = 0
        self.rec_t0 = 0.0  # wall-clock time of the recording's first sample
        self.last_app = "hangup" if hangs_up else "park"

    def dial(self, variables: str = "", timeout: float = 10.0, attempts: int = 3) -> Caller:
        """Place the call. mod_loopback (1.10.12) now and then loses the A leg's transfer to our inline dialplan
        (about 1 dial in 30): the A leg runs the public context's *XML* dialplan instead (dialplan/forkbridge.xml:
        it parks, silent), or its thread never runs the transfer at all (nothing for 10 s, in the switch log).
        Such a dial is hung up and placed again with a new A-leg uuid."""
        for attempt in range(attempts):
            self._mark = len(self.probe.events)
            app = (f"'set:RECORD_STEREO=true,record_session:{self.recording_path},playback:{self.wav},"
                   f"{self.last_app}' inline")
            reply = self.probe.api(f"originate {{origination_uuid={self.a}{variables}}}loopback/{self.did}/public "
                                   f"{app}")
            assert reply.startswith("+OK"), f"originate refused: {reply.strip()}"
            answer = self.probe.wait_event(
                lambda e: e.name == "CHANNEL_ANSWER" and e.get("Channel-Name") == f"loopback/{self.did}-b"
                and e.get("variable_other_loopback_leg_uuid") == self.a, timeout, "B-leg answer", self._mark)
            self.b = answer.uuid
            try:
                first = self.probe.wait_event(
                    lambda e: e.uuid == self.a and (e.name == "PLAYBACK_START" or (
                        e.name == "CHANNEL_EXECUTE" and e.get("Application") == "park")),
                    RACE_WAIT_S, "caller playback start", self._mark)
            except AssertionError:
                first = None  # the other face of the race: the A leg's thread never ran the transfer
            if first is not None and first.name == "PLAYBACK_START":
                self.said_from = _when(first)  # the caller's audio starts going out now
                return self
            if attempt + 1 < attempts:  # the loopback race: this A leg will never play; dial again
                ABANDONED.add(self.b)
                self.probe.api(f"uuid_kill {self.a}")
                self.wait_gone()
                self.a = str(uuidlib.uuid4())
        raise AssertionError(f"the caller's A leg never played its audio in {attempts} dials")

    def events(self, name: str, leg: str = "b") -> list[Event]:
        uuid = self.b if leg == "b" else self.a
        return [e for e in self.probe.events[self._mark:] if e.uuid == uuid and e.name == name]

    def playbacks(self) -> list[tuple[str, str, str]]:
        """(PLAYBACK_START|PLAYBACK_STOP, file, status) on the B leg, in the order FreeSWITCH sent them."""
        return [(e.name, e.get("Playback-File-Path"), e.get("Playback-Status")) for e in self.probe.events[self._mark:]
                if e.uuid == self.b and e.name in ("PLAYBACK_START", "PLAYBACK_STOP")]

    def wait(self, match, timeout: float = 10.0, what: str = "event") -> Event:
        return self.probe.wait_event(match, timeout, what, self._mark)

    def recv_dtmf(self, digits: str) -> None:
        """Digits as if the caller pressed them (they arrive on the B leg)."""
        assert self.probe.api(f"uuid_recv_dtmf {self.b} {digits}").startswith("+OK")

    def hang_up(self) -> None:
        self.probe.api(f"uuid_kill {self.a}")

    def wait_gone(self, timeout: float = 15.0) -> Event:
        """Both legs destroyed; the B leg's hangup event."""
        for uuid in (self.a, self.b):
            self.wait(lambda e, u=uuid: e.name == "CHANNEL_DESTROY" and e.uuid == u, timeout, f"destroy of {uuid}")
        return self.wait(lambda e: e.name == "CHANNEL_HANGUP_COMPLETE" and e.uuid == self.b, 1, "B-leg hangup")

    def recording(self, timeout: float = 15.0) -> Recording:
        """What the caller heard, once the recording is closed; its clock aligned to wall-clock time from
        the caller's own audio (the first loud sample of its mouth channel left at `said_from`)."""
        self.wait(lambda e: e.name == "RECORD_STOP" and e.uuid == self.a, timeout, "recording stop")
        rec = Recording.read(self.recording_path)
        first_said = int(np.argmax(np.abs(self.samples.astype(np.int32)) >= SILENT)) / CALLER_RATE
        loud = np.flatnonzero(np.abs(rec.mouth.astype(np.int32)) >= SILENT)
        onset = loud[0] / rec.rate if len(loud) else 0.0
        self.rec_t0 = self.said_from + first_said - onset
        return rec

    def at(self, wall: float) -> float:
        """Recording time (s) of a wall-clock instant; valid after recording()."""
        return wall - self.rec_t0


def wait_no_channels(probe: Probe, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.api("show channels count").strip().startswith("0 total"):
            return
        time.sleep(0.1)
    raise AssertionError(f"channels left on the switch: {probe.api('show channels')}")
