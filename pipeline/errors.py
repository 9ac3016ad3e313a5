"""Domain errors raised by the core and mapped to HTTP in one place (app.errors)."""

from __future__ import annotations

from stages.errors import CapyError


class InvalidRequest(CapyError):
    """The request is not valid."""


class Unauthorized(CapyError):
    """Missing or invalid credentials: send Authorization: Bearer <API key>."""


class Forbidden(CapyError):
    """These credentials are valid but not for this project."""


class NotFound(CapyError):
    """Not found."""


class Conflict(CapyError):
    """The request conflicts with the current state."""


class Unavailable(CapyError):
    """A dependency of the service is unavailable; try again shortly."""


class RateLimited(CapyError):
    """Too many requests; try again later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
