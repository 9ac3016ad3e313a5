"""Postgres connection URLs: parsing, validation, redaction and the address gate.

A `SourceURL` keeps the password apart from everything else: `conninfo()` never holds
it, `env()` passes it to libpq tools as PGPASSWORD, and `redacted()` is the only form
that may be shown or logged.

A tenant's URL (`SourceURL.parse_source`) may set only the parameters in
`SOURCE_PARAMETERS`: anything that would make libpq read a file of the service's host
(`passfile`, `service`, `sslcert`, `sslkey`, `sslrootcert` paths, `sslcrl`…) is refused.
Every connection made from it names those files explicitly as nothing
(`TENANT_CONNECTION_PARAMETERS`), so neither libpq's defaults (~/.pgpass,
~/.postgresql/postgresql.crt) nor inherited PG* variables reach a tenant's server, and
carries TCP keepalives and a `tcp_user_timeout`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import quote

import psycopg2.extensions

from stages.errors import PermanentError

_URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)([^@\s]*)@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

# Parameters whose value is a secret: never in conninfo(), redacted() or a repr.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})

# A path that can never exist: /dev/null is not a directory, so stat() fails with
# ENOTDIR, which libpq treats like a missing file, silently ("no client certificate",
# "no password file"; /dev/null itself would make libpq warn it is not a plain file).
NO_FILE = "/dev/null/capy-imports-no-file"

# Added to every connection to a tenant's source (psycopg2 and the tools' conninfo).
# Keepalives and tcp_user_timeout (ms) end a connection whose peer stops acknowledging;
# a peer that acknowledges but never answers is bounded by stages.deadline instead.
TENANT_CONNECTION_PARAMETERS: dict[str, str] = {
    "passfile": NO_FILE,
    "sslcert": NO_FILE,
    "sslkey": NO_FILE,
    "sslcrl": NO_FILE,
    "sslcrldir": NO_FILE,
    # GSSAPI would use the Kerberos credentials of the service's host.
    "gssencmode": "disable",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}

# The environment of a tool run against a tenant's source, besides PGPASSWORD: no
# password file, no service file, no system configuration directory of ours.
TENANT_TOOL_ENV: dict[str, str] = {
    "PGPASSFILE": NO_FILE,
    "PGSERVICEFILE": NO_FILE,
    "PGSYSCONFDIR": NO_FILE,
}

# What a tenant's URL may set, as URL parts or query parameters.
SOURCE_PARAMETERS = (
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "sslmode",
    "sslrootcert",
    "ssl_min_protocol_version",
    "channel_binding",
    "gssencmode",
    "connect_timeout",
    "application_name",
    "options",
)
_ALLOWED_VALUES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslrootcert": ("system",),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable",),
}
_NAMES_A_FILE = "it names a file on the service's host, not on your database's"
_SET_BY_US = "the service sets it itself"
_NEWER_LIBPQ = "the PostgreSQL 15 client tools that dump the source do not support it"
_REFUSED_BECAUSE = {
    "passfile": "it names a password file on the service's host; put the password in the URL",
    "service": "it reads a connection service file on the service's host; put every setting in the URL",
    "sslcert": _NAMES_A_FILE,
    "sslkey": _NAMES_A_FILE,
    "sslcrl": _NAMES_A_FILE,
    "sslcrldir": _NAMES_A_FILE,
    "sslpassword": "it unlocks a key file on the service's host; client certificates are not supported",
    "sslcertmode": "client certificates are not supported",
    "hostaddr": "the service resolves the host itself and connects to the address it checked",
    "keepalives": _SET_BY_US,
    "keepalives_idle": _SET_BY_US,
    "keepalives_interval": _SET_BY_US,
    "keepalives_count": _SET_BY_US,
    "tcp_user_timeout": _SET_BY_US,
    "krbsrvname": "GSSAPI (Kerberos) authentication is not supported",
    "gsslib": "GSSAPI (Kerberos) authentication is not supported",
    "requirepeer": "it applies to Unix-domain sockets only",
    "replication": "an import reads the database, it does not replicate it",
    "target_session_attrs": "a source URL names one host, which must accept read-only sessions",
    "load_balance_hosts": "a source URL names one host",
    "sslnegotiation": _NEWER_LIBPQ,
    "require_auth": _NEWER_LIBPQ,
}


class InvalidSourceURL(PermanentError):
    """The source URL is not a valid postgres:// or postgresql:// URL."""


class SourceAddressNotAllowed(PermanentError):
    """The source resolves to an address the service will not connect to."""


class SourceHostUnresolvable(PermanentError):
    """The source host name does not resolve to any address."""


def redact(text: str, *secrets: str | None) -> str:
    """Return `text` with URL and keyword passwords (sslpassword too), and every given
    secret, masked."""
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


def system_ca_bundle() -> str:
    """The system's CA bundle (the file, not a directory: libpq 15 takes a file), or
    `NO_FILE` when this host has none (verification then fails, saying so)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return NO_FILE


def tool_environment(env: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment for a Postgres client tool: `base` (os.environ) without
    any inherited PG* variable (PGSERVICE, PGHOST, PGSSLCERT… would otherwise reach
    libpq), then `env`. For the tools' command runner, which merges os.environ today."""
    base = os.environ if base is None else base
    return {
        **{name: value for name, value in base.items() if not name.upper().startswith("PG")},
        **(env or {}),
    }


def _check_source_parameters(params: dict[str, str]) -> None:
    accepted = ", ".join(name for name in SOURCE_PARAMETERS if name not in ("host", "port", "dbname", "user", "password"))
    for name, value in params.items():
        if name not in SOURCE_PARAMETERS:
            why = _REFUSED_BECAUSE.get(name, "it is not one a source URL may set")
            raise InvalidSourceURL(
                f"source_url parameter {name!r} is not accepted: {why}. "
                f"A source URL may set only {accepted}"
            )
        allowed = _ALLOWED_VALUES.get(name)
        if allowed and value not in allowed:
            hint = ""
            if name == "sslrootcert":
                hint = " (verify the server with the system's certificate authorities); a file path names a file on the service's host"
            elif name == "gssencmode":
                hint = ": GSSAPI encryption would use Kerberos credentials of the service's host"
            raise InvalidSourceURL(
                f"source_url parameter {name} must be one of {', '.join(allowed)}{hint}"
            )
    timeout = params.get("connect_timeout")
    if timeout is not None and (not timeout.isdigit() or int(timeout) == 0):
        raise InvalidSourceURL("source_url parameter connect_timeout must be a whole number of seconds above 0")
    if params.get("sslrootcert") == "system" and params.get("sslmode", "verify-full") != "verify-full":
        raise InvalidSourceURL(
            "source_url parameter sslrootcert=system needs sslmode=verify-full (or no sslmode): "
            "checking the certificate against the system's authorities without the host name proves nothing"
        )


@dataclass(frozen=True)
class SourceURL:
    """A parsed postgres URL; `params` are libpq keywords, without the password.

    `tenant` marks a tenant's source (from `parse_source`): its connections get
    `TENANT_CONNECTION_PARAMETERS` and its tools `TENANT_TOOL_ENV`.
    """

    params: dict[str, str]
    password: str | None = field(default=None, repr=False)
    tenant: bool = False

    @classmethod
    def parse_source(cls, url: object) -> SourceURL:
        """A tenant's source URL: `parse`, then only `SOURCE_PARAMETERS` with checked
        values; sslmode defaults to require (verify-full with sslrootcert=system)."""
        parsed = cls.parse(url, default_sslmode=None)
        params = dict(parsed.params)
        _check_source_parameters({**params, **({"password": "-"} if parsed.password else {})})
        if "sslmode" not in params:
            params["sslmode"] = "verify-full" if params.get("sslrootcert") == "system" else "require"
        return cls(params=params, password=parsed.password, tenant=True)

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
        if "sslpassword" in params:
            # libpq tools take it only in their arguments, where anyone on the host sees it.
            raise InvalidSourceURL(
                "source_url parameter 'sslpassword' is not accepted: it cannot be passed to the "
                "PostgreSQL tools without showing it in their arguments"
            )
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

    def __repr__(self) -> str:
        return f"SourceURL({self.redacted()!r}, tenant={self.tenant})"

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
        return replace(self, params={**self.params, **changes})

    def libpq_params(self, **extra: str) -> dict[str, str]:
        """Every libpq keyword of a connection, password excluded: for a tenant's source
        with the file-less, keepalive parameters, `sslrootcert=system` (or a verify
        sslmode) as the system's CA bundle, any other root certificate as nothing."""
        merged = {key: value for key, value in {**self.params, **extra}.items() if key not in SECRET_PARAMETERS}
        if not self.tenant:
            return merged
        verify = merged.get("sslmode") in ("verify-ca", "verify-full")
        return {
            **merged,
            **TENANT_CONNECTION_PARAMETERS,
            # libpq 15 knows no "system": name the bundle. Without verification a root
            # file would turn sslmode=require into verify-ca, so then none is named.
            "sslrootcert": system_ca_bundle() if verify else NO_FILE,
        }

    def conninfo(self, **extra: str) -> str:
        """A libpq keyword string without the password (pass it via `env()`)."""
        merged = self.libpq_params(**extra)
        return " ".join(f"{key}={_quote_value(str(value))}" for key, value in merged.items())

    def env(self) -> dict[str, str]:
        """Environment for libpq tools: the password travels here, never in argv; for a
        tenant's source no password, service or configuration file of ours is read."""
        env = dict(TENANT_TOOL_ENV) if self.tenant else {}
        if self.password:
            env["PGPASSWORD"] = self.password
        elif self.tenant:
            env["PGPASSWORD"] = ""  # set, so an inherited PGPASSWORD of ours is not sent
        return env

    def connect_kwargs(self, **extra: str | int) -> dict[str, str | int]:
        """Keyword arguments for psycopg2.connect, password included."""
        kwargs: dict[str, str | int] = {**self.libpq_params(), **extra}
        if self.password:
            kwargs["password"] = self.password
        elif self.tenant:
            # Explicitly empty: libpq would otherwise take PGPASSWORD from our environment.
            kwargs["password"] = ""
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
            f"{key}={'***' if key in SECRET_PARAMETERS else quote(str(value), safe='')}"
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


# -- the address gate --------------------------------------------------------------------
#
# An explicit table, because `ipaddress.is_global` differs between Python versions (3.11
# calls 100.100.100.200's neighbours 192.0.0.9 and 192.88.99.1, fec0::/10, 2002::/16 and
# 3fff::/20 global). It is consulted first, for the reason it gives; `is_global` then
# refuses whatever else Python's registry knows to be special. Most specific first.

_REFUSED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a cloud metadata address (AWS, GCP, Azure, OpenStack instance metadata; in 169.254.0.0/16, link-local)"),
    ("169.254.170.2/32", "a cloud metadata address (AWS ECS task metadata; in 169.254.0.0/16, link-local)"),
    ("100.100.100.200/32", "a cloud metadata address (Alibaba Cloud instance metadata; in 100.64.0.0/10, carrier-grade NAT)"),
    ("168.63.129.16/32", "a cloud metadata address (Azure WireServer, 168.63.129.16/32)"),
    ("192.0.0.192/32", "a cloud metadata address (Oracle Cloud instance metadata; in 192.0.0.0/24)"),
    ("0.0.0.0/8", "a 'this network' address (0.0.0.0/8, RFC 1122), which reaches this host"),
    ("10.0.0.0/8", "a private address (10.0.0.0/8, RFC 1918)"),
    ("100.64.0.0/10", "a shared carrier-grade NAT address (100.64.0.0/10, RFC 6598), not reachable from the internet"),
    ("127.0.0.0/8", "a loopback address (127.0.0.0/8)"),
    ("169.254.0.0/16", "a link-local address (169.254.0.0/16, RFC 3927)"),
    ("172.16.0.0/12", "a private address (172.16.0.0/12, RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment address (192.0.0.0/24, RFC 6890)"),
    ("192.0.2.0/24", "a documentation address (192.0.2.0/24, RFC 5737)"),
    ("192.88.99.0/24", "a 6to4 relay anycast address (192.88.99.0/24, deprecated by RFC 7526)"),
    ("192.168.0.0/16", "a private address (192.168.0.0/16, RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15, RFC 2544)"),
    ("198.51.100.0/24", "a documentation address (198.51.100.0/24, RFC 5737)"),
    ("203.0.113.0/24", "a documentation address (203.0.113.0/24, RFC 5737)"),
    ("224.0.0.0/4", "a multicast address (224.0.0.0/4)"),
    ("240.0.0.0/4", "a reserved address (240.0.0.0/4, with the broadcast address)"),
    ("fd00:ec2::254/128", "a cloud metadata address (AWS instance metadata over IPv6; in fc00::/7, unique local)"),
    ("::/128", "the unspecified address (::)"),
    ("::1/128", "a loopback address (::1)"),
    ("64:ff9b:1::/48", "a local-use NAT64 address (64:ff9b:1::/48, RFC 8215), which translates into a private network"),
    ("100::/64", "a discard-only address (100::/64, RFC 6666)"),
    ("2001:db8::/32", "a documentation address (2001:db8::/32, RFC 3849)"),
    ("2001::/23", "an IETF protocol assignment address (2001::/23, RFC 2928)"),
    ("3fff::/20", "a documentation address (3fff::/20, RFC 9637)"),
    ("5f00::/16", "an SRv6 segment identifier (5f00::/16, RFC 9602)"),
    ("fc00::/7", "a unique local (private) address (fc00::/7, RFC 4193)"),
    ("fe80::/10", "a link-local address (fe80::/10)"),
    ("fec0::/10", "a site-local address (fec0::/10, deprecated by RFC 3879)"),
    ("ff00::/8", "a multicast address (ff00::/8)"),
)
_REFUSED = tuple((ipaddress.ip_network(net), why) for net, why in _REFUSED_NETWORKS)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _table_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for network, why in _REFUSED:
        if ip.version == network.version and ip in network:
            return why
    return None


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    problem = _table_problem(ip)
    if problem is None and not ip.is_global:
        problem = "not a globally routable address"
    return problem


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, list[tuple[str, ipaddress.IPv4Address]]] | None:
    """The IPv4 addresses an IPv6 form carries, by the form's name, or None."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address (::ffff:0:0/96)", [("", ip.ipv4_mapped)]
    if ip in _NAT64:
        return "a NAT64 address (64:ff9b::/96)", [("", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip.sixtofour is not None:
        return "a 6to4 address (2002::/16)", [("", ip.sixtofour)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return "a Teredo address (2001::/32)", [("server ", server), ("client ", client)]
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "an IPv4-compatible address (::/96)", [("", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    return None


def address_problem(address: str) -> str | None:
    """Why connecting to `address` is not allowed for a public source, or None.

    The answer names the range and why it is refused. IPv6 forms that carry an IPv4
    address (mapped, NAT64, 6to4, Teredo, IPv4-compatible) are judged by it; of them
    only mapped and NAT64 (64:ff9b::/96) addresses of a public IPv4 are allowed: 6to4
    and IPv4-compatible are deprecated, Teredo is a client tunnel, never a server's.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])  # the zone does not matter
    problem = _table_problem(ip) if ip in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")) else None
    if problem:
        return problem
    embedded = _embedded(ip)
    if embedded is not None:
        form, carried = embedded
        for role, v4 in carried:
            inner = _v4_problem(v4)
            if inner:
                return f"{form} of {role}{v4}, {inner}"
        if form.startswith("a 6to4"):
            return f"{form} of {carried[0][1]}; 6to4 is deprecated (RFC 7526): use the IPv4 address itself"
        if form.startswith("a Teredo"):
            return f"{form}, a client tunnel (RFC 4380), never a database server's address"
        if form.startswith("an IPv4-compatible"):
            return f"{form} of {carried[0][1]}, deprecated by RFC 4291: use the IPv4 address itself"
        return None
    problem = _table_problem(ip)
    if problem is None and ip not in _GLOBAL_UNICAST_V6:
        problem = "outside the IPv6 global unicast range (2000::/3)"
    if problem is None and not ip.is_global:
        problem = "not a globally routable address"
    return problem


def pin_address(source: SourceURL, *, allow_private: bool, resolver: Resolver = resolve) -> SourceURL:
    """Resolve the source host once, check every address, and pin the first as `hostaddr`.

    Pinning makes libpq connect to exactly the address that was checked, so a DNS
    answer that changes between check and connect (DNS rebinding) cannot redirect the
    connection; `host` stays for TLS verification and pg_hba matching. A name with
    any address that is not allowed is refused, whichever comes first: a public
    database has no business resolving to an internal address too.
    """
    addresses = resolver(source.host, source.port)
    if not addresses:
        raise SourceHostUnresolvable(f"the source host {source.host!r} does not resolve; check the host name")
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                among = f" (one of its addresses: {', '.join(addresses)})" if len(addresses) > 1 else ""
                raise SourceAddressNotAllowed(
                    f"the source host {source.host!r} resolves to {address}, {problem}{among}; "
                    "imports connect only to publicly reachable databases. Use the database's "
                    "public host name (an operator can allow private sources with "
                    "CAPY_ALLOW_PRIVATE_SOURCES=true)"
                )
    return source.with_params(hostaddr=addresses[0])
