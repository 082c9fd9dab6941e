"""The black-box teacher facade: budget, cache, claims, checks and answers (see the package
docstring)."""
from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from .. import oip
from ..oip import FLOAT_TYPES, INT_TYPES
from .errors import (TeacherInputError, TeacherRequestError, TeacherResponseError,
                     TeacherUnavailable, _Attempt, _Malformed)
from .ledger import _Store
from .retry import RetryPolicy
from .transport import _error_text, _HTTPTransport, _LocalTransport


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
