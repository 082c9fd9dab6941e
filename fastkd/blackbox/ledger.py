"""The SQLite store of a black-box teacher: cached answers, the budget ledger and the claims
of inputs being asked (shared by every client and process that uses the same file)."""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid

from .errors import QueryBudgetExceeded


class _Store:
    """SQLite store: cached answers and the budget ledger of one teacher identity."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS responses (teacher TEXT NOT NULL, key BLOB NOT NULL,
        kind TEXT NOT NULL, value BLOB NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (teacher, key));
    CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, teacher TEXT NOT NULL,
        n INTEGER NOT NULL, state TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
        created REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS claims (teacher TEXT NOT NULL, key BLOB NOT NULL, owner TEXT NOT NULL,
        pid INTEGER NOT NULL, host TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (teacher, key));
    """

    def __init__(self, path: str | None, teacher: str) -> None:
        self.path = path or ":memory:"
        self.teacher = teacher
        if path:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                  check_same_thread=False)
        if path:
            # Switching a new file to WAL needs a moment alone with it; SQLite answers "locked"
            # at once (no busy wait) to a client opening it at that moment: wait and retry.
            _when_unlocked(lambda: self.db.execute("PRAGMA journal_mode=WAL"))
            self.db.execute("PRAGMA synchronous=FULL")
        _when_unlocked(lambda: self.db.executescript(self.SCHEMA))
        self.lock = threading.RLock()
        self.host = socket.gethostname()
        self.owner = uuid.uuid4().hex  # claims of this object (threads and objects share a pid)
        with self.lock:
            self._begin()
            self._recover()
            self.db.execute("COMMIT")

    def _begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def _recover(self) -> None:
        """Settle reservations left by processes that died: sent -> paid, unsent -> dropped."""
        rows = self.db.execute("SELECT id, state, pid FROM ledger WHERE teacher=? AND host=? "
                               "AND state IN ('reserved', 'sent')", (self.teacher, self.host)).fetchall()
        for rid, state, pid in rows:
            if pid == os.getpid() or _pid_alive(pid):
                continue
            if state == "reserved":
                self.db.execute("DELETE FROM ledger WHERE id=?", (rid,))
            else:
                self.db.execute("UPDATE ledger SET state='paid' WHERE id=?", (rid,))
        for pid in {r[0] for r in self.db.execute("SELECT DISTINCT pid FROM claims WHERE teacher=? AND host=?",
                                                   (self.teacher, self.host))}:
            if pid != os.getpid() and not _pid_alive(pid):
                self.db.execute("DELETE FROM claims WHERE teacher=? AND host=? AND pid=?",
                                (self.teacher, self.host, pid))

    def claim(self, keys: list[bytes]) -> tuple[dict, list[bytes], list[bytes]]:
        """Atomically split uncached ``keys`` into (answers now in the cache, keys claimed
        here, keys claimed by another client that is asking for them)."""
        with self.lock:
            self._begin()
            try:
                self._recover()
                cached = self.lookup(keys)
                mine, theirs, now = [], [], time.time()
                for k in keys:
                    if k in cached:
                        continue
                    r = self.db.execute("SELECT owner FROM claims WHERE teacher=? AND key=?",
                                        (self.teacher, k)).fetchone()
                    if r is None:
                        self.db.execute("INSERT INTO claims (teacher, key, owner, pid, host, created) "
                                        "VALUES (?, ?, ?, ?, ?, ?)",
                                        (self.teacher, k, self.owner, os.getpid(), self.host, now))
                        mine.append(k)
                    elif r[0] == self.owner:
                        mine.append(k)
                    else:
                        theirs.append(k)
                self.db.execute("COMMIT")
                return cached, mine, theirs
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def unclaim(self, keys: list[bytes]) -> None:
        with self.lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                self.db.execute("DELETE FROM claims WHERE teacher=? AND owner=? AND key IN (%s)" % (
                    ",".join("?" * len(chunk))), (self.teacher, self.owner, *chunk))

    def claimed(self, keys: list[bytes]) -> set[bytes]:
        """The keys still claimed by another client."""
        out = set()
        with self.lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = "SELECT key FROM claims WHERE teacher=? AND owner<>? AND key IN (%s)" % (
                    ",".join("?" * len(chunk)))
                out.update(bytes(r[0]) for r in self.db.execute(q, (self.teacher, self.owner, *chunk)))
        return out

    def spent(self) -> int:
        with self.lock:
            r = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM ledger WHERE teacher=?",
                                (self.teacher,)).fetchone()
        return int(r[0])

    def paid(self) -> int:
        with self.lock:
            r = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM ledger WHERE teacher=? AND "
                                "state IN ('paid', 'sent')", (self.teacher,)).fetchone()
        return int(r[0])

    def reserve(self, sizes: list[int], budget: int | None, what: str) -> list[int]:
        """Atomically reserve one ledger row per size, or raise QueryBudgetExceeded."""
        with self.lock:
            self._begin()
            try:
                self._recover()
                spent = int(self.db.execute("SELECT COALESCE(SUM(n), 0) FROM ledger WHERE teacher=?",
                                            (self.teacher,)).fetchone()[0])
                need = sum(sizes)
                if budget is not None and spent + need > budget:
                    raise QueryBudgetExceeded(need, max(0, budget - spent), budget, what)
                ids = []
                now = time.time()
                for n in sizes:
                    cur = self.db.execute(
                        "INSERT INTO ledger (teacher, n, state, pid, host, created) "
                        "VALUES (?, ?, 'reserved', ?, ?, ?)", (self.teacher, n, os.getpid(), self.host, now))
                    ids.append(cur.lastrowid)
                self.db.execute("COMMIT")
                return ids
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def set_state(self, rid: int, state: str) -> None:
        with self.lock:
            self.db.execute("UPDATE ledger SET state=? WHERE id=?", (state, rid))

    def release(self, rid: int) -> None:
        with self.lock:
            self.db.execute("DELETE FROM ledger WHERE id=? AND state='reserved'", (rid,))

    def settle_paid(self, rid: int, rows: list[tuple[bytes, str, bytes]] | None) -> None:
        """Mark a reservation paid and store its answers, in one transaction."""
        with self.lock:
            self._begin()
            try:
                self.db.execute("UPDATE ledger SET state='paid' WHERE id=?", (rid,))
                if rows:
                    now = time.time()
                    self.db.executemany(
                        "INSERT OR REPLACE INTO responses (teacher, key, kind, value, created) "
                        "VALUES (?, ?, ?, ?, ?)", [(self.teacher, k, kind, v, now) for k, kind, v in rows])
                    self.db.executemany("DELETE FROM claims WHERE teacher=? AND key=?",
                                        [(self.teacher, k) for k, _, _ in rows])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def lookup(self, keys: list[bytes]) -> dict[bytes, tuple[str, bytes]]:
        out = {}
        with self.lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = "SELECT key, kind, value FROM responses WHERE teacher=? AND key IN (%s)" % (
                    ",".join("?" * len(chunk)))
                for k, kind, v in self.db.execute(q, (self.teacher, *chunk)):
                    out[bytes(k)] = (kind, bytes(v))
        return out

    def cached_count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM responses WHERE teacher=?",
                                       (self.teacher,)).fetchone()[0])

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _when_unlocked(fn, timeout: float = 60.0):
    """Run ``fn``, retrying while SQLite says the database is locked (up to ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(0.2, delay * 2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
