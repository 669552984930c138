"""The config an operator writes: a good file loads, and every broken one says file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from controller.cli import main
from controller.config import ConfigError, load_config, parse_duration

REPO = Path(__file__).resolve().parent.parent
ENV = {"FORKBRIDGE_ESL_PASSWORD": "s3cret-esl", "FORKBRIDGE_TOKEN_SECRET": "0123456789abcdef0123",
       "OPENAI_API_KEY": "sk-test-123"}

GOOD = """\
esl:
  password: ${ESL_PW:-ClueCon2}
bridge:
  token_secret: ${TOKEN_SECRET:-0123456789abcdef}
engines:
  bot:
    type: echo
defaults:
  sample_rate: 8000
routes:
  - did: ["7100", "7101"]
    engine: bot
  - pattern: "1555[0-9]{7}"
    engine: bot
    sample_rate: 16000
    playback: stream
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "forkbridge.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env or {})
    return info.value.problems


def test_example_config_loads_and_prints_its_routes(capsys, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    assert main(["check-config", str(REPO / "conf" / "forkbridge.yaml")]) == 0
    out = capsys.readouterr().out
    assert "15557654321,7100" in out and "openai (openai_realtime)" in out
    assert "/71[0-9][0-9]/" in out and "line-check (echo)" in out
    assert "sk-test-123" not in out and "s3cret-esl" not in out


def test_defaults_fill_routes_and_first_match_wins(tmp_path):
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.esl.password == "ClueCon2" and config.esl.port == 8021
    first, second = config.routes
    assert first.sample_rate == 8000 and second.sample_rate == 16000 and second.playback == "stream"
    assert config.route_for("7101") is first
    assert config.route_for("15551234567") is second
    assert config.route_for("155512345678") is None  # the pattern is anchored
    assert config.route_for("9999") is None
    assert "0123456789abcdef" in config.secrets


def test_a_marked_call_no_route_matches_gets_defaults_fallback(tmp_path):
    text = GOOD.replace("defaults:\n", "defaults:\n  fallback: {transfer: 1000 XML default}\n")
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.unrouted.transfer == "1000 XML default"
    assert load_config(write(tmp_path, GOOD), env={}).unrouted.action == "hangup"  # no defaults.fallback


def test_env_value_is_typed_like_yaml(tmp_path):
    text = GOOD.replace("  password:", "  port: ${ESL_PORT:-8022}\n  password:")
    assert load_config(write(tmp_path, text), env={"ESL_PORT": "9021"}).esl.port == 9021
    assert load_config(write(tmp_path, text), env={}).esl.port == 8022


def test_durations():
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("250ms") == 0.25
    assert parse_duration("1h") == 3600 and parse_duration(12) == 12
    assert parse_duration("soon") is None and parse_duration(-1) is None


def test_yaml_syntax_error_names_the_line(tmp_path):
    found = problems(tmp_path, GOOD.replace("engine: bot\n  - pattern", "engine: [bot\n  - pattern"))
    assert len(found) == 1 and "forkbridge.yaml:" in found[0] and "YAML syntax error" in found[0]


def test_unknown_key_is_a_typo(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("    engine: bot\n  - pattern", "    engine: bot\n    greting: hi\n"
                                                                            "  - pattern"))
    assert found.endswith("forkbridge.yaml:13: routes[0].greting: unknown key (did you mean 'greeting'?); "
                          "expected one of: " + found.split("expected one of: ")[1])


def test_wrong_type(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("  password:", "  port: eighty\n  password:"))
    assert found.endswith(":2: esl.port: expected an integer, got the string 'eighty'")


def test_route_naming_an_undefined_engine(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("    engine: bot\n    sample_rate", "    engine: bots\n    sample_rate"))
    assert ":14: routes[1].engine: engine 'bots' is not defined under engines (defined: bot)" in found


def test_invalid_regex(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("1555[0-9]{7}", "1555[0-9{7}"))
    assert ":13: routes[1].pattern: invalid regular expression" in found


def test_same_did_in_two_routes(tmp_path):
    text = GOOD + "  - did: \"7101\"\n    engine: bot\n"
    (found,) = problems(tmp_path, text)
    assert ":17: routes[2].did: DID 7101 is already routed by routes[0]" in found


def test_unsupported_sample_rate(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("sample_rate: 16000", "sample_rate: 44100"))
    assert ":15: routes[1].sample_rate: 44100 is not supported; expected one of 8000, 16000" in found


def test_missing_env_var_without_default(tmp_path):
    (found,) = problems(tmp_path, GOOD.replace("${ESL_PW:-ClueCon2}", "${ESL_PW}"))
    assert ":2: esl.password: environment variable ESL_PW is not set and has no default" in found


def test_every_problem_is_reported_and_cli_exits_1(tmp_path, capsys):
    text = GOOD.replace("sample_rate: 16000", "sample_rate: 44100").replace("type: echo", "type: eccho")
    path = write(tmp_path, text)
    assert main(["check-config", path]) == 1
    err = capsys.readouterr().err
    assert "engines.bot.type: expected one of echo, openai_realtime, elevenlabs, generic, got 'eccho'" in err
    assert "routes[1].sample_rate" in err
    # the bad type, then each route's reference to the engine that therefore does not exist, then the rate
    assert err.count("is not defined under engines") == 2
    assert "4 problem(s)" in err



def test_bridge_url_needs_an_explicit_port(tmp_path):
    text = GOOD.replace("bridge:\n", "bridge:\n  url: ws://10.0.0.5/calls\n")
    (found,) = problems(tmp_path, text)
    assert ":4: bridge.url: give an explicit port" in found


OUTBOUND = GOOD.replace("""  - pattern: "1555[0-9]{7}"
""", """  - name: reminders
    engine: bot
    outbound:
      dial: sofia/gateway/carrier/{to}
      allowed: '\\+33[1-9]\\d{8}'
      caller_id: "+33100000000"
      originate_timeout: 45s
      max_concurrent: 3
      variables: {sip_h_X-Campaign: spring}
  - pattern: "1555[0-9]{7}"
""") + """api:
  token: ${FB_API_TOKEN:-an-api-token-0123456789}
"""


def test_an_outbound_route_and_its_api(tmp_path):
    config = load_config(write(tmp_path, OUTBOUND), env={})
    route = config.route_named("reminders")
    assert route is not None and route.outbound is not None
    policy = route.outbound
    assert policy.dial_string("+33123456789") == "sofia/gateway/carrier/+33123456789"
    assert policy.allows("+33123456789")
    assert not policy.allows("+331234567890") and not policy.allows("+4930123456")  # anchored
    assert policy.originate_timeout == 45 and policy.max_concurrent == 3
    assert config.api.token == "an-api-token-0123456789" and config.api.listen_port == 9465
    assert "an-api-token-0123456789" in config.secrets  # never logged


def test_outbound_mistakes_name_their_keys(tmp_path):
    text = OUTBOUND.replace("sofia/gateway/carrier/{to}", "sofia/gateway/carrier/123") \
        .replace("max_concurrent: 3", "max_concurrent: 0").replace("X-Campaign: spring", "X-Campaign: 'a b'") \
        .replace("originate_timeout: 45s", "originat_timeout: 45s")
    found = "\n".join(problems(tmp_path, text))
    assert "routes[1].outbound.dial: must contain {to}" in found
    assert "routes[1].outbound.max_concurrent: must be at least 1" in found
    assert "routes[1].outbound.variables.sip_h_X-Campaign: must not contain spaces" in found
    assert "routes[1].outbound.originat_timeout: unknown key (did you mean 'originate_timeout'?)" in found
    lines = {p.split(":")[1] for p in problems(tmp_path, text)}
    assert all(line.isdigit() for line in lines)


def test_an_outbound_route_needs_the_api_token(tmp_path):
    text = OUTBOUND.replace("""api:
  token: ${FB_API_TOKEN:-an-api-token-0123456789}
""", "")
    assert any("api.token: is required when a route has outbound" in p for p in problems(tmp_path, text))
    assert any("api.token: environment variable FB_API_TOKEN is not set" in p
               for p in problems(tmp_path, OUTBOUND.replace("${FB_API_TOKEN:-an-api-token-0123456789}",
                                                            "${FB_API_TOKEN}")))


def test_the_call_command_reads_only_the_api_section(tmp_path):
    from controller.config import load_api_settings

    path = write(tmp_path, OUTBOUND.replace("ClueCon2}", "}").replace("${ESL_PW:-}", "${ESL_PW}"))
    api = load_api_settings(path, env={})  # the engines' secrets are not needed to place a call
    assert api.token == "an-api-token-0123456789"


def test_record_is_off_by_default_true_takes_the_default_path_and_a_mapping_its_own(tmp_path):
    text = GOOD.replace("    engine: bot\n  - pattern",
                        "    engine: bot\n    record: true\n  - pattern").replace(
        "    playback: stream\n", "    playback: stream\n    record:\n      path: /srv/rec/{route}/{date}/{uuid}.wav\n")
    routes = load_config(write(tmp_path, text), env={}).routes
    assert routes[0].record == "/var/lib/forkbridge/recordings/{date}/{uuid}.wav"
    assert routes[1].record == "/srv/rec/{route}/{date}/{uuid}.wav"
    assert load_config(write(tmp_path, GOOD), env={}).routes[0].record == ""


@pytest.mark.parametrize(("record", "message"), [
    ("always", "routes[0].record: expected true, false or a mapping with path:, got the string 'always'"),
    ("{path: '/rec/{callid}.wav'}", "routes[0].record.path: unknown field {callid}; expected {date}, {uuid}, {did}, "
                                  "{route}"),
    ("{path: 'rec/{uuid}.wav'}", "routes[0].record.path: expected an absolute path without spaces"),
    ("{path: '/rec/{date}.wav'}", "routes[0].record.path: must contain {uuid}: each call needs its own file"),
    ("{path: '/rec/{uuid.wav'}", "routes[0].record.path: bad template"),
    ("{pth: '/rec/{uuid}.wav'}", "routes[0].record.pth: unknown key (did you mean 'path'?)"),
])
def test_a_bad_record_setting_names_its_line_and_key(tmp_path, record, message):
    text = GOOD.replace("    engine: bot\n  - pattern", f"    engine: bot\n    record: {record}\n  - pattern")
    (found,) = problems(tmp_path, text)
    assert f"forkbridge.yaml:13: {message}" in found
