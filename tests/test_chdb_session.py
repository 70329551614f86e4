"""Each thread's own chdb handle (sinks.chdb_session): the threads of a process run their
statements on one engine in parallel; switching paths still closes the old path's handles."""

from __future__ import annotations

import threading
from uuid import uuid4

from sinks.clickhouse import ClickHouse, close_chdb, to_table
from tests.test_clickhouse_insert import events


def running_in_background(client: ClickHouse, rows: int, answer: list, around: str = "{}") -> threading.Thread:
    """A thread running a statement that sleeps a second per row (chdb caps one block's sleep
    at 3 s) and puts its rows in answer, returned once this thread has seen it in
    system.processes: an answer this thread gets only if its statements are not queued behind
    that one. around is the statement, with {} where the sleeping SELECT goes (a subquery)."""
    tag = f"long-{uuid4().hex}"
    sleeping = f"SELECT sleepEachRow(1) FROM numbers({rows})"
    sql = f"{around.format(sleeping)} SETTINGS max_block_size = 1 /* {tag} */"
    thread = threading.Thread(target=lambda: answer.extend(client.rows(sql)))
    thread.start()
    while thread.is_alive():
        if client.rows(f"SELECT count() FROM system.processes "
                       f"WHERE query LIKE '%{tag}%' AND query_id != queryID()") == [(1,)]:
            return thread
    raise AssertionError("the statement ended before another thread saw it run: the threads took turns")


def test_a_long_statement_on_one_thread_holds_up_no_other_thread(tmp_path):
    client = ClickHouse(f"chdb://{tmp_path / 'db'}", "handles")
    try:
        client.migrate()
        answer: list = []
        long_running = running_in_background(client, 5, answer)
        client.insert("events", to_table(events(100)))
        assert client.rows("SELECT count() FROM handles.events FINAL") == [(100,)]
        assert long_running.is_alive()  # the insert and the read finished while it ran
        long_running.join()
        assert answer == [(0,)] * 5
    finally:
        close_chdb()


def test_another_path_closes_every_threads_handle_of_the_first_and_both_open_again(tmp_path):
    first, second = ClickHouse(f"chdb://{tmp_path / 'a'}"), ClickHouse(f"chdb://{tmp_path / 'b'}")
    opened, switched = threading.Event(), threading.Event()
    read_back: list = []

    def on_the_first_path() -> None:
        first.execute("CREATE TABLE default.t ENGINE = MergeTree ORDER BY v AS SELECT 1 AS v")
        opened.set()
        switched.wait()
        read_back.extend(first.rows("SELECT v FROM default.t"))  # a new handle: the old one was closed

    other = threading.Thread(target=on_the_first_path)
    try:
        other.start()
        assert opened.wait(60)
        # chdb refuses a second path while any handle of the first is open, the other thread's too
        second.execute("CREATE TABLE default.t ENGINE = MergeTree ORDER BY v AS SELECT 2 AS v")
        switched.set()
        other.join()
        assert read_back == [(1,)]
        assert second.rows("SELECT v FROM default.t") == [(2,)]
    finally:
        close_chdb()


def finishing_order_beside_a_slow_insert(client: ClickHouse, rows) -> list[str]:
    """An insert that a materialized view makes last 2 s on a thread of its own, and meanwhile
    an insert of rows into events on this one: the order the two finished in."""
    import pyarrow as pa

    database = client.database
    client.execute(f"CREATE TABLE {database}.slow (n UInt8) ENGINE = MergeTree ORDER BY n")
    client.execute(f"CREATE TABLE {database}.slow_sink (n UInt8, s UInt8) ENGINE = MergeTree ORDER BY n")
    client.execute(f"CREATE MATERIALIZED VIEW {database}.slow_view TO {database}.slow_sink "
                   f"AS SELECT n, sleepEachRow(1) AS s FROM {database}.slow")
    finished: list[str] = []

    def insert_slowly() -> None:
        client.insert("slow", pa.table({"n": pa.array([1, 2], pa.uint8())}))
        finished.append("slow")

    slow = threading.Thread(target=insert_slowly)
    slow.start()
    while client.rows(f"SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO {database}.slow %'") != [(1,)]:
        assert slow.is_alive()
    client.insert("events", rows)
    finished.append("events")
    slow.join()
    return finished


def test_inserts_of_a_process_take_turns(tmp_path):
    """Each insert's block is chdb's memory peak: a second thread's insert waits for the first."""
    client = ClickHouse(f"chdb://{tmp_path / 'db'}", "turns")
    try:
        client.migrate()
        finished = finishing_order_beside_a_slow_insert(client, to_table(events(10)))
    finally:
        close_chdb()
    assert finished == ["slow", "events"]
