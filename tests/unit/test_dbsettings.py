"""Reading pg_dump's statements for a database's settings and comment."""

from stages.database.dbsettings import DatabaseProperties, Setting, parse

PG_DUMP_OUTPUT = """
--
-- Name: shop; Type: DATABASE PROPERTIES; Schema: -; Owner: postgres
--

ALTER DATABASE "my shop" SET work_mem TO '7MB';
ALTER DATABASE "my shop" SET search_path TO 'public', '$user', 'odd''s';
ALTER DATABASE "my shop" SET "myapp.flag" TO 'on';
ALTER ROLE "App Reader" IN DATABASE "my shop" SET statement_timeout TO '5s';

COMMENT ON DATABASE "my shop" IS 'the shop''s database
over two lines';
"""


def test_settings_roles_and_comment_are_read_as_values():
    properties = parse(PG_DUMP_OUTPUT)
    assert properties.settings == [
        Setting("work_mem", ["7MB"]),
        Setting("search_path", ["public", "$user", "odd's"]),
        Setting("myapp.flag", ["on"]),
        Setting("statement_timeout", ["5s"], "App Reader"),
    ]
    assert properties.comment == "the shop's database\nover two lines"
    assert properties.settings[1].shown == "search_path = public, $user, odd's"
    assert properties.settings[3].shown == "statement_timeout = 5s for role App Reader"


def test_properties_travel_as_job_facts():
    properties = parse(PG_DUMP_OUTPUT)
    assert DatabaseProperties.from_facts(properties.facts()) == properties
    assert DatabaseProperties.from_facts(None) == DatabaseProperties()


def test_nothing_to_read_is_empty():
    assert parse("SET statement_timeout = 0;\n") == DatabaseProperties()
