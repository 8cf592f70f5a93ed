import ctypes
import mmap
import multiprocessing
import os
import struct
import time

import pytest

from conftest import random_uuid
from paycore.core.accepted_ids import (
    CLAIMED,
    CONFLICT,
    DUPLICATE,
    FULL,
    AcceptedIds,
)

# The file layout, as the shared-memory tests need to reach into it.
HEADER_BYTES = 128
GENERATION_OFFSET = 24
SLOT_BYTES = 32
KEY_OFFSET_IN_SLOT = 8
WRITING = 1
READY = 2

CLAIMS_BETWEEN_MEETINGS = 2000

fork = multiprocessing.get_context("fork")


def new_id() -> bytes:
    return random_uuid().bytes


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "accepted-ids")


def test_claim_duplicate_conflict(path):
    with AcceptedIds(path, 1024) as ids:
        key = new_id()
        assert ids.claim(key, 2005) == CLAIMED
        assert ids.claim(key, 2005) == DUPLICATE
        assert ids.claim(key, 2006) == CONFLICT
        assert ids.contains(key)
        assert not ids.contains(new_id())
        assert len(ids) == 1
        assert len({CLAIMED, DUPLICATE, CONFLICT, FULL}) == 4


def test_release_forgets_a_claim(path):
    with AcceptedIds(path, 1024) as ids:
        released, kept = new_id(), new_id()
        ids.claim(released, 100)
        ids.claim(kept, 100)
        assert ids.release(released)
        assert not ids.contains(released)
        assert not ids.release(released)
        assert not ids.release(new_id())
        assert len(ids) == 1
        assert ids.claim(released, 100) == CLAIMED
        assert ids.claim(released, 100) == DUPLICATE
        assert ids.contains(kept)
        assert len(ids) == 2


def test_purge_forgets_everything_and_allows_claims_again(path):
    with AcceptedIds(path, 256) as ids:
        keys = [new_id() for _ in range(150)]
        assert all(ids.claim(key, 1) == CLAIMED for key in keys)
        ids.purge()
        assert len(ids) == 0
        assert not any(ids.contains(key) for key in keys)
        assert all(ids.claim(key, 2) == CLAIMED for key in keys)
        assert all(ids.claim(key, 2) == DUPLICATE for key in keys)
        assert len(ids) == 150


def test_full_at_three_quarters_of_the_slots(path):
    with AcceptedIds(path, 16) as ids:
        keys = [new_id() for _ in range(12)]
        assert [ids.claim(key, 1) for key in keys] == [CLAIMED] * 12
        assert ids.claim(new_id(), 1) == FULL
        assert ids.claim(keys[0], 1) == DUPLICATE
        assert ids.claim(keys[0], 2) == CONFLICT
        # Released slots stay tombstones until a purge, so they still count.
        assert ids.release(keys[0])
        assert ids.claim(new_id(), 1) == FULL
        ids.purge()
        assert ids.claim(new_id(), 1) == CLAIMED


def test_slots_round_up_to_a_power_of_two(tmp_path):
    assert AcceptedIds(str(tmp_path / "a"), 1000).slots == 1024
    assert AcceptedIds(str(tmp_path / "b"), 1024).slots == 1024
    assert AcceptedIds(str(tmp_path / "c")).slots == 1 << 19
    with pytest.raises(ValueError):
        AcceptedIds(str(tmp_path / "d"), 0)


def test_two_objects_on_one_file_see_each_other(path):
    with AcceptedIds(path, 1024) as first, AcceptedIds(path, 1024) as second:
        key = new_id()
        assert first.claim(key, 700) == CLAIMED
        assert second.contains(key)
        assert second.claim(key, 700) == DUPLICATE
        assert len(second) == 1
        assert second.release(key)
        assert not first.contains(key)
        other = new_id()
        second.claim(other, 1)
        first.purge()
        assert not second.contains(other)
        assert len(second) == 0


def test_reopening_keeps_the_content(path):
    keys = [new_id() for _ in range(100)]
    with AcceptedIds(path, 512) as ids:
        for key in keys:
            ids.claim(key, 42)
    with AcceptedIds(path, 512) as reopened:
        assert len(reopened) == 100
        assert all(reopened.claim(key, 42) == DUPLICATE for key in keys)


def test_refuses_a_file_of_another_size_or_kind(path, tmp_path):
    AcceptedIds(path, 512).close()
    with pytest.raises(ValueError, match="512 slots"):
        AcceptedIds(path, 1024)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"not a table" * 20)
    with pytest.raises(ValueError, match="not an accepted-ids file"):
        AcceptedIds(str(foreign), 512)
    assert foreign.read_bytes() == b"not a table" * 20


def test_initialises_an_empty_or_never_initialised_file(tmp_path):
    empty = tmp_path / "empty"
    empty.touch()
    with AcceptedIds(str(empty), 64) as ids:
        assert ids.claim(new_id(), 1) == CLAIMED
    # The creator died between sizing the file and writing its header.
    zeroed = tmp_path / "zeroed"
    zeroed.write_bytes(bytes(4096))
    with AcceptedIds(str(zeroed), 64) as ids:
        assert ids.claim(new_id(), 1) == CLAIMED
    assert zeroed.stat().st_size == HEADER_BYTES + 64 * SLOT_BYTES


def test_rejects_bad_keys_and_use_after_close(path):
    ids = AcceptedIds(path, 64)
    for bad in (b"", b"x" * 15, b"x" * 17, random_uuid().hex.encode()):
        with pytest.raises(ValueError):
            ids.claim(bad, 1)
        with pytest.raises(ValueError):
            ids.release(bad)
        with pytest.raises(ValueError):
            ids.contains(bad)
    with pytest.raises(TypeError):
        ids.claim(None, 1)
    with pytest.raises(TypeError):
        ids.claim(str(random_uuid()), 1)
    ids.close()
    ids.close()
    with pytest.raises(ValueError, match="closed"):
        ids.claim(new_id(), 1)
    with pytest.raises(ValueError, match="closed"):
        ids.purge()
    with pytest.raises(ValueError, match="closed"):
        len(ids)


def claim_all(path, slots, keys, together, results):
    cpus = sorted(os.sched_getaffinity(0))
    # Spread over the CPUs so that the workers truly run at the same time.
    os.sched_setaffinity(0, {cpus[together.wait() % len(cpus)]})
    # All open the file at once, which also races its creation.
    ids = AcceptedIds(path, slots)
    outcomes = []
    for chunk_start in range(0, len(keys), CLAIMS_BETWEEN_MEETINGS):
        # Meeting again and again keeps the workers in step.
        together.wait()
        chunk = keys[chunk_start:chunk_start + CLAIMS_BETWEEN_MEETINGS]
        outcomes.extend(ids.claim(key, 2005) for key in chunk)
    claimed = [key for key, outcome in zip(keys, outcomes) if outcome == CLAIMED]
    results.put((claimed, set(outcomes)))


def test_processes_claim_each_key_exactly_once(path):
    workers, keys_per_worker = 4, 100000
    keys = [new_id() for _ in range(keys_per_worker * 5 // 4)]
    # Overlapping sets: each worker skips a fifth of the keys, and all go
    # through them in the same order, to race head to head for each key.
    key_sets = [
        [key for key in keys if key[0] % 5 != worker][:keys_per_worker]
        for worker in range(workers)
    ]
    expected = set().union(*key_sets)
    together = fork.Barrier(workers, timeout=20)
    results = fork.Queue()
    processes = [
        fork.Process(target=claim_all, args=(path, 1 << 18, key_set, together, results))
        for key_set in key_sets
    ]
    for process in processes:
        process.start()
    claimed, outcome_kinds = [], set()
    for _ in processes:
        worker_claimed, worker_outcome_kinds = results.get(timeout=30)
        claimed.extend(worker_claimed)
        outcome_kinds |= worker_outcome_kinds
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    assert len(claimed) == len(expected)
    assert set(claimed) == expected
    assert outcome_kinds == {CLAIMED, DUPLICATE}
    with AcceptedIds(path, 1 << 18) as ids:
        assert len(ids) == len(expected)


def slot_offset_of(shared: mmap.mmap, key: bytes) -> int:
    key_at = shared.find(key, HEADER_BYTES)
    assert key_at > 0
    slot_at = key_at - KEY_OFFSET_IN_SLOT
    assert (slot_at - HEADER_BYTES) % SLOT_BYTES == 0
    return slot_at


def set_state(shared: mmap.mmap, slot_at: int, state: int) -> None:
    (generation,) = struct.unpack_from("<Q", shared, GENERATION_OFFSET)
    # One aligned 8-byte store, as the core's atomics make: struct.pack_into
    # clears the bytes first, and a concurrent claim would see a free slot.
    tag = ctypes.c_uint64.from_buffer(shared, slot_at)
    tag.value = generation << 2 | state
    del tag  # the mmap cannot close while a view of it is alive


def test_abandoned_writing_slot_is_skipped_after_the_timeout(path):
    with AcceptedIds(path, 64) as ids, open(path, "r+b") as file:
        key = new_id()
        assert ids.claim(key, 100) == CLAIMED
        with mmap.mmap(file.fileno(), 0) as shared:
            # As if the claiming process had died mid-insert.
            set_state(shared, slot_offset_of(shared, key), WRITING)
        started = time.monotonic()
        assert ids.claim(key, 100) == CLAIMED
        assert 0.045 <= time.monotonic() - started < 1.0
        # The abandoned slot was retired: nobody waits for it again.
        started = time.monotonic()
        assert ids.claim(key, 100) == DUPLICATE
        assert ids.contains(key)
        assert time.monotonic() - started < 0.04


def finish_insert_later(path, slot_at, waiting, finished_at):
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as shared:
        waiting.set()
        time.sleep(0.005)
        set_state(shared, slot_at, READY)
        # After publishing: a claim that gave up on this writer did so before this.
        finished_at.value = time.monotonic()


def test_a_slot_mid_insert_is_waited_for(path):
    with AcceptedIds(path, 64) as ids, open(path, "r+b") as file:
        key = new_id()
        assert ids.claim(key, 100) == CLAIMED
        with mmap.mmap(file.fileno(), 0) as shared:
            slot_at = slot_offset_of(shared, key)
            set_state(shared, slot_at, WRITING)
        waiting, finished_at = fork.Event(), fork.Value("d", 0.0)
        writer = fork.Process(target=finish_insert_later,
                              args=(path, slot_at, waiting, finished_at))
        writer.start()
        assert waiting.wait(timeout=10)
        started = time.monotonic()
        outcome = ids.claim(key, 100)
        writer.join(timeout=10)
        assert writer.exitcode == 0
        if outcome != DUPLICATE:
            # Only a writer stalled past the timeout may be given up on.
            assert outcome == CLAIMED
            assert finished_at.value - started >= 0.045
