"""Per-call WebSocket tokens: bound to one channel uuid, short-lived, usable once.

The bridge URL travels through FreeSWITCH's channel and logs, so the token is an HMAC of the uuid and an
expiry under `bridge.token_secret`; the bridge accepts it once and only for that uuid's path.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import gevent.lock


class TokenBook:
    def __init__(self, secret: str, ttl: float, clock=time.time) -> None:
        self._key = secret.encode("utf-8")
        self._ttl = ttl
        self._clock = clock
        self._used: dict[str, float] = {}  # token → expiry, kept until it would have expired anyway
        self._lock = gevent.lock.Semaphore()

    def _sign(self, uuid: str, expiry: int) -> str:
        mac = hmac.new(self._key, f"{uuid}.{expiry}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{expiry}.{mac}"

    def mint(self, uuid: str) -> str:
        return self._sign(uuid, int(self._clock() + self._ttl))

    def check(self, uuid: str, token: str) -> str:
        """Consume `token` for `uuid`. Returns '' when accepted, else why not (bad_token, expired, replayed)."""
        expiry_text, _, _ = token.partition(".")
        if not expiry_text.isdigit() or not hmac.compare_digest(self._sign(uuid, int(expiry_text)), token):
            return "bad_token"
        now = self._clock()
        if int(expiry_text) < now:
            return "expired"
        with self._lock:
            self._used = {t: e for t, e in self._used.items() if e >= now}
            if token in self._used:
                return "replayed"
            self._used[token] = int(expiry_text)
        return ""
