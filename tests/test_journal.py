"""The journal's segments, writers (a thread, or the caller's own thread for a
journal in memory), checkpoints and recovery (pyx/journal.pyx)."""
import os
import resource
import select
import signal
import subprocess
import sys
import threading

import pytest

from conftest import random_uuid, test_random
from paycore.core.accepted_ids import CLAIMED, DURABLE, AcceptedIds
from paycore.core.journal import Journal

HEADER_SIZE = 32
RECORD_SIZE = 56
NEVER_SENT = -1


def new_id() -> bytes:
    return random_uuid().bytes


def recovered(directory, committed_seq=0, **options):
    """A journal opened on directory and recovered, with the settlements it handed over."""
    settled = []
    journal = Journal(str(directory), **options)
    journal.recover(committed_seq, settled.extend)
    return journal, settled


class Serving:
    """A recovered journal with its writer running in a thread."""

    def __init__(self, directory, committed_seq=0, pending_ids=None, **options) -> None:
        self.journal, self.settled = recovered(directory, committed_seq, **options)
        if pending_ids is not None:
            self.journal.keep_pending_ids(pending_ids)
        self.thread = threading.Thread(target=self.journal.serve)
        self.thread.start()

    def write(self) -> int:
        """Submit what was appended and wait until it is durable."""
        target = self.journal.appended_seq
        self.journal.submit()
        self.wait_until(lambda: self.journal.durable_seq >= target)
        return target

    def wait_until(self, condition) -> None:
        """Until the writer's work makes condition() true."""
        while not condition():
            assert select.select([self.journal.event_fd], [], [], 5)[0], "the writer did not answer"
            self.journal.drain_event()

    def close(self) -> None:
        self.journal.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class WrittenHere(Serving):
    """A recovered journal written on this thread (open_here), as the event
    loop writes one on tmpfs."""

    def __init__(self, directory, committed_seq=0, pending_ids=None, **options) -> None:
        self.journal, self.settled = recovered(directory, committed_seq, **options)
        if pending_ids is not None:
            self.journal.keep_pending_ids(pending_ids)
        self.journal.open_here()

    def write(self) -> int:
        target = self.journal.appended_seq
        assert self.journal.write_here()
        assert self.journal.durable_seq == target
        return target

    def wait_until(self, condition) -> None:
        assert condition(), "work done here is done on return"

    def close(self) -> None:
        self.journal.close()


@pytest.fixture(params=[Serving, WrittenHere], ids=["writer-thread", "written-here"])
def writer(request):
    """Either way of writing a journal: the tests below hold for both."""
    return request.param


def segment_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".seg"))


def test_outstanding_payments_survive_a_restart(tmp_path, writer):
    settled, unsent, sent, discarded = (new_id() for _ in range(4))
    with writer(tmp_path) as serving:
        journal = serving.journal
        assert journal.accepted(settled, 2005) == 1
        assert journal.accepted(unsent, 1000) == 2
        journal.accepted(sent, 3000)
        journal.accepted(discarded, 4000)
        journal.sending(settled, 0, 1_700_000_000_100)
        journal.sending(sent, 0, 1_700_000_000_200)
        journal.sending(sent, 1, 1_700_000_000_300)
        settled_seq = journal.settled(settled, 0, 1_700_000_000_099, 2005, 7)
        journal.discarded(discarded)
        assert serving.write() == 9
        assert journal.outstanding_count == 2
    journal, handed = recovered(tmp_path)
    assert sorted(journal.outstanding()) == sorted([
        (unsent, 1000, NEVER_SENT, 0), (sent, 3000, 1, 1_700_000_000_300)])
    assert handed == [(settled, 0, 1_700_000_000_099, 2005, 7, settled_seq)]
    assert journal.appended_seq == 9
    journal.close()


def test_settlements_the_record_committed_are_not_handed_over_again(tmp_path):
    first, second = new_id(), new_id()
    with Serving(tmp_path) as serving:
        for payment in (first, second):
            serving.journal.accepted(payment, 100)
        committed = serving.journal.settled(first, 0, 1, 100, 0)
        later = serving.journal.settled(second, 1, 2, 100, 0)
        serving.write()
    journal, handed = recovered(tmp_path, committed_seq=committed)
    assert [settlement[0] for settlement in handed] == [second]
    assert handed[0][5] == later
    journal.close()


def test_sequence_numbers_go_on_after_a_restart_and_past_what_the_record_committed(tmp_path):
    with Serving(tmp_path) as serving:
        serving.journal.accepted(new_id(), 100)
        serving.write()
    with Serving(tmp_path) as serving:
        assert serving.journal.accepted(new_id(), 100) == 2
        serving.write()
    journal, _ = recovered(tmp_path, committed_seq=50)
    assert journal.appended_seq == 50
    journal.close()


def test_full_segments_are_checkpointed_and_deleted_once_committed(tmp_path, writer):
    pending = {}
    with writer(tmp_path, segment_bytes=HEADER_SIZE + 64 * RECORD_SIZE) as serving:
        journal = serving.journal
        last_settled = 0
        for round_number in range(40):
            for _ in range(10):
                payment = test_random.randbytes(16)
                pending[payment] = test_random.randrange(1, 10**6)
                journal.accepted(payment, pending[payment])
            for payment in test_random.sample(sorted(pending), 5):
                last_settled = journal.settled(payment, 0, round_number, pending.pop(payment), 0)
            serving.write()
        assert len(segment_files(tmp_path)) > 3
        journal.committed_seq = last_settled
        # The segments before the newest go: their settlements are committed,
        # and the newest segment's checkpoint holds what they left outstanding.
        serving.wait_until(lambda: len(segment_files(tmp_path)) == 1)
    journal, handed = recovered(tmp_path, committed_seq=last_settled)
    assert handed == []
    assert {payment: cents for payment, cents, _, _ in journal.outstanding()} == pending
    journal.close()


def test_a_torn_record_ends_its_segment_and_the_next_segment_still_counts(tmp_path):
    kept, torn = new_id(), new_id()
    with Serving(tmp_path) as serving:
        serving.journal.accepted(kept, 100)
        serving.journal.accepted(torn, 200)
        serving.write()
    (first,) = segment_files(tmp_path)
    with open(tmp_path / first, "r+b") as file:  # the second record's second half never reached the disk
        file.seek(HEADER_SIZE + RECORD_SIZE + RECORD_SIZE // 2)
        file.write(bytes(RECORD_SIZE // 2))
    later = new_id()
    with Serving(tmp_path) as serving:  # starts a new segment: the torn one stays behind it
        serving.journal.accepted(later, 300)
        serving.write()
    journal, _ = recovered(tmp_path)
    assert sorted(payment for payment, *_ in journal.outstanding()) == sorted([kept, later])
    journal.close()


def test_a_corrupt_record_ends_its_segment(tmp_path):
    payments = [new_id() for _ in range(3)]
    with Serving(tmp_path) as serving:
        for payment in payments:
            serving.journal.accepted(payment, 100)
        serving.write()
    (name,) = segment_files(tmp_path)
    with open(tmp_path / name, "r+b") as file:
        file.seek(HEADER_SIZE + RECORD_SIZE + 40)  # the second record's cents
        file.write(b"\x01")
    journal, _ = recovered(tmp_path)
    assert [payment for payment, *_ in journal.outstanding()] == payments[:1]
    journal.close()


def test_a_file_that_is_not_a_segment_is_refused(tmp_path):
    (tmp_path / f"{1:020d}.seg").write_bytes(b"not a journal segment at all, certainly not")
    journal = Journal(str(tmp_path))
    with pytest.raises(ValueError, match="not a paycore journal segment"):
        journal.recover(0, print)
    journal.close()


def test_a_checkpoint_a_crash_cut_short_is_removed(tmp_path):
    (tmp_path / f"{5:020d}.seg.tmp").write_bytes(b"half a checkpoint")
    journal, _ = recovered(tmp_path)
    assert os.listdir(tmp_path) == ["lock"]
    journal.close()


def test_one_process_at_a_time(tmp_path):
    journal = Journal(str(tmp_path))
    with pytest.raises(RuntimeError, match="open in another process"):
        Journal(str(tmp_path))
    journal.close()
    Journal(str(tmp_path)).close()


def test_serving_needs_a_recovery_first(tmp_path):
    journal = Journal(str(tmp_path))
    with pytest.raises(RuntimeError, match="recover"):
        journal.serve()
    journal.close()


def test_a_stop_before_the_writer_begins_still_writes_what_was_submitted(tmp_path):
    """A service stopped while its writer thread is starting: serve() then
    writes what was submitted and returns, where it raised before."""
    journal, _ = recovered(tmp_path)
    payment = new_id()
    journal.accepted(payment, 100)
    journal.submit()
    journal.stop()
    journal.serve()
    assert journal.durable_seq == 1
    with pytest.raises(RuntimeError, match="already served"):
        journal.serve()
    journal.close()
    with pytest.raises(RuntimeError, match="already served"):
        journal.serve()
    journal, _ = recovered(tmp_path)
    assert journal.outstanding() == [(payment, 100, NEVER_SENT, 0)]
    journal.close()


@pytest.mark.parametrize("call", [
    lambda journal: journal.accepted(b"short", 100),
    lambda journal: journal.sending(new_id(), 2, 0),
    lambda journal: journal.settled(new_id(), -1, 0, 100, 0),
    lambda journal: journal.settled(new_id(), 0, 0, 100, 2**32),
])
def test_bad_arguments_append_nothing(tmp_path, call):
    journal, _ = recovered(tmp_path)
    with pytest.raises((ValueError, OverflowError)):
        call(journal)
    assert journal.appended_seq == 0
    journal.close()


def test_a_failed_write_is_retried_and_nothing_before_it_counts_as_durable(tmp_path):
    """A file size limit makes writes fail as a full disk would (EFBIG)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with Serving(tmp_path) as serving:
            journal = serving.journal
            journal.accepted(new_id(), 100)
            serving.write()
            resource.setrlimit(resource.RLIMIT_FSIZE, (HEADER_SIZE + RECORD_SIZE, hard))
            journal.accepted(new_id(), 200)
            journal.submit()
            # The event of the first batch may still be unread: wait for the error itself.
            serving.wait_until(lambda: journal.error != 0)
            assert journal.error == 27  # EFBIG
            assert journal.durable_seq == 1
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            serving.wait_until(lambda: journal.durable_seq >= 2)
            assert journal.error == 0
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    journal, _ = recovered(tmp_path)
    assert len(journal.outstanding()) == 2
    journal.close()


KILLED_WRITER = """
import select, sys, threading
from paycore.core.journal import Journal
journal = Journal(sys.argv[1])
journal.recover(0, print)
threading.Thread(target=journal.serve, daemon=True).start()
count = 0
while True:
    for _ in range(50):
        count += 1
        journal.accepted(count.to_bytes(16, "big"), count)
    journal.submit()
    while journal.durable_seq < count:
        select.select([journal.event_fd], [], [], 5)
        journal.drain_event()
    print(count, flush=True)
"""


def test_a_writer_killed_mid_batch_leaves_every_batch_it_reported_durable(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    reported = 0
    for line in child.stdout:
        reported = int(line)
        if reported >= 20_000:
            break
    child.kill()
    child.wait()
    journal, _ = recovered(tmp_path)
    held = sorted(int.from_bytes(payment, "big") for payment, *_ in journal.outstanding())
    assert held[: reported] == list(range(1, reported + 1))
    assert held == list(range(1, len(held) + 1))  # a prefix: nothing after a gap
    journal.close()


def test_the_ids_of_payments_pending_past_the_idempotency_window_stay_known(tmp_path, writer):
    ids = AcceptedIds(str(tmp_path / "accepted-ids"), "1", 1000, 4000)
    ids._now_ms = 1_000_000_000
    pending, settled = new_id(), new_id()
    for uuid16, cents in ((pending, 100), (settled, 200)):
        assert ids.claim(uuid16, cents) == CLAIMED
        ids.confirm(uuid16)
    with writer(tmp_path / "journal", pending_ids=ids) as serving:
        journal = serving.journal
        journal.accepted(pending, 100)
        journal.accepted(settled, 200)
        journal.settled(settled, 0, 1, 200, 0)
        serving.write()
        for _ in range(3 * ids.subtables):  # three windows, an epoch at a time, each filled with new ids
            ids._now_ms += ids.epoch_ms
            journal.discarded(new_id())  # a batch: the writer looks at the epoch first
            serving.write()
            for _ in range(ids.capacity // (ids.subtables - 1) - 1):
                other = new_id()
                assert ids.claim(other, 1) == CLAIMED
                ids.confirm(other)
        assert ids.state(pending) == (DURABLE, 100)
    ids.close()


def test_a_journal_on_tmpfs_knows_it_is_in_memory(memory_path):
    journal, _ = recovered(memory_path)
    assert journal.in_memory
    journal.close()


def test_a_journal_written_here_has_no_writer_thread_to_hand_batches_to(tmp_path):
    with WrittenHere(tmp_path) as here:
        here.journal.accepted(new_id(), 100)
        with pytest.raises(RuntimeError):
            here.journal.submit()
        with pytest.raises(RuntimeError):
            here.journal.serve()
        assert here.write() == 1
    with Serving(tmp_path) as serving, pytest.raises(RuntimeError):
        serving.journal.write_here()


def test_a_write_that_fails_here_keeps_its_records_for_the_next_write(tmp_path):
    """A file size limit makes writes fail as a full tmpfs would (EFBIG)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    first, second, third = new_id(), new_id(), new_id()
    try:
        with WrittenHere(tmp_path) as here:
            journal = here.journal
            journal.accepted(first, 100)
            here.write()
            resource.setrlimit(resource.RLIMIT_FSIZE, (HEADER_SIZE + RECORD_SIZE, hard))
            journal.accepted(second, 200)
            assert not journal.write_here()
            assert journal.error == 27  # EFBIG
            assert journal.durable_seq == 1
            journal.accepted(third, 300)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            assert here.write() == 3
            assert journal.error == 0
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    journal, _ = recovered(tmp_path)
    assert sorted(payment for payment, *_ in journal.outstanding()) == sorted([first, second, third])
    journal.close()
