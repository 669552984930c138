"""A SIPp caller on the real switch: a SIP phone call over RTP, the way a carrier's call arrives (PCMU, RFC 2833).

Loopback legs never cross SIP, RTP, a codec or a packet time; this caller does. It writes a UAC scenario (INVITE
offering PCMU/8000 + telephone-event/8000 with a=ptime 20 or 30, digest auth, ACK, media, BYE) and a pcap of the
caller's RTP stream (PCMU audio, RFC 2833 event packets for digits) that SIPp's `play_pcap_audio` replays at the
pcap's own pace. Everything binds to 127.0.0.1 (SIP, media, SIPp's control socket); each run is bounded by
`-m 1`, `-timeout` and a subprocess timeout.

How the call reaches our DID: the bundle's internal profile has `context=public`, but `auth-calls=true` and
`apply-inbound-acl=domains` (default deny, no cidr users), so every INVITE from 127.0.0.1 is challenged with 407.
After digest auth the caller's directory entry decides the context (`user_context`); the bundle's users 7001-7004
land in `default`, where our DIDs are not. So `add_sipp_user` writes a test-only directory user whose
`user_context` is `public`: the authenticated call then runs the public context, i.e. dialplan/forkbridge.xml
exactly as installed, like a carrier's call.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import gevent
import numpy as np

from fsim.audio import Signal, g711_decode, ulaw_encode
from tests.realswitch.switch import FreeSwitch, Probe

RATE = 8000  # PCMU
PCMU_PT = 0
EVENT_PT = 101  # telephone-event, as the profile's rfc2833-pt
SSRC = 0x5EED2833
SIPP_USER = "fbsipp"
SIPP_PASSWORD = "fb-sipp-test-only"
EVENT_CODES = {**{d: int(d) for d in "0123456789"}, "*": 10, "#": 11, "A": 12, "B": 13, "C": 14, "D": 15}

SIPP_DIRECTORY_USER = f"""<include>
  <!-- test-only: a SIPp caller whose authenticated calls run the public context (our DIDs), like a carrier's -->
  <user id="{SIPP_USER}">
    <params>
      <param name="password" value="{SIPP_PASSWORD}"/>
    </params>
    <variables>
      <variable name="user_context" value="public"/>
    </variables>
  </user>
</include>
"""


def why_sipp_unusable() -> str:
    """Why SIPp calls cannot run here ("" when they can)."""
    if shutil.which("sipp") is None:
        return "no sipp on PATH (`make freeswitch` installs Debian's sip-tester as root)"
    if os.geteuid() != 0:
        return "SIPp's play_pcap_audio sends RTP through a raw socket, which needs root"
    return ""


def add_sipp_user(switch: FreeSwitch, probe: Probe) -> None:
    """Put the SIPp caller's directory entry into the running switch (idempotent) and reload the XML."""
    path = switch.conf / "directory" / "default" / f"zz_{SIPP_USER}.xml"
    if not path.exists() or path.read_text() != SIPP_DIRECTORY_USER:
        path.write_text(SIPP_DIRECTORY_USER)
        reply = probe.api("reloadxml")
        assert "+OK" in reply, f"reloadxml: {reply.strip()}"


# ----------------------------------------------------------------------------------------- the caller's RTP


@dataclass(frozen=True)
class Dtmf:
    """RFC 2833 digits in the caller's stream: each an event of at least `on_ms`, then `off_ms` of silence."""

    digits: str
    on_ms: int = 160
    off_ms: int = 240


def rtp_packet(pt: int, seq: int, ts: int, payload: bytes, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, SSRC) + payload


def caller_stream(script: list[Signal | Dtmf], ptime_ms: int) -> list[tuple[float, bytes]]:
    """(send time in s, RTP packet) for the whole script: audio one packet per ptime, digits as RFC 2833 events
    (marker on the first packet, duration growing by a packet's samples, three end packets), timestamps on one
    8 kHz clock so audio after a digit continues where the event left off."""
    spp = RATE * ptime_ms // 1000
    packets: list[tuple[float, bytes]] = []
    slot = 0  # packet times elapsed; the RTP timestamp is slot * spp
    seq = 1

    def audio(samples: np.ndarray) -> None:
        nonlocal slot, seq
        pad = (-len(samples)) % spp
        samples = np.concatenate([samples, np.zeros(pad, np.int16)])
        for i in range(0, len(samples), spp):
            packets.append((slot * ptime_ms / 1000, rtp_packet(PCMU_PT, seq, slot * spp,
                                                                ulaw_encode(samples[i:i + spp]), marker=seq == 1)))
            slot += 1
            seq += 1

    for part in script:
        if isinstance(part, Dtmf):
            for digit in part.digits:
                start_ts, n = slot * spp, -(-part.on_ms // ptime_ms)
                for i in range(n):
                    end = i == n - 1
                    payload = struct.pack("!BBH", EVENT_CODES[digit], (0x80 if end else 0) | 10, (i + 1) * spp)
                    packet = rtp_packet(EVENT_PT, seq, start_ts, payload, marker=i == 0)
                    # the end packet goes three times, the same packet (RFC 4733 2.5.1.4)
                    packets.extend([(slot * ptime_ms / 1000, packet)] * (3 if end else 1))
                    seq += 1
                    slot += 1
                audio(np.zeros(RATE * part.off_ms // 1000, np.int16))
        else:
            audio(part.render(RATE))
    return packets


def write_pcap(path: Path, packets: list[tuple[float, bytes]], dst_port: int = 6000) -> None:
    """A classic pcap (Ethernet, IPv4, UDP) as SIPp's prepare_pcap reads it: it keeps the UDP payload and the
    timing, and rewrites addresses, ports and checksums when it plays."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ident, (when, rtp) in enumerate(packets):
        udp = struct.pack("!HHHH", dst_port, dst_port, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
        frame = b"\x00" * 12 + b"\x08\x00" + ip + udp
        usec = round(when * 1e6)
        out.append(struct.pack("<IIII", 1_700_000_000 + usec // 1_000_000, usec % 1_000_000, len(frame), len(frame)))
        out.append(frame)
    path.write_bytes(b"".join(out))


# ----------------------------------------------------------------------------------------- what the caller hears


class RtpTap:
    """The caller's ear: a copy of every RTP packet FreeSWITCH sends to SIPp's media port. SIPp itself drops what
    it receives (unless it echoes it back into the call), so a raw UDP socket on 127.0.0.1, which Linux hands a
    copy of each UDP datagram, keeps them (root, as SIPp's own play_pcap_audio needs)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.packets: list[tuple[float, int, int, int, bytes]] = []  # (arrival, pt, seq, ts, payload)
        self._closed = False
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            udp = data[(data[0] & 0x0F) * 4:]  # after the IPv4 header
            if len(udp) < 20 or struct.unpack("!H", udp[2:4])[0] != self.port or udp[8] >> 6 != 2:
                continue
            rtp = udp[8:]
            seq, ts = struct.unpack("!HI", rtp[2:8])
            self.packets.append((time.monotonic(), rtp[1] & 0x7F, seq, ts, rtp[12:]))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.join(2)
            self.sock.close()

    def payload_sizes(self, pt: int = PCMU_PT) -> list[int]:
        return [len(p) for _t, ptype, _s, _ts, p in self.packets if ptype == pt]

    def heard(self) -> np.ndarray:
        """The PCMU audio placed by RTP timestamp (lost or unsent packets stay silent)."""
        audio = [(ts, g711_decode(p, "PCMU")) for _t, pt, _s, ts, p in self.packets if pt == PCMU_PT and p]
        if not audio:
            return np.zeros(0, np.int16)
        first = audio[0][0]
        offsets = [(ts - first) & 0xFFFFFFFF for ts, _s in audio]
        if max(offsets) > 600 * RATE:
            raise AssertionError(f"RTP timestamps jump by {max(offsets) / RATE:.0f} s: not one stream")
        out = np.zeros(max(o + len(s) for o, (_ts, s) in zip(offsets, audio, strict=True)), np.int16)
        for o, (_ts, s) in zip(offsets, audio, strict=True):
            out[o:o + len(s)] = s
        return out


# ----------------------------------------------------------------------------------------- the SIPp run

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="forkbridge SIPp caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

{sdp}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="407" auth="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-3]
      From: "SIPp caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 2 INVITE
      Contact: <sip:{user}@[local_ip]:[local_port]>
      [authentication username={user} password={password}]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

{sdp}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 ACK
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop>
    <action>
      <exec play_pcap_audio="{pcap}"/>
    </action>
  </nop>
  <pause milliseconds="{talk_ms}"/>
  <send retrans="500" start_txn="bye">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 3 BYE
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" response_txn="bye" crlf="true"/>
</scenario>
"""

SDP = """      v=0
      o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-16
      a=ptime:{ptime}
      a=sendrecv"""


def free_udp_port(pair: bool = False) -> int:
    """A free UDP port on 127.0.0.1 (with `pair`, also port+2 free: SIPp binds the media port and port+2).
    Bounded: 50 tries."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not pair:
                return port
            if port > 65533:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s2:
                try:
                    s2.bind(("127.0.0.1", port + 2))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP port on 127.0.0.1")


@dataclass
class SippResult:
    returncode: int
    stats: dict[str, str] = field(default_factory=dict)  # the last row of SIPp's -trace_stat CSV
    messages: str = ""  # SIPp's -trace_msg log: every SIP message sent and received
    output: str = ""  # SIPp's stdout/stderr
    errors: str = ""  # SIPp's -trace_err log: unexpected messages

    @property
    def successful_calls(self) -> int:
        return int(self.stats.get("SuccessfulCall(C)", "0") or 0)

    @property
    def failed_calls(self) -> int:
        return int(self.stats.get("FailedCall(C)", "0") or 0)

    def _sdp(self, first_line: str) -> str:
        for block in self.messages.split("----------------------------------------------- "):
            lines = [line for line in block.splitlines() if line.strip()]  # when, "UDP message ...", start line
            if len(lines) > 2 and lines[2].startswith(first_line) and "v=0" in block:
                return block[block.index("v=0"):].strip()
        return ""

    def offer_sdp(self) -> str:
        """The SDP SIPp offered (its [media_port] filled in)."""
        return self._sdp("INVITE ")

    def answer_sdp(self) -> str:
        """The SDP of FreeSWITCH's 200 OK to the INVITE (what it agreed to: codec, ptime, DTMF payload type)."""
        return self._sdp("SIP/2.0 200 OK")

    def __str__(self) -> str:
        return (f"sipp exit {self.returncode}, successful {self.successful_calls}, failed {self.failed_calls}\n"
                f"{self.output[-1500:]}\n{self.errors[-1500:]}")


class SippCall:
    """One SIPp UAC call into the switch: start() returns at once (the test watches the call meanwhile), wait()
    collects the outcome. The caller says `script` in RTP packets of `ptime_ms`, then hangs up (BYE)."""

    def __init__(self, switch: FreeSwitch, workdir: Path, script: list[Signal | Dtmf], ptime_ms: int = 20,
                 did: str = "7100", tap: bool = True, name: str = "sipp", hang_up_after_s: float = 0.5) -> None:
        self.switch = switch
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.did = did
        self.ptime_ms = ptime_ms
        self.stream = caller_stream(script, ptime_ms)
        self.talk_s = self.stream[-1][0] + hang_up_after_s  # BYE this long after the pcap starts
        self.media_port = free_udp_port(pair=True)
        self.tap = RtpTap(self.media_port) if tap else None
        self.proc: subprocess.Popen | None = None
        self.output: IO[bytes] | None = None

    def _files(self) -> tuple[Path, Path]:
        pcap = self.dir / f"caller-{self.ptime_ms}ms.pcap"
        write_pcap(pcap, self.stream)
        sdp = SDP.format(ptime=self.ptime_ms)
        scenario = self.dir / "uac.xml"
        scenario.write_text(SCENARIO.format(user=SIPP_USER, password=SIPP_PASSWORD, sdp=sdp, pcap=pcap,
                                            talk_ms=round(self.talk_s * 1000)))
        return scenario, pcap

    def start(self) -> SippCall:
        scenario, _pcap = self._files()
        self.timeout_s = int(self.talk_s + 15)
        d = self.dir
        cmd = ["sipp", f"127.0.0.1:{self.switch.sip_port}", "-sf", str(scenario), "-s", self.did,
               "-i", "127.0.0.1", "-p", str(free_udp_port()), "-bind_local",
               "-mi", "127.0.0.1", "-mp", str(self.media_port),
               "-ci", "127.0.0.1", "-cp", str(free_udp_port()),
               "-m", "1", "-l", "1", "-timeout", f"{self.timeout_s}s", "-timeout_error", "-recv_timeout", "10000",
               "-nostdin", "-trace_stat", "-stf", str(d / "stats.csv"), "-trace_msg", "-message_file",
               str(d / "messages.log"), "-trace_err", "-error_file", str(d / "errors.log"),
               "-trace_screen", "-screen_file", str(d / "screen.log")]
        self.output = open(d / "output.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=d, stdout=self.output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def wait(self, timeout: float | None = None) -> SippResult:
        """SIPp's outcome once it has exited (stopped, by its own pid, if it outlives `timeout`)."""
        assert self.proc is not None, "start() the call first"
        try:
            returncode = self.proc.wait(timeout if timeout is not None else self.timeout_s + 10)
        except subprocess.TimeoutExpired:
            self.stop()
            returncode = self.proc.returncode
        self.stop()  # closes the tap and the output file
        return SippResult(returncode, self._stats(), _read(self.dir / "messages.log"),
                          _read(self.dir / "output.txt") + _read(self.dir / "screen.log"),
                          _read(self.dir / "errors.log"))

    def stop(self) -> None:
        """End our own SIPp process if it still runs (only it, by its Popen handle) and close the tap; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.output is not None:
            self.output.close()
        if self.tap is not None:
            self.tap.close()

    def _stats(self) -> dict[str, str]:
        text = _read(self.dir / "stats.csv")
        rows = list(csv.reader(text.splitlines(), delimiter=";"))
        if len(rows) < 2:
            return {}
        return dict(zip(rows[0], rows[-1], strict=False))


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""
