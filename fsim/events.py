"""Events as FreeSWITCH builds them: common headers, channel data, and which events carry ``variable_*``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import wire

if TYPE_CHECKING:
    from .channel import Channel

# Events that get channel variables (switch_channel_event_set_extended_data); DTMF is deliberately absent.
WITH_VARIABLES = {
    "CHANNEL_CREATE", "CHANNEL_ORIGINATE", "CHANNEL_UUID", "CHANNEL_ANSWER", "CHANNEL_PARK", "CHANNEL_UNPARK",
    "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_HANGUP",
    "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DATA", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_DESTROY",
    "CHANNEL_HOLD", "CHANNEL_UNHOLD", "REQUEST_PARAMS", "SESSION_HEARTBEAT", "API", "RECORD_START", "RECORD_STOP",
    "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE", "MEDIA_BUG_START", "MEDIA_BUG_STOP", "TEXT", "CUSTOM",
}  # fmt: skip

# Every name mod_event_socket accepts in `event ...` (switch_event.c EVENT_NAMES, the ones a client may use).
EVENT_NAMES = {
    "CUSTOM", "CLONE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_STATE", "CHANNEL_CALLSTATE", "CHANNEL_ANSWER",
    "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HOLD",
    "CHANNEL_UNHOLD", "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA",
    "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_UNPARK", "CHANNEL_APPLICATION", "CHANNEL_ORIGINATE", "CHANNEL_UUID",
    "API", "LOG", "INBOUND_CHAN", "OUTBOUND_CHAN", "STARTUP", "SHUTDOWN", "PUBLISH", "UNPUBLISH", "TALK", "NOTALK",
    "SESSION_CRASH", "MODULE_LOAD", "MODULE_UNLOAD", "DTMF", "MESSAGE", "PRESENCE_IN", "NOTIFY_IN", "PRESENCE_OUT",
    "PRESENCE_PROBE", "MESSAGE_WAITING", "MESSAGE_QUERY", "ROSTER", "CODEC", "BACKGROUND_JOB", "DETECTED_SPEECH",
    "DETECTED_TONE", "PRIVATE_COMMAND", "HEARTBEAT", "TRAP", "ADD_SCHEDULE", "DEL_SCHEDULE", "EXE_SCHEDULE",
    "RE_SCHEDULE", "RELOADXML", "NOTIFY", "PHONE_FEATURE", "PHONE_FEATURE_SUBSCRIBE", "SEND_MESSAGE",
    "RECV_MESSAGE", "REQUEST_PARAMS", "CHANNEL_DATA", "GENERAL", "COMMAND", "SESSION_HEARTBEAT", "CLIENT_DISCONNECTED",
    "SERVER_DISCONNECTED", "SEND_INFO", "RECV_INFO", "RECV_RTCP_MESSAGE", "SEND_RTCP_MESSAGE", "CALL_SECURE", "NAT",
    "RECORD_START", "RECORD_STOP", "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE", "FAILURE", "SOCKET_DATA",
    "MEDIA_BUG_START", "MEDIA_BUG_STOP", "CONFERENCE_DATA_QUERY", "CONFERENCE_DATA", "CALL_SETUP_REQ",
    "CALL_SETUP_RESULT", "CALL_DETAIL", "DEVICE_STATE", "TEXT", "SHUTDOWN_REQUESTED", "ALL",
}  # fmt: skip

# Where FreeSWITCH fires each event from (Event-Calling-File / -Function / -Line-Number); cosmetic but realistic.
_ORIGIN = {
    "CHANNEL_CREATE": ("switch_core_state_machine.c", "switch_core_session_run", "627"),
    "CHANNEL_ANSWER": ("switch_channel.c", "switch_channel_perform_mark_answered", "3998"),
    "CHANNEL_HANGUP": ("switch_channel.c", "switch_channel_perform_hangup", "3504"),
    "CHANNEL_HANGUP_COMPLETE": ("switch_core_state_machine.c", "switch_core_session_reporting_state", "958"),
    "CHANNEL_DESTROY": ("switch_core_session.c", "switch_core_session_perform_destroy", "1604"),
    "CHANNEL_EXECUTE": ("switch_core_session.c", "switch_core_session_exec", "2944"),
    "CHANNEL_EXECUTE_COMPLETE": ("switch_core_session.c", "switch_core_session_exec", "3009"),
    "CHANNEL_PARK": ("switch_ivr.c", "switch_ivr_park", "1019"),
    "CHANNEL_UNPARK": ("switch_ivr.c", "switch_ivr_park", "1372"),
    "DTMF": ("switch_channel.c", "switch_channel_dequeue_dtmf", "705"),
    "PLAYBACK_START": ("switch_ivr_play_say.c", "switch_ivr_play_file", "1619"),
    "PLAYBACK_STOP": ("switch_ivr_play_say.c", "switch_ivr_play_file", "2104"),
    "MEDIA_BUG_START": ("switch_core_media_bug.c", "switch_core_media_bug_add", "1008"),
    "MEDIA_BUG_STOP": ("switch_core_media_bug.c", "switch_core_media_bug_close", "1294"),
    "BACKGROUND_JOB": ("mod_event_socket.c", "api_exec", "1585"),
    "CHANNEL_STATE": ("switch_channel.c", "switch_channel_perform_set_running_state", "2102"),
}
_CUSTOM_ORIGIN = {
    "mod_audio_fork": ("lws_glue.cpp", "eventCallback", "143"),
    "mod_audio_stream": ("audio_streamer_glue.cpp", "eventCallback", "52"),
}


@dataclass
class Event:
    """One event as fired: ordered headers (duplicates allowed), optional raw body."""

    name: str
    headers: list[tuple[str, str]]
    body: str | None = None
    subclass: str | None = None
    uuid: str | None = None
    fired_at: float = field(default_factory=time.monotonic)

    def get(self, header: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == header:
                return v
        return default

    def get_ci(self, header: str) -> str | None:
        h = header.lower()
        for k, v in self.headers:
            if k.lower() == h:
                return v
        return None

    @property
    def key(self) -> str:
        """The name greenswitch dispatches on: the subclass for CUSTOM events."""
        return self.subclass if self.name == "CUSTOM" and self.subclass else self.name

    def plain(self) -> bytes:
        return wire.serialize_plain(self.headers, self.body)

    def json(self) -> bytes:
        return wire.serialize_json(self.headers, self.body)


def _date_headers(now: float) -> list[tuple[str, str]]:
    return [
        ("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))),
        ("Event-Date-GMT", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))),
        ("Event-Date-Timestamp", str(int(now * 1_000_000))),
    ]


def common_headers(
    name: str, core_uuid: str, hostname: str, sequence: int, subclass: str | None = None
) -> list[tuple[str, str]]:
    """The headers every event starts with, in FreeSWITCH's order (esl.md §4.1)."""
    if subclass:
        origin = _CUSTOM_ORIGIN.get(subclass.split("::")[0], ("switch_event.c", "switch_event_fire_detailed", "2000"))
    else:
        origin = _ORIGIN.get(name, ("switch_channel.c", "switch_channel_event_set_data", "2600"))
    h = [
        ("Event-Name", name),
        ("Core-UUID", core_uuid),
        ("FreeSWITCH-Hostname", hostname),
        ("FreeSWITCH-Switchname", hostname),
        ("FreeSWITCH-IPv4", "127.0.0.1"),
        ("FreeSWITCH-IPv6", "::1"),
        *_date_headers(time.time()),
        ("Event-Calling-File", origin[0]),
        ("Event-Calling-Function", origin[1]),
        ("Event-Calling-Line-Number", origin[2]),
        ("Event-Sequence", str(sequence)),
    ]
    if subclass:
        h.append(("Event-Subclass", subclass))
    return h


def channel_headers(ch: Channel, with_variables: bool) -> list[tuple[str, str]]:
    """``switch_channel_event_set_basic_data`` + caller profile (+ ``variable_*`` when the event type has them)."""
    p = ch.profile
    h = [
        ("Channel-State", ch.state),
        ("Channel-Call-State", ch.call_state),
        ("Channel-State-Number", str(ch.state_number)),
        ("Channel-Name", ch.name),
        ("Unique-ID", ch.uuid),
        ("Call-Direction", ch.direction),
        ("Presence-Call-Direction", ch.direction),
        ("Channel-HIT-Dialplan", "true"),
        ("Channel-Call-UUID", ch.variables.get("call_uuid", ch.uuid)),
        ("Answer-State", ch.answer_state),
    ]
    if ch.hangup_cause:
        h.append(("Hangup-Cause", ch.hangup_cause))
    h += [
        ("Channel-Read-Codec-Name", ch.codec),
        ("Channel-Read-Codec-Rate", str(ch.rate)),
        ("Channel-Read-Codec-Bit-Rate", str(ch.codec_bit_rate)),
        ("Channel-Write-Codec-Name", ch.codec),
        ("Channel-Write-Codec-Rate", str(ch.rate)),
        ("Channel-Write-Codec-Bit-Rate", str(ch.codec_bit_rate)),
        ("Caller-Direction", ch.direction),
        ("Caller-Logical-Direction", ch.direction),
        ("Caller-Username", p["username"]),
        ("Caller-Dialplan", p["dialplan"]),
        ("Caller-Caller-ID-Name", p["cid_name"]),
        ("Caller-Caller-ID-Number", p["cid_num"]),
        ("Caller-Orig-Caller-ID-Name", p["cid_name"]),
        ("Caller-Orig-Caller-ID-Number", p["cid_num"]),
        ("Caller-Network-Addr", p["network_addr"]),
        ("Caller-ANI", p["cid_num"]),
        ("Caller-Destination-Number", p["destination"]),
        ("Caller-Unique-ID", ch.uuid),
        ("Caller-Source", "mod_sofia"),
    ]
    if p.get("transfer_source"):
        h.append(("Caller-Transfer-Source", p["transfer_source"]))
    h += [
        ("Caller-Context", p["context"]),
        ("Caller-Channel-Name", ch.name),
        ("Caller-Profile-Index", str(p["index"])),
        ("Caller-Profile-Created-Time", str(ch.t_created_us)),
        ("Caller-Channel-Created-Time", str(ch.t_created_us)),
        ("Caller-Channel-Answered-Time", str(ch.t_answered_us)),
        ("Caller-Channel-Progress-Time", "0"),
        ("Caller-Channel-Progress-Media-Time", str(ch.t_answered_us)),
        ("Caller-Channel-Hangup-Time", str(ch.t_hangup_us)),
        ("Caller-Channel-Transfer-Time", str(ch.t_transfer_us)),
        ("Caller-Channel-Resurrect-Time", "0"),
        ("Caller-Channel-Bridged-Time", "0"),
        ("Caller-Channel-Last-Hold", "0"),
        ("Caller-Channel-Hold-Accum", "0"),
        ("Caller-Screen-Bit", "true"),
        ("Caller-Privacy-Hide-Name", "false"),
        ("Caller-Privacy-Hide-Number", "false"),
    ]
    # Drop empty caller-profile fields the way FreeSWITCH omits them (e.g. no Caller-Caller-ID-Number).
    h = [(k, v) for k, v in h if v != "" or not k.startswith("Caller-")]
    if with_variables:
        h += [(f"variable_{k}", v) for k, v in ch.variables.items()]
    return h
