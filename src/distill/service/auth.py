"""API keys: created by `distill service keys create` (or an admin over HTTP), stored as sha256 hashes, with scopes.

A key reads `dsk-<id>-<secret>`: the id finds the stored row, the secret (32 random bytes) is never stored, only the
hash of the whole key, compared in constant time. Scopes: `read` (look at files, jobs, events, artifacts, reports),
`write` (upload files, create, cancel and retry jobs, create deployments), `infer` (the OpenAI-compatible
endpoints), `admin` (keys; implies every other scope).

Open mode: until the first key is created, and while the service listens on loopback only, requests need no key (a
laptop). Creating a key records `keys_required` in the store (`service_state`), in the same transaction: from then
on every request needs a key, even after every key is revoked (the CLI can still create one locally).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from distill.errors import DistillError
from distill.service import db

SCOPES = ("read", "write", "infer", "admin")
OPEN = "local"  # who created a job or file in open mode
KEYS_REQUIRED = "keys_required"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id (or `local` in open mode) and what it may do."""

    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


OPEN_PRINCIPAL = Principal(OPEN, frozenset(SCOPES))


def parse_scopes(value: str | list[str]) -> list[str]:
    """`read,write` or a list of names -> the scopes in canonical order; an unknown name is a DistillError."""
    names = [part.strip() for part in (value.split(",") if isinstance(value, str) else value) if part.strip()]
    unknown = [name for name in names if name not in SCOPES]
    if unknown or not names:
        raise DistillError(f"scopes must be a non-empty list of {', '.join(SCOPES)}; got {', '.join(names) or 'none'}")
    return [scope for scope in SCOPES if scope in names]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(engine: Engine, scopes: list[str], name: str = "") -> tuple[str, dict[str, Any]]:
    """A new key: (the key itself, shown once; its stored record without the hash)."""
    key_id = secrets.token_hex(6)
    key = f"dsk-{key_id}-{secrets.token_urlsafe(32)}"
    record = {"id": key_id, "scopes": ",".join(parse_scopes(scopes)), "name": name[:200], "created_at": time.time()}
    with db.write(engine) as connection:
        connection.execute(db.api_keys.insert().values(hash=hash_key(key), revoked_at=None, **record))
        required = select(db.service_state.c.name).where(db.service_state.c.name == KEYS_REQUIRED)
        if connection.execute(required).first() is None:
            connection.execute(db.service_state.insert().values(name=KEYS_REQUIRED, value="1", set_at=time.time()))
    return key, public(record)


def keys_required(engine: Engine) -> bool:
    """Whether a key was ever created here: then every request needs one, for good."""
    with db.read(engine) as connection:
        found = connection.execute(select(db.service_state.c.name).where(db.service_state.c.name == KEYS_REQUIRED))
        return found.first() is not None


def public(row: Any) -> dict[str, Any]:
    data = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
    return {
        "id": data["id"],
        "object": "api_key",
        "name": data["name"],
        "scopes": data["scopes"].split(","),
        "created_at": data["created_at"],
        "revoked_at": data.get("revoked_at"),
    }


def list_keys(engine: Engine) -> list[dict[str, Any]]:
    with db.read(engine) as connection:
        rows = connection.execute(select(db.api_keys).order_by(db.api_keys.c.created_at)).all()
    return [public(row) for row in rows]


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke a key; False when no active key has that id."""
    with db.write(engine) as connection:
        result = connection.execute(
            db.api_keys.update()
            .where(db.api_keys.c.id == key_id, db.api_keys.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
    return result.rowcount > 0


def active_keys(engine: Engine) -> int:
    with db.read(engine) as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(db.api_keys).where(db.api_keys.c.revoked_at.is_(None))
            ).scalar_one()
        )


def verify(engine: Engine, key: str) -> Principal | None:
    """The principal of a presented key, or None when it is malformed, unknown or revoked."""
    parts = key.split("-")
    if len(parts) < 3 or parts[0] != "dsk":
        return None
    with db.read(engine) as connection:
        row = connection.execute(
            select(db.api_keys.c.hash, db.api_keys.c.scopes).where(
                db.api_keys.c.id == parts[1], db.api_keys.c.revoked_at.is_(None)
            )
        ).first()
    if row is None or not hmac.compare_digest(row.hash, hash_key(key)):
        return None
    return Principal(parts[1], frozenset(row.scopes.split(",")))


class KeyCache:
    """Verified keys, remembered for `ttl` seconds (a revocation takes effect within that time), and whether keys
    are required (once true, true for good), so that a request does not cost a database read for its key."""

    def __init__(self, engine: Engine, ttl: float = 2.0) -> None:
        self.engine, self.ttl = engine, ttl
        self._keys: dict[str, tuple[float, Principal | None]] = {}
        self._required: tuple[float, bool] = (-float("inf"), False)

    def any_key(self) -> bool:
        """Whether keys are required: a key was created at some time (by this process or another)."""
        now = time.monotonic()
        if not self._required[1] and now - self._required[0] > self.ttl:
            self._required = (now, keys_required(self.engine))
        return self._required[1]

    def principal(self, key: str) -> Principal | None:
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is None or now - cached[0] > self.ttl:
            if len(self._keys) > 10_000:
                self._keys.clear()
            cached = (now, verify(self.engine, key))
            self._keys[key] = cached
        return cached[1]

    def fresh(self, key: str | None) -> bool:
        """Whether `any_key` (and `principal(key)`) would answer from memory, without the database."""
        now = time.monotonic()
        if not self._required[1] and now - self._required[0] > self.ttl:
            return False
        if key is None or not self._required[1]:  # no key presented, or open mode (a presented key is not checked)
            return True
        cached = self._keys.get(key)
        return cached is not None and now - cached[0] <= self.ttl
