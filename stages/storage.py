"""Object storage for uploaded dumps (S3-compatible, through the minio client).

`ObjectStore` is the only place that talks to S3. It translates minio and urllib3
errors at the boundary: a missing object or bucket becomes `ObjectMissing`, anything
that means "storage did not answer properly" becomes `StorageUnavailable` (transient).

Users upload with a presigned POST policy (`presign_post`), not a presigned PUT: the
policy names the exact key, an expiry and a `content-length-range`, so S3 itself
refuses a body over the limit before storing anything (a PUT URL cannot bound size).

Upload keys are `imports/{project_id}/{token}/{filename}`; `validate_object_key` is
the one check every caller applies to a key a client sent, so a key of another
project, or one that tries to escape its prefix, is rejected everywhere.
"""

from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.datatypes import PostPolicy
from minio.error import InvalidResponseError, S3Error, ServerError

from stages.errors import InvalidObjectKey, ObjectChanged, ObjectMissing, ObjectTooLarge, StorageUnavailable

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# One ranged GET of a streamed object; a reader that stops past one asks for the rest again.
RANGE_BYTES = 8 * CHUNK_BYTES
RESUMES = 5
# The readiness probe's connect and read timeouts.
PROBE_TIMEOUT_SECONDS = 3
KEY_PREFIX = "imports"
# S3 limits keys to 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
_TOKEN = re.compile(r"[0-9a-f]+")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PresignedPost:
    """An HTML-form upload: POST `fields` (then the file, as the field ``file``) to
    `url`. The fields hold a signature: they are a credential, never log them."""

    url: str
    fields: dict[str, str]


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime | None
    # What storage says identifies this version of the object (stat; None from `list`).
    etag: str | None = None


class ObjectStore:
    """Dumps in one bucket. `client` does the I/O against the internal endpoint;
    `presign_client` only signs for the public endpoint `public_url` (it must have its
    region set, so that signing never makes a network call)."""

    def __init__(
        self,
        client: Minio,
        presign_client: Minio,
        bucket: str,
        public_url: str,
        probe_client: Minio | None = None,
    ) -> None:
        self.client = client
        self.presign_client = presign_client
        # Readiness asks with short timeouts and no retries: "does storage answer now?"
        self.probe_client = probe_client or client
        self.bucket = bucket
        self.public_url = public_url.rstrip("/")

    @classmethod
    def from_settings(
        cls,
        endpoint: str,
        public_endpoint: str,
        region: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool,
    ) -> ObjectStore:
        """Build both clients from endpoint URLs such as ``http://127.0.0.1:8333``.

        The URL's scheme decides TLS for that endpoint (the public one is often https
        while the internal one is not); `secure` applies to an endpoint given without
        a scheme. Connects to nothing.
        """
        host, tls = _split_endpoint(endpoint, secure)
        public_host, public_tls = _split_endpoint(public_endpoint, secure)
        client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=tls,
            region=region,
            http_client=_http_client(),
        )
        presign_client = Minio(
            public_host,
            access_key=access_key,
            secret_key=secret_key,
            secure=public_tls,
            region=region,
        )
        probe_client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=tls,
            region=region,
            http_client=_http_client(connect=PROBE_TIMEOUT_SECONDS, read=PROBE_TIMEOUT_SECONDS, retries=0),
        )
        public_url = f"{'https' if public_tls else 'http'}://{public_host}"
        return cls(client, presign_client, bucket, public_url, probe_client)

    def check(self) -> None:
        """Whether the bucket answers now, within a few seconds (readiness); a missing
        bucket is created, as at startup. StorageUnavailable otherwise."""
        with _translated(self.bucket):
            exists = self.probe_client.bucket_exists(self.bucket)
        if not exists:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; safe when several processes race."""
        with _translated(self.bucket):
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as err:
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def ping(self) -> None:
        """Raise `StorageUnavailable` unless storage answers and the bucket exists."""
        with _translated(self.bucket):
            exists = self.client.bucket_exists(self.bucket)
        if not exists:
            raise StorageUnavailable(f"object storage is reachable but bucket {self.bucket!r} does not exist")

    def presign_post(self, key: str, *, max_bytes: int, expires_at: datetime) -> PresignedPost:
        """A form that lets anyone holding it upload exactly `key`, at most `max_bytes`
        bytes, until `expires_at`. S3 checks the policy before it stores the object: a
        bigger body, another key or a late upload is refused and nothing is stored.
        Re-posting the same key while the policy holds replaces the object."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        policy = PostPolicy(self.bucket, expires_at)
        policy.add_equals_condition("key", key)
        policy.add_content_length_range_condition(0, max_bytes)
        fields = self.presign_client.presigned_post_policy(policy)
        return PresignedPost(url=f"{self.public_url}/{self.bucket}", fields={"key": key, **fields})

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with `prefix`, in key order, page by page."""
        with _translated(prefix):
            for found in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if found.is_dir or found.object_name is None:
                    continue
                yield StoredObject(found.object_name, found.size or 0, found.last_modified)

    def size(self, key: str) -> int:
        """Size of the object in bytes; `ObjectMissing` if there is none."""
        return self.stat(key).size

    def stat(self, key: str) -> StoredObject:
        """Size, ETag and time of the object; `ObjectMissing` if there is none."""
        with _translated(key):
            stat = self.client.stat_object(self.bucket, key)
        if stat.size is None:
            raise StorageUnavailable(f"object storage did not report the size of {key!r}")
        return StoredObject(key, stat.size, stat.last_modified, _etag(stat.etag))

    def chunks(
        self,
        key: str,
        *,
        expected: StoredObject | None = None,
        max_bytes: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Iterator[bytes]:
        """The object's bytes in chunks of at most 1 MiB, in bounded memory.

        It is read by ranged GETs of `RANGE_BYTES`, each held open only while its bytes
        are read: a reader that pauses (psql building an index while the script waits)
        holds no long-lived response, and a range the server cut short after sending
        some of it is asked for again from where it stopped (up to `RESUMES` times in
        a row). `expected` (as
        `stat` returned it) pins the object: one that was replaced since (another size
        or ETag) raises `ObjectChanged` rather than mixing two files. Refuses
        (`ObjectTooLarge`) an object above `max_bytes` before reading it;
        `on_progress(bytes_done, bytes_total)` is called after every chunk.
        """
        found = expected or self.stat(key)
        total = found.size
        check_limit(key, total, max_bytes)
        done = failures = 0
        while done < total:
            length = min(RANGE_BYTES, total - done)
            got = 0
            try:
                with _translated(key):
                    response = self.client.get_object(self.bucket, key, offset=done, length=length)
                    try:
                        _same_object(key, found, response.headers)
                        # Raw bytes as stored, even if the uploader set a Content-Encoding.
                        for chunk in response.stream(CHUNK_BYTES, decode_content=False):
                            # Never more than asked, even if the server ignored the range.
                            chunk = chunk[: length - got]
                            got += len(chunk)
                            done += len(chunk)
                            if chunk:
                                yield chunk
                                if on_progress is not None:
                                    on_progress(done, total)
                            if got >= length:
                                break
                    finally:
                        response.close()
                        response.release_conn()
                if got < length:
                    raise StorageUnavailable(
                        f"object storage sent {got} of {length} bytes of {key!r} from {done - got}"
                    )
                failures = 0
            except StorageUnavailable:
                failures += 1
                if not got or failures > RESUMES:
                    raise  # (the client itself retried the request: storage does not answer)
                log.warning("reading %r stopped at byte %d of %d; asking again from there", key, done, total)

    def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        expected: StoredObject | None = None,
        max_bytes: int | None = None,
        on_progress: ProgressCallback | None = None,
        in_place: bool = False,
    ) -> int:
        """Stream the object to `path` (see `chunks`) and return its size.

        The data goes to a ``.part`` file renamed into place at the end, so `path` only
        ever holds a complete download; or (`in_place`) to `path` itself, each chunk
        flushed before `on_progress` counts it, so a reader told how far the download
        got can read that far while the rest arrives. Whatever was written is removed
        if the download fails.
        """
        target = Path(path)
        partial = target if in_place else target.with_name(target.name + ".part")
        done = 0
        try:
            with open(partial, "wb") as out:
                for chunk in self.chunks(
                    key, expected=expected, max_bytes=max_bytes, on_progress=on_progress
                ):
                    out.write(chunk)
                    if in_place:
                        out.flush()
                    done += len(chunk)
            if not in_place:
                os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return done

    def reader(
        self,
        key: str,
        *,
        expected: StoredObject | None = None,
        max_bytes: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> io.BufferedReader:
        """The object as a binary file to read once from start to end (see `chunks`):
        what a stream consumer (gzip, the SQL reader) takes, without a local copy."""
        return io.BufferedReader(
            _ChunkReader(self.chunks(key, expected=expected, max_bytes=max_bytes, on_progress=on_progress)),
            CHUNK_BYTES,
        )

    def head(
        self,
        key: str,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        expected: StoredObject | None = None,
    ) -> int:
        """Write the first `max_bytes` bytes of the object to `path` and return how many
        were written: all of it when it is shorter. `ObjectMissing` if there is none.

        One ranged GET, streamed in 1 MiB chunks, so memory stays bounded whatever
        `max_bytes` is; `size()` gives the whole object's size. Reads only. `expected`
        pins the object as `chunks` does (`ObjectChanged` if it was replaced).
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        # An empty object has no byte range to ask for (S3 answers 416): stat first.
        size = expected.size if expected is not None else self.size(key)
        return self._range(key, path, 0, min(size, max_bytes), expected=expected)

    def tail(self, key: str, path: str | os.PathLike[str], max_bytes: int) -> int:
        """Write the last `max_bytes` bytes of the object (all of it when it is shorter)
        to `path` and return how many were written; one ranged GET, as `head`."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        size = self.size(key)
        length = min(size, max_bytes)
        return self._range(key, path, size - length, length)

    def _range(
        self,
        key: str,
        path: str | os.PathLike[str],
        offset: int,
        length: int,
        *,
        expected: StoredObject | None = None,
    ) -> int:
        target = Path(path)
        done = 0
        try:
            with open(target, "wb") as out:
                if length:
                    with _translated(key):
                        response = self.client.get_object(self.bucket, key, offset=offset, length=length)
                        try:
                            if expected is not None:
                                _same_object(key, expected, response.headers)
                            for chunk in response.stream(CHUNK_BYTES, decode_content=False):
                                # Never more than asked, even if the server ignored the range.
                                chunk = chunk[: length - done]
                                out.write(chunk)
                                done += len(chunk)
                                if done >= length:
                                    break
                        finally:
                            response.close()
                            response.release_conn()
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return done

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file as `key` (tests and benchmarks; users POST to a presigned form)."""
        with _translated(key):
            self.client.fput_object(
                self.bucket, key, os.fspath(path), content_type="application/octet-stream"
            )

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is already gone is not an error."""
        try:
            with _translated(key):
                self.client.remove_object(self.bucket, key)
        except ObjectMissing:
            pass


def new_object_key(project_id: str, token_hex: str) -> str:
    """The key an upload for `project_id` gets: ``imports/{project_id}/{token}/dump``."""
    if not _TOKEN.fullmatch(token_hex):
        raise ValueError("token_hex must be lowercase hexadecimal")
    return validate_object_key(f"{KEY_PREFIX}/{project_id}/{token_hex}/dump", project_id)


def validate_object_key(key: str, project_id: str) -> str:
    """Return `key` unchanged if it is an upload key of `project_id`, else raise
    `InvalidObjectKey` saying what is wrong.

    A key is ``imports/{project_id}/{token}/{filename}``: four non-empty segments,
    no ``.``/``..`` segments, no leading ``/``, backslash or control character.
    """
    if not project_id or "/" in project_id or project_id in (".", ".."):
        raise ValueError(f"not a project id: {project_id!r}")
    expected = f"imports/{project_id}/<token>/<filename>"
    if not key:
        raise InvalidObjectKey("the upload key is empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"the upload key is longer than {MAX_KEY_BYTES} bytes")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise InvalidObjectKey("the upload key contains control characters")
    if "\\" in key:
        raise InvalidObjectKey("the upload key contains a backslash")
    if key.startswith("/"):
        raise InvalidObjectKey(f"the upload key must not start with '/'; it looks like {expected}")
    segments = key.split("/")
    if ".." in segments:
        raise InvalidObjectKey("the upload key contains a '..' segment")
    if "." in segments or "" in segments:
        raise InvalidObjectKey("the upload key contains an empty or '.' segment")
    if segments[:2] != [KEY_PREFIX, project_id]:
        raise InvalidObjectKey(
            f"the upload key is not under this project's prefix imports/{project_id}/; "
            "create an upload for this project and use the object_key it returns"
        )
    if len(segments) != 4:
        raise InvalidObjectKey(f"the upload key must look like {expected}")
    return key


def check_limit(key: str, size: int, max_bytes: int | None) -> None:
    """Raise ObjectTooLarge if the object `key` of `size` bytes is above `max_bytes`."""
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(
            f"the upload {key!r} is larger than the {_human(max_bytes)} ({max_bytes} bytes) "
            f"allowed for this import (found at least {size} bytes)"
        )


def _etag(value: str | None) -> str | None:
    """An ETag without its quotes (headers quote it, minio's stat does not)."""
    return value.strip().removeprefix("W/").strip('"') or None if value else None


def _same_object(key: str, expected: StoredObject, headers: Any) -> None:
    """Raise ObjectChanged unless a ranged response is of the object `expected` describes."""
    etag = _etag(headers.get("ETag"))
    content_range = headers.get("Content-Range") or ""
    size = content_range.rsplit("/", 1)[-1] if "/" in content_range else None
    if (expected.etag and etag and etag != expected.etag) or (
        size not in (None, "*") and int(size) != expected.size
    ):
        raise ObjectChanged(
            f"the upload {key!r} was replaced while the import was running; import it again "
            "(an upload must not change once its import has started)"
        )


class _ChunkReader(io.RawIOBase):
    """A read-once binary stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # a generator's response is released now, not when collected
        super().close()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn minio/urllib3 exceptions raised inside into `stages.errors` ones."""
    try:
        yield
    except S3Error as err:
        if err.code in _MISSING_CODES:
            raise ObjectMissing(
                f"no uploaded object {what!r} in storage; POST the dump to the upload form "
                "first, or create a new upload if it expired"
            ) from err
        # AccessDenied, SignatureDoesNotMatch, InternalError...: an operator problem or
        # a hiccup, never the user's; retrying gives the operator a chance to fix it.
        raise StorageUnavailable(f"object storage refused the request for {what!r}: {err.code}") from err
    except (ServerError, InvalidResponseError) as err:
        # Ours, like the cluster: the endpoint's address stays in the log, out of what users see.
        log.warning("object storage answered badly for %r: %s", what, err)
        raise StorageUnavailable(
            f"object storage answered badly for {what!r} ({type(err).__name__})"
        ) from err
    except urllib3.exceptions.HTTPError as err:
        log.warning("object storage could not be reached for %r: %s", what, err)
        raise StorageUnavailable(f"object storage could not be reached ({type(err).__name__})") from err


def _split_endpoint(url: str, secure: bool) -> tuple[str, bool]:
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.scheme not in ("", "http", "https"):
        raise ValueError(f"S3 endpoint must be an http(s) URL, got {url!r}")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"S3 endpoint must be scheme://host[:port], got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # minio addresses buckets as /bucket/key; it cannot live under a path prefix.
        raise ValueError(f"S3 endpoint must not have a path, got {url!r}")
    return parts.netloc, (parts.scheme == "https") if parts.scheme else secure


def _http_client(connect: float = 5, read: float = 60, retries: int = 3) -> urllib3.PoolManager:
    # minio's default waits 5 minutes to connect and retries 5 times; a readiness
    # probe or a stalled download should notice a dead endpoint much sooner.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        # The same CA lookup as minio's own default client.
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
