"""The Postgres command-line tools (pg_dump, pg_restore, psql), run under deadlines and limits."""
