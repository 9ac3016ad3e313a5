"""Which copy runs alone (stages.copy.engine._head_alone): the head of the chain that
bounds the whole copy, when what the other lanes do beside it fits in the rest of that
chain; never a small table's, never on one lane, never when the work is spread evenly."""

from __future__ import annotations

from stages.copy.engine import ALONE_MIN_BYTES, INDEX_COST, _head_alone, _Planned
from stages.copy.scheduler import Task

MB = 1 << 20


def _planned(tables: dict[str, tuple[int, str]]) -> tuple[_Planned, dict[str, Task[None]]]:
    """Each table (name -> (bytes, index method)): its copy, then one index build."""
    copies: dict[int, Task[None]] = {}
    tasks: list[Task[None]] = []
    by_name: dict[str, Task[None]] = {}
    for oid, (name, (size, method)) in enumerate(tables.items()):
        copy = Task[None](f"copy {name}", size, lambda _l: None, frozenset({name}))
        index = Task[None](
            f"index on {name}", size * INDEX_COST[method], lambda _l: None, frozenset({name}), False, [copy]
        )
        copies[oid] = by_name[name] = copy
        tasks += [copy, index]
    return _Planned(tasks, copies, [t for t in tasks if t.name.startswith("index")], {}), by_name


def test_a_large_table_whose_trigram_index_bounds_the_copy_is_copied_alone():
    planned, copy = _planned(
        {"documents": (400 * MB, "gin"), "events": (700 * MB, "btree"), "accounts": (20 * MB, "btree")}
    )
    _head_alone(planned, [], lanes=2)
    assert copy["documents"].alone and not copy["events"].alone and not copy["accounts"].alone


def test_no_copy_runs_alone_when_the_work_is_spread_or_small_or_on_one_lane():
    even, copy = _planned({f"t{i}": (300 * MB, "btree") for i in range(6)})
    _head_alone(even, [], lanes=2)
    assert not any(task.alone for task in copy.values())

    small, copy = _planned({"documents": (ALONE_MIN_BYTES - 1, "gin"), "events": (ALONE_MIN_BYTES, "btree")})
    _head_alone(small, [], lanes=2)
    assert not any(task.alone for task in copy.values())

    one, copy = _planned({"documents": (400 * MB, "gin"), "events": (700 * MB, "btree")})
    _head_alone(one, [], lanes=1)
    assert not any(task.alone for task in copy.values())


def test_a_bounding_chain_with_more_beside_it_than_the_other_lanes_can_take_is_not_alone():
    # The trigram index bounds the copy on four lanes, but on two the rest outweighs it.
    tables = {"documents": (400 * MB, "gin"), **{f"t{i}": (700 * MB, "btree") for i in range(4)}}
    planned, copy = _planned(tables)
    _head_alone(planned, [], lanes=2)
    assert not copy["documents"].alone
    planned, copy = _planned(tables)
    _head_alone(planned, [], lanes=4)
    assert copy["documents"].alone
