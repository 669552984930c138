"""SIPp callers for the scale-out scenarios: many calls through the proxy, each logging which node answered it
(the Contact of its 200 OK) and how it ended, so that every call is accounted for from the caller's side."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fsim.audio import Silence, Tone
from tests.realswitch.cluster import DID, _stop
from tests.realswitch.sipp import SDP, _read, caller_stream, free_udp_port, write_pcap

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- forkbridge scale load: calls through the proxy; each call logs which node answered it and how it ended -->
<scenario name="forkbridge scale load">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "load" <sip:load@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:load@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

{sdp}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true">
    <action>
      <ereg regexp="@([0-9.]+:[0-9]+)" search_in="hdr" header="Contact:" check_it="true" assign_to="contact,node"/>
    </action>
  </recv>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "load" <sip:load@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      [routes]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:load@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop>
    <action>
      <exec play_pcap_audio="{pcap}"/>
      <log message="answered [call_id] node=[$node] contact=[$contact]"/>
    </action>
  </nop>
  <recv request="BYE" timeout="{talk_ms}" ontimeout="hangup">
    <action>
      <ereg regexp="X-Forkbridge-Fallback: *([a-z]+)" search_in="msg" check_it="false" assign_to="fbhdr,fb"/>
    </action>
  </recv>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <nop next="end">
    <action>
      <log message="far_bye [call_id] node=[$node] fallback=[$fb] header=[$fbhdr]"/>
    </action>
  </nop>
  <label id="hangup"/>
  <send retrans="500" start_txn="bye">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "load" <sip:load@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      [routes]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: <sip:load@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="408" response_txn="bye" optional="true" next="lost"/>
  <recv response="481" response_txn="bye" optional="true" next="lost"/>
  <recv response="200" response_txn="bye" timeout="15000" ontimeout="lost"/>
  <nop next="end">
    <action>
      <log message="completed [call_id] node=[$node]"/>
    </action>
  </nop>
  <label id="lost"/>
  <nop>
    <action>
      <log message="lost [call_id] node=[$node]"/>
    </action>
  </nop>
  <label id="end"/>
</scenario>
"""

_LOG_LINE = re.compile(r"(answered|completed|far_bye|lost) (\S+) node=(\S*)(?: fallback=(\S*))?")


@dataclass
class LoadCall:
    """One SIPp call: which node answered it (its Contact) and how it ended, from the caller's side.
    `end`: completed (we hung up, the node said 200), far_bye (the node hung up; `fallback` when its BYE says
    the call went through the fallback extension), lost (our BYE got 408/481 or nothing: the node is gone),
    unanswered (no 200 to the INVITE), or open (SIPp ended before the call did)."""

    call_id: str
    node: str = ""
    end: str = "unanswered"
    fallback: bool = False


@dataclass
class LoadResult:
    placed: int
    returncode: int
    calls: dict[str, LoadCall] = field(default_factory=dict)
    output: str = ""

    def on(self, node: str) -> list[LoadCall]:
        return [c for c in self.calls.values() if c.node == node]

    def unanswered(self) -> int:
        return self.placed - len([c for c in self.calls.values() if c.node])

    def count(self, end: str, node: str | None = None) -> int:
        return len([c for c in self.calls.values() if c.end == end and (node is None or c.node == node)])


class SippLoad:
    """`calls` SIPp calls to the proxy at `rate` per second, each `talk_s` long unless the far end hangs up
    first; the caller speaks a 440 Hz second then silence, in PCMU RTP, for the whole call."""

    def __init__(self, workdir: Path, proxy: tuple[str, int], calls: int, rate: float, talk_s: float,
                 name: str = "load") -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proxy = proxy
        self.calls = calls
        self.rate = rate
        self.talk_s = talk_s
        self.proc: subprocess.Popen | None = None
        self.output: IO[bytes] | None = None
        self.started = 0.0

    def start(self) -> SippLoad:
        pcap = self.dir / "caller.pcap"
        write_pcap(pcap, caller_stream([Tone(440, 1.0), Silence(self.talk_s + 4)], 20))
        scenario = self.dir / "load.xml"
        scenario.write_text(SCENARIO.replace("{sdp}", SDP.format(ptime=20)).replace("{pcap}", str(pcap))
                            .replace("{talk_ms}", str(round(self.talk_s * 1000))))
        self.limit_s = int(self.calls / self.rate + self.talk_s + 40)
        d = self.dir
        cmd = ["sipp", f"{self.proxy[0]}:{self.proxy[1]}", "-sf", str(scenario), "-s", DID,
               "-i", "127.0.0.1", "-p", str(free_udp_port()), "-bind_local",
               "-mi", "127.0.0.1", "-mp", str(free_udp_port(pair=True)),
               "-ci", "127.0.0.1", "-cp", str(free_udp_port()),
               "-m", str(self.calls), "-r", str(round(self.rate * 1000)), "-rp", "1000000", "-l", str(self.calls),
               "-timeout", f"{self.limit_s}s", "-recv_timeout", "20000", "-nostdin",
               "-trace_logs", "-log_file", str(d / "calls.log"), "-trace_err", "-error_file", str(d / "errors.log"),
               "-trace_stat", "-stf", str(d / "stats.csv"), "-trace_screen", "-screen_file", str(d / "screen.log")]
        self.output = open(d / "output.txt", "wb")  # noqa: SIM115 - closed in wait()
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, cwd=d, stdout=self.output, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def answered(self, node: str = "") -> int:
        """Calls answered so far (from SIPp's log as it goes), by the node at `node` (ip:port) if given."""
        text = _read(self.dir / "calls.log")
        return len(re.findall(rf"^answered \S+ node={re.escape(node)}" if node else r"^answered ", text, re.M))

    def wait(self) -> LoadResult:
        assert self.proc is not None, "start() first"
        try:
            self.proc.wait(self.limit_s + 10)
        except subprocess.TimeoutExpired:
            _stop(self.proc)
        if self.output is not None:
            self.output.close()
        result = LoadResult(self.calls, self.proc.returncode,
                            output=_read(self.dir / "output.txt") + _read(self.dir / "errors.log")[-3000:])
        for kind, call_id, node, fallback in _LOG_LINE.findall(_read(self.dir / "calls.log")):
            call = result.calls.setdefault(call_id, LoadCall(call_id))
            if kind == "answered":
                call.node, call.end = node, "open"
            else:
                call.end, call.fallback = kind, fallback == "true"
        return result


