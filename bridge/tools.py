"""The model tools a route may allow, and the pure policy that turns a model's tool call into an action.

The model is untrusted input: it may invent tools, targets or digits. `decide()` is the single place
that says yes or no; the bridge only applies what it returns (through call control), and always
answers the model with `result_for_model` so a refusal is something the model can talk about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.engine import ToolCall, ToolSpec

HANGUP = "hangup"
TRANSFER = "transfer"
SEND_DTMF = "send_dtmf"
REFUSE = "refuse"  # decision action: nothing happens on the call; the model is told why
TOOL_NAMES = (HANGUP, TRANSFER, SEND_DTMF)

MAX_DTMF_DIGITS = 32
_DTMF = re.compile(r"^[0-9*#A-D]+$")


@dataclass(frozen=True)
class ToolDecision:
    """What the bridge does for one tool call.

    action: hangup | transfer | send_dtmf | refuse. argument: the transfer target *name* (the route maps
    it to a destination), the validated digits, or the hangup reason. result_for_model goes back
    through `Engine.tool_result(call_id, result_for_model, is_error)`.
    """

    action: str
    argument: str = ""
    result_for_model: Mapping[str, Any] = field(default_factory=dict)
    is_error: bool = False


def build_tool_specs(allowed: Iterable[str], transfer_targets: Iterable[str] = ()) -> tuple[ToolSpec, ...]:
    """JSON-schema tool declarations for the route's allowed tools, in a stable order.

    Raises ValueError for an unknown tool, or for `transfer` without targets (the model could then
    only ever be refused, which is a configuration mistake).
    """
    allowed = list(dict.fromkeys(allowed))
    targets = tuple(dict.fromkeys(str(t) for t in transfer_targets))
    unknown = [name for name in allowed if name not in TOOL_NAMES]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; expected {', '.join(TOOL_NAMES)}")
    specs: list[ToolSpec] = []
    for name in TOOL_NAMES:
        if name not in allowed:
            continue
        if name == HANGUP:
            specs.append(ToolSpec(
                name=HANGUP,
                description="End the phone call. Say goodbye first; the line is cut once you have finished speaking.",
                parameters={"type": "object",
                            "properties": {"reason": {"type": "string", "description": "Why the call ends (logged)."}},
                            "required": [], "additionalProperties": False}))
        elif name == TRANSFER:
            if not targets:
                raise ValueError("transfer needs at least one transfer target")
            specs.append(ToolSpec(
                name=TRANSFER,
                description=("Transfer the caller to a person or department. Only these targets exist: "
                             + ", ".join(targets) + ". Tell the caller before you transfer."),
                parameters={"type": "object",
                            "properties": {"target": {"type": "string", "enum": list(targets),
                                                      "description": "Where to transfer the caller."}},
                            "required": ["target"], "additionalProperties": False},
                targets=targets))
        else:
            specs.append(ToolSpec(
                name=SEND_DTMF,
                description="Send touch-tone (DTMF) digits on the line, e.g. to navigate a phone menu.",
                parameters={"type": "object",
                            "properties": {"digits": {"type": "string", "pattern": "^[0-9*#A-D]+$",
                                                      "maxLength": MAX_DTMF_DIGITS,
                                                      "description": "Digits 0-9, *, #, A-D."}},
                            "required": ["digits"], "additionalProperties": False}))
    return tuple(specs)


def _refuse(message: str) -> ToolDecision:
    return ToolDecision(action=REFUSE, result_for_model={"ok": False, "error": message}, is_error=True)


def decide(tool_call: ToolCall, specs: Iterable[ToolSpec]) -> ToolDecision:
    """Validate a model's tool call against the route's specs. Pure: no I/O, never raises."""
    by_name = {spec.name: spec for spec in specs}
    spec = by_name.get(tool_call.name)
    if spec is None:
        allowed = ", ".join(by_name) or "none"
        return _refuse(f"The tool {tool_call.name!r} is not available on this call (available: {allowed}).")
    args = tool_call.arguments if isinstance(tool_call.arguments, Mapping) else None
    if args is None:
        return _refuse("The tool arguments must be a JSON object.")

    if spec.name == HANGUP:
        reason = args.get("reason")
        reason = reason.strip()[:200] if isinstance(reason, str) else ""
        return ToolDecision(action=HANGUP, argument=reason,
                            result_for_model={"ok": True, "result": "The call will end after your last words."})

    if spec.name == TRANSFER:
        target = args.get("target")
        if not isinstance(target, str) or not target.strip():
            return _refuse(f"Say which target to transfer to: one of {', '.join(spec.targets)}.")
        wanted = target.strip().casefold()
        for name in spec.targets:
            if name.casefold() == wanted:
                return ToolDecision(action=TRANSFER, argument=name,
                                    result_for_model={"ok": True, "result": f"Transferring the caller to {name}."})
        return _refuse(f"Transfer to {target.strip()[:64]!r} is not allowed. "
                       f"The only transfer targets are: {', '.join(spec.targets)}.")

    if spec.name == SEND_DTMF:
        digits = args.get("digits")
        if isinstance(digits, int) and not isinstance(digits, bool):
            digits = str(digits)
        if not isinstance(digits, str):
            return _refuse("digits must be a string of 0-9, *, #, A-D.")
        digits = digits.replace(" ", "").replace("-", "").upper()
        if not digits or not _DTMF.match(digits):
            return _refuse("digits may only contain 0-9, *, #, A-D.")
        if len(digits) > MAX_DTMF_DIGITS:
            return _refuse(f"At most {MAX_DTMF_DIGITS} digits can be sent at once.")
        return ToolDecision(action=SEND_DTMF, argument=digits,
                            result_for_model={"ok": True, "result": f"Sent the digits {digits}."})

    return _refuse(f"The tool {spec.name!r} is not supported.")
