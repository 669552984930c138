"""A real FreeSWITCH for the test suite: found, configured from our own dialplan files, started, stopped by PID.

Where the switch comes from: `FORKBRIDGE_FREESWITCH` (a prefix laid out like the bundle in ../shared/freeswitch:
bin/freeswitch, mod/, conf/ with the bundle's env-driven vars.xml), or else the bundle installed by the Makefile
under .cache/freeswitch. Each started switch gets its own directory (config, log, db, recordings) and free
loopback ports; nothing binds anywhere but 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import gevent.event

from controller.esl import EslConnection, Event
from tests.harness import free_ports

REPO = Path(__file__).resolve().parents[2]
CACHED_PREFIX = REPO / ".cache" / "freeswitch"
SHARED_BUNDLE = REPO.parent / "shared" / "freeswitch"
PASSWORD = "fb-test-esl-secret"


def find_prefix() -> tuple[Path | None, str]:
    """The FreeSWITCH prefix to test against, or None and why there is none."""
    explicit = os.environ.get("FORKBRIDGE_FREESWITCH", "")
    if explicit:
        prefix = Path(explicit)
        if not (prefix / "bin" / "freeswitch").is_file():
            return None, f"FORKBRIDGE_FREESWITCH={explicit} has no bin/freeswitch"
        return prefix, f"FORKBRIDGE_FREESWITCH={explicit}"
    if (CACHED_PREFIX / "bin" / "freeswitch").is_file():
        return CACHED_PREFIX, f"bundle installed in {CACHED_PREFIX}"
    if SHARED_BUNDLE.is_dir():
        return None, f"{SHARED_BUNDLE} is there but not installed (run `make freeswitch`)"
    return None, ("no FreeSWITCH: set FORKBRIDGE_FREESWITCH=/usr/local/freeswitch "
                  "or put ../shared/freeswitch beside the repo")


def must_run() -> bool:
    """Under CI with the bundle beside the repo the real-switch suite may never be skipped."""
    return os.environ.get("CI", "").lower() == "true" and SHARED_BUNDLE.is_dir()


# ----------------------------------------------------------------------------------------- configuration

TEST_EXTENSIONS = r"""<include>
  <!-- test-only extensions: transfer and fallback targets a test can tell apart by pitch -->
  <extension name="fb_test_operator">
    <condition field="destination_number" expression="^7300$">
      <action application="answer"/>
      <action application="playback" data="tone_stream://%(10000,0,1000);loops=-1"/>
    </condition>
  </extension>
  <extension name="fb_test_human">
    <condition field="destination_number" expression="^7301$">
      <action application="answer"/>
      <action application="playback" data="tone_stream://%(10000,0,1250);loops=-1"/>
    </condition>
  </extension>
  <!-- callees for outbound calls (loopback/<number>/public): the far leg records what it heard (channel 0) -->
  <extension name="fb_test_callee_speaks">
    <condition field="destination_number" expression="^7310$">
      <action application="set" data="RECORD_STEREO=true"/>
      <action application="answer"/>
      <action application="record_session" data="$${recordings_dir}/callee-${forkbridge_outbound}.wav"/>
      <action application="playback" data="silence_stream://2500"/>
      <action application="playback" data="tone_stream://%(800,0,660)"/>
      <action application="playback" data="silence_stream://3000"/>
      <action application="hangup"/>
    </condition>
  </extension>
  <extension name="fb_test_callee_busy">
    <condition field="destination_number" expression="^7311$">
      <action application="respond" data="486"/>
      <action application="hangup" data="USER_BUSY"/>
    </condition>
  </extension>
  <extension name="fb_test_callee_never_answers">
    <condition field="destination_number" expression="^7312$">
      <action application="ring_ready"/>
      <action application="sleep" data="30000"/>
    </condition>
  </extension>
  <extension name="fb_test_callee_rejects">
    <condition field="destination_number" expression="^7313$">
      <action application="hangup" data="CALL_REJECTED"/>
    </condition>
  </extension>
  <extension name="fb_test_callee_brief">
    <condition field="destination_number" expression="^\+1666777\d{4}$">
      <action application="answer"/>
      <action application="playback" data="silence_stream://1200"/>
      <action application="hangup"/>
    </condition>
  </extension>
</include>
"""


UNTAKEN_AFTER_S = 10  # the shipped dialplan's timer for calls no daemon takes, shortened for the tests
UNTAKEN_TO = "7300 XML public"  # the test operator (1000 Hz)


def dialplan_for_tests(shipped: str) -> str:
    """Our dialplan/forkbridge.xml as shipped, but for the untaken-call timer: 10 s and the test operator."""
    for name, value in (("forkbridge_untaken_after", UNTAKEN_AFTER_S), ("forkbridge_untaken_to", UNTAKEN_TO)):
        shipped, found = re.subn(rf'data="{name}=[^"]*"', f'data="{name}={value}"', shipped)
        assert found == 1, f"dialplan/forkbridge.xml no longer sets {name}"
    return shipped


def write_config(template: Path, conf: Path, esl_port: int, extra_public: dict[str, str],
                 extra_files: dict[str, str] | None = None) -> None:
    """The switch's config: the prefix's template, our event_socket.conf.xml (its port and password set for this
    switch) and our dialplan/forkbridge.xml as the public context's DIDs, plus the tests' own extensions, plus
    `extra_files` (path under conf/ -> text, e.g. a SIP profile of deploy/scale/)."""
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(template, conf)
    tree = ET.parse(REPO / "dialplan" / "event_socket.conf.xml")
    for param in tree.getroot().iter("param"):
        if param.get("name") == "listen-port":
            param.set("value", str(esl_port))
        elif param.get("name") == "password":
            param.set("value", PASSWORD)
    tree.write(conf / "autoload_configs" / "event_socket.conf.xml")
    public = conf / "dialplan" / "public"
    public.mkdir(exist_ok=True)
    (public / "10_forkbridge.xml").write_text(dialplan_for_tests((REPO / "dialplan" / "forkbridge.xml").read_text()))
    (public / "20_fb_test.xml").write_text(TEST_EXTENSIONS)
    for name, text in extra_public.items():
        (public / name).write_text(text)
    for name, text in (extra_files or {}).items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)


# ----------------------------------------------------------------------------------------- ESL probe


@dataclass
class Probe:
    """A test's own ESL connection (greenswitch, like the daemon's): commands, and every event kept in order."""

    host: str
    port: int
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._arrived = gevent.event.Event()
        self.esl = EslConnection(self.host, self.port, PASSWORD, timeout=10)
        self.esl.connect()
        self.esl.register_handle("*", self._on_event)
        self.esl.send("event plain ALL")

    def _on_event(self, raw) -> None:
        event = getattr(raw, "parsed", None)
        if event is not None and event.name:
            self.events.append(event)
            self._arrived.set()

    def api(self, command: str) -> str:
        return self.esl.send(f"api {command}").data or ""

    def wait_event(self, match, timeout: float = 10.0, what: str = "event", since: int = 0) -> Event:
        """The first event (from index `since`) for which match(event) is true; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                if match(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"FreeSWITCH sent no {what} within {timeout}s")
            self._arrived.clear()
            self._arrived.wait(min(left, 0.2))

    def find(self, match) -> list[Event]:
        return [e for e in self.events if match(e)]

    def close(self) -> None:
        self.esl.close()


# ----------------------------------------------------------------------------------------- the process


class FreeSwitch:
    """One FreeSWITCH process on free loopback ports with its own state directory."""

    def __init__(self, prefix: Path, workdir: Path, module_dir: str = "mod", name: str = "fs") -> None:
        self.prefix = prefix
        self.dir = workdir / name
        self.module_dir = prefix / module_dir
        self.name = name
        self.esl_port, self.sip_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.extra_public: dict[str, str] = {}
        self.extra_files: dict[str, str] = {}  # path under conf/ -> text, written after the template

    @property
    def conf(self) -> Path:
        return self.dir / "conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / "freeswitch.log"

    @property
    def recordings(self) -> Path:
        return self.dir / "recordings"

    def start(self, timeout: float = 90.0) -> FreeSwitch:
        for sub in ("log", "run", "db", "temp", "cache", "recordings", "storage", "sounds", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        write_config(self.prefix / "conf", self.conf, self.esl_port, self.extra_public, self.extra_files)
        certs = REPO / ".cache" / "freeswitch-certs"  # made by the first start (slow), shared by later ones
        certs.mkdir(parents=True, exist_ok=True)
        d = self.dir
        rtp = 20000 + (self.esl_port % 400) * 100  # a private RTP range per switch
        env = dict(os.environ, FS_ESL_PORT=str(self.esl_port), FS_ESL_PASSWORD=PASSWORD,
                   FS_SIP_PORT=str(self.sip_port), FS_RTP_START=str(rtp), FS_RTP_END=str(rtp + 99),
                   LD_LIBRARY_PATH=str(self.prefix / "lib"))
        cmd = [str(self.prefix / "bin" / "freeswitch"), "-nf", "-nc", "-nonat", "-base", str(d),
               "-conf", str(self.conf), "-mod", str(self.module_dir), "-log", str(d / "log"),
               "-run", str(d / "run"), "-db", str(d / "db"), "-temp", str(d / "temp"), "-cache", str(d / "cache"),
               "-recordings", str(self.recordings), "-storage", str(d / "storage"), "-sounds", str(d / "sounds"),
               "-certs", str(certs)]
        self.stdout = open(d / "stdout.txt", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.stdout, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"FreeSWITCH exited with {self.proc.returncode}; see {d / 'stdout.txt'}")
            try:
                probe = Probe("127.0.0.1", self.esl_port)
            except Exception:
                gevent.sleep(0.25)
                continue
            try:
                if "UP" in probe.api("status"):
                    return self
            finally:
                probe.close()
            gevent.sleep(0.25)
        self.stop()
        raise RuntimeError(f"FreeSWITCH ESL not up on 127.0.0.1:{self.esl_port} within {timeout}s")

    def probe(self) -> Probe:
        return Probe("127.0.0.1", self.esl_port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Gone at once, as when the box loses the process."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        self.stdout.close()
        return self.proc.returncode

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

