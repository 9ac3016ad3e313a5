"""The HTTP API of CapyDB Imports, as the client uses it.

`Api` sends each request with the key, turns the API's `{"error": …}` bodies into
`ApiRefused` and network failures into `ApiUnreachable`, and retries only what is safe
to send twice: every request after a 429 (the API did nothing; it says when to come
back in Retry-After), and requests marked `retry` (reads, cancels, and imports that
carry an Idempotency-Key) after a network error or a 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from client.errors import ApiRefused, ApiUnreachable, UsageError

USER_AGENT = "capydb-import/0.1.0"
TIMEOUT_SECONDS = 30
# A synchronous preflight connects to the source and rehearses the schema: the API
# answers within its deadline (CAPY_PREFLIGHT_DEADLINE_SECONDS, 20 s by default), which
# an operator may raise with gunicorn's timeout.
PREFLIGHT_TIMEOUT_SECONDS = 180
# A 429 is waited out this many times, each wait at most MAX_RETRY_AFTER seconds.
RATE_LIMIT_ATTEMPTS = 5
MAX_RETRY_AFTER = 120
# Network errors and 503s on retryable requests: waits of 1, 2 and 4 s.
NETWORK_ATTEMPTS = 4


class Response(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class Session(Protocol):
    """What the client needs of `requests.Session` (tests pass a small fake)."""

    # `*args: Any, **kwargs: Any`: any keywords (requests.Session names each of its own).
    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response: ...


def base_url(value: str) -> str:
    """The API's base URL without a trailing `/` or `/v1`; UsageError unless http(s)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # Not echoed: a mistyped URL may hold a password.
        raise UsageError(
            "the API URL must start with http:// or https:// and name a host, like https://imports.example.com"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(
            "the API URL must not hold credentials, a query or a fragment; pass the key with --key"
        )
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def retry_after(headers: Mapping[str, str], default: float = 5.0) -> float:
    """Seconds to wait from a Retry-After header (seconds form), within [1, MAX_RETRY_AFTER]."""
    raw = headers.get("Retry-After", "")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = default
    return min(max(seconds, 1.0), MAX_RETRY_AFTER)


def error_message(response: Response) -> str:
    """The API's `error` message, or a short description of a body that is not ours."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    if isinstance(message, str):
        return message
    return f"HTTP {response.status_code} with a body that is not a CapyDB API error; is --api the right URL?"


class Api:
    """One API base URL and key. `notify` hears about waits (429s, retries)."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        session: Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        notify: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.url = base_url(url)
        self._key = key
        self.session: Session = session or requests.Session()
        self.sleep = sleep
        self.notify = notify

    def __repr__(self) -> str:  # never the key
        return f"Api({self.url!r})"

    # The routes (SPEC.md, "HTTP API").

    def create_upload(self, project_id: str) -> dict[str, Any]:
        upload: dict[str, Any] = self.call("POST", f"/v1/projects/{project_id}/imports/uploads")["upload"]
        return upload

    def start_import(
        self, project_id: str, body: dict[str, Any], idempotency_key: str
    ) -> tuple[dict[str, Any], bool]:
        """The job, and whether this request created it (202) or found it by its key (200)."""
        answer, status = self.call_with_status(
            "POST",
            f"/v1/projects/{project_id}/imports",
            json=body,
            headers={"Idempotency-Key": idempotency_key},
            retry=True,
        )
        job: dict[str, Any] = answer["job"]
        return job, status == 202

    def preflight(self, project_id: str, body: dict[str, Any]) -> dict[str, Any]:
        preflight: dict[str, Any] = self.call(
            "POST",
            f"/v1/projects/{project_id}/imports/preflight",
            json=body,
            retry=True,
            timeout=PREFLIGHT_TIMEOUT_SECONDS,
        )["preflight"]
        return preflight

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("GET", f"/v1/jobs/{job_id}", retry=True)["job"]
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("POST", f"/v1/jobs/{job_id}/cancel", retry=True)["job"]
        return job

    def jobs(self, project_id: str, limit: int) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.call(
            "GET", f"/v1/projects/{project_id}/jobs", params={"limit": limit}, retry=True
        )["jobs"]
        return jobs

    # The transport.

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.call_with_status(method, path, **kwargs)[0]

    def call_with_status(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = False,
        timeout: float = TIMEOUT_SECONDS,
    ) -> tuple[dict[str, Any], int]:
        """The JSON body of a 2xx answer and its status; ApiRefused or ApiUnreachable otherwise."""
        sent = {
            "Authorization": f"Bearer {self._key}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        sent.update(headers or {})
        limited = failed = 0
        while True:
            try:
                response = self.session.request(
                    method, self.url + path, json=json, params=params, headers=sent, timeout=timeout
                )
            except requests.RequestException as err:
                failed += 1
                problem = f"could not reach the API at {self.url} ({_network_reason(err, timeout)})"
                transient = isinstance(err, requests.ConnectionError | requests.Timeout)
                if not (retry and transient) or failed >= NETWORK_ATTEMPTS:
                    raise ApiUnreachable(problem) from None
                self._wait(2 ** (failed - 1), f"{problem}; retrying")
                continue
            status = response.status_code
            if status == 429:
                limited += 1
                if limited >= RATE_LIMIT_ATTEMPTS:
                    raise ApiRefused(error_message(response), status)
                self._wait(
                    retry_after(response.headers), f"rate limited by the API: {error_message(response)}"
                )
                continue
            if status == 503 and retry and failed + 1 < NETWORK_ATTEMPTS:
                failed += 1
                self._wait(2 ** (failed - 1), f"the API is unavailable: {error_message(response)}; retrying")
                continue
            if status >= 500:
                raise ApiUnreachable(f"the API failed ({status}): {error_message(response)}")
            if status >= 400:
                raise ApiRefused(error_message(response), status)
            try:
                return response.json(), status
            except ValueError:
                raise ApiUnreachable(
                    f"the API at {self.url} answered {method} {path} with a body that is not JSON; is --api the right URL?"
                ) from None

    def _wait(self, seconds: float, why: str) -> None:
        self.notify(f"{why} (waiting {seconds:g} s)")
        self.sleep(seconds)


def _network_reason(err: Exception, timeout: float) -> str:
    """A short reason without the exception's repr (which can be long and nested)."""
    if isinstance(err, requests.Timeout):
        return f"no answer within {timeout:g} s"
    text = str(err)
    for hint in ("Connection refused", "Name or service not known", "No route to host", "Connection reset"):
        if hint in text:
            return hint.lower()
    return type(err).__name__
