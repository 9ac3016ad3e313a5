"""Hostile dumps: SQL a tenant could upload to take over a service session.

Shared by the privilege tests (in-process) and the hostile suite (over HTTP).
"""

from __future__ import annotations

PINNED = "-c search_path=pg_catalog,pg_temp -c role=none"

# Everything the dump defines records who ran it: its own roles in `hijack_log`. Any
# other role makes it raise, naming the role; a superuser also bumps a sequence first,
# which no rollback undoes. A read-only session cannot write, so there it raises too.
HIJACK_OBJECTS = """
CREATE TABLE public.hijack_log (
    current_role_name text, session_role_name text, is_superuser boolean, via text
);
CREATE SEQUENCE public.hijack_superuser_calls;
CREATE TABLE public.notes (id integer PRIMARY KEY, body text);
CREATE FUNCTION public.hijack_record(via text) RETURNS boolean
    LANGUAGE plpgsql SECURITY INVOKER AS $$
DECLARE
    su boolean;
BEGIN
    SELECT r.rolsuper INTO su FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user;
    IF pg_catalog.current_setting('transaction_read_only') OPERATOR(pg_catalog.=) 'on' THEN
        RAISE EXCEPTION 'hijacked: % ran as % (session %, superuser %)', via, current_user, session_user, su;
    END IF;
    IF su THEN
        PERFORM pg_catalog.nextval('public.hijack_superuser_calls'::pg_catalog.regclass);
    END IF;
    IF su OR NOT (current_user::text OPERATOR(pg_catalog.~~) 'capy\\_%') THEN
        RAISE EXCEPTION 'hijacked: % ran as % (session %, superuser %)', via, current_user, session_user, su;
    END IF;
    INSERT INTO public.hijack_log VALUES (current_user, session_user, su, via);
    RETURN true;
END $$;
CREATE FUNCTION public.hijack_not_like(a name, b name) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('!~~(name,name)');
    RETURN NOT (a::text OPERATOR(pg_catalog.~~) b::text);
END $$;
CREATE OPERATOR public.!~~ (LEFTARG = name, RIGHTARG = name, FUNCTION = public.hijack_not_like);
CREATE FUNCTION public.hijack_like(a name, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('~~(name,text)');
    RETURN a::text OPERATOR(pg_catalog.~~) b;
END $$;
CREATE OPERATOR public.~~ (LEFTARG = name, RIGHTARG = text, FUNCTION = public.hijack_like);
CREATE FUNCTION public.hijack_name_eq(a name, b name) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('=(name,name)');
    RETURN a::text OPERATOR(pg_catalog.=) b::text;
END $$;
CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = name, FUNCTION = public.hijack_name_eq);
CREATE FUNCTION public.hijack_name_ne(a name, b name) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('<>(name,name)');
    RETURN a::text OPERATOR(pg_catalog.<>) b::text;
END $$;
CREATE OPERATOR public.<> (LEFTARG = name, RIGHTARG = name, FUNCTION = public.hijack_name_ne);
CREATE FUNCTION public.hijack_count_step(state bigint) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('count(*)');
    RETURN state OPERATOR(pg_catalog.+) 1;
END $$;
CREATE AGGREGATE public.count(*) (SFUNC = public.hijack_count_step, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION public.format(fmt text, arg text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('format(text,text)');
    RETURN pg_catalog.format(fmt, arg);
END $$;
CREATE FUNCTION public.current_setting(name text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('current_setting(text)');
    RETURN pg_catalog.current_setting(name);
END $$;
CREATE FUNCTION public.quote_ident(name text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack_record('quote_ident(text)');
    RETURN pg_catalog.quote_ident(name);
END $$;
"""
# The dump does not know its database's name: it builds the statement at restore time.
SHADOW_PG_CATALOG = """
DO $$ BEGIN
    EXECUTE pg_catalog.format('ALTER DATABASE %I SET search_path = public, pg_catalog', pg_catalog.current_database());
END $$;
"""
PLAIN_HIJACK = (
    HIJACK_OBJECTS
    + "COPY public.notes (id, body) FROM stdin;\n1\tone\n2\ttwo\n3\tthree\n\\.\n"
    + SHADOW_PG_CATALOG
)
