"""greenswitch and gevent-websocket are used below their public surface (controller/esl.py fixes greenswitch
0.0.19's event parsing and EOF handling; bridge/wsframes.py replaces gevent-websocket 0.10.1's unmasking; close
frames are sent by hand). setup.cfg pins the exact versions those patches were written for; this fails loudly when
an upgrade moves what they touch, instead of letting the daemon misparse ESL or corrupt audio in production."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import greenswitch.esl
import pytest
from geventwebsocket.websocket import Header, WebSocket

PINNED = {"greenswitch": "0.0.19", "gevent-websocket": "0.10.1"}


@pytest.mark.parametrize(("package", "pinned"), sorted(PINNED.items()))
def test_the_installed_version_is_the_one_the_patches_were_written_for(package, pinned):
    assert version(package) == pinned, (
        f"{package} {version(package)} is installed, but forkbridge patches {package} {pinned}'s internals: "
        "re-check controller/esl.py and bridge/wsframes.py against the new version before moving the pin")


def test_greenswitch_internals_the_esl_layer_overrides_are_there():
    esl = greenswitch.esl.InboundESL("127.0.0.1", 1, "x")
    for attribute in ("_commands_sent", "_esl_event_queue", "_run", "_receive_events_greenlet",
                      "_process_events_greenlet", "event_handlers", "_auth_request_event"):
        assert hasattr(esl, attribute), f"greenswitch.InboundESL has no {attribute} any more"
    for method in ("handle_event", "receive_events", "process_events", "send", "connect", "register_handle"):
        assert callable(getattr(esl, method, None)), f"greenswitch.InboundESL.{method} is gone"
    # our handle_event replaces the one that reads bodies and pops _commands_sent for api/response
    source = inspect.getsource(greenswitch.esl.ESLProtocol.handle_event)
    assert "api/response" in source and "_commands_sent" in source and "Content-Length" in source
    assert "sock_file" in inspect.getsource(greenswitch.esl.InboundESL.connect)
    # connect() waits on _auth_request_event, then checks `connected`: a connection lost meanwhile sets both
    assert "_auth_request_event.wait()" in inspect.getsource(greenswitch.esl.InboundESL.connect)


def test_gevent_websocket_internals_the_bridge_replaces_are_there():
    assert callable(getattr(Header, "mask_payload", None)) and callable(getattr(Header, "unmask_payload", None))
    assert "unmask_payload" in inspect.getsource(WebSocket.read_frame)  # where our unmasking is called from
    assert "self.mask" in inspect.getsource(Header)  # the key our unmask() reads
    assert callable(getattr(WebSocket, "send_frame", None)) and WebSocket.OPCODE_CLOSE == 8
