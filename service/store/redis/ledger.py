"""The Redis store's ledger: counts and cents per processor in buckets of
16**level milliseconds (level 0 to 10: 1 ms to 2**40 ms, about 35 years),
aligned to the epoch. The 16 buckets that make up one bucket of the level
above share a hash, whose key expires with the retention:

    paycore:ledger:<generation>:<level>:<parent>   hash, parent = ms >> 4 * (level + 1)
        "<child><processor>n" -> count
        "<child><processor>l" -> cents mod 2**32 (carried into "h" as it fills)
        "<child><processor>h" -> cents >> 32 (absent while 0)
    paycore:ledger:generation                      string, the current generation

child is the bucket's hex digit within its parent. A settle adds to one
bucket per level (11 hashes); a summary reads at most 15 buckets of each level
on each side of its range, in at most 22 hashes, whatever the range and
however long the history: the coarsest buckets that fit, then finer ones
toward either edge. No field can overflow: "l" stays below 2**32 and "h"
grows by less than 2**32 per payment. A purge starts a new generation
(atomically, so no settle or summary sees half of it) and the old one's
keys are swept afterwards.

With a retention of R days a summary never counts before the start of the
day R days back, as the embedded record (which deletes what lies before it);
a hash expires a day after every bucket in it is past that, so every bucket
a summary may read is still there.
"""
from __future__ import annotations

from ..resp import Arg, Script

LEVELS = 11
FANOUT_BITS = 4
# requestedAt ms a bucket covers: [0, 2**44), until the year 2527.
DOMAIN_MS = 1 << (FANOUT_BITS * LEVELS)
DAY_MS = 86_400_000
# Beyond a day past the retention: room for hosts' clocks that disagree.
EXPIRY_MARGIN_MS = 3_600_000
GENERATION = b"paycore:ledger:generation"
KEY_PATTERN = b"paycore:ledger:*"
LOW_BITS = 32
# Each summary total comes back from Lua in two parts, below and above this.
DIGITS_SPLIT = 10**9

# Lua: the current generation's key prefix.
_PREFIX = """
local function ledger_prefix()
  return 'paycore:ledger:' .. (redis.call('GET', 'paycore:ledger:generation') or '0') .. ':'
end
"""

# Lua: add_to_ledger(processor, ms, cents mod 2**32, cents >> 32, keep_ms or 0)
# into every level; keep_ms > 0: each hash expires that long after its span.
ADD = _PREFIX + """
local function add_to_ledger(processor, ms, low, high, keep_ms)
  local prefix = ledger_prefix()
  ms, low, high, keep_ms = tonumber(ms), tonumber(low), tonumber(high), tonumber(keep_ms)
  local width = 1
  for level = 0, 10 do
    local bucket = math.floor(ms / width)
    local parent = math.floor(bucket / 16)
    local key = prefix .. level .. ':' .. string.format('%d', parent)
    local field = string.format('%x', bucket % 16) .. processor
    local first = redis.call('HINCRBY', key, field .. 'n', 1) == 1
    local carry = high
    if redis.call('HINCRBY', key, field .. 'l', low) >= 4294967296 then
      redis.call('HINCRBY', key, field .. 'l', -4294967296)
      carry = carry + 1
    end
    if carry > 0 then redis.call('HINCRBY', key, field .. 'h', carry) end
    -- Last: a time already past deletes the key.
    if first and keep_ms > 0 then
      redis.call('PEXPIREAT', key, string.format('%d', (parent + 1) * width * 16 + keep_ms))
    end
    width = width * 16
  end
end
"""

SUMMARY = Script(_PREFIX + """
-- ARGV: quadruples (level, parent, first child, last child).
-- Answers per processor: count, cents mod 2**32 and cents >> 32 summed, each
-- as (sum div 1e9, sum mod 1e9) so that it stays exact in Lua's doubles.
local prefix = ledger_prefix()
local sums = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local function add(at, value)
  if not value then return end
  local digits = #value
  if digits > 9 then
    sums[at] = sums[at] + tonumber(string.sub(value, 1, digits - 9))
    value = string.sub(value, digits - 8)
  end
  sums[at + 1] = sums[at + 1] + tonumber(value)
end
for i = 1, #ARGV, 4 do
  local fields = {}
  for child = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]) do
    local digit = string.format('%x', child)
    for processor = 0, 1 do
      for _, kind in ipairs({'n', 'l', 'h'}) do fields[#fields + 1] = digit .. processor .. kind end
    end
  end
  local values = redis.call('HMGET', prefix .. ARGV[i] .. ':' .. ARGV[i + 1], unpack(fields))
  for j = 1, #values, 3 do
    local at = ((j - 1) / 3 % 2) * 6 + 1
    add(at, values[j])
    add(at + 2, values[j + 1])
    add(at + 4, values[j + 2])
  end
end
return sums
""")

# Answers the new generation's key prefix: everything else under paycore:ledger: is the past's.
NEW_GENERATION = Script("""
return 'paycore:ledger:' .. redis.call('INCR', 'paycore:ledger:generation') .. ':'
""")


def cents_parts(cents: int) -> tuple[int, int]:
    """What a payment adds to a bucket's "l" and "h"."""
    return cents & ((1 << LOW_BITS) - 1), cents >> LOW_BITS


def keep_ms(retention_days: int) -> int:
    """How long a bucket's hash outlives the last millisecond in it; 0: for ever."""
    return (retention_days + 1) * DAY_MS + EXPIRY_MARGIN_MS if retention_days else 0


def retained_from_ms(retention_days: int, now_ms: int) -> int:
    """The first millisecond a summary counts: the start of the day
    retention_days back (the embedded record's cutoff); 0 with no retention."""
    return (now_ms - retention_days * DAY_MS) // DAY_MS * DAY_MS if retention_days else 0


def summary_runs(from_ms: int, to_ms: int) -> list[Arg]:
    """The summary script's arguments: the buckets, as runs of siblings
    (level, parent, first child, last child), that cover [from_ms, to_ms]
    (both inclusive, clipped to the ledger's domain) exactly once."""
    runs: list[Arg] = []
    low, high = max(from_ms, 0), min(to_ms, DOMAIN_MS - 1) + 1  # half-open, in buckets of the level
    fanout = 1 << FANOUT_BITS
    for level in range(LEVELS):
        if low >= high:
            break
        if level == LEVELS - 1:  # one hash holds the whole domain's coarsest buckets
            runs += [level, 0, low, high - 1]
            break
        # Up to the next bucket of the level above, and from the last one below high.
        left_end = min(-(-low // fanout) * fanout, high)
        right_start = max(high // fanout * fanout, left_end)
        for first, end in ((low, left_end), (right_start, high)):
            if first < end:
                runs += [level, first >> FANOUT_BITS, first % fanout, (end - 1) % fanout]
        low, high = -(-low // fanout), high // fanout
    return runs


def totals(sums: list[int]) -> tuple[int, int, int, int]:
    """(default count, default cents, fallback count, fallback cents) from the summary script."""
    exact = [sums[i] * DIGITS_SPLIT + sums[i + 1] for i in range(0, 12, 2)]
    return (exact[0], exact[1] + (exact[2] << LOW_BITS), exact[3], exact[4] + (exact[5] << LOW_BITS))
