"""forkbridge.yaml → typed, validated objects.

A typo in a route must be caught before a single call is affected, so every problem is collected (not just
the first) and each one names the file, the line and the key path. Secrets come in through `${VAR}` or
`${VAR:-default}` interpolation from the environment and are listed in `Config.secrets` so logging can
redact them.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
ENGINE_TYPES = ("echo", "openai_realtime", "elevenlabs", "generic")
TOOL_NAMES = ("hangup", "transfer", "send_dtmf")
DTMF_DIGITS = set("0123456789*#ABCD")
RECORD_PATH = "/var/lib/forkbridge/recordings/{date}/{uuid}.wav"  # `record: true`; FreeSWITCH writes it
RECORD_FIELDS = ("date", "uuid", "did", "route")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
# What may reach a dial string or an originate variable: nothing that ends a variable list ({ } ,), quotes an
# argument (' "), splits the command (whitespace) or escapes (\ ^), whatever an allowed pattern would let through.
SAFE_NUMBER = re.compile(r"[0-9A-Za-z+*#@._-]{1,64}")
SAFE_VALUE = re.compile(r"[^\s{}',\"\\^]*")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # e.g. sip_h_X-Campaign (a SIP header)


class ConfigError(Exception):
    """Every problem found in one file, each as 'file:line: key.path: what was expected'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---- the typed result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EslConfig:
    host: str = "127.0.0.1"
    port: int = 8021
    password: str = ""
    marker_variable: str = "forkbridge"
    command_timeout: float = 5.0
    reconnect_max: float = 30.0


@dataclass(frozen=True)
class BridgeConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8765
    url: str = ""  # what FreeSWITCH dials; defaults to ws://<listen>
    spool_dir: str = "/var/spool/forkbridge"
    token_secret: str = ""
    token_ttl: float = 30.0
    max_frame_bytes: int = 65536


@dataclass(frozen=True)
class MetricsConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"
    call_records: str = ""


@dataclass(frozen=True)
class ApiConfig:
    """The local HTTP API that places outbound calls (off unless a token is set)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 9465
    token: str = ""


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_grace: float = 20.0
    orphan_timeout: float = 60.0  # FreeSWITCH itself falls a call back this long after we stop vouching for it
    workers: int = 1  # processes taking calls; more than 1: `forkbridge run` supervises them (controller.workers)


@dataclass(frozen=True)
class EngineConfig:
    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Fallback:
    prompt: str = ""
    transfer: str = ""  # a uuid_transfer destination, e.g. "1000 XML default"; empty means hang up
    hangup_cause: str = "NORMAL_CLEARING"

    @property
    def action(self) -> str:
        return "transfer" if self.transfer else "hangup"

    def describe(self) -> str:
        then = f"transfer {self.transfer}" if self.transfer else "hangup"
        return f"{os.path.basename(self.prompt)} → {then}" if self.prompt else then


@dataclass(frozen=True)
class DtmfPolicy:
    mode: str = "forward"  # forward | collect
    terminator: str = "#"
    timeout: float = 3.0
    max_digits: int = 16
    actions: Mapping[str, str] = field(default_factory=dict)  # digit → "transfer:<target>" | "hangup"


@dataclass(frozen=True)
class ToolsPolicy:
    allow: tuple[str, ...] = ()
    transfer_targets: Mapping[str, str] = field(default_factory=dict)  # name the model uses → destination


@dataclass(frozen=True)
class OutboundPolicy:
    """How a route places calls: the dial string, who we say we are, which numbers it may call, its cap."""

    dial: str  # a FreeSWITCH dial string with {to}, e.g. sofia/gateway/carrier/{to}
    allowed: str  # a regular expression the whole destination must match
    caller_id: str = ""
    caller_id_name: str = ""
    originate_timeout: float = 30.0
    max_concurrent: int = 5  # outbound calls of this route at once, ringing or answered (inbound ones not counted)
    variables: Mapping[str, str] = field(default_factory=dict)

    def allows(self, number: str) -> bool:
        return SAFE_NUMBER.fullmatch(number) is not None and re.fullmatch(self.allowed, number) is not None

    def dial_string(self, number: str) -> str:
        return self.dial.replace("{to}", number)


@dataclass(frozen=True)
class Route:
    name: str
    dids: tuple[str, ...]
    pattern: str
    engine: str
    module: str = "audio_fork"
    sample_rate: int = 16000
    playback: str = "broadcast"
    greeting: str = ""
    greeting_file: str = ""
    instructions: str = ""
    voice: str = ""
    dtmf: DtmfPolicy = DtmfPolicy()
    tools: ToolsPolicy = ToolsPolicy()
    max_duration: float = 3600.0
    no_audio_timeout: float = 10.0
    fallback: Fallback = Fallback()
    outbound: OutboundPolicy | None = None
    record: str = ""  # path template of the call's stereo recording (FreeSWITCH's uuid_record); "" = off

    def matches(self, did: str) -> bool:
        if did in self.dids:
            return True
        return bool(self.pattern) and re.fullmatch(self.pattern, did) is not None

    def describe_match(self) -> str:
        if not self.dids and not self.pattern:
            return "(outbound only)"
        return ",".join(self.dids) if self.dids else f"/{self.pattern}/"


@dataclass(frozen=True)
class Config:
    path: str
    esl: EslConfig
    bridge: BridgeConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    daemon: DaemonConfig
    engines: Mapping[str, EngineConfig]
    routes: tuple[Route, ...]
    secrets: tuple[str, ...] = ()
    unrouted: Fallback = Fallback()  # for a marked call no route matches (the dialplan and routes drifted apart)
    api: ApiConfig = ApiConfig()

    def route_named(self, name: str) -> Route | None:
        return next((route for route in self.routes if route.name == name), None)

    def route_for(self, did: str) -> Route | None:
        """First match wins, as in a FreeSWITCH dialplan."""
        for route in self.routes:
            if route.matches(did):
                return route
        return None

    @property
    def bridge_url(self) -> str:
        return self.bridge.url or f"ws://{self.bridge.listen_host}:{self.bridge.listen_port}"


# ---- YAML with positions -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


@dataclass
class _Node:
    """A YAML value with the line it came from, so every error can point at it."""

    value: Any  # scalar, dict[str, _Node] or list[_Node]
    line: int
    interpolated: bool = False


class _Reader:
    """Walks the composed YAML, interpolating ${VAR} and remembering lines."""

    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = env
        self.problems: list[str] = []
        self._reported: set[str] = set()
        self._loader = _Loader("")

    def error(self, line: int, keypath: str, message: str) -> None:
        if keypath and keypath in self._reported:
            return  # one problem per key: a missing ${VAR} is not also reported as a missing key
        self._reported.add(keypath)
        where = f"{keypath}: " if keypath else ""
        self.problems.append(f"{self.path}:{line}: {where}{message}")

    def convert(self, node: yaml.Node, keypath: str) -> _Node:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, _Node] = {}
            for key_node, value_node in node.value:
                key = str(self._loader.construct_object(key_node))
                sub = f"{keypath}.{key}" if keypath else key
                if key in out:
                    self.error(key_node.start_mark.line + 1, sub, "duplicate key")
                out[key] = self.convert(value_node, sub)
            return _Node(out, line)
        if isinstance(node, yaml.SequenceNode):
            return _Node([self.convert(item, f"{keypath}[{i}]") for i, item in enumerate(node.value)], line)
        raw = self._loader.construct_object(node)
        if isinstance(raw, str) and "${" in raw:
            text = self._interpolate(raw, line, keypath)
            resolved = self._loader.resolve(yaml.ScalarNode, text, (True, False))
            value = self._loader.construct_object(yaml.ScalarNode(resolved, text))
            return _Node(value, line, interpolated=True)
        return _Node(raw, line)

    def _interpolate(self, text: str, line: int, keypath: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.error(line, keypath, f"environment variable {name} is not set and has no default "
                                              f"(write ${{{name}:-value}} to give one)")
                    return ""
                return default
            return value

        return _ENV_REF.sub(substitute, text)


# ---- typed conversion helpers --------------------------------------------------------------------------


class _Section:
    """Reads one mapping, checking types; unknown keys are errors (typo protection)."""

    def __init__(self, reader: _Reader, node: _Node | None, keypath: str, allowed: tuple[str, ...]) -> None:
        self.r = reader
        self.keypath = keypath
        self.line = node.line if node else 1
        self.items: dict[str, _Node] = {}
        if node is None or node.value is None:
            return
        if not isinstance(node.value, dict):
            reader.error(node.line, keypath, f"expected a mapping, got {_kind(node.value)}")
            return
        self.items = node.value
        for key, sub in node.value.items():
            if key not in allowed:
                hint = _closest(key, allowed)
                reader.error(sub.line, self._path(key), "unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
                             + f"; expected one of: {', '.join(allowed)}")

    def _path(self, key: str) -> str:
        return f"{self.keypath}.{key}" if self.keypath else key

    def has(self, key: str) -> bool:
        return key in self.items and self.items[key].value is not None

    def node(self, key: str) -> _Node | None:
        return self.items.get(key)

    def bad(self, key: str, message: str) -> None:
        node = self.items.get(key)
        self.r.error(node.line if node else self.line, self._path(key), message)

    def str(self, key: str, default: str = "", required: bool = False) -> str:
        if not self.has(key):
            if required:
                self.bad(key, "is required")
            return default
        value = self.items[key].value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.bad(key, f"expected a string, got {_kind(value)}")
            return default
        return str(value)

    def int(self, key: str, default: int, choices: tuple[int, ...] = ()) -> int:
        if not self.has(key):
            return default
        value = self.items[key].value
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, f"expected an integer, got {_kind(value)}")
            return default
        if choices and value not in choices:
            self.bad(key, f"{value} is not supported; expected one of {', '.join(map(str, choices))}")
            return default
        if value < 0:
            self.bad(key, "must not be negative")
            return default
        return value

    def regex(self, key: str, required: bool = False) -> str:
        """A regular expression; an invalid one is reported and read as none."""
        text = self.str(key, required=required)
        if text:
            try:
                re.compile(text)
            except re.error as exc:
                self.bad(key, f"invalid regular expression: {exc}")
                return ""
        return text

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(key, default)
        if value not in choices:
            self.bad(key, f"'{value}' is not valid; expected one of {', '.join(choices)}")
            return default
        return value

    def bool(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.items[key].value
        if not isinstance(value, bool):
            self.bad(key, f"expected true or false, got {_kind(value)}")
            return default
        return value

    def duration(self, key: str, default: float) -> float:
        if not self.has(key):
            return default
        value = self.items[key].value
        seconds = parse_duration(value)
        if seconds is None:
            self.bad(key, f"expected a duration like 30s, 500ms, 5m or 1h, got {value!r}")
            return default
        return seconds

    def str_list(self, key: str) -> tuple[str, ...]:
        if not self.has(key):
            return ()
        value = self.items[key].value
        if isinstance(value, list):
            out = []
            for i, item in enumerate(value):
                if isinstance(item.value, bool) or not isinstance(item.value, str | int):
                    self.r.error(item.line, f"{self._path(key)}[{i}]", f"expected a string, got {_kind(item.value)}")
                else:
                    out.append(str(item.value))
            return tuple(out)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return (str(value),)
        self.bad(key, f"expected a string or a list of strings, got {_kind(value)}")
        return ()

    def str_map(self, key: str) -> dict[str, str]:
        sub = _Section(self.r, self.items.get(key), self._path(key), tuple(self._keys(key)))
        return {k: sub.str(k) for k in sub.items}

    def _keys(self, key: str) -> list[str]:
        node = self.items.get(key)
        return list(node.value) if node is not None and isinstance(node.value, dict) else []

    def section(self, key: str, allowed: tuple[str, ...]) -> _Section:
        return _Section(self.r, self.items.get(key), self._path(key), allowed)


def parse_duration(value: Any) -> float | None:
    """'30s', '500ms', '5m', '1h' or a bare number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _DURATION.match(value)
    if not match:
        return None
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: f"the string {value!r}"}.get(type(value), type(value).__name__)


def _closest(key: str, allowed: tuple[str, ...]) -> str:
    import difflib

    match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return match[0] if match else ""


def _split_listen(section: _Section, key: str, default: tuple[str, int]) -> tuple[str, int]:
    text = section.str(key, "")
    if not text:
        return default
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        section.bad(key, f"expected host:port, got {text!r}")
        return default
    return host.strip("[]"), int(port)


# ---- sections ------------------------------------------------------------------------------------------

_ENGINE_KEYS: dict[str, tuple[str, ...]] = {
    "echo": ("vad_threshold_db", "silence_ms", "max_utterance_s", "refuse", "drop_after_s"),
    "openai_realtime": ("url", "api_key", "model", "voice", "turn_detection", "connect_timeout"),
    "elevenlabs": ("url", "agent_id", "signed_url_endpoint", "api_key", "dtmf_mode", "connect_timeout"),
    "generic": ("url", "token", "connect_timeout"),
}
_ENGINE_REQUIRED: dict[str, tuple[str, ...]] = {
    "openai_realtime": ("api_key",),
    "generic": ("url",),
}
_SECRET_KEYS = ("api_key", "token", "password", "token_secret")
_ROUTE_KEYS = ("name", "did", "pattern", "engine", "module", "sample_rate", "playback", "greeting", "greeting_file",
               "instructions", "voice", "dtmf", "tools", "max_duration", "no_audio_timeout", "fallback", "outbound",
               "record")
_OUTBOUND_KEYS = ("dial", "allowed", "caller_id", "caller_id_name", "originate_timeout", "max_concurrent",
                  "variables")


def _plain(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def _read_engines(reader: _Reader, node: _Node | None) -> dict[str, EngineConfig]:
    engines: dict[str, EngineConfig] = {}
    if node is None or node.value is None:
        return engines
    if not isinstance(node.value, dict):
        reader.error(node.line, "engines", f"expected a mapping of engine names, got {_kind(node.value)}")
        return engines
    for name, sub in node.value.items():
        path = f"engines.{name}"
        type_node = sub.value.get("type") if isinstance(sub.value, dict) else None
        etype = type_node.value if type_node else None
        if etype not in ENGINE_TYPES:
            line = type_node.line if type_node else sub.line
            reader.error(line, f"{path}.type", f"expected one of {', '.join(ENGINE_TYPES)}, got {etype!r}")
            continue
        section = _Section(reader, sub, path, ("type", *_ENGINE_KEYS[etype]))
        for key in _ENGINE_REQUIRED.get(etype, ()):
            section.str(key, required=True)
        if etype == "elevenlabs" and not (section.has("agent_id") or section.has("signed_url_endpoint")):
            section.bad("agent_id", "is required (or signed_url_endpoint)")
        if etype == "elevenlabs" and section.has("dtmf_mode"):
            section.choice("dtmf_mode", "user_message", ("user_message", "contextual_update"))
        options = {k: _plain(v) for k, v in section.items.items() if k != "type"}
        engines[name] = EngineConfig(name=name, type=etype, options=options)
    return engines


def _read_fallback(route: _Section) -> Fallback:
    node = route.node("fallback")
    if node is not None and node.value == "hangup":
        return Fallback()
    sec = route.section("fallback", ("prompt", "transfer", "hangup", "hangup_cause"))
    fallback = Fallback(prompt=sec.str("prompt"), transfer=sec.str("transfer"),
                        hangup_cause=sec.str("hangup_cause", "NORMAL_CLEARING"))
    if sec.has("hangup") and sec.has("transfer"):
        sec.bad("hangup", "give either transfer or hangup, not both")
    if sec.has("hangup") and sec.items["hangup"].value is not True:
        sec.bad("hangup", "expected true (or leave it out and give transfer)")
    return fallback


def _read_dtmf(route: _Section) -> DtmfPolicy:
    node = route.node("dtmf")
    if node is not None and node.value in ("forward", "collect"):
        return DtmfPolicy(mode=node.value)
    sec = route.section("dtmf", ("mode", "terminator", "timeout", "max_digits", "actions"))
    actions = sec.str_map("actions")
    actions_sec = sec.section("actions", tuple(actions))
    for digit, action in actions.items():
        if digit not in DTMF_DIGITS:
            actions_sec.bad(digit, "expected a DTMF digit (0-9 * # A-D)")
        if action != "hangup" and not action.startswith("transfer:"):
            actions_sec.bad(digit, f"expected 'hangup' or 'transfer:<target>', got {action!r}")
    terminator = sec.str("terminator", "#")
    if terminator not in DTMF_DIGITS:
        sec.bad("terminator", "expected a DTMF digit (0-9 * # A-D)")
    return DtmfPolicy(mode=sec.choice("mode", "forward", ("forward", "collect")), terminator=terminator,
                      timeout=sec.duration("timeout", 3.0), max_digits=sec.int("max_digits", 16), actions=actions)


def _read_tools(route: _Section) -> ToolsPolicy:
    sec = route.section("tools", ("allow", "transfer_targets"))
    allow = sec.str_list("allow")
    for i, name in enumerate(allow):
        if name not in TOOL_NAMES:
            sec.r.error(sec.items["allow"].line, f"{sec.keypath}.allow[{i}]",
                        f"unknown tool {name!r}; expected one of {', '.join(TOOL_NAMES)}")
    targets = sec.str_map("transfer_targets")
    if "transfer" in allow and not targets:
        sec.bad("transfer_targets", "is required when transfer is allowed (the model may only use these)")
    return ToolsPolicy(allow=allow, transfer_targets=targets)


def _read_outbound(route: _Section) -> OutboundPolicy | None:
    if not route.has("outbound"):
        return None
    sec = route.section("outbound", _OUTBOUND_KEYS)
    dial = sec.str("dial", required=True)
    if dial and "{to}" not in dial:
        sec.bad("dial", f"must contain {{to}} where the number goes, e.g. sofia/gateway/carrier/{{to}}; got {dial!r}")
    allowed = sec.regex("allowed", required=True)
    for key in ("caller_id", "caller_id_name"):
        if not SAFE_VALUE.fullmatch(sec.str(key)):
            sec.bad(key, "must not contain spaces, commas, quotes, braces, backslashes or ^")
    variables = sec.str_map("variables")
    var_sec = sec.section("variables", tuple(variables))
    for name, value in variables.items():
        if not VARIABLE_NAME.fullmatch(name):
            var_sec.bad(name, "expected a channel variable name (letters, digits, _ and -)")
        elif not SAFE_VALUE.fullmatch(value):
            var_sec.bad(name, "must not contain spaces, commas, quotes, braces, backslashes or ^")
    max_concurrent = sec.int("max_concurrent", 5)
    if max_concurrent < 1:
        sec.bad("max_concurrent", "must be at least 1")
    timeout = sec.duration("originate_timeout", 30.0)
    if not 1 <= timeout <= 600:
        sec.bad("originate_timeout", "expected between 1s and 10m")
    return OutboundPolicy(dial=dial, allowed=allowed, caller_id=sec.str("caller_id"),
                          caller_id_name=sec.str("caller_id_name"), originate_timeout=timeout,
                          max_concurrent=max(1, max_concurrent), variables=variables)


def _read_record(route: _Section) -> str:
    """`record: true` (the default path), `false`, or `{path: <template>}`; the template is checked here so a
    typo never reaches FreeSWITCH mid-call."""
    node = route.node("record")
    if node is None or node.value is None or node.value is False:
        return ""
    if node.value is True:
        return RECORD_PATH
    if not isinstance(node.value, dict):
        route.bad("record", f"expected true, false or a mapping with path:, got {_kind(node.value)}")
        return ""
    sec = route.section("record", ("path",))
    path = sec.str("path", RECORD_PATH)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(path) if name is not None}
    except ValueError as exc:
        sec.bad("path", f"bad template: {exc}")
        return ""
    unknown = sorted(fields - set(RECORD_FIELDS))
    if unknown:
        sec.bad("path", f"unknown field {{{unknown[0]}}}; expected {', '.join('{' + f + '}' for f in RECORD_FIELDS)}")
    elif not path.startswith("/") or " " in path:
        sec.bad("path", f"expected an absolute path without spaces (FreeSWITCH writes it), got {path!r}")
    elif "uuid" not in fields:
        sec.bad("path", "must contain {uuid}: each call needs its own file")
    else:
        return path
    return ""


def _read_route(reader: _Reader, node: _Node, index: int, defaults: _Node | None,
                engines: Mapping[str, EngineConfig]) -> Route | None:
    path = f"routes[{index}]"
    if not isinstance(node.value, dict):
        reader.error(node.line, path, f"expected a mapping, got {_kind(node.value)}")
        return None
    merged = dict(defaults.value) if defaults is not None and isinstance(defaults.value, dict) else {}
    merged.update(node.value)  # a route's own key replaces the default's key as a whole
    sec = _Section(reader, _Node(merged, node.line), path, _ROUTE_KEYS)
    dids = sec.str_list("did")
    pattern = sec.regex("pattern")
    if not dids and not sec.str("pattern") and not sec.has("outbound"):
        reader.error(node.line, path, "needs 'did' (a number or a list) or 'pattern' (a regular expression), or "
                                      "outbound: for a route that only places calls")
    engine = sec.str("engine", required=True)
    if engine and engine not in engines:
        known = ", ".join(engines) or "none defined"
        sec.bad("engine", f"engine '{engine}' is not defined under engines (defined: {known})")
    module = sec.choice("module", "audio_fork", ("audio_fork", "audio_stream"))
    playback = sec.choice("playback", "broadcast", ("broadcast", "stream"))
    if module == "audio_stream" and playback == "stream":
        sec.bad("playback", "mod_audio_stream cannot stream audio back into the call; use broadcast")
    route = Route(
        name=sec.str("name", f"route{index}"), dids=dids, pattern=pattern, engine=engine, module=module,
        sample_rate=sec.int("sample_rate", 16000, choices=(8000, 16000)), playback=playback,
        greeting=sec.str("greeting"), greeting_file=sec.str("greeting_file"),
        instructions=sec.str("instructions"), voice=sec.str("voice"),
        dtmf=_read_dtmf(sec), tools=_read_tools(sec), max_duration=sec.duration("max_duration", 3600.0),
        no_audio_timeout=sec.duration("no_audio_timeout", 10.0), fallback=_read_fallback(sec),
        outbound=_read_outbound(sec),
        record=_read_record(sec),
    )
    if route.outbound is not None and not SAFE_VALUE.fullmatch(route.name):
        sec.bad("name", "a route with outbound: needs a name without spaces, commas, quotes or braces (it travels "
                        "in the call's variables)")
    for digit, action in route.dtmf.actions.items():
        target = action.partition(":")[2]
        if action.startswith("transfer:") and target not in route.tools.transfer_targets:
            sec.section("dtmf", ()).r.error(node.line, f"{path}.dtmf.actions.{digit}",
                                             f"transfer target '{target}' is not in tools.transfer_targets")
    return route


def _read_workers(sec: _Section) -> int:
    """daemon.workers: a count of processes, or `auto` for one per core."""
    if not sec.has("workers"):
        return 1
    value = sec.items["workers"].value
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        sec.bad("workers", f"expected an integer of at least 1, or auto (one per core), got {value!r}")
        return 1
    return value


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate; raises ConfigError listing every problem."""
    env = os.environ if env is None else env
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_config(text, path, env)


def parse_config(text: str, path: str, env: Mapping[str, str]) -> Config:
    reader = _Reader(path, env)
    try:
        root_node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}:{line}: YAML syntax error: {problem}"]) from None
    if root_node is None:
        raise ConfigError([f"{path}:1: the file is empty"])
    root = reader.convert(root_node, "")
    top = _Section(reader, root, "", ("esl", "bridge", "metrics", "logging", "daemon", "engines", "defaults",
                                      "routes", "api"))

    esl_s = top.section("esl", ("host", "port", "password", "marker_variable", "command_timeout", "reconnect_max"))
    esl = EslConfig(host=esl_s.str("host", "127.0.0.1"), port=esl_s.int("port", 8021),
                    password=esl_s.str("password", required=True), marker_variable=esl_s.str("marker_variable",
                                                                                                 "forkbridge"),
                    command_timeout=esl_s.duration("command_timeout", 5.0),
                    reconnect_max=esl_s.duration("reconnect_max", 30.0))

    br = top.section("bridge", ("listen", "url", "spool_dir", "token_secret", "token_ttl", "max_frame_bytes"))
    host, port = _split_listen(br, "listen", ("127.0.0.1", 8765))
    url = br.str("url")
    if url and not url.startswith(("ws://", "wss://")):
        br.bad("url", f"expected a ws:// or wss:// address, got {url!r}")
    elif url and not re.match(r"^wss?://[^/]+:\d+(/|$)", url):
        br.bad("url", "give an explicit port (the drachtio mod_audio_fork mis-parses a host ending in a digit "
                      f"without one), e.g. ws://127.0.0.1:8765; got {url!r}")
    secret = br.str("token_secret", required=True)
    if secret and len(secret) < 16:
        br.bad("token_secret", "is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")
    bridge = BridgeConfig(listen_host=host, listen_port=port, url=url.rstrip("/"),
                          spool_dir=br.str("spool_dir", "/var/spool/forkbridge"), token_secret=secret,
                          token_ttl=br.duration("token_ttl", 30.0), max_frame_bytes=br.int("max_frame_bytes", 65536))

    ms = top.section("metrics", ("listen",))
    m_host, m_port = _split_listen(ms, "listen", ("127.0.0.1", 9464))
    lg = top.section("logging", ("level", "format", "call_records"))
    logging_cfg = LoggingConfig(level=lg.choice("level", "info", ("debug", "info", "warning", "error")),
                                format=lg.choice("format", "text", ("text", "json")),
                                call_records=lg.str("call_records"))
    dm = top.section("daemon", ("shutdown_grace", "orphan_timeout", "workers"))
    daemon = DaemonConfig(shutdown_grace=dm.duration("shutdown_grace", 20.0),
                          orphan_timeout=dm.duration("orphan_timeout", 60.0), workers=_read_workers(dm))
    if daemon.workers > 1 and bridge.listen_port and bridge.listen_port + daemon.workers - 1 > 65535:
        br.bad("listen", f"worker K listens on this port + K: {bridge.listen_port} + {daemon.workers - 1} is "
                         "past 65535")
    if dm.has("orphan_timeout") and 0 < daemon.orphan_timeout < 10:
        dm.bad("orphan_timeout", "use at least 10s (or 0 to turn the safety net off)")

    engines = _read_engines(reader, top.node("engines"))
    routes, unrouted = _read_routes(reader, top, engines)
    api_s = top.section("api", ("listen", "token"))
    a_host, a_port = _split_listen(api_s, "listen", ("127.0.0.1", 9465))
    api = ApiConfig(a_host, a_port, api_s.str("token"))
    if api.token and len(api.token) < 16:
        api_s.bad("token", "is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")
    if not api.token and any(route.outbound for route in routes):
        api_s.bad("token", "is required when a route has outbound: (the API that places calls needs it), e.g. "
                           "token: ${FORKBRIDGE_API_TOKEN}")

    if reader.problems:
        raise ConfigError(reader.problems)
    secrets = tuple(sorted({s for s in _collect_secrets(esl, bridge, engines) if s} | ({api.token} - {""})))
    return Config(path=path, esl=esl, bridge=bridge, metrics=MetricsConfig(m_host, m_port), logging=logging_cfg,
                  daemon=daemon, engines=engines, routes=routes, secrets=secrets, unrouted=unrouted, api=api)


def load_api_settings(path: str, env: Mapping[str, str] | None = None) -> ApiConfig:
    """Only the `api:` section, for `forkbridge call` and `campaign`: they need the address and the token, not
    the engines' secrets the daemon's environment holds."""
    env = os.environ if env is None else env
    try:
        with open(path, encoding="utf-8") as fh:
            root_node = yaml.compose(fh.read(), Loader=_Loader)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([f"{path}:{mark.line + 1 if mark else 1}: YAML syntax error"]) from None
    reader = _Reader(path, env)
    api_node = None
    if isinstance(root_node, yaml.MappingNode):
        api_node = next((v for k, v in root_node.value if getattr(k, "value", None) == "api"), None)
    sec = _Section(reader, reader.convert(api_node, "api") if api_node is not None else None, "api",
                   ("listen", "token"))
    host, port = _split_listen(sec, "listen", ("127.0.0.1", 9465))
    token = sec.str("token", required=True)
    if reader.problems:
        raise ConfigError(reader.problems)
    return ApiConfig(host, port, token)


def _read_routes(reader: _Reader, top: _Section,
                 engines: Mapping[str, EngineConfig]) -> tuple[tuple[Route, ...], Fallback]:
    """The routes, and the fallback for a call the dialplan marked as ours that no route matches
    (defaults.fallback; hang up when there is none)."""
    defaults = top.node("defaults")
    unrouted = Fallback()
    if defaults is not None and defaults.value is not None:
        # Checked on its own so a typo in defaults is reported at its own line.
        sec = _Section(reader, defaults, "defaults",
                       tuple(k for k in _ROUTE_KEYS if k not in ("did", "pattern", "name")))
        unrouted = _read_fallback(sec)
    node = top.node("routes")
    if node is None or not isinstance(node.value, list) or not node.value:
        reader.error(node.line if node else 1, "routes", "expected a non-empty list of routes")
        return (), unrouted
    routes: list[Route] = []
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, item in enumerate(node.value):
        route = _read_route(reader, item, i, defaults, engines)
        if route is None:
            continue
        if route.name in names:  # outbound calls, metrics and call records name a route
            reader.error(item.line, f"routes[{i}].name", f"route name '{route.name}' is already used by "
                                                        f"routes[{names[route.name]}]")
        names.setdefault(route.name, i)
        for did in route.dids:
            if did in seen:
                reader.error(item.line, f"routes[{i}].did", f"DID {did} is already routed by routes[{seen[did]}]")
            seen.setdefault(did, i)
        routes.append(route)
    return tuple(routes), unrouted


def _collect_secrets(esl: EslConfig, bridge: BridgeConfig, engines: Mapping[str, EngineConfig]) -> list[str]:
    found = [esl.password, bridge.token_secret]
    for engine in engines.values():
        found += [str(engine.options.get(k, "")) for k in _SECRET_KEYS]
    return found
