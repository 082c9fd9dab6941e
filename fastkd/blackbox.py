"""Black-box teachers: the only way fastkd's black-box methods (MEKD) reach a teacher.

:class:`BlackBoxTeacher` wraps either

* a local callable or ``nn.Module`` -- used strictly as a black box: called under
  ``torch.no_grad()`` on detached inputs, nothing but its outputs is read; or
* a remote model served with the Open Inference Protocol over HTTP (the KServe v2 REST
  protocol spoken by Triton Inference Server, KServe, Seldon MLServer and
  ``fastkd serve-teacher``): ``GET /v2/models/{name}`` for the metadata and
  ``POST /v2/models/{name}/infer`` with binary tensors when the server announces the
  binary tensor data extension (``GET /v2``), JSON tensors otherwise (codec: :mod:`fastkd.oip`).

and answers ``teacher(x) -> (N, C) float32``: the teacher's probabilities
(``response="soft"``) or the one-hot vector of its top-1 label (``response="hard"``).

Accounting. One query is one input sample. ``budget`` caps the queries *paid*; a call
whose uncached samples would exceed what is left raises :class:`QueryBudgetExceeded`
before anything is sent. Reservations are taken atomically (a lock in the process and
an ``IMMEDIATE`` SQLite transaction across processes) before every attempt, so the count
is exact under concurrent use. An attempt is counted as paid when the server answered it
(HTTP 200, even when the answer turns out malformed) or when its fate is unknown (a
timeout or a connection dropped after the request was sent); attempts that were refused
before sending, throttled (429) or failed with a server error (5xx) are not counted.

Cache. Answers are stored in SQLite, keyed by the SHA-256 of each sample's bytes
(float32, C order, with its shape), per teacher identity (URL + model name, or the local
``name``). With ``cache="file.sqlite"`` the answers *and the budget ledger* persist:
rerunning or resuming a run never pays twice for the same input, and the budget counts
every query paid by every run that used the file (a run killed while a request was in
flight counts that request as paid). Without a file the cache lives in memory.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import select
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from . import oip
from .oip import FLOAT_TYPES, INT_TYPES, format_floats

__all__ = ["BlackBoxTeacher", "RetryPolicy", "BlackBoxError", "QueryBudgetExceeded", "TeacherUnavailable",
           "TeacherResponseError", "TeacherRequestError", "TeacherInputError", "format_floats"]


class BlackBoxError(RuntimeError):
    """Base class of the errors raised while querying a black-box teacher."""


class QueryBudgetExceeded(BlackBoxError):
    """The uncached samples of a request need more queries than the budget has left."""

    def __init__(self, needed: int, remaining: int, budget: int, what: str = "request") -> None:
        self.needed, self.remaining, self.budget = needed, remaining, budget
        spent = budget - remaining
        super().__init__(
            f"query budget exceeded: this {what} needs {needed} paid queries but only {remaining} "
            f"of the budget of {budget} are left ({spent} already spent); nothing was sent. Answers "
            f"already paid for are kept in the cache and are free on a rerun; this {what} needs a "
            f"budget of at least {spent + needed}, or plan fewer new queries "
            f"(BlackBoxTeacher.affordable() says how many of a batch fit).")


class TeacherUnavailable(BlackBoxError):
    """The teacher did not answer within the retries (connection errors, timeouts, 5xx, 429)."""


class TeacherResponseError(BlackBoxError):
    """The teacher kept answering with malformed or wrong-shaped responses."""


class TeacherRequestError(BlackBoxError):
    """The server rejected the request (HTTP 4xx other than 429); retrying cannot help."""


class TeacherInputError(ValueError):
    """The inputs do not match what the teacher accepts (checked before the first paid query)."""


class _Malformed(Exception):
    pass


class _Attempt(Exception):
    """An attempt that failed; ``billed`` says whether it counts as a paid query."""

    def __init__(self, kind: str, message: str, billed: bool, retry: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.billed, self.retry, self.retry_after = kind, billed, retry, retry_after


# ----------------------------------------------------------------------------- ledger + cache
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
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(self.SCHEMA)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- transports
class _LocalTransport:
    def __init__(self, fn: Callable, outputs: str) -> None:
        self.fn = fn
        self.outputs = outputs

    def metadata(self):
        return None

    def infer(self, x: np.ndarray, timeout: float):
        xt = torch.from_numpy(x)
        dev = None
        if isinstance(self.fn, torch.nn.Module):
            p = next(iter(self.fn.parameters()), None)
            dev = p.device if p is not None else None
        if dev is not None:
            xt = xt.to(dev)
        with torch.no_grad():
            out = self.fn(xt)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = torch.as_tensor(out).detach().float().cpu().numpy()
        return out, "FP32", 0, 0


class _HTTPTransport:
    """Open Inference Protocol (KServe v2) over HTTP/1.1, one keep-alive connection per thread."""

    KEEPALIVE_S = 2.0  # reuse a connection only while the server surely keeps it open

    def __init__(self, url: str, model_name: str | None, model_version: str | None,
                 headers: dict | None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"BlackBoxTeacher: url must look like http://host:port[/v2/models/NAME], got {url!r}")
        path = u.path.rstrip("/")
        if "/v2/models/" in path:
            prefix, rest = path.split("/v2/models/", 1)
            parts = rest.split("/")
            model_name = model_name or parts[0]
            if len(parts) >= 3 and parts[1] == "versions":
                model_version = model_version or parts[2]
            path = prefix
        if not model_name:
            raise ValueError("BlackBoxTeacher: no model name: pass model_name= or a url ending in "
                             f"/v2/models/NAME, got url={url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.base = path
        self.model = model_name
        self.version = model_version
        self.headers = dict(headers or {})
        self._local = threading.local()
        mp = f"{self.base}/v2/models/{urllib.parse.quote(model_name)}"
        if model_version:
            mp += f"/versions/{urllib.parse.quote(str(model_version))}"
        self.model_path = mp
        self.identity = f"{self.scheme}://{self.host}:{self.port}{mp}"

    def _conn(self, timeout: float, fresh: bool = False):
        c = getattr(self._local, "conn", None)
        last = getattr(self._local, "last", 0.0)
        if c is not None and (fresh or time.monotonic() - last > self.KEEPALIVE_S or _dropped(c)):
            c.close()
            c = None
        if c is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            c = cls(self.host, self.port, timeout=timeout)
            self._local.conn = c
        c.timeout = timeout
        if c.sock is not None:
            c.sock.settimeout(timeout)
        return c

    def _drop(self):
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
        self._local.conn = None

    def request(self, method: str, path: str, body: bytes | None, timeout: float, extra: dict | None = None):
        """One HTTP exchange -> (status, headers, body, bytes_sent, bytes_received).

        Raises _Attempt classified by whether the request may have reached the model."""
        hdrs = {"Accept": "application/json", **self.headers}
        if body is not None:
            hdrs["Content-Type"] = "application/json"
            hdrs.update(extra or {})
        c = self._conn(timeout)
        sent_head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()) + f"Content-Length: {len(body or b'')}\r\n\r\n"
        sent = len(sent_head.encode()) + len(body or b"")
        try:
            if c.sock is None:
                c.connect()
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise _Attempt("connection", f"cannot connect to {self.host}:{self.port}: {e}", billed=False)
        try:
            c.request(method, path, body=body, headers=hdrs)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            # the request may be partly delivered: its fate is unknown
            raise _Attempt("connection", f"sending to {self.host}:{self.port} failed: {e}", billed=True)
        try:
            resp = c.getresponse()
            data = resp.read()
        except socket.timeout as e:
            self._drop()
            raise _Attempt("timeout", f"no answer from {self.host}:{self.port} within {timeout:g} s ({e})",
                           billed=True)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise _Attempt("connection", f"connection to {self.host}:{self.port} lost before the answer "
                           f"({type(e).__name__}: {e})", billed=True)
        self._local.last = time.monotonic()
        if resp.will_close:
            self._drop()
        head = sum(len(k) + len(v) + 4 for k, v in resp.getheaders()) + 17
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, sent, head + len(data)

    def extensions(self, timeout: float = 30.0) -> list:
        """The protocol extensions the server announces in ``GET /v2`` (``[]`` if it says none)."""
        status, _, data, _, _ = self.request("GET", f"{self.base}/v2", None, timeout)
        if status == 429 or status >= 500:
            raise _Attempt("server", f"GET {self.base}/v2 answered HTTP {status}: {_error_text(data)}", billed=False)
        try:
            ext = json.loads(data).get("extensions") if status == 200 else None
        except (ValueError, AttributeError):
            ext = None
        return [str(e) for e in ext] if isinstance(ext, list) else []

    def metadata(self, timeout: float = 30.0):
        status, _, data, _, _ = self.request("GET", self.model_path, None, timeout)
        if status == 429 or status >= 500:
            raise _Attempt("server", f"GET {self.identity} answered HTTP {status}: {_error_text(data)}",
                           billed=False)
        if status != 200:
            raise TeacherRequestError(f"GET {self.identity} answered HTTP {status}: {_error_text(data)}")
        try:
            meta = json.loads(data)
        except ValueError:
            raise TeacherResponseError(f"GET {self.identity}: the model metadata is not JSON: {data[:200]!r}")
        if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list):
            raise TeacherResponseError(f"GET {self.identity}: the model metadata has no 'inputs' list: {meta!r:.300}")
        return meta


def _dropped(conn) -> bool:
    """True when the server has closed a kept-alive connection (readable at EOF)."""
    if conn.sock is None:
        return False
    try:
        r, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


def _error_text(data: bytes) -> str:
    try:
        j = json.loads(data)
        if isinstance(j, dict) and "error" in j:
            return str(j["error"])
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace")


# ----------------------------------------------------------------------------- retry policy
class RetryPolicy:
    """How many further attempts a failed request gets and how long to wait before each:
    ``backoff * 2**k`` seconds (capped at ``backoff_max``) with jitter in [50%, 100%], at
    least a server's ``Retry-After`` (also capped). ``sleep`` and ``random`` are injectable,
    so retry behaviour is tested without waiting or a live server."""

    def __init__(self, retries: int = 5, backoff: float = 0.5, backoff_max: float = 30.0, *,
                 sleep: Callable[[float], None] = time.sleep, random: Callable[[], float] = random.random) -> None:
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"RetryPolicy: retries must be an int >= 0, got {retries!r}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError(f"RetryPolicy: backoff and backoff_max must be >= 0, got {backoff!r}, {backoff_max!r}")
        self.retries, self.backoff, self.backoff_max = retries, backoff, backoff_max
        self.sleep, self.random = sleep, random

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        d = min(self.backoff_max, self.backoff * (2 ** attempt)) * (0.5 + self.random() / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max))
        return d

    def wait(self, attempt: int, retry_after: float | None = None) -> None:
        self.sleep(self.delay(attempt, retry_after))


# ----------------------------------------------------------------------------- the teacher
class BlackBoxTeacher:
    """A teacher reached only through its answers, with a query budget and a response cache.

    Args:
        model: a local callable or ``nn.Module`` (mutually exclusive with ``url``). It is
            called under ``torch.no_grad()`` on detached inputs; nothing else is read.
        url: base URL of an Open Inference Protocol server (``http://127.0.0.1:8000``) or
            the model's URL (``http://host:port/v2/models/NAME``).
        model_name, model_version: the served model (if not in the URL).
        response: ``"soft"`` gives the teacher's probabilities, ``"hard"`` the one-hot of its
            top-1 label.
        budget: maximum paid queries (one query = one input sample); ``None`` = unlimited.
            With a cache file it covers every run that used that file.
        max_batch: at most this many samples per HTTP request (or local call).
        timeout: seconds to wait for one answer.
        retries: further attempts after a failed one (connection error, timeout, HTTP 5xx or
            429, malformed answer); waits ``backoff * 2**k`` seconds (capped at
            ``backoff_max``, with jitter; a 429/503 ``Retry-After`` header is honoured).
        cache: path of the SQLite cache + ledger file; ``None`` keeps both in memory;
            ``False`` disables answer caching (the budget is still kept).
        outputs: how to read the teacher's output: ``"auto"`` (integer tensors are labels,
            float rows that are distributions are probabilities, other float rows logits),
            ``"probs"``, ``"logits"`` or ``"labels"``. Local modules default to logits.
        num_classes: C; read from the metadata or the first answer when not given (needed
            up front for a server that answers with labels only, unless its metadata says).
        input_name, output_name: tensor names (default: the metadata's first input / output).
        workers: concurrent requests for one large call.
        name: identity of a local teacher in the cache (default ``"local:<class name>"``).
        headers: extra HTTP headers on every request (e.g. ``{"Authorization": "Bearer TOKEN"}``).
        binary: send inputs and ask for float outputs as binary tensor data (the protocol's
            binary tensor data extension: raw bytes, about 3x fewer than JSON floats; integer
            labels still come as JSON, whose digits are smaller than 8-byte INT64); ``None``
            (default) uses it when the server lists ``binary_tensor_data`` in the
            ``extensions`` of ``GET /v2`` and JSON otherwise. Bytes are counted either way.
        retry_policy: a :class:`RetryPolicy` (replaces ``retries``, ``backoff`` and
            ``backoff_max``; its ``sleep`` can be a fake clock in tests).
        verbose: print a line when an attempt fails and is retried.
    """

    def __init__(self, model: Callable | None = None, *, url: str | None = None,
                 model_name: str | None = None, model_version: str | None = None,
                 response: str = "soft", budget: int | None = None, max_batch: int = 256,
                 timeout: float = 30.0, retries: int = 5, backoff: float = 0.5,
                 backoff_max: float = 30.0, cache: str | os.PathLike | None | bool = None,
                 outputs: str = "auto", num_classes: int | None = None,
                 input_name: str | None = None, output_name: str | None = None,
                 workers: int = 1, name: str | None = None, headers: dict | None = None,
                 binary: bool | None = None, retry_policy: "RetryPolicy | None" = None,
                 verbose: bool = False) -> None:
        if (model is None) == (url is None):
            raise ValueError("BlackBoxTeacher: give exactly one of model= (a local callable) or url=, "
                             f"got model={type(model).__name__}, url={url!r}")
        if model is not None and not callable(model):
            raise TypeError(f"BlackBoxTeacher: model must be callable, got {type(model).__name__}")
        if response not in ("soft", "hard"):
            raise ValueError(f"BlackBoxTeacher: response must be 'soft' or 'hard', got {response!r}")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"BlackBoxTeacher: budget must be None or an int >= 0, got {budget!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"BlackBoxTeacher: max_batch must be an int >= 1, got {max_batch!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"BlackBoxTeacher: timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"BlackBoxTeacher: retries must be an int >= 0, got {retries!r}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError(f"BlackBoxTeacher: backoff and backoff_max must be >= 0, got {backoff!r}, {backoff_max!r}")
        if outputs not in ("auto", "probs", "logits", "labels"):
            raise ValueError(f"BlackBoxTeacher: outputs must be 'auto', 'probs', 'logits' or 'labels', got {outputs!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"BlackBoxTeacher: num_classes must be an int >= 2, got {num_classes!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"BlackBoxTeacher: workers must be an int >= 1, got {workers!r}")
        self.response, self.budget, self.max_batch = response, budget, max_batch
        if retry_policy is None:
            retry_policy = RetryPolicy(retries, backoff, backoff_max)
        elif not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"BlackBoxTeacher: retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        self.retry_policy = retry_policy
        self.timeout = float(timeout)
        self.retries, self.backoff, self.backoff_max = retry_policy.retries, retry_policy.backoff, retry_policy.backoff_max
        self.outputs, self.num_classes = outputs, num_classes
        self.input_name, self.output_name = input_name, output_name
        self.workers, self.verbose = workers, verbose
        if binary not in (None, True, False):
            raise ValueError(f"BlackBoxTeacher: binary must be None (ask the server), True or False, got {binary!r}")
        self.binary = binary
        if model is not None:
            self._t = _LocalTransport(model, outputs)
            self.identity = name or f"local:{type(model).__name__}"
            self.remote = False
            if outputs == "auto" and isinstance(model, torch.nn.Module):
                self.outputs = "logits"
        else:
            self._t = _HTTPTransport(str(url), model_name, model_version, headers)
            self.identity = name or self._t.identity
            self.remote = True
        self.cache_path = None if cache in (None, False) else os.fspath(cache)
        self._use_cache = cache is not False
        self._store = _Store(self.cache_path, self.identity)
        self._lock = threading.Lock()
        self._checked_shape: tuple | None = None
        self._meta: dict | None = None
        self._input_dtype = "FP32"
        self._out_is_int: bool | None = None
        self._stats = dict(queries_paid=0, cache_hits=0, answers_shared=0, requests=0, retries=0,
                           failed_attempts=0, bytes_sent=0, bytes_received=0)

    # ------------------------------------------------------------------ public API
    @property
    def url(self) -> str | None:
        return self._t.identity if self.remote else None

    def stats(self) -> dict:
        """Counters of this object plus the ledger totals of the cache file."""
        with self._lock:
            s = dict(self._stats)
        spent = self._store.spent()
        s.update(queries_paid_total=self._store.paid(), queries_reserved_total=spent,
                 budget=self.budget,
                 budget_left=None if self.budget is None else max(0, self.budget - spent),
                 cached_answers=self._store.cached_count() if self._use_cache else 0,
                 cache=self.cache_path, teacher=self.identity, response=self.response)
        return s

    @property
    def budget_left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self._store.spent())

    def metadata(self) -> dict | None:
        """The remote model's metadata (``None`` for a local teacher); not a paid query."""
        if not self.remote:
            return None
        if self._meta is None:
            self._meta = self._with_retries_free(lambda: self._t.metadata(self.timeout))
        return self._meta

    def close(self) -> None:
        self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, x) -> torch.Tensor:
        """Answers for a batch ``x`` (N, ...): float32 (N, C) probabilities or one-hots."""
        return self.query(x)

    def query(self, x) -> torch.Tensor:
        arr, device = self._as_array(x)
        n = arr.shape[0]
        self._check_inputs(arr.shape[1:])
        keys = [self._key(arr[i]) for i in range(n)]
        answers: dict[bytes, tuple[str, np.ndarray]] = {}
        if self._use_cache and n:
            for k, (kind, v) in self._store.lookup(list(dict.fromkeys(keys))).items():
                answers[k] = (kind, np.frombuffer(v, dtype=np.float32))
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in answers and k not in seen:
                seen.add(k)
                todo.append(i)
        with self._lock:
            self._stats["cache_hits"] += n - len(todo)
        if todo:
            self._fetch(arr, keys, todo, answers)
        return self._assemble(keys, answers, device)

    # ------------------------------------------------------------------ internals
    def _as_array(self, x):
        device = None
        if isinstance(x, torch.Tensor):
            device = x.device
            if not x.is_floating_point():
                raise TeacherInputError(f"BlackBoxTeacher: x must be a float tensor, got dtype {x.dtype}")
            arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        elif isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TeacherInputError(f"BlackBoxTeacher: x must be a float array, got dtype {x.dtype}")
            arr = np.ascontiguousarray(x, dtype=np.float32)
        else:
            raise TypeError(f"BlackBoxTeacher: x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if arr.ndim < 2:
            raise TeacherInputError(f"BlackBoxTeacher: x must have a batch dimension, (N, ...), got shape {tuple(arr.shape)}")
        if arr.size and not np.isfinite(arr).all():
            raise TeacherInputError("BlackBoxTeacher: x contains NaN or Inf")
        return arr, device

    def _key(self, sample: np.ndarray) -> bytes:
        h = hashlib.sha256(repr(tuple(sample.shape)).encode())
        h.update(sample.tobytes())
        return h.digest()

    def _check_inputs(self, sample_shape: tuple) -> None:
        """Check the sample shape against the model metadata, before the first paid query."""
        if self._checked_shape == tuple(sample_shape):
            return
        if self.remote:
            meta = self.metadata()
            ins = meta.get("inputs") or []
            spec = None
            if self.input_name:
                spec = next((i for i in ins if i.get("name") == self.input_name), None)
                if spec is None:
                    raise TeacherInputError(f"BlackBoxTeacher: the model has no input named {self.input_name!r}; "
                                            f"its inputs are {[i.get('name') for i in ins]}")
            elif len(ins) != 1:
                raise TeacherInputError(f"BlackBoxTeacher: the model has {len(ins)} inputs "
                                        f"{[i.get('name') for i in ins]}; pass input_name=")
            else:
                spec = ins[0]
            shape = list(spec.get("shape") or [])
            dt = spec.get("datatype", "FP32")
            if dt not in FLOAT_TYPES:
                raise TeacherInputError(f"BlackBoxTeacher: the model's input {spec.get('name')!r} takes "
                                        f"{dt}; only float inputs (FP16/FP32/FP64) are supported")
            want = shape[1:] if len(shape) == len(sample_shape) + 1 else None
            if want is None or any(int(w) not in (-1, int(g)) for w, g in zip(want, sample_shape)):
                raise TeacherInputError(
                    f"BlackBoxTeacher: inputs of shape (N, {', '.join(map(str, sample_shape))}) do not match "
                    f"the model's input {spec.get('name')!r} of shape {shape} (-1 = any); nothing was sent")
            self.input_name = spec.get("name")
            self._input_dtype = dt
            outs = meta.get("outputs") or []
            if self.output_name:
                ospec = next((o for o in outs if o.get("name") == self.output_name), None)
                if ospec is None:
                    raise TeacherInputError(f"BlackBoxTeacher: the model has no output named {self.output_name!r}; "
                                            f"its outputs are {[o.get('name') for o in outs]}")
            else:
                ospec = outs[0] if outs else None
                if ospec is not None:
                    self.output_name = ospec.get("name")
            if ospec is not None:
                self._out_is_int = ospec.get("datatype") in INT_TYPES
                oshape = ospec.get("shape") or []
                params = ospec.get("parameters") or {}
                meta_c = params.get("num_classes") or (meta.get("parameters") or {}).get("num_classes")
                if not self._out_is_int and len(oshape) >= 2 and int(oshape[-1]) > 1:
                    meta_c = int(oshape[-1])
                if self.num_classes is None and meta_c:
                    self.num_classes = int(meta_c)
                elif self.num_classes is not None and meta_c and int(meta_c) != self.num_classes:
                    raise TeacherInputError(f"BlackBoxTeacher: num_classes={self.num_classes} but the model "
                                            f"answers with {meta_c} classes")
                if (self._out_is_int or self.outputs == "labels") and self.num_classes is None:
                    raise TeacherInputError("BlackBoxTeacher: the model answers with labels and its metadata "
                                            "does not say how many classes there are; pass num_classes=")
        self._checked_shape = tuple(sample_shape)

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        self.retry_policy.wait(attempt, retry_after)

    def _binary(self) -> bool:
        """Whether to send and ask for binary tensors: as asked, or when the server announces
        the binary tensor data extension in ``GET /v2`` (asked once, not a paid query)."""
        if self.binary is None:
            try:
                ext = self._with_retries_free(lambda: self._t.extensions(self.timeout))
            except TeacherRequestError:
                ext = []
            self.binary = oip.BINARY_EXTENSION in ext
        return self.binary

    def _with_retries_free(self, fn):
        """Retry an unpaid call (metadata) on connection errors and 5xx."""
        last = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _Attempt as e:
                last = e
            if attempt < self.retries:
                self._sleep(attempt, None)
        raise TeacherUnavailable(f"the teacher at {self.identity} did not answer its metadata request after "
                                 f"{self.retries + 1} attempts: {last}")

    def affordable(self, x) -> int:
        """How many leading samples of ``x`` can be answered within the budget left: cached
        answers (and inputs another client sharing the cache is asking for now) are free,
        each new distinct input costs one query. Plan a transfer set with it (take
        ``x[:teacher.affordable(x)]``) so that a run resumed after lost requests still fits."""
        arr, _ = self._as_array(x)
        n = arr.shape[0]
        if self.budget is None or n == 0:
            return n
        keys = [self._key(arr[i]) for i in range(n)]
        uniq = list(dict.fromkeys(keys))
        free = set(self._store.lookup(uniq)) if self._use_cache else set()
        if self._use_cache:
            free |= self._store.claimed([k for k in uniq if k not in free])
        left, seen = self.budget_left, set()
        for i, k in enumerate(keys):
            if k in free or k in seen:
                continue
            if left == 0:
                return i
            left -= 1
            seen.add(k)
        return n

    def _fetch(self, arr, keys, todo, answers) -> None:
        """Answer the uncached samples ``todo``: claim them in the ledger (another client
        sharing the cache that is asking for some of them is waited for, never paid twice),
        then pay for and ask the claimed ones."""
        if not self._use_cache:
            return self._fetch_mine(arr, keys, todo, answers)
        pending = todo
        while pending:
            idx = {keys[i]: i for i in pending}
            cached, mine, theirs = self._store.claim(list(idx))
            for k, (kind, v) in cached.items():
                answers[k] = (kind, np.frombuffer(v, dtype=np.float32))
            try:
                if mine:
                    self._fetch_mine(arr, keys, [idx[k] for k in mine], answers)
            finally:
                self._store.unclaim(mine)
            with self._lock:
                self._stats["cache_hits"] += len(cached)
            pending = [idx[k] for k in self._wait_for(theirs, answers)]

    def _wait_for(self, theirs: list[bytes], answers) -> list[bytes]:
        """Wait for answers another client is fetching; returns the keys it gave up on."""
        patience = self.timeout * (self.retries + 2) + self.backoff_max * self.retries
        last = time.monotonic()
        while theirs:
            got = self._store.lookup(theirs)
            if got:
                last = time.monotonic()
                for k, (kind, v) in got.items():
                    answers[k] = (kind, np.frombuffer(v, dtype=np.float32))
                with self._lock:
                    self._stats["answers_shared"] += len(got)
                theirs = [k for k in theirs if k not in got]
                if not theirs:
                    break
            still = self._store.claimed(theirs)
            gone = [k for k in theirs if k not in still and k not in self._store.lookup([k])]
            if gone:
                return gone
            if time.monotonic() - last > patience:
                raise TeacherUnavailable(f"another client sharing the cache {self.cache_path} claimed "
                                         f"{len(theirs)} of these inputs and gave no answer within {patience:.0f} s")
            time.sleep(0.02)
        return []

    def _fetch_mine(self, arr, keys, todo, answers) -> None:
        chunks = [todo[i:i + self.max_batch] for i in range(0, len(todo), self.max_batch)]
        rids = self._store.reserve([len(c) for c in chunks], self.budget, "request")
        results: list = [None] * len(chunks)

        def run(j):
            results[j] = self._send_chunk(arr, keys, chunks[j], rids[j])

        errors = []
        if self.workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(min(self.workers, len(chunks))) as ex:
                futs = [ex.submit(run, j) for j in range(len(chunks))]
                for f in futs:
                    try:
                        f.result()
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        errors.append(e)
        else:
            for j in range(len(chunks)):
                if errors:
                    self._store.release(rids[j])
                    continue
                try:
                    run(j)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
        for j, res in enumerate(results):
            if res is not None:
                for i, kv in zip(chunks[j], res):
                    answers[keys[i]] = kv
        if errors:
            # answers already paid for are in the cache; surface the first error
            raise errors[0]

    def _send_chunk(self, arr, keys, idx, rid):
        x = arr[idx]
        n = len(idx)
        last = None
        attempt = 0
        while True:
            self._store.set_state(rid, "sent")
            try:
                raw, dt = self._infer(x)
                kinds_vals = self._parse(raw, dt, n)
            except _Attempt as e:
                last = e
                with self._lock:
                    self._stats["failed_attempts"] += 1
                if e.billed:
                    self._store.settle_paid(rid, None)
                    with self._lock:
                        self._stats["queries_paid"] += n
                else:
                    self._store.set_state(rid, "reserved")
                if not e.retry or attempt >= self.retries:
                    if not e.billed:
                        self._store.release(rid)
                    if not e.retry:
                        raise TeacherRequestError(f"the teacher at {self.identity} failed: {e}")
                    cls = TeacherResponseError if e.kind == "malformed" else TeacherUnavailable
                    raise cls(f"the teacher at {self.identity} failed {attempt + 1} attempts for {n} samples "
                              f"(last: {e}); giving up. Every answer already paid for is in the cache"
                              f"{' ' + self.cache_path if self.cache_path else ''}; rerun to resume.") from None
                if self.verbose:
                    print(f"[blackbox] attempt {attempt + 1} failed ({e}); retrying", flush=True)
                self._sleep(attempt, e.retry_after)
                attempt += 1
                with self._lock:
                    self._stats["retries"] += 1
                if e.billed:  # the failed attempt was paid: the retry needs a new reservation
                    rid = self._store.reserve([n], self.budget, "retry")[0]
                continue
            except BaseException:  # interrupted with the request out: its fate is unknown, it is paid
                self._store.settle_paid(rid, None)
                with self._lock:
                    self._stats["queries_paid"] += n
                raise
            rows = [(keys[i], kind, v.astype(np.float32).tobytes()) for i, (kind, v) in zip(idx, kinds_vals)]
            self._store.settle_paid(rid, rows if self._use_cache else None)
            with self._lock:
                self._stats["queries_paid"] += n
            return kinds_vals

    def _infer(self, x: np.ndarray):
        if not self.remote:
            self._count(0, 0)
            try:
                out, dt, _, _ = self._t.infer(x, self.timeout)
            except Exception as e:  # a local black box that fails: fail loudly, no retry
                raise _Attempt("local", f"the local teacher raised {type(e).__name__}: {e}", billed=True,
                               retry=False)
            return out, dt
        binary = self._binary()
        body, extra = oip.encode_request(
            [(self.input_name, self._input_dtype, x)], outputs=[self.output_name] if self.output_name else [],
            binary=binary, binary_output=binary and not self._out_is_int,  # labels: JSON digits are smaller
            request_id=uuid.uuid4().hex)
        status, headers, data, sent, recv = self._t.request("POST", self._t.model_path + "/infer", body,
                                                           self.timeout, extra)
        self._count(sent, recv)
        if status != 200:
            ra = headers.get("retry-after")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            msg = f"HTTP {status}: {_error_text(data)}"
            if status == 429:
                raise _Attempt("throttled", msg, billed=False, retry_after=ra)
            if status >= 500:
                raise _Attempt("server", msg, billed=False, retry_after=ra)
            raise _Attempt("rejected", msg, billed=False, retry=False)
        try:
            _, outs = oip.decode_response(data, headers.get(oip.HEADER_LENGTH.lower()))
            if not outs:
                raise _Malformed("no outputs")
            o = next((o for o in outs if o[0] == self.output_name), None) if self.output_name else None
            _, dt, a, _ = o or outs[0]
            if dt not in FLOAT_TYPES and dt not in INT_TYPES:
                raise _Malformed(f"unsupported datatype {dt!r}")
            a = np.asarray(a, dtype=np.float64)
        except (_Malformed, oip.ProtocolError) as e:
            raise _Attempt("malformed", f"malformed answer: {e}: {data[:120]!r}", billed=True)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise _Attempt("malformed", f"malformed answer ({type(e).__name__}: {e}): {data[:120]!r}", billed=True)
        return a, dt

    def _count(self, sent: int, recv: int) -> None:
        with self._lock:
            self._stats["requests"] += 1
            self._stats["bytes_sent"] += sent
            self._stats["bytes_received"] += recv

    def _parse(self, a: np.ndarray, dt: str, n: int):
        """Validate an output tensor -> list of (kind, float32 vector) per sample."""
        a = np.asarray(a)
        if a.ndim == 0 or a.shape[0] != n:
            raise _Attempt("malformed", f"wrong-shaped answer: expected {n} rows, got shape {list(a.shape)}",
                           billed=True)
        is_int = dt in INT_TYPES or self.outputs == "labels"
        if is_int:
            lab = a.reshape(n, -1)
            if lab.shape[1] != 1:
                raise _Attempt("malformed", f"wrong-shaped answer: labels of shape {list(a.shape)}, "
                               f"expected ({n},) or ({n}, 1)", billed=True)
            lab = lab[:, 0]
            c = self.num_classes
            if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)) or (
                    c is not None and (lab.min() < 0 or lab.max() >= c)):
                raise _Attempt("malformed", f"answer holds labels outside 0..{(c or 0) - 1}", billed=True)
            return [("label", np.array([v], dtype=np.float32)) for v in lab]
        rows = a.reshape(n, -1).astype(np.float64)
        c = rows.shape[1]
        if self.num_classes is None:
            if c < 2:
                raise _Attempt("malformed", f"wrong-shaped answer: {c} score per sample", billed=True)
            self.num_classes = c
        if c != self.num_classes:
            raise _Attempt("malformed", f"wrong-shaped answer: {c} scores per sample, expected "
                           f"{self.num_classes} (shape {list(a.shape)})", billed=True)
        if not np.isfinite(rows).all():
            raise _Attempt("malformed", "answer holds NaN or Inf", billed=True)
        if self.outputs == "probs":
            kind = "probs"
            if (rows < -1e-6).any() or (np.abs(rows.sum(1) - 1) > 1e-3).any():
                raise _Attempt("malformed", "answer rows are not probability distributions", billed=True)
        elif self.outputs == "logits":
            kind = "logits"
        else:
            is_p = (rows >= -1e-6).all() and (np.abs(rows.sum(1) - 1) <= 1e-3).all()
            kind = "probs" if is_p else "logits"
        return [(kind, r.astype(np.float32)) for r in rows]

    def _assemble(self, keys, answers, device) -> torch.Tensor:
        n = len(keys)
        if self.num_classes is None:  # every answer came from the cache
            for kind, v in answers.values():
                if kind != "label":
                    self.num_classes = int(v.shape[0])
                    break
        c = self.num_classes
        if c is None:
            if n:
                raise TeacherInputError("BlackBoxTeacher: cached label answers but num_classes unknown; "
                                        "pass num_classes=")
            c = 0
        out = np.zeros((n, c), dtype=np.float32)
        for i, k in enumerate(keys):
            kind, v = answers[k]
            if kind == "label":
                lab = int(v[0])
                out[i, lab] = 1.0
                continue
            if kind == "logits":
                z = v.astype(np.float64) - v.max()
                p = np.exp(z)
                p /= p.sum()
            else:
                p = np.clip(v.astype(np.float64), 0, None)
                p /= max(p.sum(), 1e-12)
            if self.response == "hard":
                out[i, int(np.argmax(v))] = 1.0
            else:
                out[i] = p
        t = torch.from_numpy(out)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return (f"BlackBoxTeacher({self.identity!r}, response={self.response!r}, budget={self.budget}, "
                f"max_batch={self.max_batch}, cache={self.cache_path!r})")
