"""fsim-only API commands, so ``fsim call`` can drive a running ``fsim serve`` over its own ESL port.

Real FreeSWITCH has no such commands; they are kept out of ``commands_log`` so tests that count commands per call
are not disturbed.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from .caller import script_from_cli

if TYPE_CHECKING:
    from .switch import FSim

CONTROL_PREFIX = "fsim_"


def fsim_call(sw: FSim, args: str) -> str:
    """``fsim_call did=7100 cid=+1555... say=/x.wav dtmf=5@3s hangup=20s rate=8000 ptime=20`` → the new uuid."""
    opts = dict(tok.split("=", 1) for tok in shlex.split(args) if "=" in tok)
    try:
        script = script_from_cli(opts.get("say"), [opts["dtmf"]] if opts.get("dtmf") else [], opts.get("hangup"))
        call = sw.place_call(
            did=opts.get("did", "7100"),
            caller_id=opts.get("cid", "+15551234567"),
            script=script,
            rate=int(opts.get("rate", "8000")),
            ptime_ms=int(opts.get("ptime", "20")),
        )
    except (ValueError, OSError) as e:
        return f"-ERR {e}\n"
    return f"+OK {call.uuid}\n"


def fsim_status(sw: FSim, args: str) -> str:
    """JSON: whether the call is over, how it ended, and what the caller heard."""
    uuid = args.strip()
    for call in sw.calls:
        if call.uuid == uuid:
            t0 = call.t_answer
            return json.dumps(
                {
                    "uuid": uuid,
                    "answered": call.t_answer is not None,
                    "hungup": call.hungup.is_set(),
                    "hangup_cause": call.hangup_cause,
                    "hangup_by": call.hangup_by,
                    "transferred_to": call.transferred_to,
                    "fork": None if call.fork is None else {"url": call.fork.url, "state": call.fork.state,
                                                            "frames": len(call.fork.frames_sent)},  # fmt: skip
                    "heard": call.ear.summary(t0),
                    "events": [e.key for e in call.events()],
                }
            )
    return "-ERR no such call\n"


CONTROL_API = {"fsim_call": fsim_call, "fsim_status": fsim_status}
