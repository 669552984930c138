"""The tool policy: what the model may do on a call, and what it is told when it may not."""

import pytest

from bridge.engine import ToolCall
from bridge.tools import REFUSE, build_tool_specs, decide

TARGETS = ["operator", "billing"]


def specs(*allowed: str):
    return build_tool_specs(list(allowed), TARGETS)


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(call_id="c1", name=name, arguments=arguments)


def test_specs_are_json_schema_objects_in_stable_order():
    built = build_tool_specs(["send_dtmf", "hangup", "transfer"], TARGETS)
    assert [s.name for s in built] == ["hangup", "transfer", "send_dtmf"]
    for spec in built:
        assert spec.parameters["type"] == "object"
        assert spec.description
    transfer = built[1]
    assert transfer.targets == ("operator", "billing")
    assert transfer.parameters["properties"]["target"]["enum"] == TARGETS
    assert transfer.parameters["required"] == ["target"]


def test_only_allowed_tools_are_built():
    assert [s.name for s in build_tool_specs(["hangup"], [])] == ["hangup"]
    assert build_tool_specs([], TARGETS) == ()


def test_bad_spec_requests_are_configuration_errors():
    with pytest.raises(ValueError, match="unknown tool"):
        build_tool_specs(["reboot"], [])
    with pytest.raises(ValueError, match="transfer target"):
        build_tool_specs(["transfer"], [])


def test_transfer_to_listed_target():
    decision = decide(call("transfer", target="billing"), specs("transfer"))
    assert (decision.action, decision.argument, decision.is_error) == ("transfer", "billing", False)
    assert decision.result_for_model["ok"] is True


def test_transfer_target_match_ignores_case_and_returns_the_route_name():
    decision = decide(call("transfer", target=" Billing "), specs("transfer"))
    assert (decision.action, decision.argument) == ("transfer", "billing")


@pytest.mark.parametrize("target", ["+15551234567", "1000 XML default", "sales", "", None, 7])
def test_transfer_anywhere_else_is_refused_and_the_model_is_told_the_allowed_targets(target):
    decision = decide(call("transfer", target=target), specs("transfer"))
    assert decision.action == REFUSE
    assert decision.is_error
    assert decision.argument == ""
    assert "operator" in decision.result_for_model["error"] and "billing" in decision.result_for_model["error"]


def test_tool_not_allowed_on_route_is_refused():
    decision = decide(call("transfer", target="operator"), specs("hangup"))
    assert decision.action == REFUSE and decision.is_error
    assert "hangup" in decision.result_for_model["error"]


def test_unknown_tool_is_refused():
    assert decide(call("format_disk"), specs("hangup", "transfer", "send_dtmf")).action == REFUSE


def test_hangup():
    decision = decide(call("hangup", reason="caller said bye"), specs("hangup"))
    assert (decision.action, decision.argument, decision.is_error) == ("hangup", "caller said bye", False)
    assert decide(call("hangup"), specs("hangup")).action == "hangup"


@pytest.mark.parametrize("digits, expected", [("123#", "123#"), ("*0", "*0"), ("abcd", "ABCD"), (42, "42"),
                                              ("1 2-3", "123")])
def test_send_dtmf_valid(digits, expected):
    decision = decide(call("send_dtmf", digits=digits), specs("send_dtmf"))
    assert (decision.action, decision.argument, decision.is_error) == ("send_dtmf", expected, False)


@pytest.mark.parametrize("digits", ["", "12x", "E", "1;uuid_kill", None, True, "1" * 33, ["1"]])
def test_send_dtmf_invalid_is_refused(digits):
    decision = decide(call("send_dtmf", digits=digits), specs("send_dtmf"))
    assert decision.action == REFUSE and decision.is_error and decision.argument == ""


def test_non_mapping_arguments_are_refused():
    bad = ToolCall(call_id="c1", name="hangup", arguments=["x"])  # type: ignore[arg-type]
    assert decide(bad, specs("hangup")).action == REFUSE
