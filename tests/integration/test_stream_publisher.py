"""The worker's publisher: tokens from the model thread become text deltas in Redis that join
up to exactly the decoded text, characters split over several tokens included."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from transformers import AutoTokenizer

from guardfleet.keys import job_stream
from guardfleet.streams import Entry, Transcript
from tests.conftest import RedisServer, db_url, wait_until
from worker.engine import DEMO_MODEL_DIR
from worker.streaming import Publisher

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(db_url(redis_server, 33))
    client.flushdb()
    return client


def entries_of(client: redis.Redis, job_id: str) -> list[Entry]:
    found: Any = client.xrange(job_stream(job_id))
    return [Entry.parse(entry_id, fields) for entry_id, fields in found]


def test_deltas_join_to_the_decoded_text(client: redis.Redis) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    # Emoji, CJK and accents: byte-fallback tokens, several per character.
    text = "Crème brûlée 🍮 for 東京 friends 🎉🎉, naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    ids += [rng.randrange(len(tokenizer)) for _ in range(200)]  # arbitrary tokens too
    publisher = Publisher(client, decode)
    try:
        tap = publisher.open("job_x", attempt=1, watched=True)
        for token in ids:
            tap.on_token(token)
            time.sleep(0.002)  # a decode step
        publisher.close(tap)
    finally:
        publisher.stop()
    entries = entries_of(client, "job_x")
    assert len(entries) > 10, "the text was not streamed in pieces"
    transcript = Transcript()
    for entry in entries:
        transcript.apply(entry)
    assert not transcript.gap
    assert transcript.text == decode(ids)
    assert 0 < client.ttl(job_stream("job_x")) <= 600


def test_an_unwatched_job_writes_nothing_until_someone_watches(client: redis.Redis) -> None:
    publisher = Publisher(client, lambda ids: "".join(chr(65 + i % 26) for i in ids))
    try:
        tap = publisher.open("job_y", attempt=2, watched=False)
        for token in range(5):
            tap.on_token(token)
        assert client.exists(job_stream("job_y")) == 0
        publisher.watch(tap)  # what has been generated so far goes at once, in one piece
        wait_until(lambda: client.xlen(job_stream("job_y")) == 1, 5, "the first delta")
        tap.on_token(5)
        publisher.close(tap)
    finally:
        publisher.stop()
    entries = entries_of(client, "job_y")
    assert [(e.offset, e.delta, e.attempt) for e in entries] == [(0, "ABCDE", 2), (5, "F", 2)]
