"""Sealing stored secrets with several keys: the first seals, every one opens."""

import pytest

from pipeline.sealing import Sealer
from stages.errors import PermanentError


def test_a_secret_sealed_with_the_old_key_opens_after_rotation():
    old = Sealer("old-key")
    token = old.seal("postgresql://u:pw@h/db")
    rotated = Sealer("new-key,old-key")
    assert rotated.open(token) == "postgresql://u:pw@h/db"
    assert not rotated.is_current(token)
    fresh = rotated.reseal(token)
    assert rotated.is_current(fresh) and rotated.open(fresh) == "postgresql://u:pw@h/db"
    # Once re-sealed, the old key can be dropped.
    assert Sealer("new-key").open(fresh) == "postgresql://u:pw@h/db"
    with pytest.raises(PermanentError, match="none of the keys"):
        Sealer("new-key").open(token)


def test_new_secrets_are_sealed_with_the_first_key():
    token = Sealer(["new-key", "old-key"]).seal("secret")
    assert Sealer("new-key").open(token) == "secret"
    with pytest.raises(PermanentError):
        Sealer("old-key").open(token)


def test_reseal_refuses_what_no_key_opens():
    with pytest.raises(PermanentError, match="cannot be decrypted"):
        Sealer("new-key").reseal(Sealer("lost-key").seal("x"))


def test_digests_survive_rotation_and_reveal_nothing():
    old = Sealer("old-key")
    digest = old.digest('{"source_url": "postgresql://u:pw@h/db"}')
    assert "pw" not in digest and len(digest) == 64
    rotated = Sealer("new-key, old-key")
    assert rotated.digest_matches('{"source_url": "postgresql://u:pw@h/db"}', digest)
    assert not rotated.digest_matches('{"source_url": "postgresql://u:other@h/db"}', digest)
    assert not Sealer("new-key").digest_matches('{"source_url": "postgresql://u:pw@h/db"}', digest)


def test_existing_single_key_tokens_still_open():
    # The key derivation is unchanged, so secrets stored before rotation support open.
    token = Sealer("same-key").seal("x")
    assert Sealer(" same-key ").open(token) == "x"
