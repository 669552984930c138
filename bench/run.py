"""`make bench`: load figures for the real daemon — CPU and memory per call, real-time misses, latencies.

Per step (N concurrent calls) three processes run, each started fresh and ended by PID here:

- the daemon: `.venv/bin/forkbridge run --config <generated yaml>` (the only process whose cost is measured);
- bench/driver.py: fsim (simulated FreeSWITCH: ESL server, mod_audio_fork emulation, scripted callers);
- bench/fake_openai.py: a lean OpenAI Realtime GA fake (base64 PCM16 24 kHz JSON both ways, replies 10x faster
  than real time, a caller interruption every other response).

N 16 kHz calls are placed at 100 calls/s; half go to a broadcast route (DID 7101: chunks in the spool dir +
`playback`), half to a stream route (DID 7102: jambonz bidirectional build, binary frames back on the fork
socket), in the same run. Once every fork is connected and after a 2 s settle, the steady window of
`--seconds` starts; all latency samples are taken from that window only.

Figures (one row per step, also written to bench/results.json):

- cpu %/call: daemon utime+stime (/proc/<pid>/stat) over the window, as % of one core, divided by N.
- KiB/call: (VmRSS at the window's end - VmRSS idle, after ESL connected and before any call) / N.
- late: appends of caller audio that reached the engine more than 20 ms after fsim sent the fork frame that
  triggered them, with the total count. This is the "fell behind real time" measure; gen-late is the same check
  on the generator (fsim frames sent > 20 ms behind their 20 ms schedule), which says whether the step's load was
  real.
- frame→engine p50/p99: the triggering frame sent by fsim → its append arriving at the fake. The triggering frame
  is the one that completed the daemon's batch: the session drops caller audio until the engine is ready, then
  sends each time ENGINE_CHUNK_MS (two frames) or more have accumulated, through the 16k→24k resampler, which
  emits in blocks (an append goes out when it emits). Which frame that is is replayed per call from the fork
  messages fsim really sent (sizes and order; a two-frame message after a single frame makes a three-frame batch
  and shifts every later pair), starting from the first frame the engine heard (read from where the caller's
  signature ends in the audio), and checked against the running byte count the fake records:
  appends_mismatched counts appends whose size the replay does not reproduce (0 when the attribution is right).
  By construction this figure includes no batching wait and no resampler hold: the reference frame is the last
  one the daemon needed. batch_first_frame_to_engine_ms (JSON only) is the same for the batch's first frame,
  so it adds the wait for the frame that completes the batch (about 20 ms).
- audio→playback p50/p99: engine delta sent → playback submitted. Broadcast: the `playback` command for the
  chunk arriving at fsim, from the delta that completed the chunk (or response.done for the flushed tail).
  Stream: the first binary frame of each response arriving at fsim, from the response's first delta (later
  frames are paced at real time on purpose; how far they run ahead of the pacer's 60 ms lead, measured from
  the first frame, is reported as frames_ahead_of_lead_ms).
- barge-in→stop p50/p99: speech_started sent by the fake → uuid_break (broadcast) / killAudio (stream) at fsim.

Clocks: every cross-process timestamp is time.time() (CLOCK_REALTIME, the same clock for all processes on this
host); fsim's own monotonic frame times are converted with one offset taken at driver start.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.audio import Converter  # noqa: E402
from bridge.engine import PCM16, AudioFormat  # noqa: E402
from bridge.session import ENGINE_CHUNK_MS  # noqa: E402

PY = sys.executable
FORKBRIDGE = str(Path(PY).with_name("forkbridge"))
HZ = os.sysconf("SC_CLK_TCK")
LATE_MS = 20.0
SETTLE_S = 2.0
SECRET = "bench-token-secret-0123456789abcdef"
API_KEY = "sk-bench-0000000000000000"
SIG_FRAMES = 100
FRAME_BYTES = 640  # 20 ms of 16 kHz L16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


ROUTES = """\
  - name: bench-broadcast
    did: "7101"
    engine: openai
    playback: broadcast
    sample_rate: 16000
    no_audio_timeout: 30s
  - name: bench-stream
    did: "7102"
    engine: openai
    playback: stream
    sample_rate: 16000
    no_audio_timeout: 30s
"""


def config_text(esl_port: int, bridge_port: int, metrics_port: int, fake_port: int, spool: str,
                password: str = "ClueCon", routes: str = ROUTES) -> str:
    """The daemon's config for a bench run (bench/switchload.py gives its own routes and ESL password)."""
    return f"""\
esl:
  port: {esl_port}
  password: {password}
  command_timeout: 10s
bridge:
  listen: 127.0.0.1:{bridge_port}
  spool_dir: {spool}
  token_secret: {SECRET}
metrics:
  listen: 127.0.0.1:{metrics_port}
logging:
  level: warning
daemon:
  shutdown_grace: 1s
engines:
  openai:
    type: openai_realtime
    api_key: {API_KEY}
    url: ws://127.0.0.1:{fake_port}/v1/realtime
    connect_timeout: 10s
routes:
{routes}"""


def merge_results(out: Path, key: str, value: dict) -> None:
    """Read-modify-write of one key of bench/results.json: the other parts' figures in the file are kept."""
    data: dict = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(out.read_text())
        if isinstance(loaded, dict):
            data = loaded
    data[key] = value
    out.write_text(json.dumps(data, indent=2) + "\n")


def read_line(proc: subprocess.Popen, timeout: float, want: str) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{want}: process exited (rc {proc.poll()})")
        if line.startswith(want):
            return line.strip()
    raise RuntimeError(f"timed out waiting for '{want}'")


def wait_ready(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                                   timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("daemon never became ready")


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


# ---- one step ------------------------------------------------------------------------------------------------


def run_step(n: int, seconds: float, workdir: Path, profile: str = "") -> dict:
    step_dir = workdir / f"step{n}"
    spool = step_dir / "spool"
    spool.mkdir(parents=True)
    ports = {k: free_port() for k in ("esl", "bridge", "metrics", "fake")}
    fake_out, driver_out = step_dir / "fake.json", step_dir / "driver.json"
    cfg = step_dir / "forkbridge.yaml"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["fake"] = subprocess.Popen([PY, str(ROOT / "bench/fake_openai.py"), "--port", str(ports["fake"]),
                                          "--out", str(fake_out)], stdout=subprocess.PIPE, text=True, env=env,
                                         cwd=ROOT)
        read_line(procs["fake"], 20, "ready")
        procs["driver"] = subprocess.Popen([PY, str(ROOT / "bench/driver.py"), "--esl-port", str(ports["esl"]),
                                            "--calls", str(n), "--out", str(driver_out)],
                                           stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        read_line(procs["driver"], 20, "ready")
        cfg.write_text(config_text(ports["esl"], ports["bridge"], ports["metrics"], ports["fake"], str(spool)))
        log = open(step_dir / "daemon.log", "w")  # noqa: SIM115 - closed with the process below
        procs["daemon"] = subprocess.Popen([FORKBRIDGE, "run", "--config", str(cfg)], stdout=log,
                                           stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_ready(ports["metrics"], 20)
        time.sleep(1.0)
        pid = procs["daemon"].pid
        rss_idle = rss_kib(pid)
        os.kill(procs["driver"].pid, signal.SIGUSR1)
        ramped = read_line(procs["driver"], 60 + n / 50, "ramped").split()
        connected = int(ramped[2])
        time.sleep(SETTLE_S)
        helpers = {k: procs[k].pid for k in ("driver", "fake")}
        spy = None
        if profile:  # py-spy (pip install py-spy; not a dependency) samples the daemon over the window
            spy = subprocess.Popen([profile, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                                    "-f", "raw", "-o", str(step_dir / "daemon.folded")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1, c1 = time.time(), cpu_ticks(pid)
        h1 = {k: cpu_ticks(p) for k, p in helpers.items()}
        rss_peak = 0
        while time.time() < t1 + seconds:
            time.sleep(min(1.0, max(0.0, t1 + seconds - time.time())))
            rss_peak = max(rss_peak, rss_kib(pid))
        t2, c2 = time.time(), cpu_ticks(pid)
        h2 = {k: cpu_ticks(p) for k, p in helpers.items()}
        rss_end = rss_kib(pid)
        if spy is not None:
            spy.wait(30)
        os.kill(procs["driver"].pid, signal.SIGUSR2)
        read_line(procs["driver"], 60, "done")
        stop(procs["fake"])
        stop(procs["daemon"])
        stop(procs["driver"])
        log.close()
        fake = json.loads(fake_out.read_text())
        driver = json.loads(driver_out.read_text())
    finally:
        for proc in procs.values():
            stop(proc)
    span = t2 - t1
    result = {
        "calls": n, "forks_connected": connected, "window_s": round(span, 2),
        "cpu_pct_per_call": round(100.0 * (c2 - c1) / HZ / span / n, 4),
        "cpu_pct_total": round(100.0 * (c2 - c1) / HZ / span, 1),
        "rss_idle_kib": rss_idle, "rss_end_kib": rss_end, "rss_peak_kib": rss_peak,
        "rss_kib_per_call": round((rss_end - rss_idle) / n, 1),
        "generator_cpu_pct": {k: round(100.0 * (h2[k] - h1[k]) / HZ / span, 1) for k in helpers},
        "generator_hub_lag_p99_ms": round(driver["hub_lag_p99_ms"], 1),
        "fake_hub_lag_p99_ms": round(fake["hub_lag_p99_ms"], 1),
    }
    result.update(analyse(fake, driver, t1, t2))
    return result


# ---- analysis --------------------------------------------------------------------------------------------------


def _in_cum(frames: int = 60_000) -> list[int]:
    """Cumulative 24 kHz bytes the 16k→24k converter has produced after n 20 ms caller frames (index n; 20 minutes
    by default). soxr's output is a function of the input fed so far, whatever the pieces (whole frames), so the
    daemon's batches only decide when an append is sent, not its size."""
    conv = Converter(AudioFormat(PCM16, 16000), AudioFormat(PCM16, 24000))
    total, cum = 0, [0]
    for _ in range(frames):
        total += len(conv.convert(bytes(FRAME_BYTES)))
        cum.append(total)
    return cum


def _model_appends(sizes: list[int], first: int, in_cum: list[int]) -> list[tuple[int, int, int]]:
    """The appends the daemon sends for one call, replaying its batching on the fork messages fsim really sent.

    `sizes`: bytes of each fork message in order; `first`: the message the converter starts with (the daemon
    drops every message before its engine is ready, then batches from that one). A batch is sent once it holds
    ENGINE_CHUNK_MS or more (a 2-frame message after a single frame makes a 3-frame batch, which shifts every
    later pair: that is why the batch phase comes from the messages, not from the first frame's parity); it
    makes an append when the converter emits. Returns (message that completed the batch, the batch's first
    message, cumulative bytes sent) per append."""
    batch_bytes = 16000 * 2 * ENGINE_CHUNK_MS // 1000
    out: list[tuple[int, int, int]] = []
    pending = frames = sent = 0
    start = first
    for i in range(first, len(sizes)):
        if not sizes[i]:
            continue
        if not pending:
            start = i
        pending += sizes[i]
        if pending < batch_bytes:
            continue
        frames += pending // FRAME_BYTES
        pending = 0
        if frames >= len(in_cum):
            break
        if in_cum[frames] > sent:
            sent = in_cum[frames]
            out.append((i, start, sent))
    return out


def _out_cum(delta_bytes: int, count: int) -> list[int]:
    """Cumulative 16 kHz bytes the 24k→16k converter has produced after each delta of one response."""
    conv = Converter(AudioFormat(PCM16, 24000), AudioFormat(PCM16, 16000))
    total, cum = 0, []
    for _ in range(count):
        total += len(conv.convert(bytes(delta_bytes)))
        cum.append(total)
    return cum


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 2)


def analyse(fake: dict, driver: dict, t1: float, t2: float) -> dict:
    in_cum = _in_cum()
    cfg = fake["config"]
    n_deltas = cfg["resp_ms"] // cfg["delta_ms"]
    out_cum = _out_cum(cfg["delta_bytes"], n_deltas)
    sessions = {s["sig"]: s for s in fake["sessions"] if s["sig"] is not None}
    in_lat: list[float] = []
    batch_lat: list[float] = []
    gen_late = gen_total = mismatched = unmatched = 0
    bc_lat: list[float] = []
    st_lat: list[float] = []
    st_ahead: list[float] = []
    stop_lat: list[float] = []
    no_stop = 0
    for call in driver["calls"]:
        frames = call["frames"]
        # generator: each fork frame against its 20 ms schedule (best case = the earliest-relative frame)
        sent: list[float] = []
        msg_first: list[int] = []  # index in `sent` of each message's first frame
        for t, nbytes in frames:
            msg_first.append(len(sent))
            sent.extend([t] * max(1, nbytes // FRAME_BYTES))
        if sent:
            sched = np.asarray(sent) - 0.02 * np.arange(len(sent))
            lag = (sched - sched.min()) * 1000.0
            inwin = (np.asarray(sent) >= t1) & (np.asarray(sent) <= t2)
            gen_late += int(np.sum(lag[inwin] > LATE_MS))
            gen_total += int(np.sum(inwin))
        s = sessions.get(call["index"])
        if s is None or s["edge"] is None or call["first_tick"] is None or not sent:
            unmatched += 1
            continue
        # frame → engine: replay the daemon's batching on this call's own messages (see _model_appends)
        offset = round((SIG_FRAMES * 480 - s["edge"]) / 480)  # caller frames before the converter's first
        first = bisect.bisect_left(msg_first, offset - call["first_tick"])
        model = _model_appends([nbytes for _t, nbytes in frames], first, in_cum)
        mismatched += max(0, len(s["append_cum"]) - len(model))  # appends the replay cannot account for
        for (ta, cum), (i, i0, want) in zip(zip(s["append_t"], s["append_cum"], strict=True), model, strict=False):
            if cum != want:
                mismatched += 1
            t_done = frames[i][0]
            if t1 <= t_done <= t2:
                in_lat.append((ta - t_done) * 1000.0)
                batch_lat.append((ta - frames[i0][0]) * 1000.0)
        responses = s["responses"]
        starts = [r["deltas_t"][0] if r["deltas_t"] else float("inf") for r in responses]

        def avail(r: dict, nbytes: int) -> float | None:
            i = bisect.bisect_left(out_cum, nbytes)
            if i < len(r["deltas_t"]):
                return r["deltas_t"][i]
            return r["t_done"]

        if call["mode"] == "broadcast":
            cum: dict[int, int] = {}
            for t, size in call["plays"]:
                k = bisect.bisect_right(starts, t) - 1
                if k < 0 or size < 0:
                    continue
                cum[k] = cum.get(k, 0) + size
                ref = avail(responses[k], cum[k])
                if ref is not None and t1 <= t <= t2:
                    bc_lat.append((t - ref) * 1000.0)
            stops = sorted(call["breaks"])
        else:
            count: dict[int, int] = {}
            anchor: dict[int, float] = {}
            for t, _size in call["binaries"]:
                k = bisect.bisect_right(starts, t) - 1
                if k < 0:
                    continue
                nth = count.get(k, 0)
                count[k] = nth + 1
                if nth == 0:
                    anchor[k] = t
                    if t1 <= t <= t2 and responses[k]["deltas_t"]:
                        st_lat.append((t - responses[k]["deltas_t"][0]) * 1000.0)
                elif t1 <= t <= t2:  # how far ahead of the 60 ms lead the pacer ran
                    st_ahead.append((anchor[k] + max(0.0, 0.02 * nth - 0.06) - t) * 1000.0)
            stops = sorted(call["kills"])
        for r in responses:
            tss = r["t_ss"]
            if tss is None or not t1 <= tss <= t2:
                continue
            i = bisect.bisect_left(stops, tss)
            if i < len(stops) and stops[i] - tss < 1.0:
                stop_lat.append((stops[i] - tss) * 1000.0)
            else:
                no_stop += 1
    late = sum(1 for v in in_lat if v > LATE_MS)
    return {
        "late_appends": late, "appends": len(in_lat),
        "late_pct": round(100.0 * late / len(in_lat), 3) if in_lat else None,
        "generator_late_frames": gen_late, "generator_frames": gen_total,
        "calls_unmatched": unmatched, "appends_mismatched": mismatched,
        "frame_to_engine_ms": {"p50": pct(in_lat, 50), "p99": pct(in_lat, 99), "max": pct(in_lat, 100)},
        "batch_first_frame_to_engine_ms": {"p50": pct(batch_lat, 50), "p99": pct(batch_lat, 99),
                                           "max": pct(batch_lat, 100)},
        "audio_to_playback_ms": {
            "broadcast": {"p50": pct(bc_lat, 50), "p99": pct(bc_lat, 99), "n": len(bc_lat)},
            "stream": {"p50": pct(st_lat, 50), "p99": pct(st_lat, 99), "n": len(st_lat),
                       "frames_ahead_of_lead_ms": {"p50": pct(st_ahead, 50), "p99": pct(st_ahead, 99),
                                                   "max": pct(st_ahead, 100)}},
            "all": {"p50": pct(bc_lat + st_lat, 50), "p99": pct(bc_lat + st_lat, 99)},
        },
        "bargein_to_stop_ms": {"p50": pct(stop_lat, 50), "p99": pct(stop_lat, 99), "n": len(stop_lat),
                               "no_stop": no_stop},
    }


# ---- report ----------------------------------------------------------------------------------------------------

HEADER = (f"{'calls':>5} {'cpu%/call':>9} {'KiB/call':>8} {'late':>12} {'gen-late':>8} "
          f"{'frame→eng p50/p99':>17} {'audio→play p50/p99':>18} {'barge→stop p50/p99':>18}")


def _pair(d: dict) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    return f"{f(d['p50'])}/{f(d['p99'])}"


def row(r: dict) -> str:
    late = f"{r['late_appends']}/{r['appends']}"
    return (f"{r['calls']:>5} {r['cpu_pct_per_call']:>9.3f} {r['rss_kib_per_call']:>8.0f} {late:>12} "
            f"{r['generator_late_frames']:>8} {_pair(r['frame_to_engine_ms']):>17} "
            f"{_pair(r['audio_to_playback_ms']['all']):>18} {_pair(r['bargein_to_stop_ms']):>18}")


def main() -> int:
    p = argparse.ArgumentParser(description="forkbridge load bench (see the module docstring)")
    p.add_argument("--steps", default="50,100,200,300,500", help="comma-separated concurrent call counts")
    p.add_argument("--seconds", type=float, default=20.0, help="steady window per step")
    p.add_argument("--out", default=str(ROOT / "bench/results.json"))
    p.add_argument("--keep", action="store_true", help="keep the per-step work dir (configs, logs, raw data)")
    p.add_argument("--py-spy", default="", help="path to py-spy: profile the daemon over each window (implies --keep)")
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="forkbridge-bench-"))
    results = []
    started = time.monotonic()
    print(f"forkbridge bench: steps {steps}, {args.seconds:g} s steady window, half broadcast / half stream "
          f"(one run per step), 16 kHz calls, 20 ms frames", flush=True)
    print(HEADER, flush=True)
    try:
        for n in steps:
            try:
                r = run_step(n, args.seconds, workdir, args.py_spy)
            except Exception as exc:  # one broken step must not hide the others
                print(f"{n:>5} step failed: {exc}", flush=True)
                results.append({"calls": n, "error": str(exc)})
                continue
            results.append(r)
            print(row(r), flush=True)
    finally:
        if args.keep or args.py_spy:
            print(f"work dir kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = [r for r in results if "error" not in r]
    zero = [r["calls"] for r in ok if r["late_appends"] == 0 and r["forks_connected"] == r["calls"]]
    small = [r["calls"] for r in ok if (r["late_pct"] or 0) <= 0.1 and r["forks_connected"] == r["calls"]]
    summary = {"largest_n_no_late": max(zero, default=None), "largest_n_late_le_0.1pct": max(small, default=None),
               "elapsed_s": round(time.monotonic() - started, 1)}
    print(f"largest N with no late appends: {summary['largest_n_no_late']}; with <= 0.1 % late: "
          f"{summary['largest_n_late_le_0.1pct']}; took {summary['elapsed_s']} s", flush=True)
    for r in ok:
        print(f"  {r['calls']}: daemon {r['cpu_pct_total']}% of a core, rss idle {r['rss_idle_kib']} KiB end "
              f"{r['rss_end_kib']} KiB; generator cpu {r['generator_cpu_pct']}, hub lag p99 fsim "
              f"{r['generator_hub_lag_p99_ms']} ms fake {r['fake_hub_lag_p99_ms']} ms; "
              f"broadcast {_pair(r['audio_to_playback_ms']['broadcast'])} stream "
              f"{_pair(r['audio_to_playback_ms']['stream'])}; no-stop {r['bargein_to_stop_ms']['no_stop']}, "
              f"unmatched calls {r['calls_unmatched']}, forks {r['forks_connected']}", flush=True)
    Path(args.out).write_text(json.dumps({"steps": results, "summary": summary,
                                          "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
