import collections
import ctypes
import mmap
import multiprocessing
import os
import struct
import time

import pytest

from conftest import random_uuid, test_random
from paycore.core.accepted_ids import (
    CLAIMED,
    CONFLICT,
    DUPLICATE,
    DURABLE,
    IN_PROGRESS,
    AcceptedIds,
)

# The file layout, as the shared-memory tests need to reach into it.
HEADER_BYTES = 4480
PAYLOAD_BYTES = 24
STATE_MASK = 7
WRITING = 1

HOUR_MS = 3_600_000
SUBTABLES = 5

fork = multiprocessing.get_context("fork")


@pytest.fixture
def new_id():
    return lambda: random_uuid().bytes


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "accepted-ids")


def window(path, instance="1", capacity=1000, window_ms=HOUR_MS, **geometry) -> AcceptedIds:
    return AcceptedIds(path, instance, capacity, window_ms, **geometry)


def epoch_start_after(ids: AcceptedIds) -> int:
    """The wall-clock ms at which the next epoch begins."""
    return (ids._now_ms // ids.epoch_ms + 1) * ids.epoch_ms


def accept(ids: AcceptedIds, key: bytes, cents: int = 100) -> None:
    assert ids.claim(key, cents) == CLAIMED
    assert ids.confirm(key)


def test_a_claim_is_in_progress_until_confirmed(path, new_id):
    with window(path) as ids:
        key = new_id()
        assert ids.state(key) is None
        assert ids.claim(key, 2005) == CLAIMED
        assert ids.state(key) == (CLAIMED, 2005)
        assert ids.claim(key, 2005) == IN_PROGRESS
        assert ids.claim(key, 2006) == IN_PROGRESS
        assert ids.confirm(key)
        assert ids.state(key) == (DURABLE, 2005)
        assert ids.claim(key, 2005) == DUPLICATE
        assert ids.claim(key, 2006) == CONFLICT
        assert not ids.confirm(key)
        assert not ids.abandon(key)
        assert ids.state(key) == (DURABLE, 2005)
        assert len({CLAIMED, DUPLICATE, CONFLICT, IN_PROGRESS, DURABLE}) == 5


def test_abandon_forgets_a_claim(path, new_id):
    with window(path) as ids:
        abandoned, kept = new_id(), new_id()
        ids.claim(abandoned, 100)
        accept(ids, kept)
        assert ids.abandon(abandoned)
        assert ids.state(abandoned) is None
        assert not ids.abandon(abandoned)
        assert not ids.confirm(abandoned)
        assert not ids.abandon(new_id())
        assert ids.claim(abandoned, 300) == CLAIMED
        assert ids.state(abandoned) == (CLAIMED, 300)
        assert ids.state(kept) == (DURABLE, 100)


def test_instances_share_ids_but_settle_only_their_own_claims(path, new_id):
    with window(path, "1") as first, window(path, "2") as second:
        key = new_id()
        assert first.claim(key, 700) == CLAIMED
        assert second.claim(key, 700) == IN_PROGRESS
        assert not second.confirm(key)
        assert not second.abandon(key)
        assert second.state(key) == (CLAIMED, 700)
        assert first.confirm(key)
        assert second.claim(key, 700) == DUPLICATE
        assert second.claim(key, 1) == CONFLICT


def test_claims_of_this_instance_outlive_the_process(path, new_id):
    left, confirmed, abandoned, others = new_id(), new_id(), new_id(), new_id()
    with window(path, "api-1") as first, window(path, "api-2") as second:
        for key in (left, confirmed, abandoned):
            assert first.claim(key, 5) == CLAIMED
        first.confirm(confirmed)
        first.abandon(abandoned)
        assert second.claim(others, 5) == CLAIMED
        assert first.claims_of_this_instance() == [left]
        assert second.claims_of_this_instance() == [others]
    # As after a crash: the same name finds its claims again.
    with window(path, "api-1") as restarted:
        assert restarted.claims_of_this_instance() == [left]
        assert restarted.confirm(left)
        assert restarted.claims_of_this_instance() == []
        assert restarted.claim(left, 5) == DUPLICATE


def test_the_registry_holds_64_names(path, new_id):
    opened = [window(path, f"instance-{index}") for index in range(64)]
    key = new_id()
    assert opened[63].claim(key, 1) == CLAIMED
    with pytest.raises(RuntimeError, match="registry .* is full"):
        window(path, "one-too-many")
    with window(path, "instance-63") as again:
        assert again.claims_of_this_instance() == [key]
    for ids in opened:
        ids.close()


@pytest.mark.parametrize("name", ["", "x" * 57, "a b", "a/b", "é"])
def test_refuses_bad_instance_names(path, name):
    with pytest.raises(ValueError, match="instance name"):
        window(path, name)


def test_ids_are_remembered_for_the_window_then_forgotten(path, new_id):
    with window(path, window_ms=4 * 60_000) as ids:
        assert ids.epoch_ms == 60_000
        epoch_start = epoch_start_after(ids)
        # Accepted in the last ms of an epoch: remembered for the window exactly.
        ids._now_ms = epoch_start + ids.epoch_ms - 1
        late = new_id()
        accept(ids, late)
        ids._now_ms = epoch_start
        early = new_id()
        accept(ids, early)
        ids._now_ms = epoch_start + ids.epoch_ms - 1 + ids.window_ms
        assert ids.claim(late, 100) == DUPLICATE
        assert ids.claim(early, 100) == DUPLICATE
        assert ids.effective_window_ms == ids.window_ms + ids.epoch_ms - 1
        # At most window * K / (K - 1).
        ids._now_ms = epoch_start + SUBTABLES * ids.epoch_ms
        assert ids.state(late) is None
        assert ids.state(early) is None
        assert ids.claim(early, 200) == CLAIMED
        assert ids.live_ids == 1
        assert ids.early_advances == 0


def test_a_clock_stepping_back_forgets_nothing(path, new_id):
    with window(path, window_ms=4 * 60_000) as ids:
        ids._now_ms = epoch_start_after(ids) + ids.window_ms
        epoch = ids.epoch
        key = new_id()
        accept(ids, key)
        ids._now_ms -= 10 * ids.window_ms
        assert ids.epoch == epoch
        assert ids.claim(key, 100) == DUPLICATE
        other = new_id()
        accept(ids, other)
        ids._now_ms += 10 * ids.window_ms
        assert ids.state(other) == (DURABLE, 100)
        ids._now_ms += ids.window_ms + ids.epoch_ms
        assert ids.state(other) is None


def test_overload_ends_epochs_early_instead_of_refusing(path, new_id):
    # 10 ids per epoch, the clock held still: only load moves the epochs.
    with window(path, capacity=40) as ids:
        ids._now_ms = epoch_start_after(ids)
        file_bytes = os.path.getsize(path)
        keys = [new_id() for _ in range(1000)]
        for key in keys:
            accept(ids, key)
        assert ids.early_advances == 1000 // 10 - 1
        assert ids.live_ids <= SUBTABLES * 10
        assert os.path.getsize(path) == file_bytes
        # Every id of the last capacity is still there; the oldest are gone.
        assert all(ids.claim(key, 100) == DUPLICATE for key in keys[-40:])
        assert all(ids.state(key) is None for key in keys[:-50])
        assert ids.effective_window_ms == 0
        ids._now_ms += 5000
        assert ids.effective_window_ms == 5000
        # Back under the sizing, epochs follow the clock again.
        ids._now_ms = epoch_start_after(ids) + ids.window_ms
        assert ids.effective_window_ms >= ids.window_ms


def test_the_effective_window_at_rest_is_at_least_the_window(path, new_id):
    with window(path, window_ms=4 * 60_000) as ids:
        for offset in (0, 1, 30_000, 59_999):
            ids._now_ms = epoch_start_after(ids) + offset
            assert ids.effective_window_ms == ids.window_ms + offset


def test_remember_keeps_an_id_past_the_window(path, new_id):
    with window(path, window_ms=4 * 60_000) as ids:
        ids._now_ms = epoch_start_after(ids)
        pending, settled = new_id(), new_id()
        accept(ids, pending, 900)
        accept(ids, settled, 900)
        for _ in range(3 * SUBTABLES):
            ids._now_ms += ids.epoch_ms
            assert ids.remember(pending, 900) == DURABLE
            assert ids.remember(pending, 900) == DURABLE
        assert ids.claim(pending, 900) == DUPLICATE
        assert ids.claim(pending, 901) == CONFLICT
        assert ids.state(settled) is None
        # The copies of older epochs do not pile up.
        assert ids.live_ids == SUBTABLES


def test_remember_across_early_epochs(path, new_id):
    with window(path, capacity=40) as ids:
        ids._now_ms = epoch_start_after(ids)
        pending = new_id()
        accept(ids, pending)
        epoch = ids.epoch
        for _ in range(500):
            accept(ids, new_id())
            if ids.epoch != epoch:
                epoch = ids.epoch
                assert ids.remember(pending, 100) == DURABLE
        assert ids.early_advances > 5 * SUBTABLES
        assert ids.claim(pending, 100) == DUPLICATE


def test_remember_inserts_or_takes_over_its_own_claims(path, new_id):
    with window(path, "1") as first, window(path, "2") as second:
        unknown, own, foreign, durable = new_id(), new_id(), new_id(), new_id()
        assert first.remember(unknown, 10) == DURABLE
        assert second.claim(unknown, 10) == DUPLICATE
        assert first.claim(own, 10) == CLAIMED
        assert first.remember(own, 11) == CONFLICT
        assert first.remember(own, 10) == DURABLE
        assert first.claims_of_this_instance() == []
        assert first.state(own) == (DURABLE, 10)
        assert second.claim(foreign, 10) == CLAIMED
        assert first.remember(foreign, 10) == IN_PROGRESS
        accept(second, durable, 10)
        assert first.remember(durable, 11) == CONFLICT
        assert first.remember(durable, 10) == DURABLE


def test_memory_follows_the_capacity(tmp_path):
    sizes = {}
    for capacity in (1000, 1001, 100_000):
        ids = window(str(tmp_path / f"ids-{capacity}"), capacity=capacity)
        per_epoch = -(-capacity // (SUBTABLES - 1))
        assert ids.slots == SUBTABLES * -(-per_epoch * 4 // 3)
        assert ids.file_bytes == os.path.getsize(tmp_path / f"ids-{capacity}")
        sizes[capacity] = ids.file_bytes
        ids.close()
    assert sizes[1000] < sizes[1001] < sizes[1000] + 5 * 2 * 32 + 64
    assert 50 < (sizes[100_000] - sizes[1000]) / 99_000 < 56


def test_refuses_bad_geometry(tmp_path):
    for bad in ({"capacity": 0}, {"window_ms": 3}, {"subtables": 1}, {"subtables": 17},
                {"load_factor": 0}, {"load_factor": 0.95}):
        with pytest.raises(ValueError):
            window(str(tmp_path / "ids"), **bad)


def test_refuses_a_file_of_another_geometry_or_kind(path, tmp_path):
    window(path, capacity=512).close()
    for other in ({"capacity": 1024}, {"window_ms": 2 * HOUR_MS}, {"subtables": 3},
                  {"load_factor": 0.5}):
        with pytest.raises(ValueError, match="512 ids per 3600000 ms window .* remove the file"):
            window(path, **{"capacity": 512, **other})
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"not a table" * 20)
    with pytest.raises(ValueError, match="not an accepted-ids file"):
        window(str(foreign))
    assert foreign.read_bytes() == b"not a table" * 20
    # The fixed-size table this one replaced.
    older = tmp_path / "older"
    older.write_bytes(struct.pack("<QQQ", 0x5445534449594150, 1, 1024) + bytes(128 + 1024 * 32 - 24))
    with pytest.raises(ValueError, match="format version 1"):
        window(str(older))


def test_initialises_an_empty_or_never_initialised_file(tmp_path, new_id):
    empty = tmp_path / "empty"
    empty.touch()
    with window(str(empty)) as ids:
        assert ids.claim(new_id(), 1) == CLAIMED
    # The creator died between sizing the file and writing its header.
    zeroed = tmp_path / "zeroed"
    zeroed.write_bytes(bytes(8192))
    with window(str(zeroed)) as ids:
        assert ids.claim(new_id(), 1) == CLAIMED
        assert zeroed.stat().st_size == ids.file_bytes


def test_reopening_keeps_the_content(path, new_id):
    keys = [new_id() for _ in range(100)]
    with window(path) as ids:
        for key in keys:
            accept(ids, key, 42)
    with window(path, "2") as reopened:
        assert reopened.live_ids == 100
        assert all(reopened.claim(key, 42) == DUPLICATE for key in keys)


def test_rejects_bad_keys_and_use_after_close(path, new_id):
    ids = window(path)
    for bad in (b"", b"x" * 15, b"x" * 17, new_id().hex().encode()):
        for call in (ids.confirm, ids.abandon, ids.state):
            with pytest.raises(ValueError):
                call(bad)
        for call in (ids.claim, ids.remember):
            with pytest.raises(ValueError):
                call(bad, 1)
    with pytest.raises(TypeError):
        ids.claim(None, 1)
    with pytest.raises(TypeError):
        ids.claim(new_id().hex(), 1)
    ids.close()
    ids.close()
    with pytest.raises(ValueError, match="closed"):
        ids.claim(new_id(), 1)
    with pytest.raises(ValueError, match="closed"):
        ids.claims_of_this_instance()
    with pytest.raises(ValueError, match="closed"):
        ids.live_ids


# --- many processes at once ------------------------------------------------------------

def claim_in_step(path, worker, geometry, keys, clock_step, arrived, results):
    cpus = sorted(os.sched_getaffinity(0))
    # Spread over the CPUs so that the workers truly run at the same time.
    os.sched_setaffinity(0, {cpus[worker % len(cpus)]})
    # All open the file at once, which also races its creation.
    ids = AcceptedIds(path, f"worker-{worker}", **geometry)
    # The epochs move because their sub-tables fill, and with clock_step as the
    # clocks move on: one step a key, each worker's a step ahead of the one
    # before, so that the workers racing for a key see the epoch change.
    clock_origin = 1_000_000_000_000 + worker * clock_step
    claimed, outcome_kinds, epochs = [], set(), []
    deadline = time.monotonic() + 60
    for position, key in enumerate(keys):
        # All meet before each key, to race head to head for it: spinning,
        # for the workers to start within a fraction of a claim of each other.
        arrived[worker] = position + 1
        while min(arrived) <= position:
            os.sched_yield()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker} waited for the others at key {position}")
        ids._now_ms = clock_origin + position * clock_step
        first_epoch = ids.epoch
        outcome = ids.claim(key, 2005)
        if outcome == CLAIMED:
            ids.confirm(key)
            claimed.append(key)
        outcome_kinds.add(outcome)
        epochs.append((first_epoch, ids.epoch))
    results.put((claimed, outcome_kinds, epochs))


@pytest.mark.parametrize("subtables, capacity, clock_step", [
    (16, 15, 0), (5, 8, 0), (5, 400, 0), (16, 10**6, 5)])
def test_processes_claim_each_key_once_while_epochs_race_by(path, subtables, capacity, clock_step):
    """Each id is claimed by one worker alone, with the epoch moving as often
    as every claim (a sub-table of one id per epoch) or by the clock."""
    workers = max(2, min(4, len(os.sched_getaffinity(0))))
    keys = [test_random.randbytes(16) for _ in range(100_000)]
    # Epochs of 5 ms when the clock moves.
    geometry = {"capacity": capacity, "window_ms": (subtables - 1) * 5, "subtables": subtables}
    arrived = fork.RawArray("q", workers)
    results = fork.Queue()
    processes = [
        fork.Process(target=claim_in_step, args=(path, worker, geometry, keys, clock_step, arrived, results))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    claimed, outcome_kinds, epochs = [], set(), []
    for _ in processes:
        worker_claimed, worker_outcome_kinds, worker_epochs = results.get(timeout=90)
        claimed.extend(worker_claimed)
        outcome_kinds |= worker_outcome_kinds
        epochs.append(worker_epochs)
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    # A key whose race took no more epochs than an id is remembered for could
    # not be forgotten and claimed again: it is claimed exactly once. With room
    # for about one id per epoch, two claims of one key now and then push the
    # epoch on in turns, each finding full the epoch the other just filled
    # (4 runs in 130 had one to three such keys, of 100,000); such a race can
    # outlast the window, and a second claim may then stand, as a window cut
    # short by traffic above its capacity allows.
    long_races = {key for key, key_epochs in zip(keys, zip(*epochs))
                  if max(last for _, last in key_epochs) - min(first for first, _ in key_epochs) > subtables - 1}
    assert len(long_races) <= len(keys) // 1000
    with AcceptedIds(path, "checker", **geometry) as ids:
        assert ids.epoch >= len(keys) * (subtables - 1) // capacity - 1
    claims = collections.Counter(claimed)
    assert set(claims) == set(keys)
    assert all(count == 1 for key, count in claims.items() if key not in long_races)
    assert all(count <= len(processes) for count in claims.values())
    assert outcome_kinds <= {CLAIMED, DUPLICATE, IN_PROGRESS}


# --- a writer stopped mid-insert -------------------------------------------------------------

def tag_offset_of(ids: AcceptedIds, shared: mmap.mmap, key: bytes) -> int:
    payloads_at = -(-(HEADER_BYTES + ids.slots * 8) // 64) * 64
    key_at = shared.find(key, payloads_at)
    assert key_at > 0 and (key_at - payloads_at) % PAYLOAD_BYTES == 0
    return HEADER_BYTES + (key_at - payloads_at) // PAYLOAD_BYTES * 8


def set_state(shared: mmap.mmap, tag_at: int, state: int) -> None:
    # One aligned 8-byte store, as the core's atomics make: struct.pack_into
    # clears the bytes first, and a concurrent claim would see a free slot.
    tag = ctypes.c_uint64.from_buffer(shared, tag_at)
    tag.value = tag.value & ~STATE_MASK | state
    del tag  # the mmap cannot close while a view of it is alive


def test_an_abandoned_writing_slot_is_retired_after_the_timeout(path, new_id):
    with window(path) as ids, open(path, "r+b") as file:
        key = new_id()
        assert ids.claim(key, 100) == CLAIMED
        with mmap.mmap(file.fileno(), 0) as shared:
            # As if the claiming process had died mid-insert.
            set_state(shared, tag_offset_of(ids, shared, key), WRITING)
        started = time.monotonic()
        assert ids.claim(key, 100) == CLAIMED
        assert 0.045 <= time.monotonic() - started < 1.0
        # The abandoned slot was retired: nobody waits for it again.
        started = time.monotonic()
        assert ids.claim(key, 100) == IN_PROGRESS
        assert ids.state(key) == (CLAIMED, 100)
        assert time.monotonic() - started < 0.04


def test_a_writing_slot_of_another_key_is_passed_without_waiting(path, new_id):
    # One row per sub-table: every key's probe path starts at the same slot.
    with window(path, capacity=4, load_factor=0.9) as ids, open(path, "r+b") as file:
        assert ids.slots == SUBTABLES * 2
        stuck = new_id()
        assert ids.claim(stuck, 100) == CLAIMED
        with mmap.mmap(file.fileno(), 0) as shared:
            set_state(shared, tag_offset_of(ids, shared, stuck), WRITING)
        started = time.monotonic()
        others = [new_id() for _ in range(20)]
        assert [ids.claim(key, 100) for key in others] == [CLAIMED] * 20
        assert time.monotonic() - started < 0.04


def finish_insert_later(path, tag_at, waiting, finished_at):
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as shared:
        waiting.set()
        time.sleep(0.005)
        set_state(shared, tag_at, 2)
        # After publishing: a claim that gave up on this writer did so before this.
        finished_at.value = time.monotonic()


def test_a_slot_mid_insert_is_waited_for(path, new_id):
    with window(path) as ids, open(path, "r+b") as file:
        key = new_id()
        assert ids.claim(key, 100) == CLAIMED
        with mmap.mmap(file.fileno(), 0) as shared:
            tag_at = tag_offset_of(ids, shared, key)
            set_state(shared, tag_at, WRITING)
        waiting, finished_at = fork.Event(), fork.Value("d", 0.0)
        writer = fork.Process(target=finish_insert_later, args=(path, tag_at, waiting, finished_at))
        writer.start()
        assert waiting.wait(timeout=10)
        started = time.monotonic()
        outcome = ids.claim(key, 100)
        writer.join(timeout=10)
        assert writer.exitcode == 0
        if outcome != IN_PROGRESS:
            # Only a writer stalled past the timeout may be given up on.
            assert outcome == CLAIMED
            assert finished_at.value - started >= 0.045
