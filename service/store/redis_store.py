"""The Redis store (PAYCORE_STORE=redis://HOST:PORT/DB): any number of
instances on any number of hosts share one Redis (6.2 or later).

Each call is one round trip: one command, or one Lua script where it reads
and writes more than one key, so that it is atomic. Keys, all in the selected
database:

    paycore:pending          stream  a pending payment per entry {id: uuid16, cents},
                                     read by the consumer group "dispatch": one
                                     consumer per instance, named PAYCORE_INSTANCE
    paycore:entry            hash    uuid16 -> its pending entry id
    paycore:sent             hash    uuid16 -> "processor:requestedAt" of its recorded send
    paycore:paid             hash    uuid16 -> "processor:requestedAt:cents" once settled
    paycore:paid:day:<day>   list    with a retention: the ids paid on that day
    paycore:paid:days        zset    with a retention: the days that have such a list
    paycore:ledger:...       hashes  counts and cents by requestedAt (redis/ledger.py)
    paycore:lease:<instance> string  exists while the instance lives (PX store_lease_ms)
    paycore:health:poller    string  the instance polling processor health (PX interval)
    paycore:health:board     hash    processor name -> JSON report, "version" -> publish count

What grows: the pending payments' keys with the payments pending, nothing
else with the payments accepted; the paid record and the ledger with the
payments of the retention (PAYCORE_RETENTION_DAYS; 0: all of them). An id
is known while its payment is pending or paid, whatever its age: a repost
is answered from the stream or the paid record at once (the idempotency
window of the embedded store's shared table is not needed here), and no
payment is sent or counted twice. A paid record older than the retention
is forgotten a slice at a time by every instance, the ledger's keys expire
by themselves.

A payment read from the stream is in its instance's pending-entries list until
settled. An instance whose lease has expired is dead: the others claim its
entries (with the sends it recorded) and resume them. Before each send the
sender checks that the entry is still its own, so a payment taken over is
sent by one instance only, and a settle counts only if it acknowledges the
entry, so a payment is counted once. A purge starts the ledger over and
keeps the rest.

Redis must not evict keys: the store refuses to start unless its
maxmemory-policy is noeviction. A reply from Redis is as durable as Redis is
configured to make it (appendonly/appendfsync). Some keys are named in the
scripts rather than passed as KEYS: this is one Redis, not a cluster.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from paycore.core.ring_queue import RingQueue

from ..config import Settings
from ..payment import Attempt, Payment
from .base import Acceptance, PaymentStatus, PendingWork
from .redis import ledger
from .resp import Arg, RedisClient, RedisError, Script

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("paycore.store")

STREAM = b"paycore:pending"
ENTRIES = b"paycore:entry"
SENT = b"paycore:sent"
PAID = b"paycore:paid"
PAID_DAYS = b"paycore:paid:days"
LEASE_PREFIX = b"paycore:lease:"
POLLER = b"paycore:health:poller"
BOARD = b"paycore:health:board"
GROUP = b"dispatch"

# New entries read per XREADGROUP, at most (and never more than the queue has room for).
FEED_BATCH = 256
# Short, so that stopping the feeder never waits long for its connection.
FEED_BLOCK_MS = 200
QUEUE_ROOM_WAIT_S = 0.02
# Entries claimed per script call, from this instance's past or from dead ones.
TAKE_BATCH = 256
# At close: how long Redis gets to take the settles still on their way.
CLOSE_WAIT_S = 1.0
# With a retention: how often the paid record is looked at, and ids forgotten per call.
RETENTION_CHECK_S = 60.0
RETENTION_SLICE = 1000
# Keys a purge's sweep of the ledger's past generations looks at per SCAN.
SWEEP_COUNT = 1000
REQUIRED_EVICTION_POLICY = b"noeviction"

# Lua: the cents of the payment pending under uuid16, or nil.
_PENDING_CENTS = """
local function pending_cents(entries, stream, uuid)
  local entry = redis.call('HGET', entries, uuid)
  if entry then return redis.call('XRANGE', stream, entry, entry)[1][2][4] end
end
"""

ACCEPT = Script(_PENDING_CENTS + """
-- KEYS: entries, stream, paid. ARGV: uuid16, cents.
-- Answers an Acceptance: 0 accepted, 1 duplicate, 2 conflict.
local known = pending_cents(KEYS[1], KEYS[2], ARGV[1])
if not known then
  local paid = redis.call('HGET', KEYS[3], ARGV[1])
  if paid then known = string.match(paid, '[^:]*$') end
end
if known then
  if known == ARGV[2] then return 1 end
  return 2
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'cents', ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], entry)
return 0
""")

SENDING = Script("""
-- KEYS: entries, stream, sent. ARGV: group, this instance, uuid16, "processor:requestedAt".
-- 1 and the send recorded while the entry is pending with this instance; else 0.
local entry = redis.call('HGET', KEYS[1], ARGV[3])
if not entry then return 0 end
if #redis.call('XPENDING', KEYS[2], ARGV[1], entry, entry, 1, ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return 1
""")

SETTLE = Script(ledger.ADD + """
-- KEYS: entries, stream, sent, paid, paid days. ARGV: group, uuid16, processor,
-- requestedAt, cents, cents mod 2**32, cents >> 32, how long the ledger keeps
-- it (0: for ever), its day ('' without a retention).
-- Into the ledger only when this call acknowledges the entry: a payment counts once.
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return 0 end
local acknowledged = redis.call('XACK', KEYS[2], ARGV[1], entry)
if acknowledged == 1 then
  add_to_ledger(ARGV[3], ARGV[4], ARGV[6], ARGV[7], ARGV[8])
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3] .. ':' .. ARGV[4] .. ':' .. ARGV[5])
  if ARGV[9] ~= '' then
    redis.call('RPUSH', 'paycore:paid:day:' .. ARGV[9], ARGV[2])
    redis.call('ZADD', KEYS[5], ARGV[9], ARGV[9])
  end
end
redis.call('XDEL', KEYS[2], entry)
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return acknowledged
""")

LOOKUP = Script(_PENDING_CENTS + """
-- KEYS: entries, stream, paid. ARGV: uuid16.
-- Answers {cents if pending or false, "processor:requestedAt:cents" if paid or false}.
return {pending_cents(KEYS[1], KEYS[2], ARGV[1]) or false, redis.call('HGET', KEYS[3], ARGV[1])}
""")

FORGET_PAID = Script("""
-- KEYS: paid, paid days. ARGV: the first day kept, how many ids at most.
-- Forgets that many ids of the oldest day before it; 1 if it found one, else 0.
local day = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1)[1]
if not day then return 0 end
local list = 'paycore:paid:day:' .. day
local ids = redis.call('LPOP', list, ARGV[2])
if ids then redis.call('HDEL', KEYS[1], unpack(ids)) end
if redis.call('EXISTS', list) == 0 then redis.call('ZREM', KEYS[2], day) end
return 1
""")

# KEYS: stream, sent. ARGV[1]: group, ARGV[2]: this instance.
_CLAIM = """
local function pending_ids(first, count, consumer)
  local ids = {}
  for i, item in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], first, '+', count, consumer)) do
    ids[i] = item[1]
  end
  return ids
end
-- Makes the entries this instance's and appends uuid16, cents and the recorded
-- send ('' when none) of each one still in the stream.
local function claim(ids, taken)
  if #ids == 0 then return end
  for _, entry in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))) do
    if entry and entry[2] then
      local uuid = entry[2][2]
      taken[#taken + 1] = uuid
      taken[#taken + 1] = entry[2][4]
      taken[#taken + 1] = redis.call('HGET', KEYS[2], uuid) or ''
    end
  end
end
"""

RESUME_OWN = Script(_CLAIM + """
-- ARGV[3]: where the page starts ('-', or '(' and the last id of the page before),
-- ARGV[4]: its size. Answers the page's last id ('' when it is empty), then the entries.
local ids = pending_ids(ARGV[3], ARGV[4], ARGV[2])
local taken = {ids[#ids] or ''}
claim(ids, taken)
return taken
""")

TAKE_OVER_DEAD = Script(_CLAIM + """
-- ARGV[3]: the lease key prefix, ARGV[4]: how many entries to claim at most.
-- Answers 1 when that bound was reached (there may be more), else 0; then the entries.
-- A consumer without a lease and without entries is removed.
local budget = tonumber(ARGV[4])
local taken = {0}
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #fields, 2 do consumer[fields[i]] = fields[i + 1] end
  local name, pending = consumer['name'], consumer['pending']
  if name ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. name) == 0 then
    if pending > 0 and budget > 0 then
      local ids = pending_ids('-', budget, name)
      claim(ids, taken)
      budget = budget - #ids
      pending = pending - #ids
    end
    if pending == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name) end
  end
end
if budget == 0 then taken[1] = 1 end
return taken
""")

PUBLISH = Script("""
-- KEYS: board. ARGV: processor name, report, ...
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HINCRBY', KEYS[1], 'version', 1)
""")


def _nothing(_reply: Any) -> None:
    return None


def _status(correlation_id: bytes) -> Callable[[list[bytes | None]], PaymentStatus | None]:
    def status(reply: list[bytes | None]) -> PaymentStatus | None:
        cents, settled = reply
        if settled is not None:
            processor, requested_at_ms, settled_cents = (int(part) for part in settled.split(b":"))
            payment = Payment(correlation_id, settled_cents)
            return PaymentStatus(payment, Attempt(payment, processor, requested_at_ms))
        return None if cents is None else PaymentStatus(Payment(correlation_id, int(cents)), None)
    return status


def split_taken(flat: list[bytes]) -> tuple[list[Payment], list[Attempt]]:
    """Claimed entries (uuid16, cents, recorded send or b'') into never sent
    and sent with an unknown outcome."""
    unsent: list[Payment] = []
    unresolved: list[Attempt] = []
    for index in range(0, len(flat), 3):
        payment, sent = Payment(flat[index], int(flat[index + 1])), flat[index + 2]
        if sent:
            processor, _, requested_at_ms = sent.partition(b":")
            unresolved.append(Attempt(payment, int(processor), int(requested_at_ms)))
        else:
            unsent.append(payment)
    return unsent, unresolved


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _wall_minus_monotonic_ms() -> float:
    return time.time() * 1000 - time.monotonic() * 1000


class RedisHealthBoard:
    """The poller's turn is a key set only if absent, expiring after the
    interval: one poll per interval across every host, and a dead poller's
    turn ends by itself. Reports carry wall-clock times on the board (hosts
    share no monotonic clock) and this process's monotonic times outside it."""

    def __init__(self, client: RedisClient, instance: bytes) -> None:
        self._client = client
        self._instance = instance
        self._seen_version: bytes | None = None

    def claim_poll(self, interval_ms: int) -> asyncio.Future:
        return self._client.execute(b"SET", POLLER, self._instance, b"NX", b"PX", interval_ms,
                                    convert=_turn_time)

    def publish(self, reports: dict[str, dict[str, Any]]) -> asyncio.Future:
        offset_ms = _wall_minus_monotonic_ms()
        fields: list[Arg] = []
        for name, report in reports.items():
            fields += [name, orjson.dumps({**report, "observedAt": report["observedAt"] + offset_ms})]
        return self._client.run(PUBLISH, (BOARD,), fields, convert=_nothing)

    def latest(self) -> asyncio.Future:
        return self._client.execute(b"HGETALL", BOARD, convert=self._reports_if_new)

    def close(self) -> None:
        """Nothing of its own to release: the poller's turn expires by itself."""

    def _reports_if_new(self, reply: list[bytes]) -> dict[str, dict[str, Any]] | None:
        board = dict(zip(reply[::2], reply[1::2]))
        version = board.pop(b"version", None)
        if version is None or version == self._seen_version:
            return None
        self._seen_version = version
        offset_ms = _wall_minus_monotonic_ms()
        reports = {name.decode(): orjson.loads(report) for name, report in board.items()}
        for report in reports.values():
            report["observedAt"] -= offset_ms
        return reports


def _turn_time(reply: bytes | None) -> float | None:
    return time.monotonic() * 1000 if reply is not None else None


class RedisStore:
    journal = None  # what Redis answers is durable: no journal per instance
    # Settles wait in memory while Redis is away, however many: nothing to keep room in.
    settlement_room = sys.maxsize
    promised = 0  # what Redis has answered it holds: an answer never waits

    def __init__(self, settings: Settings) -> None:
        self._instance = settings.instance.encode()
        self._lease_key = LEASE_PREFIX + self._instance
        self._lease_ms = settings.store_lease_ms
        self._retention_days = settings.retention_days
        self._ledger_keep_ms = ledger.keep_ms(settings.retention_days)
        self._assume_noeviction = settings.store_assume_noeviction
        # Retries of Redis calls back off as payments do (PAYCORE_RETRY_MIN_MS / _MAX_MS).
        self._retry_min_s = settings.retry_min_ms / 1000
        self._retry_max_s = settings.retry_max_ms / 1000
        reply_timeout_s = settings.store_timeout_ms / 1000
        self._client = RedisClient(settings.store, reply_timeout_s=reply_timeout_s)
        # XREADGROUP ... BLOCK holds its connection: the feeder has its own
        # (its BLOCK stays well under the reply timeout).
        self._feed_client = RedisClient(settings.store, reply_timeout_s=reply_timeout_s)
        self.health = RedisHealthBoard(self._client, self._instance)
        self._queue: RingQueue | None = None
        self._work: PendingWork | None = None
        self._tasks: list[asyncio.Task] = []
        self._sweeps: set[asyncio.Task] = set()
        self._settles_in_flight = 0
        self._settles_done = asyncio.Event()
        self._settles_done.set()
        self._closed = False

    async def start(self, queue: RingQueue, work: PendingWork) -> None:
        self._queue = queue
        self._work = work
        await self._refuse_evicting_redis()
        await self._create_group()
        # The lease first: nobody may take over what this instance resumes.
        await self._renew_lease()
        unsent, unresolved = await self._resume_own()
        if unsent or unresolved:
            log.warning("resuming %d unsent payments and %d with an unknown outcome",
                        len(unsent), len(unresolved))
        work.resume(unsent, unresolved)
        tasks = [self._feed, self._keep_lease, self._take_over_dead]
        if self._retention_days:
            tasks.append(self._keep_retention)
        self._tasks = [asyncio.ensure_future(task()) for task in tasks]

    def accept(self, payment: Payment) -> asyncio.Future:
        return self._client.run(ACCEPT, (ENTRIES, STREAM, PAID), payment, convert=Acceptance)

    def after_durable(self, promise: int, callback: Callable[..., Any], *args: Any) -> None:
        # What Redis has answered is as durable as this store gets.
        callback(*args)

    def flush_waiting(self) -> None:
        self._client.flush()

    def sending(self, attempt: Attempt) -> asyncio.Future:
        return self._client.run(SENDING, (ENTRIES, STREAM, SENT),
                                (GROUP, self._instance, attempt.payment.correlation_id,
                                 b"%d:%d" % (attempt.processor, attempt.requested_at_ms)),
                                convert=bool)

    def settle(self, attempt: Attempt) -> None:
        self._settles_in_flight += 1
        self._settles_done.clear()
        self._send_settle(attempt, self._retry_min_s)

    @property
    def settles_in_flight(self) -> int:
        """Settles Redis has not answered yet (retried until it does)."""
        return self._settles_in_flight

    def summary(self, from_ms: int | None, to_ms: int | None) -> asyncio.Future:
        retained_from_ms = ledger.retained_from_ms(self._retention_days, _wall_ms())
        first = retained_from_ms if from_ms is None else max(from_ms, retained_from_ms)
        last = ledger.DOMAIN_MS if to_ms is None else to_ms
        return self._client.run(ledger.SUMMARY, (), ledger.summary_runs(first, last), convert=ledger.totals)

    def lookup(self, correlation_id: bytes) -> asyncio.Future:
        return self._client.run(LOOKUP, (ENTRIES, STREAM, PAID), (correlation_id,),
                                convert=_status(correlation_id))

    def purge(self) -> asyncio.Future:
        """A new generation of the ledger, at once; the old ones' keys are
        swept afterwards. The paid record, and the pending payments' stream
        and maps, stay: pending payments are still delivered, and none is
        paid or counted twice."""
        return self._client.run(ledger.NEW_GENERATION, (), (), convert=self._sweep_past_generations)

    async def forget_past_retention(self) -> None:
        """Forget the paid ids from before the retention, a slice per call."""
        first_day_kept = ledger.retained_from_ms(self._retention_days, _wall_ms()) // ledger.DAY_MS
        while await self._client.run(FORGET_PAID, (PAID, PAID_DAYS), (first_day_kept, RETENTION_SLICE)):
            pass

    async def swept(self) -> None:
        """Once the ledger's past generations are gone, as far as purges so far go."""
        await asyncio.gather(*self._sweeps)

    def register_metrics(self, metrics: Metrics) -> None:
        """Nothing of its own to report: what it keeps, Redis reports."""

    async def close(self) -> None:
        """What this instance still holds stays pending under its name. The
        lease goes too on a clean close: the others take over at once what is
        left rather than one lease later (with nothing left, they only drop
        the idle consumer); after a crash it expires by itself."""
        for task in (*self._tasks, *self._sweeps):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sweeps, return_exceptions=True)
        self._feed_client.close()
        try:
            await asyncio.wait_for(self._settles_done.wait(), CLOSE_WAIT_S)
        except TimeoutError:
            log.error("closing with %d settles Redis has not taken; those payments stay pending",
                      self._settles_in_flight)
        self._closed = True
        try:
            await asyncio.wait_for(self._client.execute(b"DEL", self._lease_key), CLOSE_WAIT_S)
        except (TimeoutError, ConnectionError, RedisError) as error:
            log.warning("lease not released, it expires by itself: %r", error)
        self.health.close()
        self._client.close()

    def _send_settle(self, attempt: Attempt, backoff_s: float) -> None:
        payment = attempt.payment
        day = attempt.requested_at_ms // ledger.DAY_MS if self._retention_days else b""
        settled = self._client.run(SETTLE, (ENTRIES, STREAM, SENT, PAID, PAID_DAYS),
                                   (GROUP, payment.correlation_id, attempt.processor, attempt.requested_at_ms,
                                    payment.cents, *ledger.cents_parts(payment.cents),
                                    self._ledger_keep_ms, day))
        settled.add_done_callback(lambda done: self._settle_answered(done, attempt, backoff_s))

    def _settle_answered(self, done: asyncio.Future, attempt: Attempt, backoff_s: float) -> None:
        error = done.exception()
        if error is not None and not self._closed:
            log.warning("settle not taken by Redis, retrying in %.2f s: %r", backoff_s, error)
            asyncio.get_running_loop().call_later(
                backoff_s, self._send_settle, attempt, self._longer(backoff_s))
            return
        self._settles_in_flight -= 1
        if self._settles_in_flight == 0:
            self._settles_done.set()

    def _longer(self, backoff_s: float) -> float:
        """The next wait of an exponential backoff, capped at PAYCORE_RETRY_MAX_MS."""
        return min(backoff_s * 2, self._retry_max_s)

    async def _refuse_evicting_redis(self) -> None:
        """Evicted keys would be payments lost, paid twice or miscounted."""
        address = self._client.address
        try:
            reply = await self._client.execute(b"CONFIG", b"GET", b"maxmemory-policy")
        except RedisError as error:
            if self._assume_noeviction:
                log.warning("cannot read maxmemory-policy (%s); PAYCORE_STORE_ASSUME_NOEVICTION=1 "
                            "vouches that it is noeviction", error)
                return
            raise SystemExit(
                f"Redis at {address} does not tell its maxmemory-policy ({error}); the store needs "
                "noeviction: set it, or when CONFIG is disabled and it is set, start with "
                "PAYCORE_STORE_ASSUME_NOEVICTION=1") from None
        policy = reply[1] if len(reply) == 2 else b"(none)"
        if policy != REQUIRED_EVICTION_POLICY:
            raise SystemExit(
                f"Redis at {address} has maxmemory-policy {policy.decode()}, which may evict the "
                "store's keys (pending payments, the paid record, the ledger): set maxmemory-policy "
                "noeviction (redis.conf, or CONFIG SET maxmemory-policy noeviction)")

    def _sweep_past_generations(self, prefix: bytes) -> None:
        sweep = asyncio.ensure_future(self._sweep(prefix))
        self._sweeps.add(sweep)
        sweep.add_done_callback(self._sweeps.discard)

    async def _sweep(self, current_prefix: bytes) -> None:
        """Unlink every ledger key of a generation before the one current_prefix
        names (never a later one: another purge may have started it)."""
        current = int(current_prefix.split(b":")[2])
        cursor = b"0"
        try:
            while True:
                cursor, keys = await self._client.execute(
                    b"SCAN", cursor, b"MATCH", ledger.KEY_PATTERN, b"COUNT", SWEEP_COUNT)
                past = [key for key in keys if key != ledger.GENERATION and int(key.split(b":")[2]) < current]
                if past:
                    await self._client.execute(b"UNLINK", *past)
                if cursor == b"0":
                    return
        except (ConnectionError, RedisError) as error:
            log.warning("sweeping the purged ledger failed; the next purge sweeps it again: %r", error)

    async def _keep_retention(self) -> None:
        while True:
            try:
                await self.forget_past_retention()
            except (ConnectionError, RedisError) as error:
                log.warning("forgetting paid ids past the retention failed: %r", error)
            await asyncio.sleep(RETENTION_CHECK_S)

    async def _create_group(self) -> None:
        # From the stream's start: entries accepted before the group existed are delivered too.
        try:
            await self._client.execute(b"XGROUP", b"CREATE", STREAM, GROUP, b"0", b"MKSTREAM")
        except RedisError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise

    async def _renew_lease(self) -> None:
        await self._client.execute(b"SET", self._lease_key, b"1", b"PX", self._lease_ms)

    async def _resume_own(self) -> tuple[list[Payment], list[Attempt]]:
        """What this instance had read before a restart and not settled."""
        taken: list[bytes] = []
        start = b"-"
        while True:
            page = await self._client.run(RESUME_OWN, (STREAM, SENT),
                                          (GROUP, self._instance, start, TAKE_BATCH))
            if not page[0]:
                return split_taken(taken)
            taken += page[1:]
            start = b"(" + page[0]

    def _queue_room(self) -> int:
        assert self._queue is not None
        return self._queue.capacity - len(self._queue)

    async def _feed(self) -> None:
        """New pending payments onto the queue, as long as it has room."""
        backoff_s = self._retry_min_s
        while True:
            room = min(self._queue_room(), FEED_BATCH)
            if room <= 0:
                await asyncio.sleep(QUEUE_ROOM_WAIT_S)
                continue
            try:
                await self._feed_once(room)
                backoff_s = self._retry_min_s
            except (ConnectionError, RedisError) as error:
                log.warning("reading pending payments failed, retrying in %.2f s: %r", backoff_s, error)
                await asyncio.sleep(backoff_s)
                backoff_s = self._longer(backoff_s)

    async def _feed_once(self, room: int) -> None:
        read = self._feed_client.execute(
            b"XREADGROUP", b"GROUP", GROUP, self._instance, b"COUNT", room,
            b"BLOCK", FEED_BLOCK_MS, b"STREAMS", STREAM, b">")
        self._feed_client.flush()
        try:
            reply = await read
        except RedisError as error:
            if not str(error).startswith("NOGROUP"):
                raise
            await self._create_group()  # Redis lost its data: the group starts again
            return
        if reply:
            self._push(reply[0][1])  # [[stream, entries]]

    def _push(self, entries: list[list[Any]]) -> None:
        assert self._queue is not None and self._work is not None
        # The queue had room when they were asked for; a requeue may have taken it since.
        overflow: list[Payment] = []
        for _, fields in entries:
            uuid16, cents = fields[1], int(fields[3])
            if not self._queue.push(uuid16, cents):
                overflow.append(Payment(uuid16, cents))
        if overflow:
            self._work.resume(overflow, [])
        self._work.notify()

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self._renew_lease()
            except (ConnectionError, RedisError) as error:
                log.warning("lease not renewed: %r", error)

    async def _take_over_dead(self) -> None:
        """Claim the pending payments of instances whose lease has expired."""
        assert self._work is not None
        while True:
            try:
                more = True
                while more and self._queue_room() > 0:
                    taken = await self._client.run(
                        TAKE_OVER_DEAD, (STREAM, SENT),
                        (GROUP, self._instance, LEASE_PREFIX, min(self._queue_room(), TAKE_BATCH)))
                    more = taken[0] == 1
                    unsent, unresolved = split_taken(taken[1:])
                    if unsent or unresolved:
                        log.warning("took over %d unsent payments and %d with an unknown outcome "
                                    "from dead instances", len(unsent), len(unresolved))
                        self._work.resume(unsent, unresolved)
            except (ConnectionError, RedisError) as error:
                log.warning("taking over dead instances' payments failed: %r", error)
            await asyncio.sleep(self._lease_ms / 3000)
