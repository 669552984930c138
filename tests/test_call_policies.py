"""Pure call policies: per-call WebSocket tokens, what digits do, how ESL event bodies are read."""

from __future__ import annotations

import gevent
import gevent.event

from bridge.tokens import TokenBook
from controller.config import DtmfPolicy
from controller.dtmf import DtmfAction, DtmfHandler
from controller.esl import parse_plain_event

UUID = "1f0a6d3e-5c1b-4c8e-9d55-2b7f0a9d1e42"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_token_is_bound_to_its_call_and_single_use():
    clock = Clock()
    book = TokenBook("0123456789abcdef", ttl=30, clock=clock)
    token = book.mint(UUID)
    assert book.check("another-uuid", token) == "bad_token"
    assert book.check(UUID, token[:-1] + ("0" if token[-1] != "0" else "1")) == "bad_token"
    assert book.check(UUID, "garbage") == "bad_token"
    assert book.check(UUID, token) == ""
    assert book.check(UUID, token) == "replayed"


def test_token_expires():
    clock = Clock()
    book = TokenBook("0123456789abcdef", ttl=30, clock=clock)
    token = book.mint(UUID)
    clock.now += 31
    assert book.check(UUID, token) == "expired"
    other = TokenBook("fedcba9876543210", ttl=30, clock=clock)
    assert other.check(UUID, book.mint(UUID)) == "bad_token"


def collect(policy: DtmfPolicy) -> tuple[DtmfHandler, list[DtmfAction]]:
    out: list[DtmfAction] = []
    return DtmfHandler(policy, out.append), out


def test_forward_sends_each_digit_in_order():
    handler, out = collect(DtmfPolicy(mode="forward"))
    for digit in "12#":
        handler.digit(digit)
    assert out == [DtmfAction("text", "1"), DtmfAction("text", "2"), DtmfAction("text", "#")]


def test_collect_until_terminator_is_one_message():
    handler, out = collect(DtmfPolicy(mode="collect"))
    for digit in "12#":
        handler.digit(digit)
    assert out == [DtmfAction("text", "12")]


def test_collect_sends_what_it_has_after_the_timeout():
    handler, out = collect(DtmfPolicy(mode="collect", timeout=0.05))
    handler.digit("4")
    handler.digit("2")
    with gevent.Timeout(2):
        while not out:
            gevent.sleep(0.01)
    assert out == [DtmfAction("text", "42")]


def test_local_action_digit_never_reaches_the_model():
    handler, out = collect(DtmfPolicy(mode="forward", actions={"0": "transfer:operator", "*": "hangup"}))
    handler.digit("5")
    handler.digit("0")
    assert out == [DtmfAction("text", "5"), DtmfAction("transfer", "operator")]


def test_event_body_stays_raw_and_headers_are_decoded():
    body = '{"reason":"Unable to connect","pct":"100%25"}'
    text = ("Event-Name: CUSTOM\nEvent-Subclass: mod_audio_fork%3A%3Aconnect_failed\n"
            f"Unique-ID: {UUID}\nCaller-Caller-ID-Name: Joe%20Bloggs\nContent-Length: {len(body)}\n\n{body}")
    event = parse_plain_event(text)
    assert event.name == "CUSTOM" and event.subclass == "mod_audio_fork::connect_failed"
    assert event.uuid == UUID and event.get("Caller-Caller-ID-Name") == "Joe Bloggs"
    assert event.body == body  # %25 is not decoded inside a body


def test_background_job_result_is_the_body():
    text = "Event-Name: BACKGROUND_JOB\nJob-UUID: abc\nContent-Length: 12\n\n+OK Success\n"
    event = parse_plain_event(text)
    assert event.get("Job-UUID") == "abc" and event.body == "+OK Success\n"


def test_websocket_unmasking_matches_rfc6455():
    import os

    from bridge.wsframes import unmask

    class Header:
        mask = b"\x37\xfa\x21\x3d"

    payload = os.urandom(1003)
    expected = bytes(b ^ Header.mask[i % 4] for i, b in enumerate(payload))
    assert unmask(Header(), payload) == expected
    assert unmask(Header(), unmask(Header(), payload)) == payload
    assert unmask(Header(), b"") == b""


class _SlowEsl:
    """An ESL client whose first command hangs until released, so later ones queue up behind it."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.release = gevent.event.Event()

    def api(self, command: str) -> str:
        self.sent.append(command)
        if len(self.sent) == 1:
            self.release.wait(5)
        return "+OK\n"

    def execute(self, uuid: str, app: str, arg: str, lock: bool = True) -> str:
        return self.api(f"execute {app} {arg}")


def test_a_transfer_never_leaves_an_orphan_timer_behind_it():

    from controller.actions import EslCallControl

    esl = _SlowEsl()
    control = EslCallControl(esl, UUID, stop_fork=f"uuid_audio_fork {UUID} stop forkbridge", marker="forkbridge")
    control.setvar("busy", "1")  # occupies the worker
    gevent.sleep(0)
    control.arm_orphan_timer(60, f"uuid_kill {UUID} NORMAL_CLEARING")  # a re-arm still queued...
    control.transfer("2000 XML default")  # ...when the call is handed over
    control.arm_orphan_timer(60, f"uuid_kill {UUID} NORMAL_CLEARING")  # and a late one after it
    esl.release.set()
    control.finish()
    control.drain(5)
    assert not [c for c in esl.sent if c.startswith("sched_api")]
    assert esl.sent[-1] == f"uuid_transfer {UUID} 2000 XML default"
    assert f"uuid_setvar {UUID} forkbridge released" in esl.sent
    assert esl.sent.index(f"sched_del forkbridge-{UUID}") < esl.sent.index(f"uuid_transfer {UUID} 2000 XML default")
