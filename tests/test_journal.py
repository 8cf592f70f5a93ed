import os

import pytest

from conftest import random_uuid
from paycore.core.journal import Journal, RecordKind, read_journal, write_journal

HEADER_SIZE = 16
RECORD_SIZE = 48


def new_id() -> bytes:
    return random_uuid().bytes


def test_records_read_back_in_order(tmp_path):
    path = str(tmp_path / "journal.log")
    first, second = new_id(), new_id()
    journal = Journal(path)
    journal.accepted(first, 2005, 3)
    journal.sending(first, 1, 1_700_000_000_123, 3)
    journal.settled(first, 1, 1_700_000_000_100, 2005, 4)
    journal.accepted(second, 99_999_999_999_999, 4)
    assert journal.pending == 4
    assert read_journal(path) == []  # appended is not written
    assert journal.flush() == 4
    assert journal.pending == 0 and journal.size == HEADER_SIZE + 4 * RECORD_SIZE
    assert read_journal(path) == [
        (RecordKind.ACCEPTED, first, 0, 2005, 0, 3),
        (RecordKind.SENDING, first, 1, 0, 1_700_000_000_123, 3),
        (RecordKind.SETTLED, first, 1, 2005, 1_700_000_000_100, 4),
        (RecordKind.ACCEPTED, second, 0, 99_999_999_999_999, 0, 4),
    ]
    journal.close()


def test_reopening_appends(tmp_path):
    path = str(tmp_path / "journal.log")
    ids = [new_id() for _ in range(3)]
    for payment_id in ids:
        journal = Journal(path)
        journal.accepted(payment_id, 100, 0)
        journal.flush()
        journal.close()
    assert [record[1] for record in read_journal(path)] == ids


def test_a_torn_tail_ends_the_replay_and_is_cut_off(tmp_path):
    path = str(tmp_path / "journal.log")
    kept, torn = new_id(), new_id()
    journal = Journal(path)
    journal.accepted(kept, 100, 0)
    journal.accepted(torn, 200, 0)
    journal.flush()
    journal.close()
    with open(path, "r+b") as file:
        file.truncate(HEADER_SIZE + RECORD_SIZE + RECORD_SIZE // 2)
    assert [record[1] for record in read_journal(path)] == [kept]
    # Appending after a torn record must not shift what follows.
    journal = Journal(path)
    assert journal.size == HEADER_SIZE + RECORD_SIZE
    later = new_id()
    journal.accepted(later, 300, 0)
    journal.flush()
    journal.close()
    assert [record[1] for record in read_journal(path)] == [kept, later]


def test_a_corrupt_record_ends_the_replay(tmp_path):
    path = str(tmp_path / "journal.log")
    journal = Journal(path)
    ids = [new_id() for _ in range(3)]
    for payment_id in ids:
        journal.accepted(payment_id, 100, 0)
    journal.flush()
    journal.close()
    with open(path, "r+b") as file:
        file.seek(HEADER_SIZE + RECORD_SIZE + 40)  # the second record's cents
        file.write(b"\x01")
    assert [record[1] for record in read_journal(path)] == ids[:1]


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    path = tmp_path / "journal.log"
    path.write_bytes(b"not a journal at all, certainly")
    with pytest.raises(ValueError, match="not a paycore journal"):
        read_journal(str(path))
    with pytest.raises(ValueError, match="not a paycore journal"):
        Journal(str(path))


def test_a_missing_journal_is_empty(tmp_path):
    assert read_journal(str(tmp_path / "absent.log")) == []


def test_one_writer_at_a_time(tmp_path):
    path = str(tmp_path / "journal.log")
    journal = Journal(path)
    with pytest.raises(RuntimeError, match="open in another process"):
        Journal(path)
    journal.close()
    Journal(path).close()


def test_rewriting_replaces_the_file_atomically(tmp_path):
    path = str(tmp_path / "journal.log")
    journal = Journal(path)
    for _ in range(10):
        journal.accepted(new_id(), 100, 0)
    journal.flush()
    journal.close()
    kept = [(RecordKind.SETTLED, new_id(), 0, 100, 1_700_000_000_000, 2)]
    write_journal(path, kept, sync=True)
    assert read_journal(path) == kept
    assert not os.path.exists(path + ".new")


def test_rewriting_with_a_bad_record_leaves_the_journal_alone(tmp_path):
    path = str(tmp_path / "journal.log")
    good = [(RecordKind.ACCEPTED, new_id(), 0, 100, 0, 0)]
    write_journal(path, good)
    with pytest.raises(ValueError):
        write_journal(path, [*good, (RecordKind.SENDING, new_id(), 2, 0, 0, 0)])
    assert read_journal(path) == good
    assert not os.path.exists(path + ".new")


@pytest.mark.parametrize("call", [
    lambda journal: journal.accepted(b"short", 100, 0),
    lambda journal: journal.sending(new_id(), 2, 0, 0),
    lambda journal: journal.settled(new_id(), -1, 0, 100, 0),
])
def test_bad_arguments_append_nothing(tmp_path, call):
    journal = Journal(str(tmp_path / "journal.log"))
    with pytest.raises(ValueError):
        call(journal)
    assert journal.pending == 0
    journal.close()
