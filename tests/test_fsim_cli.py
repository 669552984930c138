"""The fsim command line: serve in one process, place a scripted call from another."""

from __future__ import annotations

import subprocess
import sys

from fsim.audio import Tone, write_wav
from fsim.cli import build_parser


def test_parser_defaults():
    a = build_parser().parse_args(["serve"])
    assert (a.host, a.port, a.password) == ("127.0.0.1", 8021, "ClueCon")
    c = build_parser().parse_args(["call", "--did", "7100", "--dtmf", "5@3s", "--hangup", "20s"])
    assert (c.did, c.dtmf, c.hangup) == ("7100", ["5@3s"], "20s")


def test_serve_and_call(tmp_path):
    wav = tmp_path / "hello.wav"
    write_wav(str(wav), Tone(440, 0.3).render(8000), 8000)
    serve = subprocess.Popen(
        [sys.executable, "-m", "fsim.cli", "serve", "--port", "0", "--password", "s3cret"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = serve.stdout.readline()
        assert "ESL listening on 127.0.0.1:" in line
        port = line.split("127.0.0.1:")[1].split()[0]
        out = subprocess.run(
            [sys.executable, "-m", "fsim.cli", "call", "--port", port, "--password", "s3cret", "--did", "7100",
             "--say", str(wav), "--dtmf", "5@0.1s", "--hangup", "0.6s", "--timeout", "20"],
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "ended: NORMAL_CLEARING (by caller)" in out.stdout
        assert "(heard nothing)" in out.stdout
    finally:
        serve.terminate()
        serve.wait(timeout=10)
