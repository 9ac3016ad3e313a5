"""The restore stage's download of an archive (pipeline.steps.upload._Download), which
the restore reads while it arrives: how far it got, what a reader waiting for more bytes
is told when it fails or is abandoned."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pipeline.steps.upload import _Download
from stages.errors import Cancelled, ObjectChanged
from stages.storage import StoredObject

PIECES = [b"a" * 10, b"b" * 20, b"c" * 30]
TOTAL = sum(map(len, PIECES))


class PacedStore:
    """`download` writes PIECES in place, one each time `step` is released; `fail_after`
    pieces in, it raises ObjectChanged instead."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.step = threading.Semaphore(0)
        self.fail_after = fail_after

    def download(self, key: str, path: str, *, on_progress: Any, in_place: bool, **kwargs: Any) -> int:
        assert in_place, "the restore reads the file while it downloads: it must be written in place"
        done = 0
        with open(path, "wb") as out:
            for number, piece in enumerate(PIECES):
                assert self.step.acquire(timeout=10)
                if number == self.fail_after:
                    raise ObjectChanged("the upload was replaced while it was read; upload it again")
                out.write(piece)
                out.flush()
                done += len(piece)
                on_progress(done, TOTAL)
        return done


def _download(store: PacedStore, tmp_path) -> _Download:
    return _Download(store, StoredObject("k", TOTAL, None, "etag"), str(tmp_path / "upload"), 10**9)  # type: ignore[arg-type]


def _waiter(download: _Download, end: int | None) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            download.wait_for(end)
            outcome.append("ready")
        except BaseException as err:  # noqa: BLE001 - what the waiter was told
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_reader_waits_for_the_bytes_it_needs_and_finds_them_on_disk(tmp_path):
    store = PacedStore()
    download = _download(store, tmp_path)
    thread, outcome = _waiter(download, 25)
    store.step.release()  # 10 bytes
    time.sleep(0.2)
    assert outcome == [] and thread.is_alive()
    store.step.release()  # 30 bytes
    thread.join(5)
    assert outcome == ["ready"]
    assert (tmp_path / "upload").read_bytes()[:25] == b"a" * 10 + b"b" * 15
    assert not download.complete
    store.step.release()
    download.wait_for(None)
    assert download.complete and (tmp_path / "upload").read_bytes() == b"".join(PIECES)
    download.stop()


def test_a_download_that_fails_is_raised_to_every_reader_even_of_bytes_that_arrived(tmp_path):
    """A failed download's file is removed: what arrived is no longer there to read."""
    store = PacedStore(fail_after=1)
    download = _download(store, tmp_path)
    download.wait_for(0)
    store.step.release()
    download.wait_for(10)  # the first piece is there while the download goes on
    store.step.release()
    with pytest.raises(ObjectChanged):
        download.wait_for(11)
    with pytest.raises(ObjectChanged):
        download.wait_for(10)
    assert not download.complete
    download.stop()


def test_an_abandoned_download_releases_its_readers_at_once_while_storage_stalls(tmp_path):
    store = PacedStore()  # never released: storage sends nothing
    download = _download(store, tmp_path)
    thread, outcome = _waiter(download, None)
    time.sleep(0.1)
    download.abandon()
    thread.join(2)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    for _ in PIECES:
        store.step.release()  # the download ends at its next chunk
    download.stop()
    assert not download.complete
