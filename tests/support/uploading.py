"""Uploading a dump the way a user does: create an upload, PUT to its presigned URL."""

from __future__ import annotations

from pathlib import Path

import requests


def put_file(upload_url: str, path: Path | bytes) -> None:
    data = path if isinstance(path, bytes) else path.read_bytes()
    resp = requests.put(upload_url, data=data, headers={"Content-Type": "application/octet-stream"}, timeout=120)
    resp.raise_for_status()
