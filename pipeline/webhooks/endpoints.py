"""Webhook endpoints: where an organization's events go, behind the address gate.

An endpoint's URL is `https://` (plain `http://` only in development mode), carries no
credentials or fragment, and its host must resolve only to addresses the source
address gate allows (stages.connections.addresses: globally routable, unless the
operator allows private addresses, as development mode does). The gate is applied when
the endpoint is added and again before every attempt, and the attempt connects to the
address that was checked (`Target.address`), never resolving the name a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from pipeline.errors import InvalidRequest, NotFound
from pipeline.ids import new_id
from pipeline.models import Organization, WebhookEndpoint, utcnow
from pipeline.sealing import Sealer
from pipeline.serialize import timestamp
from pipeline.webhooks.signing import new_secret
from stages.connections.addresses import SourceHostUnresolvable, refused_addresses, resolve
from stages.errors import PermanentError

MAX_URL_LENGTH = 2048

Resolver = Callable[[str, int], list[str]]


class EndpointAddressNotAllowed(PermanentError):
    """The endpoint's host resolves to an address webhooks are not sent to."""


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: the URL's parts and the checked address to connect to."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    address: str


@dataclass(frozen=True)
class CreatedEndpoint:
    record: WebhookEndpoint
    secret: str  # shown once, never stored in the clear


def parse_url(url: str, *, dev_mode: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an endpoint URL, or InvalidRequest saying what to fix."""
    url = url.strip()
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"the webhook URL must be 1 to {MAX_URL_LENGTH} characters long")
    if any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F or c.isspace() for c in url):
        raise InvalidRequest("the webhook URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InvalidRequest(f"the webhook URL is not a valid URL ({err})") from None
    allowed = ("https", "http") if dev_mode else ("https",)
    if parts.scheme not in allowed:
        raise InvalidRequest(
            "the webhook URL must start with https://"
            + (
                " (or http:// in development mode)"
                if dev_mode
                else " (plain http is allowed only in development mode)"
            )
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            "the webhook URL must not carry credentials (user:password@): verify the X-CapyDB-Signature instead"
        )
    if parts.fragment:
        raise InvalidRequest("the webhook URL must not have a #fragment")
    host = parts.hostname
    if not host:
        raise InvalidRequest("the webhook URL has no host name")
    # The request line is ASCII (http.client refuses anything else): other characters
    # of the path and query travel percent-encoded as UTF-8, as a browser sends them.
    path = _ascii((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def _ascii(path: str) -> str:
    return "".join(c if c.isascii() else quote(c, safe="") for c in path)


def check_address(url: str, *, dev_mode: bool, allow_private: bool, resolver: Resolver = resolve) -> Target:
    """Resolve the endpoint's host once and check every address it resolves to, as the
    source gate does; the Target connects to the first. InvalidRequest for a malformed
    URL, EndpointAddressNotAllowed (a PermanentError) for a refused or unresolvable host."""
    scheme, host, port, path = parse_url(url, dev_mode=dev_mode)
    try:
        addresses = resolver(host, port)
    except SourceHostUnresolvable as err:
        raise EndpointAddressNotAllowed(
            f"the webhook host {host!r} does not resolve; check the host name"
        ) from err
    if not addresses:
        raise EndpointAddressNotAllowed(f"the webhook host {host!r} does not resolve; check the host name")
    if not allow_private and (why := refused_addresses(addresses)):
        raise EndpointAddressNotAllowed(
            f"the webhook host {host!r} {why}; webhooks are "
            "sent only to publicly reachable addresses (an operator can allow private ones "
            "with CAPY_ALLOW_PRIVATE_SOURCES=true)"
        )
    return Target(scheme, host, port, path, addresses[0])


def add_endpoint(
    org: Organization,
    url: str,
    sealer: Sealer,
    *,
    dev_mode: bool,
    allow_private: bool,
    description: str = "",
    resolver: Resolver = resolve,
) -> CreatedEndpoint:
    """Add an endpoint for the organization after checking its address; its secret is
    returned once and stored sealed."""
    url = url.strip()
    try:
        check_address(url, dev_mode=dev_mode, allow_private=allow_private, resolver=resolver)
    except EndpointAddressNotAllowed as err:
        raise InvalidRequest(err.message) from None
    secret = new_secret()
    record = WebhookEndpoint.create(
        id=new_id("whe"),
        organization=org.id,
        url=url,
        description=description,
        secret_encrypted=sealer.seal(secret),
    )
    return CreatedEndpoint(record, secret)


def list_endpoints(org: Organization, *, include_removed: bool = False) -> list[WebhookEndpoint]:
    query = WebhookEndpoint.select().where(WebhookEndpoint.organization == org.id)
    if not include_removed:
        query = query.where(WebhookEndpoint.removed_at.is_null())
    return list(query.order_by(WebhookEndpoint.created_at))


def get_endpoint(endpoint_id: str) -> WebhookEndpoint:
    endpoint = WebhookEndpoint.get_or_none(WebhookEndpoint.id == endpoint_id)
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} does not exist")
    return endpoint


def remove_endpoint(endpoint_id: str) -> tuple[WebhookEndpoint, bool]:
    """Remove the endpoint (its deliveries stay listable; pending ones are not sent);
    (the endpoint, whether this call removed it)."""
    get_endpoint(endpoint_id)
    removed = (
        WebhookEndpoint.update(removed_at=utcnow())
        .where((WebhookEndpoint.id == endpoint_id) & WebhookEndpoint.removed_at.is_null())
        .execute()
    )
    return get_endpoint(endpoint_id), bool(removed)


def endpoint_json(endpoint: WebhookEndpoint) -> dict[str, object]:
    """An endpoint as the CLI shows it: never its secret."""
    return {
        "id": endpoint.id,
        "organization_id": endpoint.organization_id,
        "url": endpoint.url,
        "description": endpoint.description,
        "created_at": timestamp(endpoint.created_at),
        "removed_at": timestamp(endpoint.removed_at),
    }
