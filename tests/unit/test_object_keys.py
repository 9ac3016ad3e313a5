"""Upload keys: what new_object_key makes and what validate_object_key lets through."""

from __future__ import annotations

import pytest

from stages.errors import InvalidObjectKey, PermanentError
from stages.storage import new_object_key, validate_object_key

PROJECT = "prj_a1"


def test_new_object_key_layout() -> None:
    assert new_object_key(PROJECT, "0123abcd") == "imports/prj_a1/0123abcd/dump"


def test_new_object_keys_are_valid_for_their_project_only() -> None:
    key = new_object_key(PROJECT, "ff00")
    assert validate_object_key(key, PROJECT) == key
    with pytest.raises(InvalidObjectKey):
        validate_object_key(key, "prj_b2")


@pytest.mark.parametrize("token", ["", "XYZ", "ab/cd", "../x", "AB12"])
def test_new_object_key_wants_a_lowercase_hex_token(token: str) -> None:
    with pytest.raises(ValueError):
        new_object_key(PROJECT, token)


@pytest.mark.parametrize(
    "key",
    [
        "imports/prj_a1/0123abcd/dump",
        "imports/prj_a1/tok/my dump 2024.sql.gz",
        "imports/prj_a1/t/données.dump",
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert validate_object_key(key, PROJECT) == key


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "is empty"),
        ("/imports/prj_a1/tok/dump", "must not start with '/'"),
        ("imports/prj_a1/../prj_b2/dump", "'..' segment"),
        ("imports/prj_a1/tok/..", "'..' segment"),
        ("../imports/prj_a1/tok/dump", "'..' segment"),
        ("imports\\prj_a1\\tok\\dump", "backslash"),
        ("imports/prj_a1/tok/du\nmp", "control characters"),
        ("imports/prj_a1/tok/dump\x00", "control characters"),
        ("imports/prj_a1/tok/\x7fdump", "control characters"),
        ("imports/prj_a1//dump", "empty or '.' segment"),
        ("imports/prj_a1/./dump", "empty or '.' segment"),
        ("imports/prj_b2/tok/dump", "not under this project's prefix imports/prj_a1/"),
        # A prefix test on the string would let a project read a longer-named one's.
        ("imports/prj_a10/tok/dump", "not under this project's prefix"),
        ("uploads/prj_a1/tok/dump", "not under this project's prefix"),
        ("imports/prj_a1", "must look like imports/prj_a1/<token>/<filename>"),
        ("imports/prj_a1/tok", "must look like imports/prj_a1/<token>/<filename>"),
        ("imports/prj_a1/tok/dir/dump", "must look like imports/prj_a1/<token>/<filename>"),
        ("imports/prj_a1/tok/" + "x" * 1100, "longer than 1024 bytes"),
    ],
)
def test_invalid_keys_are_refused_saying_why(key: str, fragment: str) -> None:
    with pytest.raises(InvalidObjectKey) as caught:
        validate_object_key(key, PROJECT)
    assert fragment in caught.value.message
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize("project_id", ["", "a/b", ".."])
def test_a_bad_project_id_is_a_programming_error(project_id: str) -> None:
    with pytest.raises(ValueError):
        validate_object_key("imports/x/tok/dump", project_id)
