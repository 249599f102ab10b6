"""The store's parts: an id says which part its keys are in, and everything one operation
touches lands in one Redis Cluster slot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from guardfleet import keys
from guardfleet.schemas import Batch, ClassifyRequest, Job
from guardfleet.settings import Settings


def test_new_ids_are_drawn_from_the_first_parts_only() -> None:
    tags = {keys.id_tag(keys.new_id("job", 16)) for _ in range(2000)}
    assert tags == set(keys.part_tags(16))
    assert {keys.id_tag(keys.new_id("batch")) for _ in range(50)} == {"00"}
    assert keys.id_tag(keys.new_id("job", tag="3f")) == "3f"
    assert len(keys.new_id("job", 256)) == len("job_") + 32  # as long as a uuid's hex


def test_default_ids_are_in_the_first_part() -> None:
    assert keys.id_tag(Job(request=ClassifyRequest(prompt="Hi")).id) == "00"
    assert keys.id_tag(Batch.model_validate({"request_counts": {"total": 1}}).id) == "00"


@pytest.mark.parametrize("foreign", ["job_zz12", "job_3", "nope", "job_3F00", "job_{x}", ""])
def test_an_id_not_minted_here_still_has_one_part(foreign: str) -> None:
    assert keys.id_tag(foreign) == "xx"
    assert key_slot(keys.job_key(foreign).encode()) == key_slot(keys.open_jobs("xx").encode())


def _slots(*names: str) -> set[int]:
    return {key_slot(name.encode()) for name in names}


def test_what_one_operation_touches_is_in_one_slot() -> None:
    job_id, batch_id = keys.new_id("job", 256), keys.new_id("batch", 256)
    tag = keys.id_tag(job_id)
    job = _slots(
        keys.job_key(job_id),
        keys.job_channel(job_id),
        keys.job_stream(job_id),
        keys.job_stream_channel(job_id),
        keys.open_jobs(tag),
        keys.stats(tag),
        keys.delivery_key(job_id),
        keys.delivery_lock_key(job_id),
        keys.webhooks_due(tag),
    )
    assert len(job) == 1
    btag = keys.id_tag(batch_id)
    item = keys.new_id("job", tag=btag)
    batch = _slots(
        keys.batch_key(batch_id),
        keys.batch_state_key(batch_id),
        keys.batch_jobs_key(batch_id),
        keys.batch_upload_key(batch_id),
        keys.batch_fanout_key(batch_id),
        keys.batch_done_key(batch_id),
        keys.batches_due(btag),
        keys.stats(btag),
        keys.job_key(item),
        keys.open_jobs(keys.id_tag(item)),
    )
    assert len(batch) == 1
    assert len(_slots(keys.WORKER_REGISTRY, keys.worker_key("a@x"), keys.worker_key("b@y"))) == 1


def test_the_parts_spread_over_the_slots() -> None:
    slots = _slots(*(keys.open_jobs(tag) for tag in keys.part_tags(keys.MAX_PARTS)))
    assert len(slots) == keys.MAX_PARTS


def test_by_tag_groups_ids_by_part() -> None:
    a, b, c = keys.new_id("job", tag="00"), keys.new_id("job", tag="01"), keys.new_id("job")
    assert keys.by_tag([a, b, c]) == {"00": [a, c], "01": [b]}


@pytest.mark.parametrize("parts", [0, 257])
def test_the_part_count_is_bounded(parts: int) -> None:
    with pytest.raises(ValidationError, match="store_parts"):
        Settings(store_parts=parts)
