"""The HTTP API of CapyDB Imports, as the client uses it.

`Api` sends each request with the key, turns the API's `{"error": …}` bodies into
`ApiRefused` and network failures into `ApiUnreachable`, and retries only what is safe
to send twice: every request after a 429 (the API did nothing; it says when to come
back in Retry-After), and requests marked `retry` (reads, cancels, and imports that
carry an Idempotency-Key) after a network error or a 503.
"""

from __future__ import annotations

import math
import re
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
    try:
        parts = urlsplit(value.strip())
    except ValueError:  # "Invalid IPv6 URL": http://[::1
        parts = urlsplit("")
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


# What the API accepts (app.auth, app.edge); anything else is refused here, before a
# request: a key with a pasted "…" made requests raise UnicodeEncodeError, and an ID
# holding "../" or "?" was sent to another route (requests normalises the path).
_KEY = re.compile(r"[\x21-\x7e]{1,8192}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def api_key(value: str) -> str:
    """The key, if it can be sent as a bearer token; UsageError (never echoing it) if not."""
    if not _KEY.fullmatch(value):
        raise UsageError(
            "the API key must be printable ASCII without spaces, like capy_live_…; check that "
            "nothing was added to it when it was copied"
        )
    return value


def path_id(value: str, what: str) -> str:
    """`value` as a path segment: an ID of letters, digits, '_' and '-'; UsageError if not."""
    if not _ID.fullmatch(value):
        raise UsageError(f"{what} must be an ID of 1 to 64 letters, digits, '_' or '-'")
    return value


def retry_after(headers: Mapping[str, str], default: float = 5.0) -> float:
    """Seconds to wait from a Retry-After header (seconds form), within [1, MAX_RETRY_AFTER]."""
    raw = headers.get("Retry-After", "")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = default
    if not math.isfinite(seconds):  # "nan" (which min and max pass on) and "inf"
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
        self._key = api_key(key)
        self.session: Session = session or requests.Session()
        self.sleep = sleep
        self.notify = notify

    def __repr__(self) -> str:  # never the key
        return f"Api({self.url!r})"

    # The routes (SPEC.md, "HTTP API").

    def create_upload(self, project_id: str) -> dict[str, Any]:
        path = f"/v1/projects/{path_id(project_id, 'the project')}/imports/uploads"
        upload = self._member(self.call("POST", path), "upload", f"POST {path}")
        for name in ("object_key", "upload_url"):
            if not isinstance(upload.get(name), str):
                raise self._not_ours(f"POST {path}", f'an upload without "{name}"')
        return upload

    def start_import(
        self, project_id: str, body: dict[str, Any], idempotency_key: str
    ) -> tuple[dict[str, Any], bool]:
        """The job, and whether this request created it (202) or found it by its key (200)."""
        path = f"/v1/projects/{path_id(project_id, 'the project')}/imports"
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise UsageError(
                "--idempotency-key must be 1 to 255 printable ASCII characters (a UUID is a good choice)"
            )
        answer, status = self.call_with_status(
            "POST", path, json=body, headers={"Idempotency-Key": idempotency_key}, retry=True
        )
        return self._job(answer, f"POST {path}"), status == 202

    def preflight(self, project_id: str, body: dict[str, Any]) -> dict[str, Any]:
        path = f"/v1/projects/{path_id(project_id, 'the project')}/imports/preflight"
        answer = self.call("POST", path, json=body, retry=True, timeout=PREFLIGHT_TIMEOUT_SECONDS)
        preflight = self._member(answer, "preflight", f"POST {path}")
        checks = preflight.get("checks")
        if not (isinstance(checks, list) and all(isinstance(c, dict) for c in checks)) or not isinstance(
            preflight.get("source") or {}, dict
        ):
            raise self._not_ours(f"POST {path}", 'a preflight without a list of "checks"')
        return preflight

    def job(self, job_id: str) -> dict[str, Any]:
        path = f"/v1/jobs/{path_id(job_id, 'the job')}"
        return self._job(self.call("GET", path, retry=True), f"GET {path}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        path = f"/v1/jobs/{path_id(job_id, 'the job')}/cancel"
        return self._job(self.call("POST", path, retry=True), f"POST {path}")

    def jobs(self, project_id: str, limit: int) -> list[dict[str, Any]]:
        path = f"/v1/projects/{path_id(project_id, 'the project')}/jobs"
        answer: Any = self.call("GET", path, params={"limit": limit}, retry=True)  # JSON: any shape
        jobs = answer.get("jobs") if isinstance(answer, dict) else None
        if not isinstance(jobs, list):
            raise self._not_ours(f"GET {path}", 'no "jobs" list')
        return [self._job({"job": job}, f"GET {path}") for job in jobs]

    # What the routes answer: the shapes the client reads, or ApiUnreachable saying the
    # answer is not the API's (another service at --api, a proxy's page), never a traceback.

    def _not_ours(self, request: str, what: str) -> ApiUnreachable:
        return ApiUnreachable(
            f"the API at {self.url} answered {request} with {what}, not a CapyDB API answer; "
            "is --api the right URL?"
        )

    def _member(self, answer: Any, name: str, request: str) -> dict[str, Any]:
        member = answer.get(name) if isinstance(answer, dict) else None
        if not isinstance(member, dict):
            raise self._not_ours(request, f'no "{name}" object')
        return member

    def _job(self, answer: Any, request: str) -> dict[str, Any]:
        job = self._member(answer, "job", request)
        if not (isinstance(job.get("id"), str) and isinstance(job.get("state"), str)):
            raise self._not_ours(request, 'a job without an "id" and a "state"')
        if not isinstance(job.get("progress") or {}, dict) or not isinstance(job.get("report") or {}, dict):
            raise self._not_ours(request, 'a job whose "progress" or "report" is not an object')
        return job

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
