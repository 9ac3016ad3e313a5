"""Uploading a dump to the presigned POST form the API hands out.

The form (`upload_url` and `fields`) is itself the credential: no API key goes to
storage, and neither the form nor its fields are ever printed. The body is streamed from
the file with its length known up front (S3 refuses chunked form posts), so a dump of
any size uploads in constant memory and reports progress as it goes.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

from client.api import USER_AGENT, Session
from client.errors import ApiRefused, ApiUnreachable, UsageError

CHUNK = 1024 * 1024
UPLOAD_TIMEOUT_SECONDS = 120  # per read or write on the socket, not for the whole upload


class FormBody:
    """A multipart/form-data body: every field of the form, then the file (S3 reads the
    fields that precede the file only). Iterable and readable, with a length."""

    def __init__(
        self, fields: dict[str, str], file: BinaryIO, size: int, on_progress: Callable[[int], None]
    ) -> None:
        self.boundary = "capydb-" + secrets.token_hex(16)
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + str(value).encode()
            + b"\r\n"
            for name, value in fields.items()
        )
        head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="dump"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._parts: list[bytes | BinaryIO] = [head, file, tail]
        self._length = len(head) + size + len(tail)
        self._size = size
        self._sent = 0
        self._on_progress = on_progress

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def read(self, size: int = -1) -> bytes:
        limit = CHUNK if size is None or size < 0 else size
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                if part:
                    return part
                continue
            data = part.read(limit)
            if data:
                self._sent += len(data)
                self._on_progress(self._sent)
                return data
            self._parts.pop(0)
        return b""


def check_dump(path: Path) -> int:
    """The dump's size; UsageError if it is not a readable, non-empty file."""
    if not path.is_file():
        raise UsageError(f"{path} is not a file; pass the dump with --file PATH")
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"{path} is empty; pass a dump made with pg_dump")
    return size


def post_dump(
    session: Session, upload: dict[str, Any], path: Path, size: int, on_progress: Callable[[int], None]
) -> None:
    """POST the dump to the upload's form; ApiRefused with storage's reason if it refuses."""
    limit = upload.get("max_bytes")
    if isinstance(limit, int) and size > limit:
        raise ApiRefused(
            f"{path} is {size:,} bytes, more than the {limit:,} bytes the project may store; "
            "ask for a bigger storage limit or import a smaller dump",
            413,
        )
    if upload.get("method", "POST") != "POST" or not isinstance(upload.get("fields"), dict):
        raise ApiUnreachable("the API returned an upload without a POST form; this client needs a newer API")
    try:
        with path.open("rb") as file:
            body = FormBody(upload["fields"], file, size, on_progress)
            response = session.request(
                "POST",
                upload["upload_url"],
                data=body,
                headers={
                    "Content-Type": body.content_type,
                    "Content-Length": str(len(body)),
                    "User-Agent": USER_AGENT,
                },
                timeout=UPLOAD_TIMEOUT_SECONDS,
            )
    except OSError as err:
        if isinstance(err, requests.ConnectionError | requests.Timeout):
            raise ApiUnreachable(
                f"the upload to object storage did not go through ({type(err).__name__}); try again"
            ) from None
        raise UsageError(f"could not read {path}: {err.strerror or err}") from None
    if response.status_code >= 400:
        reason = storage_reason(response.text)
        error = ApiUnreachable if response.status_code >= 500 else ApiRefused
        message = (
            f"object storage refused the upload ({response.status_code}{': ' + reason if reason else ''})"
        )
        if "expired" in reason.lower():
            message += "; the upload form expired: run the command again for a new one"
        if error is ApiRefused:
            raise ApiRefused(message, response.status_code)
        raise ApiUnreachable(message)


def storage_reason(xml: str) -> str:
    """`Code: Message` from an S3 error document, or '' (the document may hold more; not shown)."""
    code = re.search(r"<Code>([^<]{1,100})</Code>", xml)
    message = re.search(r"<Message>([^<]{1,300})</Message>", xml)
    return ": ".join(m.group(1) for m in (code, message) if m)
