"""Browser sessions of the dashboard: an API key typed once on the login page, a random session id in the cookie.

The cookie (`distill_session`) is HttpOnly and SameSite=Strict (Secure over https) and holds only a random id; the
key stays in the service's memory, so every page checks it again through the key cache and a revoked key logs its
sessions out within the cache's ttl. Sessions end after `TTL_SECONDS` or at logout, and do not survive a restart.

CSRF: each session has its own random token, put in every form as the hidden field `csrf` and compared in constant
time on every POST. The login form, posted before a session exists, is checked the same way against a random
token in a short-lived cookie of its own (`distill_login`).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import Response

from distill.service.auth import OPEN_PRINCIPAL, Principal
from distill.service.deps import Services, _host, services
from distill.service.settings import is_loopback

COOKIE = "distill_session"
LOGIN_COOKIE = "distill_login"
TTL_SECONDS = 12 * 3600.0
MAX_SESSIONS = 10_000


class LoginRequired(Exception):
    """A page was asked for without a valid session: the app answers with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class Forbidden(Exception):
    """The session's key lacks a scope, or a form came without its CSRF token."""

    def __init__(self, message: str) -> None:
        self.message = message


@dataclass
class Session:
    key: str | None  # the API key, in memory only; None for a loopback session in open mode
    csrf: str
    expires: float


class Sessions:
    """Every live session of this process, by session id."""

    def __init__(self) -> None:
        self._items: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, key: str | None) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            if len(self._items) >= MAX_SESSIONS:
                self._items = {t: s for t, s in self._items.items() if s.expires > now}
            self._items[token] = Session(key, secrets.token_urlsafe(32), now + TTL_SECONDS)
        return token

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._items.get(token)
            if session is not None and session.expires <= time.time():
                del self._items[token]
                return None
        return session

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._items.pop(token or "", None)


def sessions(svc: Services) -> Sessions:
    found = svc.extra.get("sessions")
    if found is None:
        found = svc.extra.setdefault("sessions", Sessions())
    return found  # type: ignore[no-any-return]


def open_mode_allowed(request: Request) -> bool:
    """Whether this request may use the service without a key (no key exists, loopback client and Host)."""
    svc = services(request)
    if svc.settings.require_keys or svc.keys.any_key():
        return False
    client = request.client.host if request.client is not None else ""
    return is_loopback(client) and is_loopback(_host(request.headers.get("host", "")))


def principal_for_key(request: Request, key: str | None) -> Principal | None:
    """The principal a login (or a session) with `key` stands for now; None when it is not valid."""
    if key is None:
        return OPEN_PRINCIPAL if open_mode_allowed(request) else None
    return services(request).keys.principal(key)


def current(request: Request, scope: str) -> tuple[Principal, Session]:
    """The signed-in principal holding `scope`; LoginRequired without a valid session, Forbidden without the scope."""
    store = sessions(services(request))
    token = request.cookies.get(COOKIE)
    session = store.get(token)
    principal = principal_for_key(request, session.key) if session is not None else None
    if session is None or principal is None:
        store.drop(token)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    if not principal.allows(scope):
        raise Forbidden(f"your API key lacks the {scope!r} scope for this page")
    return principal, session


def check_csrf(expected: str, presented: str | None) -> None:
    if not presented or not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and submit it again")


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
