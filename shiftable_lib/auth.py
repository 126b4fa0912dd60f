"""Who may call: API keys and their scopes, with no protocol in sight.

Two scopes. `user` keys generate and read; `admin` keys also change things (add, delete and
cancel specialists over REST; every registry and training mutation over gRPC) and are what the
services present to each other. An admin key can do whatever a user key can. With no key
configured at all, nothing is checked: the single-machine default of `sma up` on loopback.

A presented key is compared with every configured key in constant time (`hmac.compare_digest`,
all of them, whichever matches), so the time an answer takes says nothing about the keys.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum

MIN_KEY_CHARS = 16


class Scope(IntEnum):
    """What a key may do; a larger scope includes the smaller."""

    USER = 1
    ADMIN = 2


@dataclass(frozen=True)
class Keys:
    user: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    @classmethod
    def parse(cls, user: str, admin: str) -> Keys:
        """Keys from comma-separated lists (SMA_API_KEY, SMA_ADMIN_KEY); ValueError, naming the
        setting, for a key shorter than MIN_KEY_CHARS or with characters a header cannot hold."""
        return cls(_split(user, "SMA_API_KEY"), _split(admin, "SMA_ADMIN_KEY"))

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)

    @property
    def internal(self) -> str:
        """The key a service presents when it calls another ("" when none is configured)."""
        return self.admin[0] if self.admin else ""

    def scope_of(self, presented: str) -> Scope | None:
        """The scope of `presented`, or None if it is no key of ours."""
        found = None
        candidate = presented.encode()
        for scope, keys in ((Scope.ADMIN, self.admin), (Scope.USER, self.user)):
            for key in keys:
                if hmac.compare_digest(candidate, key.encode()) and found is None:
                    found = scope
        return found

    def check(self, authorization: str | None, needed: Scope) -> Refusal | None:
        """None when an `Authorization` value of `Bearer <key>` may do what `needed` allows,
        else why not. Always None while no key is configured."""
        if not self.enabled:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return Refusal(False, "send an API key as 'Authorization: Bearer <key>'")
        scope = self.scope_of(presented.strip())
        if scope is None:
            return Refusal(False, "that API key is not valid")
        if scope < needed:
            return Refusal(True, f"this needs an {needed.name.lower()} key")
        return None


@dataclass(frozen=True)
class Refusal:
    """Why a call may not go on: without a valid key (HTTP 401, UNAUTHENTICATED), or with a key
    of too small a scope (`forbidden`: HTTP 403, PERMISSION_DENIED)."""

    forbidden: bool
    message: str


NO_KEYS = Keys()  # nothing is checked


def bearer(key: str) -> str:
    """The `Authorization` value that presents `key`."""
    return f"Bearer {key}"


def _split(value: str, setting: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    for key in keys:
        if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError(
                f"{setting}: every key needs {MIN_KEY_CHARS} or more printable ASCII characters "
                "and no spaces (e.g. `openssl rand -hex 32`)"
            )
    return keys
