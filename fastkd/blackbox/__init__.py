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
flight counts that request as paid). Without a file the cache lives in memory. Before
paying for an input a client claims it in the same file, so clients sharing a cache never
pay twice for one input: the others wait for its answer.

Layout, one concern per module: :mod:`fastkd.oip` (the protocol codec, shared with the
server), ``transport`` (local callable / HTTP, each failure classified as paid or not),
``retry`` (:class:`RetryPolicy`, injectable clock), ``ledger`` (the SQLite answers, budget
ledger and claims), ``errors``, and ``teacher`` (:class:`BlackBoxTeacher`, the facade).
"""
from __future__ import annotations

from ..oip import format_floats
from .errors import (BlackBoxError, QueryBudgetExceeded, TeacherInputError, TeacherRequestError,
                     TeacherResponseError, TeacherUnavailable)
from .retry import RetryPolicy
from .teacher import BlackBoxTeacher

__all__ = ["BlackBoxTeacher", "RetryPolicy", "BlackBoxError", "QueryBudgetExceeded", "TeacherUnavailable",
           "TeacherResponseError", "TeacherRequestError", "TeacherInputError", "format_floats"]
