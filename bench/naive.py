"""The naive bridge `make bench` measures forkbridge against: the tutorial pattern, not a product.

What the widely copied "FreeSWITCH mod_audio_fork + OpenAI Realtime" examples do: a FastAPI WebSocket endpoint
(uvicorn, the `websockets` library both ways) that mod_audio_fork dials, and per call one engine socket. Per
caller frame: resample 16 kHz -> 24 kHz, base64, one `input_audio_buffer.append` JSON message. Per engine audio
delta: base64-decode, resample 24 -> 16 kHz, send it back on the fork socket as a binary frame (the jambonz build
plays it; the drachtio build discards it). `speech_started` sends `killAudio`. No call control, no ESL, no
playback accounting, no metrics, no fallback. The resampler is soxr's streaming one on int16 (as forkbridge's
dependencies have it; the tutorials use audioop or scipy).

FreeSWITCH starts the fork itself: `api_on_answer=uuid_audio_fork ${uuid} start ws://127.0.0.1:<port>/ mono 16k`
in the dialplan (the tutorials' `execute_on_answer` is refused: uuid_audio_fork is an API command).

Needs the bench extra (`pip install -e '.[bench]'`: fastapi, uvicorn, websockets). Run:
`python bench/naive.py --port P --engine ws://127.0.0.1:Q/v1/realtime`; prints `ready <port>`; SIGTERM ends it.
A plain GET of / answers how many bytes of caller audio it has received (for the bench's on-time check).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import soxr
import uvicorn
import websockets
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse

CALL_RATE, ENGINE_RATE = 16000, 24000
ENGINE_URL = ""
audio_in = 0


def resample(stream: soxr.ResampleStream, pcm: bytes) -> bytes:
    return stream.resample_chunk(np.frombuffer(pcm, dtype="<i2")).tobytes()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    print(f"ready {PORT}", flush=True)
    yield


app = FastAPI(lifespan=lifespan)
PORT = 0


@app.get("/")
async def received() -> PlainTextResponse:
    return PlainTextResponse(f"{audio_in} bytes of caller audio received\n")


@app.websocket("/{path:path}")
async def fork(ws: WebSocket, path: str) -> None:
    global audio_in
    await ws.accept()
    async with websockets.connect(ENGINE_URL, additional_headers={"Authorization": "Bearer sk-naive"}) as engine:
        await engine.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "model": "gpt-realtime", "instructions": "Be brief.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": ENGINE_RATE},
                                "turn_detection": {"type": "server_vad"}},
                      "output": {"format": {"type": "audio/pcm", "rate": ENGINE_RATE}, "voice": "alloy"}}}}))

        async def from_engine() -> None:
            down = soxr.ResampleStream(ENGINE_RATE, CALL_RATE, 1, dtype="int16")
            async for raw in engine:
                message = json.loads(raw)
                kind = message.get("type")
                if kind in ("response.output_audio.delta", "response.audio.delta"):
                    await ws.send_bytes(resample(down, base64.b64decode(message["delta"])))
                elif kind == "input_audio_buffer.speech_started":
                    await ws.send_text(json.dumps({"type": "killAudio"}))

        reader = asyncio.create_task(from_engine())
        up = soxr.ResampleStream(CALL_RATE, ENGINE_RATE, 1, dtype="int16")
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if not data:
                    continue  # metadata text
                audio_in += len(data)
                audio = base64.b64encode(resample(up, data)).decode("ascii")
                await engine.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        except Exception:
            pass
        finally:
            reader.cancel()


def main() -> int:
    global ENGINE_URL, PORT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--engine", required=True, help="the engine's WebSocket URL")
    args = p.parse_args()
    ENGINE_URL, PORT = args.engine, args.port
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws="websockets-sansio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
