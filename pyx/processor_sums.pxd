# Counts and cents per processor (0 default, 1 fallback), summed so that no
# sum wraps whatever the number of payments: cents in their low 32 bits and
# the rest, put together as Python integers at the end. For the summaries of
# the ledger tail and the recent ledger. Inline: no module of its own.
from libc.stdint cimport uint64_t


cdef struct ProcessorSums:
    uint64_t count[2]
    uint64_t cents_low[2]
    uint64_t cents_high[2]


cdef inline void add_payments(ProcessorSums* sums, int processor, uint64_t count, uint64_t cents) noexcept nogil:
    sums.count[processor] += count
    sums.cents_low[processor] += cents & 0xFFFFFFFFULL
    sums.cents_high[processor] += cents >> 32


cdef inline tuple sums_tuple(const ProcessorSums* sums):
    """(default count, default cents, fallback count, fallback cents)."""
    return (sums.count[0], (<object>sums.cents_high[0] << 32) + sums.cents_low[0],
            sums.count[1], (<object>sums.cents_high[1] << 32) + sums.cents_low[1])
