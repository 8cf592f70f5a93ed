"""Group commit: answers and sends wait for the batch holding their promise."""
import asyncio
import os

from conftest import random_uuid
from paycore.core.journal import Journal, RecordKind, read_journal
from paycore.core.ledger import Ledger
from paycore.service.store.embedded.journal import JournalWriter


class FailingFirstWrites:
    """A journal whose first writes fail as a full disk would."""

    def __init__(self, journal: Journal, failures: int) -> None:
        self._journal = journal
        self._failures = failures

    def __getattr__(self, name):
        return getattr(self._journal, name)

    def flush(self) -> int:
        if self._failures:
            self._failures -= 1
            raise OSError(28, os.strerror(28))
        return self._journal.flush()


def run(tmp_path, scenario, failing_writes=0):
    async def main():
        with Ledger(str(tmp_path), "1") as ledger:
            path = str(tmp_path / "journal-1.log")
            writer = JournalWriter(FailingFirstWrites(Journal(path), failing_writes), ledger)
            await scenario(writer, path)
            writer.close()
    asyncio.run(main())


def test_an_answer_waits_for_its_promise_to_be_written(tmp_path):
    async def scenario(writer, path):
        answered = []
        payment = random_uuid().bytes
        writer.accepted(payment, 2005)
        writer.after_durable(answered.append, "first")
        writer.after_durable(answered.append, "second")
        assert answered == [] and read_journal(path) == []
        await asyncio.sleep(0)  # one pass of the loop: the batch is written
        assert answered == ["first", "second"]
        assert [record[0] for record in read_journal(path)] == [RecordKind.ACCEPTED]
        writer.after_durable(answered.append, "nothing pending")
        assert answered[-1] == "nothing pending"
    run(tmp_path, scenario)


def test_a_send_waits_for_its_record_and_outcomes_do_not_hold_anyone(tmp_path):
    async def scenario(writer, path):
        payment = random_uuid().bytes
        writer.sending(payment, 0, 1_700_000_000_000)
        await writer.durable()
        assert [record[0] for record in read_journal(path)] == [RecordKind.SENDING]
        writer.settled(payment, 0, 1_700_000_000_000, 2005)
        assert writer.backlog == 1
        answered = []
        writer.after_durable(answered.append, "summary")
        assert answered == ["summary"]  # an outcome in the buffer holds nobody back
        assert writer.durable().done()
        writer.accepted(random_uuid().bytes, 100)
        await writer.durable()
        assert [record[0] for record in read_journal(path)] == [
            RecordKind.SENDING, RecordKind.SETTLED, RecordKind.ACCEPTED]
    run(tmp_path, scenario)


def test_a_failed_write_keeps_everyone_waiting_until_it_succeeds(tmp_path):
    async def scenario(writer, path):
        answered = []
        writer.accepted(random_uuid().bytes, 100)
        writer.after_durable(answered.append, "answer")
        await asyncio.sleep(0.01)
        assert answered == [] and read_journal(path) == []
        await asyncio.sleep(0.1)  # the retry
        assert answered == ["answer"] and len(read_journal(path)) == 1
    run(tmp_path, scenario, failing_writes=1)
