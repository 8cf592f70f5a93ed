"""At start: read what the journal says a previous run of this instance left
behind, and turn it into work.

- Payments a processor confirmed (SETTLED) of the current purge generation
  become this instance's share of the ledger again, and their ids are claimed
  again (both may have been lost with the shared directory).
- Payments accepted and never sent go back to the queue.
- Payments whose last send has no known outcome are resolved by asking the
  processors before anything is sent again (Dispatcher.resolve_after_restart).

The journal is then rewritten with only what is still needed, so it does not
grow across restarts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from paycore.core.journal import RecordKind, read_journal, write_journal

# (kind, uuid16, processor, cents, requested_at_ms, generation), as read_journal gives them.
JournalEntry = tuple[int, bytes, int, int, int, int]


@dataclass
class _PaymentHistory:
    cents: int
    accepted_generation: int
    last_send: tuple[int, int] | None = None   # (processor, requested_at_ms)
    settled: JournalEntry | None = None


@dataclass
class Replay:
    generation: int
    # (processor, requested_at_ms, cents): this instance's share of the ledger.
    settled: list[tuple[int, int, int]] = field(default_factory=list)
    # (uuid16, cents) of the current generation, settled or not: the accepted ids.
    accepted: list[tuple[bytes, int]] = field(default_factory=list)
    # (uuid16, cents), in the order they were accepted.
    unsent: list[tuple[bytes, int]] = field(default_factory=list)
    # (uuid16, cents, processor, requested_at_ms) of the last send.
    unresolved: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    # What the journal must still hold.
    compacted: list[JournalEntry] = field(default_factory=list)


def replay(records: list[JournalEntry], ledger_generation: int) -> Replay:
    """Fold the journal's records into the work they leave. The current purge
    generation is the ledger's, or the journal's newest if the ledger's
    directory was lost (it starts again from 0)."""
    generation = max([ledger_generation, *(record[5] for record in records)])
    histories: dict[bytes, _PaymentHistory] = {}
    for record in records:
        kind, uuid16, processor, cents, requested_at_ms, record_generation = record
        history = histories.get(uuid16)
        if kind == RecordKind.ACCEPTED:
            if history is None:
                histories[uuid16] = _PaymentHistory(cents, record_generation)
        elif history is None:
            if kind == RecordKind.SETTLED:  # a compacted journal keeps only this
                histories[uuid16] = _PaymentHistory(cents, record_generation, settled=record)
        elif history.settled is None:
            if kind == RecordKind.SENDING:
                history.last_send = (processor, requested_at_ms)
            else:
                history.settled = record

    result = Replay(generation)
    for uuid16, history in histories.items():
        settled = history.settled
        if settled is not None:
            if settled[5] == generation:
                result.settled.append((settled[2], settled[4], settled[3]))
                result.accepted.append((uuid16, history.cents))
                result.compacted.append(settled)
            continue
        if history.accepted_generation == generation:
            result.accepted.append((uuid16, history.cents))
        result.compacted.append((RecordKind.ACCEPTED, uuid16, 0, history.cents, 0,
                                 history.accepted_generation))
        if history.last_send is None:
            result.unsent.append((uuid16, history.cents))
        else:
            processor, requested_at_ms = history.last_send
            result.unresolved.append((uuid16, history.cents, processor, requested_at_ms))
            result.compacted.append((RecordKind.SENDING, uuid16, processor, 0, requested_at_ms,
                                     history.accepted_generation))
    return result


def recover(path: str, ledger_generation: int, sync: bool) -> Replay:
    """Replay the journal at `path` and leave it compacted. The caller holds
    the instance's ledger, so no other process writes this journal meanwhile."""
    result = replay(read_journal(path), ledger_generation)
    write_journal(path, result.compacted, sync)
    return result
