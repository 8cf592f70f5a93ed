"""A process that hands the payments record numbered batches of settlements,
as an instance would, and prints each committed sequence as it comes back:
the test kills it at some point, or runs two at once on one file.

The settlements of batch `seq` depend on seq alone, so two instances writing
the same sequence numbers settle the same payments.

Run: python tests/record_writer.py PATH INSTANCE BATCHES
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import sys

from paycore.service.store.embedded.record import PaymentsRecord, Settlement

BATCH_SIZE = 200
BASE_MS = 1_752_600_000_000
AHEAD = 20  # batches handed and not yet committed, at most


def batch(seq: int) -> list[Settlement]:
    return [
        Settlement(hashlib.blake2b(b"%d:%d" % (seq, index), digest_size=16).digest(),
                   1 + (seq * 7919 + index * 104729) % 10**9, (seq + index) % 2,
                   BASE_MS + seq * 37 + index % 41, 0, seq)
        for index in range(BATCH_SIZE)
    ]


async def main(path: str, instance: str, batches: int) -> None:
    record = PaymentsRecord(path, instance, os.path.dirname(path), sync=False)
    record.open()
    committed = record.committed_seq()
    advanced = asyncio.Event()

    def on_committed(seq: int) -> None:
        nonlocal committed
        committed = seq
        print(seq, flush=True)
        advanced.set()

    record.start(asyncio.get_running_loop(), on_committed)
    for seq in range(committed + 1, batches + 1):
        record.submit(batch(seq), seq)
        while seq - committed >= AHEAD:
            advanced.clear()
            await advanced.wait()
    await record.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
