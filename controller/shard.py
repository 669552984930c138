"""Which calls a worker process owns, and the addresses it listens on (`daemon.workers` above 1).

Every worker sees every CHANNEL_ANSWER of the one FreeSWITCH (a call's other events only once its owner has taken
it), so each must know, without asking the others, whether a channel is its own: the owner of a call is
crc32(channel uuid) % N, the same answer in every process, at every answer and at every resync after a (re)start.
An outbound call is placed by the worker that owns its route's name (so a route's `max_concurrent` is counted in
one place) under a uuid that worker owns.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib
import zlib

from controller.config import Config

_URL_PORT = re.compile(r"^(wss?://[^/]+:)(\d+)(.*)$")


def owner(key: str, count: int) -> int:
    """The worker (0 … count-1) that owns a channel uuid, a call id or an outbound route name."""
    return zlib.crc32(key.encode()) % count


@dataclasses.dataclass(frozen=True)
class Shard:
    """Worker `index` of `count`; the default (0 of 1) owns everything: the single-process daemon."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N` from the command line."""
        index, _, count = text.partition("/")
        shard = cls(int(index), int(count))
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"worker {text!r}: expected K/N with 0 <= K < N")
        return shard

    @property
    def sole(self) -> bool:
        return self.count == 1

    def owns(self, key: str) -> bool:
        return self.sole or owner(key, self.count) == self.index

    def new_uuid(self) -> str:
        """A fresh channel uuid this worker owns (an outbound call's origination_uuid)."""
        while True:
            candidate = str(uuidlib.uuid4())
            if self.owns(candidate):
                return candidate

    def config_for(self, config: Config) -> Config:
        """The worker's view of the file: its own WebSocket port (bridge.listen + K, and bridge.url's port + K;
        port 0 stays ephemeral), its metrics and call API on ephemeral loopback ports (the parent serves the
        configured ones and asks the workers)."""
        if self.sole:
            return config
        bridge = config.bridge
        port = bridge.listen_port + self.index if bridge.listen_port else 0
        url = bridge.url
        match = _URL_PORT.match(url)
        if match:
            url = f"{match[1]}{int(match[2]) + self.index}{match[3]}"
        return dataclasses.replace(
            config, bridge=dataclasses.replace(bridge, listen_port=port, url=url),
            metrics=dataclasses.replace(config.metrics, listen_host="127.0.0.1", listen_port=0),
            api=dataclasses.replace(config.api, listen_host="127.0.0.1", listen_port=0))
