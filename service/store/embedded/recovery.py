"""At start, before serving: turn what the journal and the payments record
say a previous run of this instance left into work, and leave the shared
state consistent with them.

- Settlements the journal holds and the record had not committed yet go into
  the record now (it ignores those it holds), so the summary survives any
  kill; the ledger's tail of this instance then starts empty.
- Payments the journal holds as outstanding are resumed: never sent ones
  are queued again, sent ones with an unknown outcome are asked about first.
  One the record already holds as paid is dropped (a segment left behind by
  a crash may replay history the record has).
- The accepted-id table may have been lost with the shared directory, or
  hold claims this instance made and never made durable: the outstanding ids
  are remembered again, and its claims the journal does not hold are
  abandoned, so a client's retry of those is accepted. A table found empty
  (the shared directory lost, as at a host's reboot) is refilled from the
  record with the payments of the idempotency window, so a retry within it
  is still answered "already accepted"; the settlements of the window this
  journal replays are remembered too, whether the table was empty or not
  (another instance may have refilled it before the record held them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from paycore.core.accepted_ids import AcceptedIds
from paycore.core.journal import Journal
from paycore.core.ledger_tail import LedgerTail

from ...payment import Attempt, Payment
from .record import PaymentsRecord, Settlement, wall_clock_ms

log = logging.getLogger("paycore.recovery")

NEVER_SENT = -1


@dataclass
class Resumed:
    unsent: list[Payment] = field(default_factory=list)
    unresolved: list[Attempt] = field(default_factory=list)
    already_paid: list[Payment] = field(default_factory=list)


def recover(journal: Journal, record: PaymentsRecord, tail: LedgerTail, ids: AcceptedIds) -> Resumed:
    window_starts_ms = wall_clock_ms() - ids.window_ms
    # Settled within the window, and in this journal only until now: another
    # instance that found the table empty refilled it from the record without them.
    replayed: list[Payment] = []

    def commit(chunk: list[tuple[bytes, int, int, int, int, int]]) -> None:
        record.record_recovered([
            Settlement(correlation_id=correlation_id, cents=cents, processor=processor,
                       requested_at_ms=requested_at_ms, generation=generation, journal_seq=seq)
            for correlation_id, processor, requested_at_ms, cents, generation, seq in chunk], chunk[-1][5])
        replayed.extend(Payment(correlation_id, cents) for correlation_id, _, requested_at_ms, cents, _, _ in chunk
                        if requested_at_ms >= window_starts_ms)

    journal.recover(record.committed_seq(), commit)
    record.record_recovered([], journal.durable_seq)
    tail.raise_generation(record.generation())
    tail.reset()

    outstanding = journal.outstanding()
    paid = record.settled_among([correlation_id for correlation_id, *_ in outstanding])
    resumed = Resumed()
    for correlation_id, cents, processor, requested_at_ms in outstanding:
        payment = Payment(correlation_id, cents)
        if correlation_id in paid:
            resumed.already_paid.append(payment)
        elif processor == NEVER_SENT:
            resumed.unsent.append(payment)
        else:
            resumed.unresolved.append(Attempt(payment, processor, requested_at_ms))

    held = {payment.correlation_id for payment in (*resumed.unsent, *(a.payment for a in resumed.unresolved))}
    found_empty = ids.live_ids == 0
    abandoned = 0
    for correlation_id in ids.claims_of_this_instance():
        if correlation_id in held:
            ids.confirm(correlation_id)
        else:
            ids.abandon(correlation_id)
            abandoned += 1
    for payment in (*resumed.unsent, *(attempt.payment for attempt in resumed.unresolved), *replayed):
        ids.remember(payment.correlation_id, payment.cents)
    if found_empty:
        refilled = 0
        for payment in record.settled_since(window_starts_ms):
            ids.remember(payment.correlation_id, payment.cents)
            refilled += 1
        if refilled:
            log.warning("the accepted-id table was empty: %d ids of the idempotency window "
                        "remembered again from the payments record", refilled)
    if resumed.unsent or resumed.unresolved or abandoned:
        log.warning("resuming %d unsent payments and %d with an unknown outcome from the journal; "
                    "%d claims never made durable abandoned",
                    len(resumed.unsent), len(resumed.unresolved), abandoned)
    return resumed
