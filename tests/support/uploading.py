"""Uploading a dump the way a user does: POST it to the upload's presigned form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests


def post_file(upload: dict[str, Any], data: Path | bytes) -> requests.Response:
    """POST `data` to an upload (the `upload` object of the API) as `curl -F` does:
    every field of the form, then the file."""
    body = data if isinstance(data, bytes) else data.read_bytes()
    return requests.post(
        upload["upload_url"],
        data=upload["fields"],
        files={"file": ("app.dump", body, "application/octet-stream")},
        timeout=120,
    )


def upload_file(upload: dict[str, Any], data: Path | bytes) -> None:
    """POST `data` to the upload; raise unless storage accepted it."""
    post_file(upload, data).raise_for_status()


class UploadReads:
    """What the stages read of an upload from object storage, in order: "download" for
    each whole download, "head N" for each head of N bytes (ObjectStore patched by
    `monkeypatch`)."""

    def __init__(self, monkeypatch: Any) -> None:
        from stages.storage import ObjectStore

        self.seen: list[str] = []
        download, head = ObjectStore.download, ObjectStore.head

        def whole(store: ObjectStore, key: str, path: Any, **kwargs: Any) -> int:
            self.seen.append("download")
            return download(store, key, path, **kwargs)

        def first(store: ObjectStore, key: str, path: Any, max_bytes: int, **kwargs: Any) -> int:
            self.seen.append(f"head {max_bytes}")
            return head(store, key, path, max_bytes, **kwargs)

        monkeypatch.setattr(ObjectStore, "download", whole)
        monkeypatch.setattr(ObjectStore, "head", first)
