"""Generated text, as it is generated, into the streams of watched jobs (`guardfleet.streams`).

The model thread only appends each new token to its job's `Tap` (no Redis, no decoding there:
a decode step must not wait on the network). One publisher thread per worker turns the new
tokens of every tap into text and writes all deltas in one pipelined round trip; when Redis is
slower than the model, deltas of several steps simply travel together. A Redis error leaves the
deltas unsent and they go with the next write; the job's result never depends on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis

from guardfleet import streams
from guardfleet.keys import job_stream, job_stream_channel

log = logging.getLogger(__name__)

Decode = Callable[[Sequence[int]], str]
RETRY_S = 0.5  # after a Redis error, before the next write
FLUSH_WAIT_S = 2.0  # how long a finishing job waits for its last deltas to be written


class Tap:
    """One job attempt's tokens, filled by the model thread, turned into text deltas here.

    Text is decoded incrementally the way vLLM and TGI do it: the tokens since the last delta
    are decoded together with a few before them and only the difference is new, so a character
    split over several tokens is only sent once it is whole, and no step decodes the whole text.
    """

    def __init__(self, job_id: str, attempt: int, watched: bool, wake: threading.Event) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.watched = watched
        self._wake = wake
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._newest_at = 0.0
        self.first_at: float | None = None  # monotonic time of the first token
        self._prefix = 0  # tokens before `_read` decoded as context for the next delta
        self._read = 0  # tokens already turned into text
        self.sent_chars = 0
        self.finishing = False  # no more tokens come: send what there is, whole or not

    def on_token(self, token: int) -> None:
        """Called from the model thread: must stay cheap."""
        with self._lock:
            self._tokens.append(token)
            self._newest_at = time.time()
            if self.first_at is None:
                self.first_at = time.monotonic()
        if self.watched:
            self._wake.set()

    def pending(self) -> bool:
        return self.watched and len(self._tokens) > self._read

    def delta(self, decode: Decode) -> tuple[str, int, int, float] | None:
        """(text, offset, tokens, time) for the tokens not yet sent ("" when they decode to
        nothing), or None while they end in an unfinished character. Nothing counts as sent
        until `sent()` confirms the write."""
        with self._lock:
            tokens, newest = list(self._tokens), self._newest_at
        if len(tokens) <= self._read:
            return None
        before = decode(tokens[self._prefix : self._read])
        after = decode(tokens[self._prefix :])
        if after.endswith("\ufffd") and not self.finishing:
            return None
        return after[len(before) :], self.sent_chars, len(tokens), newest

    def sent(self, text: str, tokens: int) -> None:
        self._prefix, self._read = self._read, tokens
        self.sent_chars += len(text)


class Publisher:
    """The worker's publishing thread: `open` a tap per job attempt, `close` it at the end."""

    def __init__(self, client: redis.Redis, decode: Decode) -> None:
        self.client = client
        self.decode = decode
        self._taps: dict[int, Tap] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="stream-publisher", daemon=True)
        self._thread.start()

    def open(self, job_id: str, attempt: int, watched: bool) -> Tap:
        tap = Tap(job_id, attempt, watched, self._wake)
        with self._lock:
            self._taps[id(tap)] = tap
        return tap

    def watch(self, tap: Tap) -> None:
        """Someone started streaming a running job: send everything it generated so far."""
        tap.watched = True
        self._wake.set()

    def close(self, tap: Tap) -> None:
        """The job's generation ended: write its last deltas (waiting at most FLUSH_WAIT_S,
        so the stream shows them before the job's final status), then forget the tap."""
        deadline = time.monotonic() + FLUSH_WAIT_S
        tap.finishing = True
        self._wake.set()
        with self._flushed:
            while tap.pending() and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("job %s: last stream deltas not written in time", tap.job_id)
                    break
                self._flushed.wait(remaining)
        with self._lock:
            self._taps.pop(id(tap), None)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            try:
                self._flush()
            except redis.RedisError as exc:
                log.warning("could not write stream deltas (will retry): %s", exc)
                time.sleep(RETRY_S)
                self._wake.set()
            except Exception:  # a decode bug must not end streaming for every later job
                log.exception("stream publisher failed; retrying")
                time.sleep(RETRY_S)
                self._wake.set()
            with self._flushed:
                self._flushed.notify_all()

    def _flush(self) -> None:
        with self._lock:
            taps = [tap for tap in self._taps.values() if tap.pending()]
        writes: list[tuple[Tap, str, int]] = []
        with self.client.pipeline(transaction=False) as pipe:
            for tap in taps:
                found = tap.delta(self.decode)
                if found is None:
                    continue
                text, offset, tokens, newest = found
                if not text:
                    tap.sent(text, tokens)
                    continue
                key = job_stream(tap.job_id)
                fields = streams.text_fields(tap.attempt, offset, text, tokens, newest)
                pipe.xadd(key, fields, maxlen=streams.MAX_ENTRIES, approximate=True)
                pipe.expire(key, streams.TTL_S)
                # As a plain command: redis-py refuses PUBLISH in a Redis Cluster pipeline.
                pipe.execute_command("PUBLISH", job_stream_channel(tap.job_id), "text")  # type: ignore[no-untyped-call]
                writes.append((tap, text, tokens))
            if writes:
                pipe.execute()
        for tap, text, tokens in writes:
            tap.sent(text, tokens)
