"""What a journal left by a killed instance turns into at the next start."""

from conftest import random_uuid
from paycore.core.journal import Journal, RecordKind, read_journal
from paycore.service.store.embedded.recovery import recover, replay

ACCEPTED, SENDING, SETTLED = RecordKind.ACCEPTED, RecordKind.SENDING, RecordKind.SETTLED
DEFAULT, FALLBACK = 0, 1


def ids(count):
    return [random_uuid().bytes for _ in range(count)]


def test_each_payment_ends_up_where_its_history_says():
    settled, unsent, in_flight, retried = ids(4)
    records = [
        (ACCEPTED, settled, 0, 2005, 0, 0),
        (ACCEPTED, unsent, 0, 1000, 0, 0),
        (SENDING, settled, DEFAULT, 0, 111, 0),
        (ACCEPTED, in_flight, 0, 3000, 0, 0),
        (SETTLED, settled, DEFAULT, 2005, 110, 0),  # the processor's requestedAt wins
        (SENDING, in_flight, DEFAULT, 0, 222, 0),
        (ACCEPTED, retried, 0, 4000, 0, 0),
        (SENDING, retried, DEFAULT, 0, 333, 0),
        (SENDING, retried, FALLBACK, 0, 444, 0),
    ]
    result = replay(records, ledger_generation=0)
    assert result.generation == 0
    assert result.settled == [(DEFAULT, 110, 2005)]
    assert result.unsent == [(unsent, 1000)]
    assert result.unresolved == [(in_flight, 3000, DEFAULT, 222), (retried, 4000, FALLBACK, 444)]
    assert sorted(result.accepted) == sorted([(settled, 2005), (unsent, 1000), (in_flight, 3000),
                                              (retried, 4000)])


def test_the_compacted_journal_replays_to_the_same_work():
    settled, unsent, in_flight = ids(3)
    records = [
        (ACCEPTED, settled, 0, 2005, 0, 0),
        (SENDING, settled, FALLBACK, 0, 111, 0),
        (SETTLED, settled, FALLBACK, 2005, 111, 0),
        (ACCEPTED, unsent, 0, 1000, 0, 0),
        (ACCEPTED, in_flight, 0, 3000, 0, 0),
        (SENDING, in_flight, DEFAULT, 0, 222, 0),
    ]
    first = replay(records, 0)
    again = replay(first.compacted, 0)
    assert len(first.compacted) == 4  # one record per settled payment
    for name in ("settled", "accepted", "unsent", "unresolved", "compacted"):
        assert getattr(again, name) == getattr(first, name), name


def test_a_purge_drops_earlier_totals_but_not_earlier_promises():
    old_settled, old_unsent, new_settled = ids(3)
    records = [
        (ACCEPTED, old_settled, 0, 100, 0, 4),
        (SETTLED, old_settled, DEFAULT, 100, 10, 4),
        (ACCEPTED, old_unsent, 0, 200, 0, 4),
        (ACCEPTED, new_settled, 0, 300, 0, 5),
        (SETTLED, new_settled, DEFAULT, 300, 30, 5),
    ]
    result = replay(records, ledger_generation=5)
    assert result.settled == [(DEFAULT, 30, 300)]
    assert result.unsent == [(old_unsent, 200)]  # a 2xx was given: still owed to a processor
    assert result.accepted == [(new_settled, 300)]  # the id table was purged since


def test_a_lost_ledger_directory_adopts_the_journals_generation():
    payment, = ids(1)
    records = [(ACCEPTED, payment, 0, 100, 0, 7), (SETTLED, payment, FALLBACK, 100, 10, 7)]
    result = replay(records, ledger_generation=0)
    assert result.generation == 7
    assert result.settled == [(FALLBACK, 10, 100)]


def test_nothing_after_the_outcome_counts_and_repeats_are_ignored():
    payment, = ids(1)
    records = [
        (ACCEPTED, payment, 0, 100, 0, 0),
        (ACCEPTED, payment, 0, 100, 0, 0),
        (SETTLED, payment, DEFAULT, 100, 10, 0),
        (SENDING, payment, FALLBACK, 0, 20, 0),
        (SETTLED, payment, FALLBACK, 100, 20, 0),
    ]
    result = replay(records, 0)
    assert result.settled == [(DEFAULT, 10, 100)]
    assert result.unresolved == [] and result.unsent == []


def test_recover_compacts_the_file(tmp_path):
    path = str(tmp_path / "journal-1.log")
    journal = Journal(path)
    for payment in ids(50):
        journal.accepted(payment, 100, 0)
        journal.sending(payment, DEFAULT, 10, 0)
        journal.settled(payment, DEFAULT, 10, 100, 0)
    journal.flush()
    journal.close()
    result = recover(path, ledger_generation=0, sync=False)
    assert len(result.settled) == 50
    assert read_journal(path) == result.compacted
    assert len(read_journal(path)) == 50
