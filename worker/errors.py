"""Why a worker hands a job back instead of finishing it.

    HandBack                 not the job's fault: the message goes back on its queue
    ├── ModelUnavailable     the model thread is stopping (SIGTERM), dead, or stuck
    └── StoreUnavailable     Redis stayed unreachable longer than GUARDFLEET_REDIS_OUTAGE_S

Errors that *are* the job's fault (bad input, unparseable output) live in `guardfleet.errors`
and end the job as `failed`; everything here ends in a retry, never in a failed job.
"""

from __future__ import annotations


class HandBack(Exception):
    """The job could not be run here and now; another try (here or elsewhere) should."""


class ModelUnavailable(HandBack):
    pass


class StoreUnavailable(HandBack):
    pass
