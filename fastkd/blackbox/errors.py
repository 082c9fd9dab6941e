"""Errors of the black-box client (public) and the attempt outcomes it classifies (internal)."""
from __future__ import annotations




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
