"""The one exception tree of guardfleet.

    GuardfleetError
    ├── InvalidInput          the request cannot be served as given (client's fault, 4xx)
    │   ├── InputTooLong      more tokens than the model accepts
    │   └── InvalidBatch      a batch upload with bad lines (each listed) or no lines at all
    ├── OutputError           the model answered, but not with a verdict (fail closed)
    │   ├── TruncatedOutput   generation stopped inside the think block or before a field
    │   └── UnparseableOutput a required field is missing or has an unknown value
    ├── ModelNotReady         the worker has no loaded model
    └── JobNotFound           no job with that id (or it expired)

Each error has a stable `type` string that ends up in a failed job's `error.type` and in API
error bodies, so clients can branch on it.
"""

from __future__ import annotations


class GuardfleetError(Exception):
    type = "guardfleet_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(GuardfleetError):
    type = "invalid_input"


class InputTooLong(InvalidInput):
    type = "input_too_long"


class InvalidBatch(InvalidInput):
    """`status` is the HTTP status it maps to (400: not text or not JSON, 422: bad contents);
    `code` says which; `errors` lists bad lines as `{"line": n, "message": ...}`."""

    type = "invalid_batch"

    def __init__(
        self, message: str, status: int, code: str, errors: list[dict[str, object]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.errors = errors or []


class OutputError(GuardfleetError):
    """The model's text is kept so an operator can see what it said instead of a verdict."""

    type = "output_error"

    def __init__(self, message: str, raw_output: str) -> None:
        super().__init__(message)
        self.raw_output = raw_output


class TruncatedOutput(OutputError):
    type = "truncated_output"


class UnparseableOutput(OutputError):
    type = "unparseable_output"


class ModelNotReady(GuardfleetError):
    type = "model_not_ready"


class JobNotFound(GuardfleetError):
    type = "job_not_found"
