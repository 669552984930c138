"""The `forkbridge` command: check-config, run, call and campaign run."""

from __future__ import annotations

import argparse
import sys

from controller.config import Config, ConfigError, load_api_settings, load_config

DEFAULT_CONFIG = "/etc/forkbridge/forkbridge.yaml"


def route_table(config: Config) -> str:
    """The routes as an operator reads them: what number goes where, and what happens when it fails."""
    header = ("#", "DID / pattern", "engine", "module", "rate", "playback", "fallback")
    rows = [header]
    for i, r in enumerate(config.routes):
        engine = f"{r.engine} ({config.engines[r.engine].type})"
        rows.append((str(i), r.describe_match(), engine, r.module, str(r.sample_rate), r.playback,
                     r.fallback.describe()))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s); nothing was changed", file=sys.stderr)
        return 1
    print(f"{path}: OK, {len(config.routes)} route(s), {len(config.engines)} engine(s)")
    print(route_table(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkbridge", description="AI voice agents on FreeSWITCH calls")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file and print its route table")
    check.add_argument("file")
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--worker", help=argparse.SUPPRESS)  # K/N: started by the parent (controller.workers)
    run.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)  # where the worker tells its ports
    call = sub.add_parser("call", help="place one outbound call through the running daemon")
    call.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="the daemon's config (for api.listen/token)")
    call.add_argument("--route", required=True)
    call.add_argument("--to", required=True, help="the number to call (must match the route's outbound.allowed)")
    call.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a channel variable")
    call.add_argument("--context", default="", help="text for the model about this call")
    call.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for the call to end")
    campaign = sub.add_parser("campaign", help="outbound campaigns").add_subparsers(dest="action", required=True)
    crun = campaign.add_parser("run", help="call every row of a CSV file (columns: to, context, variables)")
    crun.add_argument("csv")
    crun.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    crun.add_argument("--route", required=True)
    crun.add_argument("--concurrency", type=int, default=5, help="calls at once (default 5)")
    crun.add_argument("--rate", default="1/s", help="new calls per s, m or h (default 1/s)")
    crun.add_argument("--retries", type=int, default=0, help="more attempts after busy, no_answer or failed")
    crun.add_argument("--retry-after", default="10m", help="wait before a retry (default 10m)")
    crun.add_argument("--hours", default="", help="calling hours, e.g. 09:00-18:00")
    crun.add_argument("--tz", default="", help="time zone of --hours, e.g. Europe/Paris (default: local)")
    crun.add_argument("--results", default="", help="JSON lines, one per attempt (default: <csv>.results.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command in ("call", "campaign"):
        return _client_command(args)
    if args.worker:
        from controller.workers import supervised

        supervised()  # before anything else: a worker never outlives its parent
    from gevent import monkey

    monkey.patch_all()  # the one place the process is patched, before the daemon's modules load
    from controller.daemon import run_daemon
    from controller.shard import Shard

    return run_daemon(args.config, Shard.parse(args.worker) if args.worker else None, args.report_fd)


def _client_command(args: argparse.Namespace) -> int:
    from controller import campaign as c

    try:
        client = c.ApiClient(load_api_settings(args.config))
        if args.command == "call":
            return c.place_one(client, args.route, args.to, c.parse_vars(args.var), args.context, args.wait,
                               sys.stdout)
        if args.concurrency < 1 or args.retries < 0:
            raise c.CampaignError("--concurrency must be at least 1 and --retries at least 0")
        settings = c.Settings(route=args.route, concurrency=args.concurrency, rate=c.parse_rate(args.rate),
                              retries=args.retries, retry_after=c.parse_span(args.retry_after),
                              hours=c.Hours.parse(args.hours, args.tz))
        return c.run_campaign(client, args.csv, settings, args.results or f"{args.csv}.results.jsonl")
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except c.CampaignError as exc:
        print(f"forkbridge {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
