"""The service's one error type: an HTTP status, a message, and the request field it is about."""

from __future__ import annotations


class ServiceError(Exception):
    """Answered as `{"error": {"message", "type", "param", "code"}}` with `status`.

    422 names the bad field in `param` (e.g. `config.train.lr`), 404 an unknown id, 409 a state conflict."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {404: "not_found", 409: "conflict", 422: "invalid_value", 413: "too_large"}.get(
            status, "error"
        )


def not_found(what: str, ident: str) -> ServiceError:
    return ServiceError(404, f"no {what} with id {ident!r}", code="not_found")
