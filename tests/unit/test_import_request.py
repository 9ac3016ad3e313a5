import pytest

from pipeline.errors import InvalidRequest
from pipeline.imports import ImportRequest
from stages.errors import PermanentError


def accept_key(key):
    return key


def parse(body):
    return ImportRequest.parse(body, validate_key=accept_key)


def test_live_request():
    request = parse({"confirm": True, "recreate": True, "source_url": "postgres://u:p@db.example.com/app"})
    assert request.recreate is True
    assert request.source.host == "db.example.com"
    assert request.upload_key is None


def test_upload_request_defaults_recreate_to_false():
    request = parse({"confirm": True, "upload_key": "imports/prj_x/abc/dump"})
    assert request.upload_key == "imports/prj_x/abc/dump"
    assert request.recreate is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        (
            {"confirm": True, "source_url": "postgres://u@h.example.com/d", "extra": 1},
            "unknown field(s): extra",
        ),
        ({"source_url": "postgres://u@h.example.com/d"}, '"confirm" must be true'),
        ({"confirm": "yes", "source_url": "postgres://u@h.example.com/d"}, '"confirm" must be true'),
        (
            {"confirm": True, "recreate": "no", "source_url": "postgres://u@h.example.com/d"},
            '"recreate" must be true or false',
        ),
        ({"confirm": True}, 'send exactly one of "source_url"'),
        (
            {"confirm": True, "source_url": "postgres://u@h.example.com/d", "upload_key": "k"},
            "exactly one of",
        ),
        ({"confirm": True, "source_url": "http://example.com"}, "postgres:// or postgresql://"),
        ({"confirm": True, "upload_key": 5}, '"upload_key" must be a string'),
    ],
)
def test_bad_requests_say_what_to_fix(body, message):
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert message in info.value.message


def test_upload_key_validation_errors_become_invalid_request():
    def refuse(key):
        raise PermanentError("the upload key must not contain '..'")

    with pytest.raises(InvalidRequest, match="must not contain"):
        ImportRequest.parse({"confirm": True, "upload_key": "imports/../x"}, validate_key=refuse)


def test_a_source_url_parameter_outside_the_allowlist_is_a_400_naming_it():
    with pytest.raises(InvalidRequest) as info:
        parse({"confirm": True, "source_url": "postgres://u:pw@db.example.com/app?passfile=/root/.pgpass"})
    assert "source_url parameter 'passfile' is not accepted" in info.value.message
    assert "/root/.pgpass" not in info.value.message
    request = parse({"confirm": True, "source_url": "postgres://u:pw@db.example.com/app?sslrootcert=system"})
    assert request.source.tenant and request.source.params["sslmode"] == "verify-full"
