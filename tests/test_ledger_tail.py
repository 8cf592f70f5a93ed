"""The ledger's tail: settlements not yet in the payments record, shared by every instance."""
import multiprocessing

import pytest

from paycore.core.ledger_tail import LedgerTail

DEFAULT, FALLBACK = 0, 1
MAX_CENTS = 99_999_999_999_999


def test_a_summary_counts_what_the_record_had_not_committed(tmp_path):
    with LedgerTail(str(tmp_path), "1", capacity=16) as tail:
        assert tail.append(1, 0, DEFAULT, 1_000, 2005)
        assert tail.append(2, 0, FALLBACK, 2_000, 100)
        assert tail.append(3, 0, DEFAULT, 3_000, 50)
        snapshot = tail.snapshot()
        assert snapshot.totals({}, 0) == (2, 2055, 1, 100)
        assert snapshot.totals({"1": 1}, 0) == (1, 50, 1, 100)
        assert snapshot.totals({"1": 3}, 0) == (0, 0, 0, 0)
        assert snapshot.totals({}, 0, 2_000, 3_000) == (1, 50, 1, 100)  # inclusive
        assert snapshot.totals({}, 0, None, 1_999) == (1, 2005, 0, 0)
        assert snapshot.totals({}, 1) == (0, 0, 0, 0)  # another purge generation


def test_committed_entries_are_dropped_and_their_room_reused(tmp_path):
    with LedgerTail(str(tmp_path), "1", capacity=4) as tail:
        for seq in range(1, 5):
            assert tail.append(seq, 0, DEFAULT, seq, 1)
        assert tail.room == 0
        assert not tail.append(5, 0, DEFAULT, 5, 1)
        tail.release_through(2)
        assert tail.room == 2 and len(tail) == 2
        assert tail.append(5, 0, DEFAULT, 5, 1) and tail.append(6, 0, DEFAULT, 6, 1)
        assert tail.snapshot().totals({}, 0) == (4, 4, 0, 0)
        tail.reset()
        assert tail.room == 4 and tail.snapshot().totals({}, 0) == (0, 0, 0, 0)


def test_every_instance_reads_every_tail(tmp_path):
    with LedgerTail(str(tmp_path), "a") as first, LedgerTail(str(tmp_path), "b") as second:
        first.append(10, 0, DEFAULT, 1, 100)
        second.append(10, 0, FALLBACK, 1, 7)
        for reader in (first, second):
            assert reader.snapshot().totals({"a": 0, "b": 0}, 0) == (1, 100, 1, 7)
            assert reader.snapshot().totals({"a": 10}, 0) == (0, 0, 1, 7)


def test_what_a_previous_run_left_counts_until_reset(tmp_path):
    with LedgerTail(str(tmp_path), "1") as tail:
        tail.append(1, 0, DEFAULT, 1, 100)
    with LedgerTail(str(tmp_path), "1") as tail:
        assert tail.snapshot().totals({}, 0) == (1, 100, 0, 0)
        tail.reset()
        assert tail.snapshot().totals({}, 0) == (0, 0, 0, 0)


def test_a_ring_of_another_size_starts_empty(tmp_path):
    with LedgerTail(str(tmp_path), "1", capacity=8) as tail:
        tail.append(1, 0, DEFAULT, 1, 100)
    with LedgerTail(str(tmp_path), "1", capacity=16) as tail:
        assert tail.room == 16 and tail.snapshot().totals({}, 0) == (0, 0, 0, 0)


def test_one_owner_per_instance(tmp_path):
    with LedgerTail(str(tmp_path), "1"):
        with pytest.raises(RuntimeError, match="already has a ledger tail"):
            LedgerTail(str(tmp_path), "1")


def test_the_purge_generation_only_moves_forward(tmp_path):
    with LedgerTail(str(tmp_path), "a") as first, LedgerTail(str(tmp_path), "b") as second:
        assert first.generation == 0
        first.raise_generation(3)
        assert second.generation == 3
        second.raise_generation(2)
        assert first.generation == 3


def test_sums_do_not_wrap(tmp_path):
    with LedgerTail(str(tmp_path), "1", capacity=200_000) as tail:
        for seq in range(1, 100_001):
            assert tail.append(seq, 0, DEFAULT, seq, MAX_CENTS)
        assert tail.snapshot().totals({}, 0) == (100_000, 100_000 * MAX_CENTS, 0, 0)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 57])
def test_bad_instance_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        LedgerTail(str(tmp_path), name)


def _write_and_commit(directory: str, rounds: int, started) -> None:
    """Append settlements whose cents say their sequence number, dropping
    committed ones all along, so slots are reused while readers copy."""
    with LedgerTail(directory, "writer", capacity=64) as tail:
        started.set()
        seq = 0
        for _ in range(rounds):
            for _ in range(48):
                seq += 1
                assert tail.append(seq, 0, DEFAULT, seq, seq * 3)
            tail.release_through(seq - 8)


def test_a_reader_never_sees_an_entry_overwritten_while_it_copied(tmp_path):
    context = multiprocessing.get_context("fork")
    started = context.Event()
    writer = context.Process(target=_write_and_commit, args=(str(tmp_path), 100_000, started))
    writer.start()
    assert started.wait(10)
    with LedgerTail(str(tmp_path), "reader") as reader:
        snapshots = 0
        while writer.is_alive() or snapshots == 0:
            entries = [entry for entry in reader.snapshot().entries() if entry[0] == "writer"]
            seqs = [seq for _, seq, *_ in entries]
            # Whole entries, in order, none dropped in the middle of a copy.
            assert all(cents == 3 * seq and requested_at == seq
                       for _, seq, _, _, requested_at, cents in entries)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
            snapshots += 1
    writer.join()
    assert writer.exitcode == 0
