"""The `forkbridge` command: check-config and run."""

from __future__ import annotations

import argparse
import sys

from controller.config import Config, ConfigError, load_config


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
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    from gevent import monkey

    monkey.patch_all()  # the one place the process is patched, before the daemon's modules load
    from controller.daemon import run_daemon

    return run_daemon(args.config)


if __name__ == "__main__":
    sys.exit(main())
