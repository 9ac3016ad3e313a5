"""Postgres connection URLs: parsing, validation, redaction and the address gate.

A `SourceURL` keeps the password apart from everything else: `conninfo()` never holds
it, `env()` passes it to libpq tools as PGPASSWORD, and `redacted()` is the only form
that may be shown or logged.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import psycopg2.extensions

from stages.errors import PermanentError

_URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)([^@\s]*)@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class InvalidSourceURL(PermanentError):
    """The source URL is not a valid postgres:// or postgresql:// URL."""


class SourceAddressNotAllowed(PermanentError):
    """The source resolves to an address the service will not connect to."""


class SourceHostUnresolvable(PermanentError):
    """The source host name does not resolve to any address."""


def redact(text: str, *secrets: str | None) -> str:
    """Return `text` with URL and keyword passwords, and every given secret, masked."""
    if not text:
        return text
    out = _URL_PASSWORD.sub(r"\1***@", text)
    out = _KEYWORD_PASSWORD.sub(r"\1***", out)
    for secret in secrets:
        if secret and len(secret) >= 3:
            out = out.replace(secret, "***")
    return out


def _quote_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class SourceURL:
    """A parsed postgres URL; `params` are libpq keywords, without the password."""

    params: dict[str, str]
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: object, *, default_sslmode: str | None = "require") -> SourceURL:
        if not isinstance(url, str) or not url.strip():
            raise InvalidSourceURL("source_url must be a non-empty string")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("postgres", "postgresql"):
            raise InvalidSourceURL(
                "source_url must start with postgres:// or postgresql://, "
                "e.g. postgres://user:password@host:5432/dbname"
            )
        try:
            params = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError as err:
            # libpq's message may quote the URL; never echo it.
            raise InvalidSourceURL(
                "source_url could not be parsed; check its format: "
                "postgres://user:password@host:5432/dbname (percent-encode special "
                "characters in the password)"
            ) from err
        password = params.pop("password", None)
        if not params.get("host"):
            raise InvalidSourceURL("source_url must name a host, e.g. postgres://user@db.example.com/app")
        if "," in params["host"]:
            raise InvalidSourceURL("source_url must name exactly one host")
        if params["host"].startswith("/"):
            raise InvalidSourceURL("source_url must name a network host, not a Unix socket")
        if not params.get("user"):
            raise InvalidSourceURL("source_url must name a user, e.g. postgres://user:password@host/db")
        if not params.get("dbname"):
            raise InvalidSourceURL("source_url must name a database, e.g. postgres://user@host:5432/dbname")
        port = params.get("port", "5432")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidSourceURL(f"source_url has an invalid port {port!r}")
        params["port"] = port
        if default_sslmode and "sslmode" not in params:
            params["sslmode"] = default_sslmode
        return cls(params=params, password=password or None)

    @property
    def host(self) -> str:
        return self.params["host"]

    @property
    def port(self) -> int:
        return int(self.params["port"])

    @property
    def dbname(self) -> str:
        return self.params["dbname"]

    @property
    def user(self) -> str:
        return self.params["user"]

    def with_params(self, **changes: str) -> SourceURL:
        return SourceURL(params={**self.params, **changes}, password=self.password)

    def conninfo(self, **extra: str) -> str:
        """A libpq keyword string without the password (pass it via `env()`)."""
        merged = {**self.params, **extra}
        return " ".join(f"{key}={_quote_value(str(value))}" for key, value in merged.items())

    def env(self) -> dict[str, str]:
        """Environment for libpq tools: the password travels here, never in argv."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def connect_kwargs(self, **extra: str | int) -> dict[str, str | int]:
        """Keyword arguments for psycopg2.connect, password included."""
        kwargs: dict[str, str | int] = {**self.params, **extra}
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def url(self) -> str:
        """The full URL, password included: for storage encrypted at rest only."""
        return self._build(self.password)

    def redacted(self) -> str:
        return self._build("***" if self.password else None)

    def _build(self, password: str | None) -> str:
        auth = quote(self.user, safe="")
        if password is not None:
            auth += ":" + (password if password == "***" else quote(password, safe=""))
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        query = "&".join(
            f"{key}={quote(str(value), safe='')}"
            for key, value in self.params.items()
            if key not in ("host", "port", "user", "dbname", "hostaddr")
        )
        url = f"postgresql://{auth}@{host}:{self.port}/{quote(self.dbname, safe='')}"
        return f"{url}?{query}" if query else url


Resolver = Callable[[str, int], list[str]]
AddressLookup = Callable[..., list[tuple]]


def resolve(host: str, port: int, *, getaddrinfo: AddressLookup = socket.getaddrinfo) -> list[str]:
    """All addresses `host` resolves to (IPv4 and IPv6), in resolver order.

    Raises `SourceHostUnresolvable` when the name does not resolve. `getaddrinfo` is
    the lookup itself, passed in so tests can fail a lookup without asking a DNS server.
    """
    try:
        infos = getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise SourceHostUnresolvable(
            f"the source host {host!r} does not resolve ({err.strerror}); check the host name"
        ) from err
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


_METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
}


def address_problem(address: str) -> str | None:
    """Why connecting to `address` is not allowed for a public source, or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "a private or reserved address"
    return None


def pin_address(source: SourceURL, *, allow_private: bool, resolver: Resolver = resolve) -> SourceURL:
    """Resolve the source host once, check the address, and pin it as `hostaddr`.

    Pinning makes libpq connect to exactly the address that was checked, so a DNS
    answer that changes between check and connect (DNS rebinding) cannot redirect the
    connection; `host` stays for TLS verification and pg_hba matching.
    """
    addresses = resolver(source.host, source.port)
    if not addresses:
        raise SourceHostUnresolvable(f"the source host {source.host!r} does not resolve; check the host name")
    address = addresses[0]
    problem = address_problem(address)
    if problem and not allow_private:
        raise SourceAddressNotAllowed(
            f"the source host {source.host!r} resolves to {address}, {problem}; "
            "imports connect only to publicly reachable databases. Use the database's "
            "public host name (an operator can allow private sources with "
            "CAPY_ALLOW_PRIVATE_SOURCES=true)"
        )
    return source.with_params(hostaddr=address)
