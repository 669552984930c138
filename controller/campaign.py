"""`forkbridge call` and `forkbridge campaign run`: place calls through a running daemon's API.

A campaign reads rows from a CSV file (a `to` column, an optional `context` column, any other column a channel
variable), places them within a concurrency cap, a rate, retries and calling hours, and writes one JSON line per
finished attempt to a results file. Every placement is first journaled (`<results>.placed`), so a campaign that
is stopped, however abruptly, resumes without calling a finished row twice: an attempt it placed but never saw
end is looked up on the daemon, and counted as done ("unknown") if the daemon no longer knows it.

Plain blocking code (urllib, time.sleep): a command-line client, not part of the gevent daemon.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as clock
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controller.config import SAFE_NUMBER, SAFE_VALUE, VARIABLE_NAME, ApiConfig

RETRYABLE = ("busy", "no_answer", "failed")  # worth another try later; answered, rejected, cancelled are final
POLL = 0.25


class CampaignError(Exception):
    """Nothing more can be done (bad arguments, unreadable file, daemon unreachable, unknown route)."""


# ---- the daemon's API ------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # 0: the daemon could not be reached


class ApiClient:
    """The daemon's /calls API (controller/callapi.py) over plain HTTP on loopback."""

    def __init__(self, api: ApiConfig, timeout: float = 10.0) -> None:
        host = f"[{api.listen_host}]" if ":" in api.listen_host else api.listen_host
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
        self.base = f"http://{host}:{api.listen_port}"
        self._token = api.token
        self._timeout = timeout

    def place(self, route: str, to: str, variables: dict[str, str], context: str) -> dict[str, Any]:
        return self._request("POST", "/calls", {"route": route, "to": to, "variables": variables,
                                                "context": context})

    def get(self, attempt_id: str) -> dict[str, Any]:
        return self._request("GET", f"/calls/{attempt_id}")

    def live(self) -> list[dict[str, Any]]:
        return self._request("GET", "/calls")["calls"]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self._token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = str(exc.reason)
            raise ApiError(exc.code, message) from None
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, f"the daemon is not reachable at {self.base}: {reason}") from None


def parse_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CampaignError(f"--var {pair!r}: expected name=value")
        out[name] = value
    return out


def place_one(client: ApiClient, route: str, to: str, variables: dict[str, str], context: str, wait: float,
              out: TextIO) -> int:
    """`forkbridge call`: 0 once placed (with --wait: once it ended answered), 1 refused or not answered,
    2 daemon unreachable."""
    try:
        attempt = client.place(route, to, variables, context)
    except ApiError as exc:
        print(f"forkbridge call: {exc}", file=sys.stderr)
        return 2 if exc.status == 0 else 1
    print(json.dumps(attempt), file=out)
    if wait <= 0:
        return 0
    deadline = time.monotonic() + wait
    while attempt["state"] != "ended" and time.monotonic() < deadline:
        time.sleep(POLL)
        try:
            attempt = client.get(attempt["id"])
        except ApiError as exc:
            print(f"forkbridge call: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(attempt), file=out)
    return 0 if attempt["outcome"] == "answered" else 1


# ---- rows, pace, hours ------------------------------------------------------------------------------------


@dataclass
class Row:
    line: int  # the CSV line it came from: its identity across resumes
    to: str
    variables: dict[str, str] = field(default_factory=dict)
    context: str = ""
    attempts: int = 0
    done: bool = False
    not_before: float = 0.0  # wall clock: a retry waits until then


def read_rows(path: str, problems: list[str]) -> list[Row]:
    """Good rows; a malformed one is reported in `problems` with its line number and skipped."""
    try:
        fh = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CampaignError(f"{path}: cannot read: {exc.strerror}") from None
    with fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "to" not in columns:
            raise CampaignError(f"{path}:1: the header needs a 'to' column (got {', '.join(columns) or 'none'})")
        for name in columns:
            if name not in ("to", "context") and not VARIABLE_NAME.fullmatch(name):
                raise CampaignError(f"{path}:1: column {name!r} is not a channel variable name")
        rows, seen = [], {}
        for record in reader:
            line = reader.line_num
            values = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k is not None}
            if None in record:
                problems.append(f"{path}:{line}: more fields than the header has columns; row skipped")
                continue
            to = values.pop("to", "")
            context = values.pop("context", "")
            if not SAFE_NUMBER.fullmatch(to):
                problems.append(f"{path}:{line}: 'to' must be a number, got {to!r}; row skipped")
                continue
            bad = [k for k, v in values.items() if not SAFE_VALUE.fullmatch(v)]
            if bad:
                problems.append(f"{path}:{line}: {', '.join(bad)}: no spaces, commas, quotes, braces, backslashes or "
                                "^ in a variable; row skipped")
                continue
            if to in seen:
                problems.append(f"{path}:{line}: {to} is already on line {seen[to]}; row skipped")
                continue
            seen[to] = line
            rows.append(Row(line, to, {k: v for k, v in values.items() if v}, context))
        return rows


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_HOURS = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_rate(text: str) -> float:
    """'2/s', '30/m', '100/h' → calls per second."""
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise CampaignError(f"--rate {text!r}: expected calls per unit, e.g. 1/s, 30/m or 100/h")
    return float(match.group(1)) / {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def parse_span(text: str) -> float:
    match = _SPAN.match(text)
    if not match:
        raise CampaignError(f"{text!r}: expected a duration like 30s, 10m or 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


@dataclass
class Hours:
    """Calling hours in a time zone; a window like 20:00-08:00 runs over midnight."""

    start: clock
    end: clock
    tz: ZoneInfo | None

    @classmethod
    def parse(cls, text: str, tz: str) -> Hours | None:
        zone = None
        if tz:
            try:
                zone = ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                raise CampaignError(f"--tz {tz!r}: not a known time zone (e.g. Europe/Paris)") from None
        if not text:
            return None
        match = _HOURS.match(text.strip())
        if not match or int(match.group(1)) > 23 or int(match.group(3)) > 24 or int(match.group(2)) > 59 \
                or int(match.group(4)) > 59:
            raise CampaignError(f"--hours {text!r}: expected HH:MM-HH:MM, e.g. 09:00-18:00")
        end_h = int(match.group(3))
        end = clock(23, 59, 59, 999999) if end_h == 24 else clock(end_h, int(match.group(4)))
        return cls(clock(int(match.group(1)), int(match.group(2))), end, zone)

    def open_at(self, epoch: float) -> bool:
        now = datetime.fromtimestamp(epoch, self.tz).time()
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end


# ---- the campaign --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    route: str
    concurrency: int = 5
    rate: float = 1.0  # calls per second
    retries: int = 0
    retry_after: float = 600.0
    hours: Hours | None = None


class Campaign:
    """Places every row's calls through the API; stop() ends placing and lets live calls finish."""

    def __init__(self, client: ApiClient, rows: list[Row], settings: Settings, results: str,
                 progress: Callable[[str], None], clock_fn: Callable[[], float] = time.time) -> None:
        self.client = client
        self.rows = rows
        self.settings = settings
        self.results = results
        self.journal = results + ".placed"
        self.progress = progress
        self.now = clock_fn
        self.live: dict[str, Row] = {}  # attempt id → row
        self.stopping = False
        self.counts = {"placed": 0, "answered": 0, "failed": 0}
        self._next_slot = 0.0
        self._last_progress = 0.0

    # -- persistence

    def resume(self) -> None:
        """Rows finished in an earlier run are skipped; attempts placed but never seen ending are looked up."""
        by_line = {row.line: row for row in self.rows}
        ended: set[str] = set()
        for entry in _read_jsonl(self.results):
            row = by_line.get(entry.get("row"))
            ended.add(entry.get("id", ""))
            if row is None or row.to != entry.get("to"):
                continue
            row.attempts = max(row.attempts, int(entry.get("attempt", 1)))
            self._settle(row, entry.get("outcome", ""), _epoch(entry.get("ended")))
        for entry in _read_jsonl(self.journal):
            row = by_line.get(entry.get("row"))
            if row is None or entry.get("id") in ended or row.to != entry.get("to"):
                continue
            row.attempts = max(row.attempts, int(entry.get("attempt", 1)))
            try:
                attempt = self.client.get(entry["id"])
            except ApiError as exc:
                if exc.status != 404:
                    raise CampaignError(str(exc)) from None
                attempt = {"id": entry["id"], "outcome": "unknown", "cause": "not known to the daemon (restarted?)",
                           "state": "ended"}
            if attempt["state"] == "ended":
                self._record(row, attempt)
            else:
                self.live[attempt["id"]] = row  # still on: follow it like one of ours

    def _record(self, row: Row, attempt: dict[str, Any]) -> None:
        outcome = attempt.get("outcome") or "unknown"
        entry = {"row": row.line, "to": row.to, "attempt": row.attempts, "id": attempt.get("id"),
                 "outcome": outcome, "cause": attempt.get("cause", ""), "call_outcome": attempt.get("call_outcome", ""),
                 "placed": attempt.get("created"), "answered": attempt.get("answered"),
                 "ended": attempt.get("ended") or _iso(self.now()), "duration": attempt.get("duration")}
        _append(self.results, entry)
        self.counts["answered" if outcome == "answered" else "failed"] += 1
        self._settle(row, outcome, self.now())

    def _settle(self, row: Row, outcome: str, ended: float) -> None:
        if outcome in RETRYABLE and row.attempts <= self.settings.retries:
            row.not_before = ended + self.settings.retry_after
        else:
            row.done = True

    # -- the loop

    def remaining(self) -> int:
        return sum(1 for row in self.rows if not row.done)

    def run(self, max_seconds: float | None = None) -> int:
        """Until every row is done, or stop() was called and the live calls ended (a daemon that goes away
        meanwhile is waited for: nothing is placed while it is unreachable)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while deadline is None or time.monotonic() < deadline:
            self._follow_live()
            if self.stopping and not self.live:
                break
            if not self.stopping and self.remaining() == 0:
                break
            placed = not self.stopping and self._place_next()
            self._show()
            time.sleep(0.02 if placed else POLL)  # right after a placement the next may be due soon (--rate)
        self._show(final=True)
        return 0

    def stop(self) -> None:
        self.stopping = True

    def _follow_live(self) -> None:
        for attempt_id, row in list(self.live.items()):
            try:
                attempt = self.client.get(attempt_id)
            except ApiError as exc:
                if exc.status == 404:  # the daemon restarted: the call's fate is not known, never call it again
                    attempt = {"id": attempt_id, "outcome": "unknown", "cause": "not known to the daemon",
                               "state": "ended"}
                else:
                    continue  # unreachable for now: ask again on the next pass
            if attempt["state"] == "ended":
                del self.live[attempt_id]
                self._record(row, attempt)

    def _eligible(self) -> Iterator[Row]:
        live_rows = {id(row) for row in self.live.values()}
        now = self.now()
        for row in self.rows:
            if not row.done and id(row) not in live_rows and row.not_before <= now:
                yield row

    def _place_next(self) -> bool:
        """Place the next eligible row if the cap, the rate and the hours allow; True if one was placed."""
        s = self.settings
        now = self.now()
        if len(self.live) >= s.concurrency or time.monotonic() < self._next_slot:
            return False
        if s.hours is not None and not s.hours.open_at(now):
            return False
        row = next(self._eligible(), None)
        if row is None:
            return False
        try:
            attempt = self.client.place(s.route, row.to, row.variables, row.context)
        except ApiError as exc:
            if exc.status in (0, 429, 503):  # busy or away: try again in a moment, nothing was placed
                self._next_slot = time.monotonic() + 1.0
                return False
            if exc.status in (401, 404) or (exc.status == 400 and "outbound" in str(exc)):
                raise CampaignError(str(exc)) from None  # wrong token or route: no row can go
            row.attempts += 1  # this row cannot be called (e.g. a number outside outbound.allowed): say so, go on
            print(f"line {row.line}: {row.to}: refused: {exc}", file=sys.stderr)
            self._record(row, {"id": None, "outcome": "refused", "cause": str(exc), "state": "ended"})
            return False
        row.attempts += 1
        self._next_slot = time.monotonic() + 1.0 / s.rate
        _append(self.journal, {"row": row.line, "to": row.to, "attempt": row.attempts, "id": attempt["id"]})
        self.live[attempt["id"]] = row
        self.counts["placed"] += 1
        return True

    def _show(self, final: bool = False) -> None:
        if not final and time.monotonic() - self._last_progress < 1.0:
            return
        self._last_progress = time.monotonic()
        c = self.counts
        self.progress(f"placed {c['placed']} · answered {c['answered']} · failed {c['failed']} · remaining "
                      f"{self.remaining()} · live {len(self.live)}" + (" · stopping" if self.stopping else ""))


def run_campaign(client: ApiClient, csv_path: str, settings: Settings, results: str) -> int:
    try:
        client.live()  # reachable, and the token is right, before anything is placed
    except ApiError as exc:
        raise CampaignError(str(exc)) from None
    problems: list[str] = []
    rows = read_rows(csv_path, problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    campaign = Campaign(client, rows, settings, results, progress=lambda line: print(line, file=sys.stderr))
    campaign.resume()
    done = len(rows) - campaign.remaining()
    if done:
        print(f"resuming: {done} of {len(rows)} row(s) already done ({results})", file=sys.stderr)

    def interrupted(_signum: int, _frame: Any) -> None:
        if campaign.stopping:
            raise KeyboardInterrupt
        print("stopping: no new calls; waiting for the live ones to end (Ctrl-C again to leave them)",
              file=sys.stderr)
        campaign.stop()

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        return campaign.run()
    except KeyboardInterrupt:
        print(f"left {len(campaign.live)} call(s) live; a resumed run looks them up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict):
                yield entry


def _append(path: str, entry: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _epoch(text: Any) -> float:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=ZoneInfo("UTC")).timestamp()
    except ValueError:
        return time.time()
