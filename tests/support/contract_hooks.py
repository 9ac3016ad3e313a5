"""schemathesis hooks of the contract test (tests/e2e/test_contract.py): sources stay on loopback.

A generated source URL that the service would accept is pointed at a closed loopback
port before the request is sent; one it would refuse is sent as it is (the service
parses it with the same function and answers 400 before any connection).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

from stages.connections.pgurl import SourceURL
from stages.errors import CapyError

# Set by the test: postgres://…@127.0.0.1:<a port nobody listens on>/…
LOOPBACK_SOURCE = os.environ["CAPY_CONTRACT_SOURCE"]


def confine(body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("source_url"), str):
        try:
            SourceURL.parse_source(body["source_url"])
        except CapyError:
            return body
        return {**body, "source_url": LOOPBACK_SOURCE}
    return body


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    case.body = confine(case.body)
