"""SQLite storage: schema migrations, the single group-commit writer, readers.

One connection owns every write. Callers hand it rows and await the commit
that contains them; rows that arrive while a transaction is being written wait
for the next one, so a burst of concurrent requests shares a few commits. A
request is answered only after its row is committed, so a killed process
loses no acknowledged row. When a commit fails (disk full, read-only file)
the rows stay queued, in a bounded buffer, and are retried until they go in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

Row = tuple[str, Sequence[Any]]
"""One statement and its parameters."""


class SchemaError(Exception):
    """The database cannot be used by this version of probe-server."""


class Overloaded(Exception):
    """The write queue is full: the row was not accepted."""


class NotStored(Exception):
    """The row did not reach the database in time (it is still queued)."""


def migrations() -> list[tuple[int, str, str]]:
    """The schema scripts shipped in ``probe_server/schema``, in order."""
    found = []
    for entry in resources.files("probe_server.schema").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"schema scripts are not numbered 1..n: {versions}")
    return found


SCHEMA_VERSION = len(migrations())


def _pragmas(conn: sqlite3.Connection, synchronous: str) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout = 5000")


def _check_version(conn: sqlite3.Connection) -> int:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {current} is newer than this probe-server "
            f"understands ({SCHEMA_VERSION}); upgrade probe-server"
        )
    return current


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a database up to :data:`SCHEMA_VERSION`; returns the old version."""
    current = _check_version(conn)
    for version, name, script in migrations():
        if version <= current:
            continue
        log.info("event=migrate version=%d script=%s", version, name)
        # executescript commits first; the script runs as one transaction.
        conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    return current


def open_sync(path: Path, synchronous: str = "full") -> sqlite3.Connection:
    """A plain sqlite3 connection with the schema in place (CLI and tools)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Before anything is changed (WAL mode among them): a file that is
        # not a database, or one of a newer probe-server, is left as it was.
        _check_version(conn)
        _pragmas(conn, synchronous)
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


async def open_database(path: Path, synchronous: str = "full") -> aiosqlite.Connection:
    """Open (creating and migrating) the database for the writer."""
    # Migrations run once, before serving, on a plain connection in a thread.
    await asyncio.to_thread(lambda: open_sync(path, synchronous).close())
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        await conn.execute("PRAGMA busy_timeout = 5000")
    except BaseException:
        await conn.close()
        raise
    return conn


async def open_reader(path: Path) -> aiosqlite.Connection:
    """A read-only connection; WAL lets it read while the writer commits."""
    conn = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    await conn.execute("PRAGMA busy_timeout = 5000")
    conn.row_factory = aiosqlite.Row
    return conn


@dataclass
class WriterStats:
    """Counters exported as metrics and shown in logs."""

    commits: int = 0
    rows: int = 0
    errors: int = 0
    rejected: int = 0
    # Rows the database refused for what they hold (not for its own state):
    # answered NotStored and dropped, so that they cannot block the queue.
    bad_rows: int = 0
    dropped_at_close: int = 0
    last_error: str = ""
    commit_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


# Errors that come from the rows themselves (text that cannot be encoded, a
# value out of range, a violated constraint): retrying cannot help. Any other
# sqlite3.Error is about the database (disk full, read-only, locked) and the
# rows are kept and retried.
ROW_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    ValueError,  # UnicodeEncodeError among them
    OverflowError,
    TypeError,
)


class _Item:
    __slots__ = ("deadline", "future", "rows")

    def __init__(self, rows: Sequence[Row], future: asyncio.Future[None], deadline: float) -> None:
        self.rows = rows
        self.future = future
        self.deadline = deadline


class Writer:
    """The single writer: group commit over one aiosqlite connection."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        queue_limit: int = 50000,
        batch_max: int = 2000,
        commit_timeout: float = 5.0,
        retry_min: float = 0.05,
        retry_max: float = 2.0,
        observe_commit: Callable[[float], None] | None = None,
    ) -> None:
        self._conn = conn
        # Called with each successful commit's duration (the metrics histogram).
        self._observe_commit = observe_commit
        self._commit_timeout = commit_timeout
        self._queue_limit = queue_limit
        self._batch_max = batch_max
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._expired = 0  # leading items of _pending already answered NotStored
        self.stats = WriterStats()

    @property
    def queued_rows(self) -> int:
        return self._pending_rows

    @property
    def healthy(self) -> bool:
        """False while commits are failing (rows are being held back)."""
        return not self.stats.last_error

    @property
    def running(self) -> bool:
        """True while the writer task is alive (started, not finished or crashed)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sqlite-writer")
        self._task.add_done_callback(self._stopped)
        self._watchdog = asyncio.create_task(self._expire_late(), name="sqlite-writer-watchdog")

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        """Queue rows for the next commit; the future resolves once committed."""
        if self._closing:
            raise Overloaded("the writer is shutting down")
        if self._pending_rows + len(rows) > self._queue_limit:
            self.stats.rejected += len(rows)
            raise Overloaded(f"write queue full ({self._pending_rows} rows waiting)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append(_Item(rows, future, loop.time() + self._commit_timeout))
        self._pending_rows += len(rows)
        self._wake.set()
        return future

    async def write(self, rows: Sequence[Row]) -> None:
        """Queue rows and wait until they are committed.

        Raises :class:`Overloaded` when the queue is full and
        :class:`NotStored` when the commit has not happened within the
        writer's ``commit_timeout``; in the latter case the rows stay queued
        and are stored later.
        """
        await self.submit(rows)

    async def _expire_late(self) -> None:
        """Answer NotStored to rows waiting longer than commit_timeout.

        One periodic check instead of a timer per request: the queue is in
        submission order, so only its head needs looking at.
        """
        interval = min(1.0, self._commit_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = asyncio.get_running_loop().time()
            for index in range(self._expired, len(self._pending)):
                item = self._pending[index]
                if item.deadline > now:
                    break
                self._expired = index + 1
                if not item.future.done():
                    item.future.set_exception(NotStored(self.stats.last_error or "commit is slow"))
                    item.future.exception()  # nobody need be waiting any more

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        count = 0
        for item in self._pending:
            if batch and count + len(item.rows) > self._batch_max:
                break
            batch.append(item)
            count += len(item.rows)
        return batch

    async def _commit(self, batch: Iterable[_Item]) -> int:
        grouped: dict[str, list[Sequence[Any]]] = {}
        for item in batch:
            for sql, params in item.rows:
                grouped.setdefault(sql, []).append(params)
        conn = self._conn
        # One trip to aiosqlite's thread for the whole transaction rather
        # than one per statement: on one core each trip is two thread
        # switches, and at low concurrency they cost more than the fsync.
        run = getattr(conn, "_execute", None)
        if run is not None:
            return int(await run(self._commit_on_thread, conn, grouped))
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params_list in grouped.items():
                await conn.executemany(sql, params_list)
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
        return sum(len(p) for p in grouped.values())

    @staticmethod
    def _commit_on_thread(
        conn: aiosqlite.Connection, grouped: dict[str, list[Sequence[Any]]]
    ) -> int:
        """The transaction, run on the connection's own thread (aiosqlite's)."""
        raw: sqlite3.Connection = conn._conn
        raw.execute("BEGIN IMMEDIATE")
        try:
            for sql, params_list in grouped.items():
                raw.executemany(sql, params_list)
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise
        return sum(len(p) for p in grouped.values())

    async def _run(self) -> None:
        delay = self._retry_min
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            started = time.perf_counter()
            try:
                rows = await self._commit(batch)
            except ROW_ERRORS as e:
                await self._isolate(batch, e)
                continue
            except sqlite3.Error as e:
                self.stats.errors += 1
                if self.stats.last_error != str(e):
                    log.error(
                        "event=commit_failed error=%r queued_rows=%d", str(e), self._pending_rows
                    )
                self.stats.last_error = str(e)
                if self._closing and delay >= self._retry_max:
                    self._drop_all(str(e))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if self.stats.last_error:
                log.warning("event=commit_recovered queued_rows=%d", self._pending_rows)
                self.stats.last_error = ""
            delay = self._retry_min
            elapsed = time.perf_counter() - started
            self.stats.commit_seconds.append(elapsed)
            if self._observe_commit is not None:
                self._observe_commit(elapsed)
            self.stats.commits += 1
            self.stats.rows += rows
            for item in batch:
                self._done(item)

    def _done(self, item: _Item, error: Exception | None = None) -> None:
        """``item`` (the head of the queue) is stored, or refused for good."""
        popped = self._pending.popleft()
        assert popped is item
        self._pending_rows -= len(item.rows)
        self._expired = max(0, self._expired - 1)
        if item.future.done():
            return
        if error is None:
            item.future.set_result(None)
        else:
            item.future.set_exception(NotStored(f"the database refused the row: {error}"))
            item.future.exception()  # retrieved: nobody may be waiting any more

    async def _isolate(self, batch: list[_Item], error: Exception) -> None:
        """Commit ``batch`` item by item; drop only the items the database refuses.

        One request's rows must not stop everyone's: before this, a single
        User-Agent with a byte that is not UTF-8 stopped the writer for good.
        """
        log.error(
            "event=row_refused error=%r (committing the batch of %d requests one by one)",
            f"{type(error).__name__}: {error}",
            len(batch),
        )
        for item in batch:
            try:
                rows = await self._commit([item])
            except ROW_ERRORS as e:
                self.stats.bad_rows += len(item.rows)
                log.error(
                    "event=row_dropped error=%r rows=%d statements=%s",
                    f"{type(e).__name__}: {e}",
                    len(item.rows),
                    ",".join(sorted({sql.split("(")[0].strip() for sql, _ in item.rows})),
                )
                self._done(item, e)
                continue
            except sqlite3.Error:
                return  # the database itself: the main loop retries what is left
            self.stats.commits += 1
            self.stats.rows += rows
            self._done(item)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Never silent: every probe would wait for commit_timeout, then 503.
            log.critical(
                "event=writer_died error=%r queued_rows=%d",
                repr(task.exception()),
                self._pending_rows,
                exc_info=task.exception(),
            )

    def _drop_all(self, error: str) -> None:
        dropped = self._pending_rows
        self.stats.dropped_at_close += dropped
        log.error("event=rows_not_stored_at_shutdown rows=%d error=%r", dropped, error)
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(NotStored(error))
                item.future.exception()  # retrieved: nobody may be waiting any more
        self._pending_rows = 0
        self._expired = 0

    async def close(self) -> None:
        """Commit everything queued, then stop. Idempotent."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
