"""`make bench`, real-switch load part: CPU and memory per call of forkbridge and of a naive bridge, same run.

Runs when a FreeSWITCH is found as the test suite finds one (FORKBRIDGE_FREESWITCH, or the bundle in
.cache/freeswitch); else prints one line saying why it is skipped. Alone: `make bench-load [LOAD_CALLS=20,40]`.

Per playback mode (broadcast: the drachtio build of mod_audio_fork; stream: the jambonz build) one FreeSWITCH and
one engine fake (bench/fake_openai.py: OpenAI Realtime GA protocol, a 2 s tone response about every 3.5 s, 10x
faster than real time, a caller interruption every other response) serve two bridges, each its own process:

- forkbridge: `forkbridge run` with one 16 kHz route on DID 7100 (the shipped dialplan: answer, park; the daemon
  takes the call over ESL and forks it);
- naive: bench/naive.py (the tutorial pattern) on DID 7200, forked by FreeSWITCH itself (`api_on_answer`).

Callers are loopback legs playing 2 s tone turns with 2 s pauses, endlessly. For each call count and repetition
the bridges take turns (A B A B): N calls are placed to one bridge, and once every fork carries audio (and a
settle) the bridge's process CPU (utime+stime from /proc) is read over `--seconds`; then the calls are hung up
and the other bridge gets the same. Contention from anything else on the box hits both alike: the ratio is the
figure. Each bridge first takes one warm-up call (what the first call loads, imports and caches once is not a
per-call cost). Per run: %/call = CPU % of one core / N; KiB/call = (RSS at the window's end - the bridge's RSS
just before the run's calls) / N; left = how far that RSS before the run is above the bridge's RSS after its
warm-up (what earlier runs left behind: a leak grows it run after run, a bounded history or heap that keeps its
free space does not); kernel = the share of that CPU spent in system calls (stime); audio in = the caller audio
the bridge received over the window as a share of real time (both must be ~1.0).

`--workers N` runs forkbridge with `daemon.workers: N`: its CPU and RSS are then the parent's and every worker's
together, and each run also reports each worker's own %/call (its CPU over the calls it owns: crc32 of the
B leg's uuid, counted from `show channels`) and the parent's share.

`--profile PATH-TO-PY-SPY` samples forkbridge with py-spy over its last window per mode and prints the top
functions by own time and by total time (py-spy is a bench-only tool: `pip install py-spy`).
Results are merged into bench/results.json under "switchload".
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import HZ, PY, config_text, cpu_ticks, merge_results, read_line, rss_kib, stop  # noqa: E402
from controller.esl import EslConnection  # noqa: E402
from controller.shard import owner  # noqa: E402
from fsim.audio import Silence, Tone  # noqa: E402
from fsim.audio import write_wav as write_wav_file  # noqa: E402
from tests.harness import free_ports  # noqa: E402
from tests.realswitch.switch import PASSWORD, FreeSwitch, find_prefix  # noqa: E402

MODES = {"broadcast": "mod", "stream": "mod-jambonz"}
BRIDGES = ("forkbridge", "naive")
DIDS = {"forkbridge": "7100", "naive": "7200"}
TURN_S, PAUSE_S = 2.0, 2.0
DIAL_PER_S = 12.0  # a loopback call is two sessions; the switch allows 30 new sessions a second
SETTLE_S = 4.0
BYTES_PER_S = 32000  # 16 kHz L16 mono

NAIVE_DIALPLAN = """<include>
  <extension name="bench_naive">
    <condition field="destination_number" expression="^7200$">
      <action application="set" data="api_on_answer=uuid_audio_fork ${{uuid}} start ws://127.0.0.1:{port}/ mono 16k"/>
      <action application="answer"/>
      <action application="park"/>
    </condition>
  </extension>
</include>
"""


ROUTE = """\
  - name: load
    did: "7100"
    engine: openai
    playback: {playback}
    sample_rate: 16000
    no_audio_timeout: 30s
"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def audio_in_bytes(bridge: str, port: int) -> int:
    """Caller audio the bridge has received so far (forkbridge: its metric; naive: its plain-HTTP counter)."""
    if bridge == "naive":
        return int(_get(f"http://127.0.0.1:{port}/").split()[0])
    text = _get(f"http://127.0.0.1:{port}/metrics")
    match = re.search(r'^forkbridge_audio_bytes_total\{direction="in"\} ([0-9.e+]+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


class Callers:
    """Loopback callers placed over the harness's own ESL connection (no events: it only counts channels)."""

    def __init__(self, switch: FreeSwitch, wav: Path) -> None:
        self.esl = EslConnection("127.0.0.1", switch.esl_port, PASSWORD, timeout=10)
        self.esl.connect()
        self.wav = wav

    def api(self, command: str) -> str:
        return self.esl.send(f"api {command}").data or ""

    def channels(self) -> int:
        return int((self.api("show channels count").split() or ["0"])[0] or 0)

    def per_worker(self, workers: int) -> Counter[int]:
        """forkbridge's calls (the B legs of DID 7100) by the worker that owns them."""
        rows = json.loads(self.api("show channels as json") or "{}").get("rows") or []
        legs = f"loopback/{DIDS['forkbridge']}-b"
        return Counter(owner(row["uuid"], workers) for row in rows if row.get("name") == legs)

    def place(self, n: int, did: str) -> None:
        for _ in range(n):
            self.esl.send(f"bgapi originate loopback/{did}/public 'endless_playback:{self.wav}' inline")
            gevent.sleep(1.0 / DIAL_PER_S)
        deadline = time.monotonic() + 30 + n / 5
        while self.channels() < 2 * n and time.monotonic() < deadline:
            gevent.sleep(0.2)

    def hang_up_all(self) -> None:
        self.api("hupall NORMAL_CLEARING")
        deadline = time.monotonic() + 30
        while self.channels() and time.monotonic() < deadline:
            gevent.sleep(0.2)

    def close(self) -> None:
        self.esl.close()


def measure(bridge: str, pid: int, stat_port: int, callers: Callers, n: int, seconds: float, rss0: int,
            spy: str = "", folded: Path | None = None, workers: int = 1) -> dict[str, Any]:
    """One run: n calls to one bridge; its CPU over the window, its RSS at the window's end above its RSS just
    before the calls (what n calls hold), and how far that is above `rss0` (its RSS after the warm-up call)."""
    rss_before = sum(rss_kib(p) for p in process_tree(pid))
    callers.place(n, DIDS[bridge])
    legs = callers.channels() // 2
    gevent.sleep(SETTLE_S)
    profiler = None
    if spy and folded is not None:
        rate = os.environ.get("SPY_RATE", "100")  # samples per second; more for a finer profile of a short window
        profiler = subprocess.Popen([spy, "record", "--gil", "-p", str(pid), "-d", str(int(seconds)), "-r", rate,
                                     "-f", "raw", "-o", str(folded)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = process_tree(pid)
    owned = callers.per_worker(workers) if bridge == "forkbridge" and workers > 1 else Counter()
    t1, a1 = time.time(), audio_in_bytes(bridge, stat_port)
    ticks1 = {p: (cpu_ticks(p), system_ticks(p)) for p in procs}
    gevent.sleep(seconds)
    t2, a2 = time.time(), audio_in_bytes(bridge, stat_port)
    ticks2 = {p: (cpu_ticks(p), system_ticks(p)) for p in procs}
    c1, k1 = (sum(t[i] for t in ticks1.values()) for i in (0, 1))
    c2, k2 = (sum(t[i] for t in ticks2.values()) for i in (0, 1))
    rss1 = sum(rss_kib(p) for p in procs)
    if profiler is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(30)
    callers.hang_up_all()
    gevent.sleep(2.0)  # the bridge finishes its calls before the other one is measured
    span = t2 - t1
    cpu = 100.0 * (c2 - c1) / HZ / span
    result = {"bridge": bridge, "calls": n, "legs_up": legs, "window_s": round(span, 2),
              "cpu_pct_total": round(cpu, 2), "cpu_pct_per_call": round(cpu / n, 4),
              "rss_kib_per_call": round((rss1 - rss_before) / n, 1),
              "rss_left_kib": rss_before - rss0,
              "system_share": round((k2 - k1) / max(1, c2 - c1), 2),
              "audio_in_ratio": round((a2 - a1) / (BYTES_PER_S * span * n), 3)}
    if owned:
        share = {p: 100.0 * (ticks2[p][0] - ticks1[p][0]) / HZ / span for p in procs}
        result["parent_cpu_pct"] = round(share[pid], 2)
        result["workers"] = [{"worker": k, "calls": owned[k], "cpu_pct": round(share[p], 2),
                              "cpu_pct_per_call": round(share[p] / max(1, owned[k]), 4)}
                             for p, k in worker_indexes(procs).items()]
    return result


def process_tree(pid: int) -> list[int]:
    """The bridge's process and its children (the workers of a forkbridge parent)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def worker_indexes(pids: list[int]) -> dict[int, int]:
    """pid -> K of each `forkbridge run --worker K/N` among pids."""
    found = {}
    for p in pids:
        args = Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0")
        if "--worker" in args:
            found[p] = int(args[args.index("--worker") + 1].partition("/")[0])
    return dict(sorted(found.items(), key=lambda item: item[1]))


def system_ticks(pid: int) -> int:
    """stime alone (field 15): the kernel's share says how much of a bridge's cost is system calls."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[12])


def top_entries(folded: Path, k: int = 12) -> dict[str, Any]:
    """py-spy raw output (folded stacks) -> the top functions by own samples and by inclusive samples, in %."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # by function, not by line
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * v / samples, 1)) for name, v in c.most_common(k)] if samples else []

    return {"samples": samples, "own": pct(own), "total": pct(total)}


def run_mode(prefix: Path, mode: str, steps: list[int], reps: int, seconds: float, workdir: Path,
             spy: str, workers: int = 1) -> dict[str, Any]:
    mdir = workdir / mode
    mdir.mkdir(parents=True)
    naive_port, bridge_port, metrics_port, fake_port = free_ports(4)
    switch = FreeSwitch(prefix, mdir, MODES[mode], name="fs")
    switch.extra_public["30_bench_naive.xml"] = NAIVE_DIALPLAN.format(port=naive_port)
    wav = mdir / "turns.wav"
    audio = Tone(440, TURN_S, 0.3) + Silence(PAUSE_S)
    write_wav_file(str(wav), audio.render(8000), 8000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    runs: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    callers = None
    try:
        switch.start()
        procs["fake"] = subprocess.Popen([PY, str(ROOT / "bench/fake_openai.py"), "--port", str(fake_port),
                                          "--out", str(mdir / "fake.json")], stdout=subprocess.PIPE, text=True,
                                         env=env, cwd=ROOT)
        read_line(procs["fake"], 20, "ready")
        procs["naive"] = subprocess.Popen([PY, str(ROOT / "bench/naive.py"), "--port", str(naive_port), "--engine",
                                           f"ws://127.0.0.1:{fake_port}/v1/realtime"], stdout=subprocess.PIPE,
                                          text=True, env=env, cwd=ROOT)
        read_line(procs["naive"], 20, "ready")
        cfg = mdir / "forkbridge.yaml"
        spool = mdir / "spool"
        text = config_text(switch.esl_port, 0 if workers > 1 else bridge_port, metrics_port, fake_port, str(spool),
                           password=PASSWORD, routes=ROUTE.format(playback=mode))
        cfg.write_text(text.replace("  shutdown_grace: 1s\n", f"  shutdown_grace: 1s\n  workers: {workers}\n"))
        log = open(mdir / "daemon.log", "w")  # noqa: SIM115 - closed once the daemon is stopped
        procs["forkbridge"] = subprocess.Popen([PY, "-m", "controller.cli", "run", "--config", str(cfg)], stdout=log,
                                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if "ready" in _get(f"http://127.0.0.1:{metrics_port}/readyz"):
                    break
            gevent.sleep(0.2)
        callers = Callers(switch, wav)
        stat_ports = {"forkbridge": metrics_port, "naive": naive_port}
        for bridge in BRIDGES:  # the warm-up call
            callers.place(1, DIDS[bridge])
            gevent.sleep(SETTLE_S)
            callers.hang_up_all()
        gevent.sleep(2.0)
        idle_rss = {bridge: sum(rss_kib(p) for p in process_tree(procs[bridge].pid)) for bridge in BRIDGES}
        for n in steps:
            for rep in range(reps):
                for bridge in BRIDGES:
                    last = n == steps[-1] and rep == reps - 1 and bridge == "forkbridge"
                    folded = mdir / "forkbridge.folded" if last and spy else None
                    r = measure(bridge, procs[bridge].pid, stat_ports[bridge], callers, n, seconds,
                                idle_rss[bridge], spy, folded, workers)
                    r.update(mode=mode, rep=rep)
                    runs.append(r)
                    print(f"  {mode:<9} {bridge:<10} {n:>4} calls rep {rep}: {r['cpu_pct_per_call']:.3f} %/call, "
                          f"{r['rss_kib_per_call']:.0f} KiB/call (left {r['rss_left_kib']} KiB), "
                          f"audio in {r['audio_in_ratio']:.2f}, "
                          f"{r['legs_up']} up, kernel {r['system_share']:.0%} of it", flush=True)
                    for w in r.get("workers", []):
                        print(f"    worker {w['worker']}: {w['calls']} calls, {w['cpu_pct']:.1f} % of a core, "
                              f"{w['cpu_pct_per_call']:.3f} %/call; parent {r['parent_cpu_pct']:.1f} %", flush=True)
                    if folded is not None and folded.exists():
                        profile = top_entries(folded)
        log.close()
        errors = [line.strip() for line in (mdir / "daemon.log").read_text(errors="replace").splitlines()
                  if " ERROR " in line]
    finally:
        if callers is not None:
            with contextlib.suppress(Exception):
                callers.hang_up_all()
            callers.close()
        for proc in procs.values():
            stop(proc)
        switch.stop()
    return {"mode": mode, "runs": runs, "summary": summarise(runs, steps), "profile": profile,
            "daemon_errors": errors}


def summarise(runs: list[dict[str, Any]], steps: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in steps:
        row: dict[str, Any] = {"calls": n}
        for bridge in BRIDGES:
            mine = [r for r in runs if r["calls"] == n and r["bridge"] == bridge]
            row[bridge] = {key: round(sum(r[key] for r in mine) / len(mine), 4) for key in
                           ("cpu_pct_per_call", "rss_kib_per_call", "audio_in_ratio")} if mine else {}
        fb, nv = row["forkbridge"].get("cpu_pct_per_call"), row["naive"].get("cpu_pct_per_call")
        row["ratio"] = round(fb / nv, 2) if fb and nv else None
        out.append(row)
    return out


def print_mode(result: dict[str, Any]) -> None:
    print(f"{result['mode']}: calls | forkbridge %/call KiB/call | naive %/call KiB/call | ratio", flush=True)
    for row in result["summary"]:
        fb, nv = row["forkbridge"], row["naive"]
        print(f"  {row['calls']:>5} | {fb.get('cpu_pct_per_call', 0):>8.3f} {fb.get('rss_kib_per_call', 0):>6.0f} | "
              f"{nv.get('cpu_pct_per_call', 0):>8.3f} {nv.get('rss_kib_per_call', 0):>6.0f} | {row['ratio']}",
              flush=True)
    prof = result.get("profile") or {}
    for kind in ("own", "total"):
        if prof.get(kind):
            print(f"  forkbridge profile, top by {kind} time (% of samples):", flush=True)
            for name, share in prof[kind]:
                print(f"    {share:>5.1f}  {name}", flush=True)
    for line in result.get("daemon_errors", [])[:5]:
        print(f"  daemon ERROR: {line[:200]}", flush=True)
    if len(result.get("daemon_errors", [])) > 5:
        print(f"  ... {len(result['daemon_errors'])} daemon ERROR lines in all", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description="forkbridge vs a naive bridge on a real switch (see the docstring)")
    p.add_argument("--calls", default="20,40", help="comma-separated concurrent call counts")
    p.add_argument("--reps", type=int, default=2, help="repetitions per call count (A B A B ...)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per run")
    p.add_argument("--modes", default="broadcast,stream")
    p.add_argument("--profile", default="", help="path to py-spy: profile forkbridge's last window per mode")
    p.add_argument("--workers", type=int, default=1, help="forkbridge's daemon.workers (default 1)")
    p.add_argument("--out", default=str(ROOT / "bench/results.json"))
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs, profiles)")
    args = p.parse_args()
    out = Path(args.out)
    prefix, why = find_prefix()
    if prefix is None:
        print(f"real-switch load bench skipped: {why}", flush=True)
        merge_results(out, "switchload", {"skipped": why, "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return 0
    steps = [int(s) for s in args.calls.split(",") if s.strip()]
    modes = [m for m in args.modes.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="forkbridge-bench-load-"))
    print(f"forkbridge vs naive bridge on a real FreeSWITCH ({why}): calls {steps}, {args.reps} rep(s) A B, "
          f"{args.seconds:g} s windows, 16 kHz, callers speak {TURN_S:g} s turns", flush=True)
    results = []
    started = time.monotonic()
    try:
        for mode in modes:
            if not (prefix / MODES[mode]).is_dir():
                print(f"{mode}: skipped, {prefix / MODES[mode]} missing", flush=True)
                continue
            try:
                result = run_mode(prefix, mode, steps, args.reps, args.seconds, workdir, args.profile, args.workers)
            except Exception as exc:  # one broken mode must not hide the other
                print(f"{mode}: failed: {type(exc).__name__}: {exc}", flush=True)
                results.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                continue
            results.append(result)
            print_mode(result)
    finally:
        if args.keep or args.profile:
            print(f"work dir kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    merge_results(out, "switchload" if args.workers == 1 else f"switchload_workers_{args.workers}",
                  {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "freeswitch": why, "workers": args.workers,
                                      "seconds": args.seconds, "reps": args.reps, "modes": results,
                                      "elapsed_s": round(time.monotonic() - started, 1)})
    print(f"took {time.monotonic() - started:.0f} s; wrote switchload into {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
