"""A small, honest fake of the HTTP layer the client CLI uses, and the job shapes of the API."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from client.cli import Io

API = "http://api.capydb.invalid"
KEY = "capy_live_s3cretKeyThatMustNeverBePrinted"
PROJECT = "prj_123"


@dataclass
class FakeResponse:
    status_code: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw_text: str | None = None

    @property
    def text(self) -> str:
        return self.raw_text if self.raw_text is not None else json.dumps(self.body)

    def json(self) -> Any:
        if self.raw_text is not None:
            raise ValueError("not JSON")
        return self.body


@dataclass
class Call:
    method: str
    url: str
    kwargs: dict[str, Any]
    body: bytes | None = None  # a streamed body, as read by the fake

    @property
    def headers(self) -> dict[str, str]:
        return self.kwargs.get("headers") or {}


class FakeSession:
    """Answers each request with the next scripted `(method, url, answer)`; an answer is a
    FakeResponse or an exception to raise. A request that does not match fails the test."""

    def __init__(self, *script: tuple[str, str, Any]) -> None:
        self.script = list(script)
        self.calls: list[Call] = []

    def request(self, method: str, url: str, **kwargs: Any) -> FakeResponse:
        data = kwargs.get("data")
        body = b"".join(data) if data is not None and not isinstance(data, bytes | dict) else None
        self.calls.append(Call(method, url, kwargs, body))
        assert self.script, f"unexpected request {method} {url}"
        want_method, want_url, answer = self.script.pop(0)
        assert (method, url) == (want_method, want_url), (
            f"expected {want_method} {want_url}, got {method} {url}"
        )
        if isinstance(answer, BaseException):
            raise answer
        return answer


def job(state: str = "pending", **more: Any) -> dict[str, Any]:
    base = {
        "id": "job_1",
        "state": state,
        "stage": "preflight",
        "progress": {"phase": "queued"},
        "error": None,
        "retry_classification": None,
        "last_exit_code": None,
        "last_stderr": None,
        "created_at": "2026-11-29T10:00:00Z",
        "started_at": None,
        "completed_at": None,
        "cancel_requested_at": None,
        "source": {"kind": "live", "url": "postgresql://app:***@db.example.invalid/app"},
        "recreate": False,
    }
    base.update(more)
    return base


REPORT = {
    "tables": {
        "public.actor": {"source_rows": 200, "target_rows": 200},
        "public.film": {"source_rows": 1000, "target_rows": 1000},
    },
    "table_count": 2,
    "row_count": 1200,
    "uncounted_tables": [],
    "sequences": {"public.actor_actor_id_seq": {"source": 200, "target": 200}},
    "objects": {"index": {"source": 3, "target": 3}},
    "objects_source": "source snapshot",
    "extensions": {"plpgsql": {"source": "1.0", "target": "1.0"}},
    "skipped": [{"object": "EVENT TRIGGER audit", "reason": "event triggers need a superuser"}],
    "warnings": ["skipped EVENT TRIGGER audit: event triggers need a superuser"],
    "replaced_database": "capy_prj_123_replaced_1",
}


def completed() -> dict[str, Any]:
    return job(
        "completed",
        stage="finalize",
        progress={"phase": "completed"},
        started_at="2026-11-29T10:00:00Z",
        completed_at="2026-11-29T10:01:05Z",
        report=REPORT,
    )


def ok(body: Any, status: int = 200, **headers: str) -> FakeResponse:
    return FakeResponse(status, body, dict(headers))


def error(status: int, message: str, **headers: str) -> FakeResponse:
    return FakeResponse(status, {"error": message}, dict(headers))


class Outputs:
    """The Io of a test: captured stdout and stderr, recorded sleeps, scripted answers."""

    def __init__(
        self,
        session: FakeSession,
        *,
        env: dict[str, str] | None = None,
        interactive: bool = False,
        answers: list[str] | None = None,
        sleep: Any = None,
    ) -> None:
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.sleeps: list[float] = []
        self.questions: list[str] = []
        self.answers = list(answers or [])
        self.now = 0.0

        def record_sleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            self.now += seconds
            if sleep is not None:
                sleep(len(self.sleeps))

        def ask(question: str) -> str:
            self.questions.append(question)
            return self.answers.pop(0)

        self.io = Io(
            env=env if env is not None else {},
            stdout=self.stdout,
            stderr=self.stderr,
            session=session,
            sleep=record_sleep,
            clock=lambda: self.now,
            ask=ask,
            interactive=interactive,
            new_idempotency_key=lambda: "idem-1",
        )

    @property
    def out(self) -> str:
        return self.stdout.getvalue()

    @property
    def err(self) -> str:
        return self.stderr.getvalue()
