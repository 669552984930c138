"""``fsim serve`` (a simulated FreeSWITCH on 127.0.0.1:8021) and ``fsim call`` (place a scripted call on it)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _serve(args: argparse.Namespace) -> int:
    import gevent
    import gevent.event

    from .switch import FSim

    sw = FSim(
        esl_host=args.host,
        esl_port=args.port,
        password=os.environ.get(args.password_env) or args.password,
        dids=args.did or None,
        fork_build=args.fork_build,
        broadcast_lead_frames=args.lead_frames,
        temp_dir=args.temp_dir,
    )
    sw.start()
    print(f"fsim: ESL listening on {sw.esl_host}:{sw.esl_port} (temp_dir {sw.temp_dir})", flush=True)
    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGINT, done.set)
    gevent.signal_handler(signal.SIGTERM, done.set)
    done.wait()
    sw.stop()
    return 0


def _call(args: argparse.Namespace) -> int:
    import greenswitch

    password = os.environ.get(args.password_env) or args.password
    esl = greenswitch.InboundESL(args.host, args.port, password, timeout=5)
    try:
        esl.connect()
    except Exception as e:  # refused, timeout, bad password
        print(f"fsim call: cannot reach fsim ESL at {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    opts = [f"did={args.did}", f"cid={args.cid}", f"rate={args.rate}", f"ptime={args.ptime}"]
    if args.say:
        opts.append(f"say={os.path.abspath(args.say)}")
    if args.dtmf:
        opts.append("dtmf=" + ",".join(args.dtmf))
    if args.hangup:
        opts.append(f"hangup={args.hangup}")
    reply = esl.send("api fsim_call " + " ".join(opts)).data.strip()
    if not reply.startswith("+OK "):
        print(f"fsim call: {reply} (is this a real FreeSWITCH? fsim call needs fsim serve)", file=sys.stderr)
        return 2
    uuid = reply[4:]
    print(f"call {uuid} to {args.did}", flush=True)
    deadline = time.monotonic() + args.timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = json.loads(esl.send(f"api fsim_status {uuid}").data)
        if status.get("hungup"):
            break
        time.sleep(0.2)
    else:
        esl.send(f"api uuid_kill {uuid}")
        print("fsim call: timed out, hung up", file=sys.stderr)
    esl.stop()
    print(f"ended: {status.get('hangup_cause')} (by {status.get('hangup_by')})")
    if status.get("transferred_to"):
        print(f"transferred to: {status['transferred_to']}")
    if status.get("fork"):
        print(f"fork: {status['fork']}")
    print("what the caller heard (seconds from answer):")
    print(status.get("heard", ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsim", description="FreeSWITCH simulator for forkbridge tests and demos")
    sub = p.add_subparsers(dest="cmd", required=True)

    def esl_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", default="127.0.0.1", help="ESL address (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=8021, help="ESL port (default 8021; 0 = any free port)")
        sp.add_argument("--password", default="ClueCon", help="ESL password (default ClueCon)")
        sp.add_argument("--password-env", default="FSIM_ESL_PASSWORD", help="env var that overrides --password")

    s = sub.add_parser("serve", help="run a simulated FreeSWITCH until SIGINT/SIGTERM")
    esl_opts(s)
    s.add_argument("--did", action="append", help="DID the dialplan answers (repeatable; default: every DID)")
    s.add_argument("--fork-build", choices=["drachtio", "jambonz"], default="drachtio")
    s.add_argument("--lead-frames", type=int, default=5, help="frames read before each uuid_broadcast (FS: 5)")
    s.add_argument("--temp-dir", default=None, help="where playAudio files are written")
    s.set_defaults(fn=_serve)

    c = sub.add_parser("call", help="place a scripted call on a running 'fsim serve' and print what was heard")
    esl_opts(c)
    c.add_argument("--did", default="7100")
    c.add_argument("--cid", default="+15551234567", help="caller id number")
    c.add_argument("--say", help="WAV (or .r8/.r16) file the caller speaks from answer")
    c.add_argument("--dtmf", action="append", help="digit@time, e.g. 5@3s (repeatable or comma-separated)")
    c.add_argument("--hangup", help="caller hangs up after this long, e.g. 20s")
    c.add_argument("--rate", type=int, default=8000, choices=[8000, 16000], help="codec rate (PCMU 8000, G722)")
    c.add_argument("--ptime", type=int, default=20, choices=[20, 30])
    c.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    c.set_defaults(fn=_call)
    return p


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
