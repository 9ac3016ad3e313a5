"""Hostile review of foreign keys added in batches (stages.copy.engine.KEY_BATCH): the
keys of small tables into one table, up to 20 to a transaction and a round trip.

Whatever the keys look like, the preview must end with exactly the source's
constraints; a batch that fails leaves none of its keys and says which key failed.
"""

from __future__ import annotations

import subprocess

import psycopg2
import pytest

import stages.copy.engine as engine
from stages.errors import PermanentError
from tests.support import pg
from tests.support.copying import CopyRun, copied_as_source, source_url

CHILDREN = 45  # three batches of keys into public.parent at least


def _children_sql(count: int = CHILDREN) -> str:
    """`count` small tables c00… each with a key into public.parent, of every style."""
    out = []
    for i in range(count):
        name = f"c{i:02d}"
        style = i % 9
        if style == 0:
            out.append(f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int REFERENCES public.parent);")
        elif style == 1:
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int, "
                f"CONSTRAINT {name}_cascade FOREIGN KEY (p) REFERENCES public.parent ON DELETE CASCADE ON UPDATE CASCADE);"
            )
        elif style == 2:
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int, q text, "
                f"CONSTRAINT {name}_setnull FOREIGN KEY (p, q) REFERENCES public.parent (id, code) "
                "MATCH FULL ON DELETE SET NULL (p, q) DEFERRABLE INITIALLY DEFERRED);"
            )
        elif style == 3:
            # Two keys from one child into the same parent, one of them a composite.
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int REFERENCES public.parent, "
                f"p2 int, q text, FOREIGN KEY (p2, q) REFERENCES public.parent (id, code) DEFERRABLE);"
            )
        elif style == 4:
            # A child referencing two parents, one in another schema with an odd name.
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int REFERENCES public.parent ON DELETE RESTRICT, "
                f'o int REFERENCES "Other Schema"."Pärent ""Q"""(id) ON DELETE SET DEFAULT);'
            )
        elif style == 5:
            # Odd names everywhere: the table, its columns, the constraint; a comment on it.
            out.append(
                f'CREATE TABLE public."Kïd ""{i}"" Täble" (id int PRIMARY KEY, "Pa rent" int, '
                f'CONSTRAINT "fk ""{i}"" ü; DROP" FOREIGN KEY ("Pa rent") REFERENCES public.parent);'
                f'\nCOMMENT ON CONSTRAINT "fk ""{i}"" ü; DROP" ON public."Kïd ""{i}"" Täble" IS \'a comment; with ";\n"\';'
            )
            name = f'"Kïd ""{i}"" Täble"'
        elif style == 6:
            # NOT VALID, with a row it would refuse.
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int);"
                f"\nINSERT INTO public.{name} VALUES (0, 999999);"
                f"\nALTER TABLE public.{name} ADD CONSTRAINT {name}_notvalid FOREIGN KEY (p) REFERENCES public.parent NOT VALID;"
            )
        elif style == 7:
            # No index, no key of its own: only its statistics are built before its key.
            out.append(f"CREATE TABLE public.{name} (id int, p int REFERENCES public.parent);")
        else:
            out.append(
                f"CREATE TABLE public.{name} (id int PRIMARY KEY, p int, "
                f"CONSTRAINT {name}_fk FOREIGN KEY (p) REFERENCES public.parent (id) ON DELETE NO ACTION DEFERRABLE INITIALLY IMMEDIATE);"
            )
        if style != 6:
            cols = {
                2: "(id, p, q) SELECT g, 1 + g % 50, 'k' || (1 + g % 50)",
                3: "(id, p, p2, q) SELECT g, 1 + g % 50, 1 + g % 50, 'k' || (1 + g % 50)",
                4: "(id, p, o) SELECT g, 1 + g % 50, 1 + g % 5",
                5: "SELECT g, 1 + g % 50",
            }.get(style, "(id, p) SELECT g, 1 + g % 50")
            out.append(f"INSERT INTO public.{name} {cols} FROM generate_series(1, {10 + i}) g;")
    return "\n".join(out)


SCHEMA = '''
CREATE SCHEMA "Other Schema";
CREATE TABLE "Other Schema"."Pärent ""Q""" (id int PRIMARY KEY DEFAULT 1);
INSERT INTO "Other Schema"."Pärent ""Q""" SELECT g FROM generate_series(1, 5) g;
CREATE TABLE public.parent (id int PRIMARY KEY, code text NOT NULL, up int REFERENCES public.parent, UNIQUE (id, code));
INSERT INTO public.parent SELECT g, 'k' || g, NULLIF(g - 1, 0) FROM generate_series(1, 50) g;
-- A large child (its key stays alone) in the middle of the small ones.
CREATE TABLE public.large (id int PRIMARY KEY, p int REFERENCES public.parent, pad text);
INSERT INTO public.large SELECT g, 1 + g % 50, repeat('x', 200) FROM generate_series(1, 8000) g;
''' + _children_sql()

CONSTRAINTS = """
SELECT k.conrelid::regclass::text, k.conname, k.contype, pg_get_constraintdef(k.oid), k.convalidated,
       k.condeferrable, k.condeferred, obj_description(k.oid, 'pg_constraint')
FROM pg_constraint k
JOIN pg_namespace n ON n.oid = k.connamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND k.contype <> 'n'
ORDER BY 1, 2
"""

FOREIGN_KEYS = "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1, 2"


def constraints(dbname: str) -> list[tuple]:
    return pg.admin(CONSTRAINTS, dbname=dbname)


@pytest.fixture
def batches(monkeypatch) -> list[list[str]]:
    """Each key task as planned: its keys' entry names ("table constraint")."""
    seen: list[list[str]] = []
    original = engine._key_task

    def recording(batch, by_table, progress):
        seen.append([key.block.entry.name for key in batch])
        return original(batch, by_table, progress)

    monkeypatch.setattr(engine, "_key_task", recording)
    return seen


def _largest(batches: list[list[str]]) -> list[str]:
    return max(batches, key=len)


def test_every_kind_of_key_comes_out_exactly_as_the_source_has_it(scratch_db, tmp_path, batches):
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    pg.psql(source, text=SCHEMA)
    copied_as_source(source, target, tmp_path)
    assert constraints(target) == constraints(source)
    # The attack needs real batches: full ones, and the large table's key alone.
    assert len(_largest(batches)) == engine.KEY_BATCH, batches
    assert ["large large_p_fkey"] in batches, batches
    # Every key planned exactly once.
    names = [name for batch in batches for name in batch]
    assert len(names) == len(set(names)) == len(pg.admin(FOREIGN_KEYS, dbname=source))


def test_every_kind_of_key_unsliced_with_one_lane(scratch_db, tmp_path, batches):
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    pg.psql(source, text=SCHEMA)
    result = CopyRun(source_url(source), target, tmp_path, lanes=1).run()
    assert result.source_counts == result.target_counts
    assert constraints(target) == constraints(source)
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)


def _orphan_into(target: str, table: str) -> None:
    """The preview's `table` gains a row whose parent does not exist as its rows load."""
    pg.psql(
        target,
        text=f"""
CREATE FUNCTION public.orphan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.{table} (id, p) VALUES (100000, 99999); RETURN NULL; END $$;
CREATE TRIGGER orphan AFTER INSERT ON public.{table} FOR EACH ROW WHEN (NEW.id = 1)
    EXECUTE FUNCTION public.orphan();
""",
    )


PLAIN_CHILDREN = """
CREATE TABLE public.parent (id int PRIMARY KEY);
INSERT INTO public.parent SELECT g FROM generate_series(1, 50) g;
""" + "\n".join(
    f"CREATE TABLE public.k{i:02d} (id int PRIMARY KEY, p int REFERENCES public.parent);"
    f"\nINSERT INTO public.k{i:02d} SELECT g, 1 + g % 50 FROM generate_series(1, 20) g;"
    for i in range(30)
)


def test_one_violating_key_in_a_full_batch_fails_the_copy_names_it_and_leaves_none_of_the_batch(
    scratch_db, tmp_path, batches
):
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    pg.psql(source, text=PLAIN_CHILDREN)
    run = CopyRun(
        source_url(source), target, tmp_path, lanes=1, before_copy=lambda: _orphan_into(target, "k07")
    )
    with pytest.raises(PermanentError) as raised:
        run.run()
    message = str(raised.value)
    assert 'violates foreign key constraint "k07_p_fkey"' in message, message
    (failing,) = [batch for batch in batches if "k07 k07_p_fkey" in batch]
    assert len(failing) > 1, batches
    left = {f"{table} {name}" for table, name in pg.admin(FOREIGN_KEYS, dbname=target)}
    assert not left & set(failing), (left, failing)


def test_a_batch_chosen_to_break_a_deadlock_is_run_again_whole(scratch_db, tmp_path, batches):
    """The server refuses the batch's third key once, as a deadlock (40P01): the whole
    batch is rolled back and run again, every key of it added once."""
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    pg.psql(source, text=PLAIN_CHILDREN)

    def refuse_once() -> None:
        pg.psql(
            target,
            text="""
CREATE SEQUENCE public.refusals;
CREATE FUNCTION public.refuse() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()
               WHERE object_identity = 'public.k02')
       AND current_query() LIKE '%k02_p_fkey FOREIGN KEY%'
       AND nextval('public.refusals') = 1 THEN
        RAISE EXCEPTION 'staged deadlock' USING ERRCODE = '40P01';
    END IF;
END $$;
CREATE EVENT TRIGGER refuse ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION public.refuse();
""",
        )

    CopyRun(source_url(source), target, tmp_path, lanes=2, before_copy=refuse_once).run()
    # Refused once, then passed.
    assert pg.admin("SELECT last_value, is_called FROM public.refusals", dbname=target) == [(2, True)]
    (retried,) = [batch for batch in batches if "k02 k02_p_fkey" in batch]
    assert len(retried) > 1 and retried[0] != "k02 k02_p_fkey", retried  # k02 was not the first of its batch
    pg.psql(
        target,
        text="DROP EVENT TRIGGER refuse; DROP FUNCTION public.refuse(); DROP SEQUENCE public.refusals;",
    )
    assert constraints(target) == constraints(source)


def test_a_key_stuck_behind_a_lock_is_named_when_its_batch_is_stopped(
    scratch_db, tmp_path, batches, monkeypatch
):
    """Another session holds one child (k17) so that its key cannot be added; the
    statement timeout stops the batch. The message must say which key was stuck, as it
    did when each key was a task of its own ("creating foreign key k17 k17_p_fkey …")."""
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    # k17 without an index: nothing before its key conflicts with ROW EXCLUSIVE.
    pg.psql(source, text=PLAIN_CHILDREN.replace("public.k17 (id int PRIMARY KEY,", "public.k17 (id int,"))
    original = engine._open_lane_target
    monkeypatch.setattr(
        engine,
        "_open_lane_target",
        lambda open_, preamble, mem, _timeout: original(open_, preamble, mem, 3000),
    )
    holder: list[psycopg2.extensions.connection] = []

    def hold() -> None:
        conn = psycopg2.connect(pg.url_for(target))
        conn.cursor().execute("LOCK TABLE public.k17 IN ROW EXCLUSIVE MODE")
        holder.append(conn)

    try:
        run = CopyRun(source_url(source), target, tmp_path, lanes=2, before_copy=hold)
        with pytest.raises(PermanentError) as raised:
            run.run()
    finally:
        for conn in holder:
            conn.close()
    message = str(raised.value)
    assert "statement timeout" in message, message
    (stuck,) = [batch for batch in batches if "k17 k17_p_fkey" in batch]
    assert len(stuck) > 1, batches
    left = {f"{table} {name}" for table, name in pg.admin(FOREIGN_KEYS, dbname=target)}
    assert not left & set(stuck), (left, stuck)
    assert "k17" in message, message  # which of the batch's keys waited


def test_many_children_into_many_parents(scratch_db, tmp_path, batches):
    """600 small children, each with a key into one of 30 parents and one into a shared
    parent: keys in many chains, each child in two of them."""
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    parts = [
        "CREATE TABLE public.hub (id int PRIMARY KEY); INSERT INTO public.hub SELECT generate_series(1, 10);"
    ]
    for j in range(30):
        parts.append(
            f"CREATE TABLE public.p{j:02d} (id int PRIMARY KEY); INSERT INTO public.p{j:02d} VALUES (1), (2);"
        )
    for i in range(600):
        parts.append(
            f"CREATE TABLE public.m{i:03d} (id int PRIMARY KEY, h int REFERENCES public.hub, "
            f"x int REFERENCES public.p{i % 30:02d}, y int REFERENCES public.m{i:03d}); "
            f"CREATE INDEX ON public.m{i:03d} (h); CREATE INDEX ON public.m{i:03d} (x);"
            f"INSERT INTO public.m{i:03d} VALUES (1, 1, 1, NULL), (2, 2, 2, 1);"
        )
    pg.psql(source, text="\n".join(parts))
    copied_as_source(source, target, tmp_path, lanes=4)
    assert constraints(target) == constraints(source)
    assert sum(len(batch) for batch in batches) == 1800
    # Each child locks itself and 3 indexes for its key's check, hub 2: 15 keys a batch
    # (2 + 15 × 4 = 62), short of KEY_BATCH, within KEY_BATCH_LOCKS.
    assert len(_largest(batches)) == (engine.KEY_BATCH_LOCKS - 2) // 4 == 15


def test_an_uploaded_archive_with_every_kind_of_key(control_db, store, scratch_db, tmp_path, batches):
    from tests.support.imports import upload_and_import
    from tests.support.world import make_world

    source = scratch_db("capysrc_fkb")
    pg.psql(source, text=SCHEMA)
    path = tmp_path / "a.dump"
    subprocess.run(
        ["pg_dump", "-Fc", "-d", pg.url_for(source), f"--file={path}"], check=True, capture_output=True
    )
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, path.read_bytes(), recreate=True)
    assert job.state == "completed", job.error
    assert constraints(world.project.database_name) == constraints(source)
    assert len(_largest(batches)) == engine.KEY_BATCH, batches


def test_every_kind_of_key_with_the_schema_in_one_entry_slices(scratch_db, tmp_path, batches, monkeypatch):
    """The pre-data section in slices of one entry: a batch waits for the slices of all
    of its keys' tables, not only its first key's."""
    from tests.support.copying import in_small_slices

    in_small_slices(monkeypatch, first=1)
    source, target = scratch_db("capysrc_fkb"), scratch_db("capytgt_fkb")
    pg.psql(source, text=SCHEMA)
    copied_as_source(source, target, tmp_path, lanes=3)
    assert constraints(target) == constraints(source)
    assert len(_largest(batches)) == engine.KEY_BATCH, batches
