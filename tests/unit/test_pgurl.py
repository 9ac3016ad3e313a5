import socket

import pytest

from stages.connections.addresses import SourceAddressNotAllowed, address_problem, pin_address, resolve
from stages.connections.pgurl import (
    NO_FILE,
    InvalidSourceURL,
    SourceURL,
    redact,
    system_ca_bundle,
    tool_environment,
)
from stages.errors import PermanentError
from stages.tools.commands import PgTools


def test_parse_keeps_password_apart_and_adds_sslmode():
    url = SourceURL.parse("postgres://alice:s%40cret@db.example.com:6432/shop")
    assert url.password == "s@cret"
    assert url.params == {
        "user": "alice",
        "host": "db.example.com",
        "port": "6432",
        "dbname": "shop",
        "sslmode": "require",
    }
    assert "s@cret" not in url.conninfo()
    assert url.env() == {"PGPASSWORD": "s@cret"}
    assert url.redacted() == "postgresql://alice:***@db.example.com:6432/shop?sslmode=require"


def test_parse_respects_explicit_sslmode_and_default_port():
    url = SourceURL.parse("postgresql://bob@db.example.com/app?sslmode=verify-full")
    assert url.params["sslmode"] == "verify-full"
    assert url.port == 5432


def test_url_round_trips_with_special_characters():
    url = SourceURL.parse("postgres://u:p%2Fa%3Fss%20w@h.example.com/d")
    again = SourceURL.parse(url.url())
    assert again.password == "p/a?ss w"
    assert again.params == url.params


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("mysql://u:p@h/db", "must start with postgres:// or postgresql://"),
        ("", "non-empty string"),
        (42, "non-empty string"),
        ("postgres://u:p@/db", "must name a host"),
        ("postgres://:p@h.example.com/db", "must name a user"),
        ("postgres://u:p@h.example.com", "must name a database"),
        ("postgres://u@h1.example.com,h2.example.com/db", "exactly one host"),
        ("postgres://u:p@h.example.com:99999/db", "invalid port"),
        ("postgres://u:p@[::1/db", "could not be parsed"),
        ("postgres://u@%2Fvar%2Frun%2Fpostgresql/db", "not a Unix socket"),
        ("postgres://u@%40abstract/db", "not a Unix socket"),
    ],
)
def test_parse_rejects_with_actionable_messages(raw, fragment):
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse(raw)
    assert fragment in info.value.message
    assert ":p@" not in info.value.message


def test_redact_masks_url_and_keyword_passwords_and_named_secrets():
    text = "failed: postgres://u:hunter2@h/db and password=hunter2 and 'hunter2'"
    out = redact(text, "hunter2")
    assert "hunter2" not in out
    assert "postgres://u:***@h/db" in out


LOOPBACK = "a loopback address (127.0.0.0/8)"
RFC1918_10 = "a private address (10.0.0.0/8, RFC 1918)"
CGNAT = "a shared carrier-grade NAT address (100.64.0.0/10, RFC 6598), not reachable from the internet"


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        # IPv4: every refused range, with its name and why
        ("0.0.0.0", "a 'this network' address (0.0.0.0/8, RFC 1122), which reaches this host"),
        ("10.1.2.3", RFC1918_10),
        ("100.64.0.1", CGNAT),
        ("100.127.255.254", CGNAT),
        (
            "100.100.100.200",
            "a cloud metadata address (Alibaba Cloud instance metadata; in 100.64.0.0/10, carrier-grade NAT)",
        ),
        ("127.0.0.1", LOOPBACK),
        ("127.8.9.10", LOOPBACK),
        (
            "169.254.169.254",
            "a cloud metadata address (AWS, GCP, Azure, OpenStack instance metadata; in 169.254.0.0/16, link-local)",
        ),
        ("169.254.170.2", "a cloud metadata address (AWS ECS task metadata; in 169.254.0.0/16, link-local)"),
        ("169.254.10.10", "a link-local address (169.254.0.0/16, RFC 3927)"),
        ("168.63.129.16", "a cloud metadata address (Azure WireServer, 168.63.129.16/32)"),
        ("172.16.5.4", "a private address (172.16.0.0/12, RFC 1918)"),
        ("192.0.0.9", "an IETF protocol assignment address (192.0.0.0/24, RFC 6890)"),
        ("192.0.0.192", "a cloud metadata address (Oracle Cloud instance metadata; in 192.0.0.0/24)"),
        ("192.0.2.1", "a documentation address (192.0.2.0/24, RFC 5737)"),
        ("192.88.99.1", "a 6to4 relay anycast address (192.88.99.0/24, deprecated by RFC 7526)"),
        ("192.168.0.10", "a private address (192.168.0.0/16, RFC 1918)"),
        ("198.18.0.1", "a benchmarking address (198.18.0.0/15, RFC 2544)"),
        ("198.51.100.7", "a documentation address (198.51.100.0/24, RFC 5737)"),
        ("203.0.113.7", "a documentation address (203.0.113.0/24, RFC 5737)"),
        ("224.0.0.1", "a multicast address (224.0.0.0/4)"),
        ("255.255.255.255", "a reserved address (240.0.0.0/4, with the broadcast address)"),
        # IPv6
        ("::", "the unspecified address (::)"),
        ("::1", "a loopback address (::1)"),
        (
            "fd00:ec2::254",
            "a cloud metadata address (AWS instance metadata over IPv6; in fc00::/7, unique local)",
        ),
        ("fd12:3456::1", "a unique local (private) address (fc00::/7, RFC 4193)"),
        ("fe80::1", "a link-local address (fe80::/10)"),
        ("fe80::1%eth0", "a link-local address (fe80::/10)"),
        ("fec0::1", "a site-local address (fec0::/10, deprecated by RFC 3879)"),
        ("ff02::1", "a multicast address (ff00::/8)"),
        ("100::1", "a discard-only address (100::/64, RFC 6666)"),
        ("2001:db8::1", "a documentation address (2001:db8::/32, RFC 3849)"),
        ("2001:2::1", "an IETF protocol assignment address (2001::/23, RFC 2928)"),
        ("3fff::1", "a documentation address (3fff::/20, RFC 9637)"),
        ("5f00::1", "an SRv6 segment identifier (5f00::/16, RFC 9602)"),
        ("4000::1", "outside the IPv6 global unicast range (2000::/3)"),
        (
            "64:ff9b:1::a00:1",
            "a local-use NAT64 address (64:ff9b:1::/48, RFC 8215), which translates into a private network",
        ),
        # IPv6 forms that carry an IPv4 address are judged by it
        ("::ffff:127.0.0.1", f"an IPv4-mapped address (::ffff:0:0/96) of 127.0.0.1, {LOOPBACK}"),
        (
            "::ffff:100.100.100.200",
            "an IPv4-mapped address (::ffff:0:0/96) of 100.100.100.200, a cloud metadata address (Alibaba Cloud instance metadata; in 100.64.0.0/10, carrier-grade NAT)",
        ),
        ("64:ff9b::10.0.0.1", f"a NAT64 address (64:ff9b::/96) of 10.0.0.1, {RFC1918_10}"),
        (
            "64:ff9b::169.254.169.254",
            "a NAT64 address (64:ff9b::/96) of 169.254.169.254, a cloud metadata address (AWS, GCP, Azure, OpenStack instance metadata; in 169.254.0.0/16, link-local)",
        ),
        ("2002:a00:1::1", f"a 6to4 address (2002::/16) of 10.0.0.1, {RFC1918_10}"),
        ("2002:6440:1::1", f"a 6to4 address (2002::/16) of 100.64.0.1, {CGNAT}"),
        (
            "2002:808:808::1",
            "a 6to4 address (2002::/16) of 8.8.8.8; 6to4 is deprecated (RFC 7526): use the IPv4 address itself",
        ),
        # Teredo: server 10.0.0.1 (bits 32-63); client = ~last 32 bits
        ("2001:0:a00:1::ffff:ffff", f"a Teredo address (2001::/32) of server 10.0.0.1, {RFC1918_10}"),
        ("2001:0:808:808::f5ff:fffe", f"a Teredo address (2001::/32) of client 10.0.0.1, {RFC1918_10}"),
        (
            "2001:0:808:808::f7f7:f7f7",
            "a Teredo address (2001::/32), a client tunnel (RFC 4380), never a database server's address",
        ),
        ("::10.0.0.1", f"an IPv4-compatible address (::/96) of 10.0.0.1, {RFC1918_10}"),
        (
            "::8.8.8.8",
            "an IPv4-compatible address (::/96) of 8.8.8.8, deprecated by RFC 4291: use the IPv4 address itself",
        ),
        # public addresses pass
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("93.184.216.34", None),
        ("2606:4700::1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::8.8.8.8", None),
    ],
)
def test_address_problem(address, problem):
    assert address_problem(address) == problem


def fixed(*addresses: str):
    """An injected resolver: nothing is looked up, nothing is connected to."""
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    "address",
    [
        "100.100.100.200",
        "100.64.0.1",
        "fec0::1",
        "2002:a00:1::1",
        "192.0.0.9",
        "192.88.99.1",
        "2001:0:a00:1::ffff:ffff",
        "64:ff9b::a00:1",
        "64:ff9b:1::1",
        "::ffff:10.0.0.1",
        "::10.0.0.1",
    ],
)
def test_pin_address_refuses_every_non_global_range(address):
    url = SourceURL.parse_source("postgres://u@db.invalid/d")
    with pytest.raises(SourceAddressNotAllowed) as info:
        pin_address(url, allow_private=False, resolver=fixed(address))
    message = info.value.message
    assert message.startswith(
        f"the source host 'db.invalid' resolves to {address}, {address_problem(address)};"
    )
    assert "/" in address_problem(address)  # the range is named


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_pin_address_pins_a_public_address(address):
    url = SourceURL.parse_source("postgres://u@db.invalid/d")
    pinned = pin_address(url, allow_private=False, resolver=fixed(address))
    assert pinned.params["hostaddr"] == address
    assert pinned.host == "db.invalid"
    assert pinned.tenant
    assert f"hostaddr='{address}'" in pinned.conninfo()


def test_pin_address_pins_the_first_address_when_all_are_public():
    url = SourceURL.parse("postgres://u@db.example.com/d")
    pinned = pin_address(url, allow_private=False, resolver=fixed("93.184.216.34", "2606:4700::1"))
    assert pinned.params["hostaddr"] == "93.184.216.34"
    assert pinned.host == "db.example.com"


def test_pin_address_refuses_a_name_with_any_address_not_allowed():
    url = SourceURL.parse("postgres://u@db.invalid/d")
    with pytest.raises(SourceAddressNotAllowed) as info:
        pin_address(url, allow_private=False, resolver=fixed("93.184.216.34", "10.0.0.1"))
    assert info.value.message.startswith(
        f"the source host 'db.invalid' resolves to 10.0.0.1, {RFC1918_10} "
        "(one of its addresses: 93.184.216.34, 10.0.0.1); imports connect only to publicly reachable databases."
    )
    allowed = pin_address(url, allow_private=True, resolver=fixed("93.184.216.34", "10.0.0.1"))
    assert allowed.params["hostaddr"] == "93.184.216.34"


def test_pin_address_refuses_private_unless_allowed():
    url = SourceURL.parse("postgres://u@internal.example.com/d")
    with pytest.raises(SourceAddressNotAllowed) as info:
        pin_address(url, allow_private=False, resolver=lambda host, port: ["10.0.0.7"])
    assert f"resolves to 10.0.0.7, {RFC1918_10}" in info.value.message
    assert "CAPY_ALLOW_PRIVATE_SOURCES" in info.value.message
    assert (
        pin_address(url, allow_private=True, resolver=lambda h, p: ["10.0.0.7"]).params["hostaddr"]
        == "10.0.0.7"
    )


def test_pin_address_unresolvable_host():
    def no_such_name(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    url = SourceURL.parse("postgres://u@nowhere.invalid/d")
    with pytest.raises(PermanentError) as info:
        pin_address(url, allow_private=False, resolver=lambda h, p: resolve(h, p, getaddrinfo=no_such_name))
    assert (
        info.value.message
        == "the source host 'nowhere.invalid' does not resolve (Name or service not known); check the host name"
    )


# -- what a tenant's URL may say -----------------------------------------------------------

SECRET = "Zq9-never-shown"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("passfile", "it names a password file on the service's host"),
        ("service", "it reads a connection service file on the service's host"),
        ("sslcert", "it names a file on the service's host"),
        ("sslkey", "it names a file on the service's host"),
        ("sslcrl", "it names a file on the service's host"),
        ("sslcrldir", "it names a file on the service's host"),
        ("sslpassword", "it cannot be passed to the PostgreSQL tools without showing it in their arguments"),
        ("sslcertmode", "client certificates are not supported"),
        ("hostaddr", "the service resolves the host itself and connects to the address it checked"),
        ("keepalives", "the service sets it itself"),
        ("keepalives_idle", "the service sets it itself"),
        ("keepalives_interval", "the service sets it itself"),
        ("keepalives_count", "the service sets it itself"),
        ("tcp_user_timeout", "the service sets it itself"),
        ("krbsrvname", "GSSAPI (Kerberos) authentication is not supported"),
        ("gsslib", "GSSAPI (Kerberos) authentication is not supported"),
        ("requirepeer", "it applies to Unix-domain sockets only"),
        ("replication", "an import reads the database, it does not replicate it"),
        ("target_session_attrs", "a source URL names one host"),
        ("load_balance_hosts", "a source URL names one host"),
        ("sslnegotiation", "the PostgreSQL 15 client tools that dump the source do not support it"),
        ("require_auth", "the PostgreSQL 15 client tools that dump the source do not support it"),
        ("client_encoding", "it is not one a source URL may set"),
        ("sslsni", "it is not one a source URL may set"),
    ],
)
def test_source_url_refuses_parameters_outside_the_allowlist(name, why):
    raw = f"postgres://app:pw@db.invalid/shop?sslmode=require&{name}={SECRET}"
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse_source(raw)
    message = info.value.message
    assert f"source_url parameter {name!r} is not accepted: {why}" in message
    assert SECRET not in message and ":pw@" not in message


def test_the_refusal_lists_what_a_source_url_may_set():
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse_source("postgres://app@db.invalid/shop?passfile=/root/.pgpass")
    assert info.value.message.endswith(
        "A source URL may set only sslmode, sslrootcert, ssl_min_protocol_version, channel_binding, "
        "gssencmode, connect_timeout, application_name, options"
    )
    assert "/root/.pgpass" not in info.value.message


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        (
            "sslrootcert=/etc/ssl/private/ca.pem",
            "source_url parameter sslrootcert must be one of system (verify",
        ),
        ("gssencmode=prefer", "source_url parameter gssencmode must be one of disable: GSSAPI encryption"),
        ("sslmode=sometimes", "source_url parameter sslmode must be one of disable, allow, prefer, require"),
        (
            "channel_binding=maybe",
            "source_url parameter channel_binding must be one of disable, prefer, require",
        ),
        ("connect_timeout=0", "connect_timeout must be a whole number of seconds above 0"),
        ("connect_timeout=ten", "connect_timeout must be a whole number of seconds above 0"),
        ("sslrootcert=system&sslmode=require", "sslrootcert=system needs sslmode=verify-full"),
    ],
)
def test_source_url_checks_the_values_it_accepts(query, fragment):
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse_source(f"postgres://app@db.invalid/shop?{query}")
    assert fragment in info.value.message
    assert "/etc/ssl/private" not in info.value.message


def test_source_url_accepts_the_allowlisted_parameters():
    url = SourceURL.parse_source(
        "postgres://app:pw@db.invalid:6543/shop?sslmode=verify-full&channel_binding=require"
        "&gssencmode=disable&connect_timeout=5&application_name=migrator&options=-c%20search_path%3Dapp"
        "&ssl_min_protocol_version=TLSv1.3&sslrootcert=system"
    )
    assert url.tenant
    assert url.params["options"] == "-c search_path=app"
    assert url.params["sslrootcert"] == "system"
    again = SourceURL.parse_source(url.url())
    assert again == url


def test_sslrootcert_system_defaults_to_verify_full_and_names_the_system_bundle():
    url = SourceURL.parse_source("postgres://app@db.invalid/shop?sslrootcert=system")
    assert url.params["sslmode"] == "verify-full"
    assert url.libpq_params()["sslrootcert"] == system_ca_bundle()
    assert system_ca_bundle().endswith((".crt", ".pem"))


def test_a_tenant_connection_reads_no_file_of_ours_and_has_keepalives():
    url = SourceURL.parse_source(f"postgres://app:{SECRET}@db.invalid/shop")
    params = url.libpq_params()
    assert params["sslmode"] == "require"
    assert params["passfile"] == NO_FILE
    for name in ("sslcert", "sslkey", "sslcrl", "sslcrldir"):
        assert params[name] == NO_FILE
    # With sslmode=require a root certificate file would turn it into verify-ca.
    assert params["sslrootcert"] == NO_FILE
    assert params["gssencmode"] == "disable"
    assert {
        k: params[k]
        for k in (
            "keepalives",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        )
    } == {
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "60000",
    }
    kwargs = url.connect_kwargs(connect_timeout=3)
    assert kwargs["password"] == SECRET and kwargs["passfile"] == NO_FILE and kwargs["connect_timeout"] == 3
    verified = SourceURL.parse_source("postgres://app@db.invalid/shop?sslmode=verify-ca")
    assert verified.libpq_params()["sslrootcert"] == system_ca_bundle()


def test_a_tenant_tool_env_names_no_file_of_ours():
    url = SourceURL.parse_source(f"postgres://app:{SECRET}@db.invalid/shop")
    assert url.env() == {
        "PGPASSWORD": SECRET,
        "PGPASSFILE": NO_FILE,
        "PGSERVICEFILE": NO_FILE,
        "PGSYSCONFDIR": NO_FILE,
    }
    # Without a password in the URL, the password is set empty: an inherited
    # PGPASSWORD (the operator's) must never be sent to a tenant's server.
    bare = SourceURL.parse_source("postgres://app@db.invalid/shop")
    assert bare.env()["PGPASSWORD"] == ""
    assert bare.connect_kwargs()["password"] == ""
    assert "password" not in SourceURL.parse("postgres://app@db.invalid/shop").connect_kwargs()


def test_tool_environment_drops_inherited_pg_variables():
    inherited = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "PGSERVICE": "ops",
        "PGHOST": "10.0.0.5",
        "PGSSLCERT": "/root/.postgresql/postgresql.crt",
        "PGPASSWORD": "operator-secret",
        "pgpassfile": "/root/.pgpass",
    }
    url = SourceURL.parse_source(f"postgres://app:{SECRET}@db.invalid/shop")
    env = tool_environment({"PGAPPNAME": "capy-imports", **url.env()}, base=inherited)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "PGAPPNAME": "capy-imports",
        "PGPASSWORD": SECRET,
        "PGPASSFILE": NO_FILE,
        "PGSERVICEFILE": NO_FILE,
        "PGSYSCONFDIR": NO_FILE,
    }


def test_cluster_admin_urls_keep_their_parameters():
    # Ours, not a tenant's: client certificates of the service's host are fine here.
    url = SourceURL.parse(
        "postgresql://capy_admin:pw@10.0.0.5:5432/postgres?sslcert=/etc/capy/admin.crt&sslkey=/etc/capy/admin.key",
        default_sslmode=None,
    )
    assert not url.tenant
    assert "sslmode" not in url.params
    assert url.libpq_params() == url.params
    assert url.env() == {"PGPASSWORD": "pw"}
    assert "sslcert='/etc/capy/admin.crt'" in url.conninfo()


def test_secrets_never_leave_a_source_url():
    url = SourceURL.parse_source(f"postgres://app:{SECRET}@db.invalid/shop")
    assert SECRET not in url.redacted() and SECRET not in repr(url) and SECRET not in url.conninfo()
    args = PgTools("/usr/lib/postgresql/15/bin").pg_dump.schema_args(
        url.conninfo(), "/tmp/out", snapshot="s", lock_wait_ms=1
    )
    assert not any(SECRET in arg for arg in args)
    assert url.url() == f"postgresql://app:{SECRET}@db.invalid:5432/shop?sslmode=require"
    # A URL built by hand (never parsed) that carries sslpassword still never shows it.
    built = SourceURL({**url.params, "sslpassword": "ssl-" + SECRET}, password=SECRET)
    for shown in (built.redacted(), repr(built), built.conninfo()):
        assert SECRET not in shown
    assert "sslpassword=***" in built.redacted()
    assert redact(f"sslpassword={SECRET} password={SECRET}") == "sslpassword=*** password=***"


def test_sslpassword_is_refused_even_in_an_admin_url():
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse(
            f"postgresql://capy_admin@10.0.0.5/postgres?sslpassword={SECRET}", default_sslmode=None
        )
    assert "'sslpassword' is not accepted" in info.value.message and SECRET not in info.value.message
