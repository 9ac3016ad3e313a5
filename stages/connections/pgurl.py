"""Postgres connection URLs: parsing, validation and redaction (the address gate is
`stages.connections.addresses`).

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

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote

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
# a peer that acknowledges but never answers is bounded by stages.connections.deadline instead.
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


def conninfo_passwords(text: str) -> list[str]:
    """Every part of `text`, a connection string libpq may fail to parse, that could be
    a password, as written: a URL's after the first ':' of its userinfo (up to the first
    '@', and up to the last, since an unencoded '@' or '/' moves where libpq ends it) and
    the value of every query parameter whose name, percent-decoded, ends in "password"
    (`pass%77ord=` is `password=` to libpq)."""
    found: list[str] = []
    _scheme, sep, rest = text.partition("://")
    if not sep:
        return found
    for end in (rest.find("@"), rest.rfind("@")):
        if end >= 0:
            _user, colon, password = rest[:end].partition(":")
            if colon and password and password not in found:
                found.append(password)
    for item in rest.partition("?")[2].split("&"):
        key, equals, value = item.partition("=")
        if equals and value and unquote(key).strip().lower().endswith("password"):
            found.append(value)
    return found


def redact_conninfo(text: str) -> str:
    """`text` (a connection string, or a message about one) as `redact` masks it, and
    with every part `conninfo_passwords` finds masked too, even in a string libpq cannot
    parse: a password holding a space, an invalid %-escape or an unencoded '/', or given
    as a %-encoded parameter name."""
    out = text
    for password in sorted(conninfo_passwords(text), key=len, reverse=True):
        out = out.replace(password, "***")
    return redact(out)


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


def tool_environment(
    env: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The full environment for a Postgres client tool: `base` (os.environ) without
    any inherited PG* variable (PGSERVICE, PGHOST, PGSSLCERT… would otherwise reach
    libpq), then `env`. For the tools' command runner, which merges os.environ today."""
    base = os.environ if base is None else base
    return {
        **{name: value for name, value in base.items() if not name.upper().startswith("PG")},
        **(env or {}),
    }


def _check_source_parameters(params: dict[str, str]) -> None:
    accepted = ", ".join(
        name for name in SOURCE_PARAMETERS if name not in ("host", "port", "dbname", "user", "password")
    )
    for name, value in params.items():
        if name not in SOURCE_PARAMETERS:
            why = _REFUSED_BECAUSE.get(name, "it is not one a source URL may set")
            raise InvalidSourceURL(
                f"source_url parameter {name!r} is not accepted: {why}. A source URL may set only {accepted}"
            )
        allowed = _ALLOWED_VALUES.get(name)
        if allowed and value not in allowed:
            hint = ""
            if name == "sslrootcert":
                hint = " (verify the server with the system's certificate authorities); a file path names a file on the service's host"
            elif name == "gssencmode":
                hint = ": GSSAPI encryption would use Kerberos credentials of the service's host"
            raise InvalidSourceURL(f"source_url parameter {name} must be one of {', '.join(allowed)}{hint}")
    timeout = params.get("connect_timeout")
    if timeout is not None and (not timeout.isdigit() or int(timeout) == 0):
        raise InvalidSourceURL(
            "source_url parameter connect_timeout must be a whole number of seconds above 0"
        )
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
        if params["host"].startswith(("/", "@")):  # "@name": libpq's abstract Unix socket
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
        merged = {
            key: value for key, value in {**self.params, **extra}.items() if key not in SECRET_PARAMETERS
        }
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
