/*
 * The payment processor of SPEC §2, in C: for benchmarks whose processors must
 * never be what limits the stack. paycore/emulator (Python) is the reference;
 * this one answers the same requests with the same statuses and bodies:
 * POST /payments, GET /payments/{id}, GET /payments/service-health (one
 * answer per window, a line of two), and the admin endpoints behind
 * X-Rinha-Token (summary, token, delay, failure, purge). It takes the same
 * options (--host --port --fee --token --delay --failure --health-interval
 * --max-inflight --max-queued) and prints the same start-up line.
 *
 * Single-threaded, epoll, HTTP/1.1 keep-alive with pipelining (answers leave
 * in request order). Every payment is kept: 32 bytes in an array, a slot of
 * a hash table by correlationId, and 16 bytes in an array ordered by
 * requestedAt (appended while payments come in order, merged in on the next
 * range summary otherwise) with a running total per block of it, so an
 * unbounded summary is O(1) and a range one a binary search, block totals and
 * two partial blocks. --expected-payments sizes the tables up front: growing
 * them is a pause.
 *
 * Where it differs from the reference: amounts whose cents do not fit in 64
 * bits are refused (400, "amount is out of range"); request heads over 64 KiB
 * and chunked bodies are refused (400); --health-interval 0 answers every
 * health check at once.
 *
 * Build: gcc -O2 -Wall -Wextra -o build/processor perf/processor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "http_head.h"
#include "parse_number.h"
#include "stop_signals.h"
#include "tcp_server.h"
#include "timer_heap.h"

#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL
#define US_PER_S 1000000LL
#define HEAD_MAX (64 * 1024)
#define BODY_MAX (1024 * 1024)
#define IN_INITIAL 4096
#define MAX_HEALTH_WAITING 2
#define JSON_MAX_DEPTH 512
#define ORDERED_BLOCK 1024
#define TIMESTAMP_TEXT_MAX 35 /* 2025-07-15T12:34:56.123456789+03:00 */
#define MAX_LOAD_PERCENT 70

typedef __int128 money; /* cents: sums of int64 amounts cannot wrap */

/* ---- options and live configuration ---- */

static struct {
    const char *host;
    long port;
    const char *fee_text;
    int64_t fee_numerator, fee_denominator;
    char *token;
    size_t token_len;
    int64_t delay_ms;
    bool failing;
    double health_interval_s;
    long max_inflight, max_queued;
    long expected_payments;
} config = {
    .host = "127.0.0.1", .port = 8001, .fee_text = "0.07", .fee_numerator = 7, .fee_denominator = 100,
    .health_interval_s = 5.0, .max_inflight = 800, .max_queued = 500, .expected_payments = 1 << 16,
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static void *must_realloc(void *pointer, size_t size)
{
    void *grown = realloc(pointer, size ? size : 1);
    if (!grown) {
        fputs("processor: out of memory\n", stderr);
        exit(1);
    }
    return grown;
}

/* ---- text helpers ---- */

struct text {
    char *data;
    size_t len, cap;
};

static void text_reserve(struct text *t, size_t more)
{
    if (t->len + more <= t->cap)
        return;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < t->len + more)
        cap *= 2;
    t->data = must_realloc(t->data, cap);
    t->cap = cap;
}

static void text_add(struct text *t, const void *bytes, size_t len)
{
    text_reserve(t, len);
    memcpy(t->data + t->len, bytes, len);
    t->len += len;
}

static void text_str(struct text *t, const char *s)
{
    text_add(t, s, strlen(s));
}

static void text_printf(struct text *t, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void text_printf(struct text *t, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    int needed = vsnprintf(NULL, 0, format, args);
    va_end(args);
    text_reserve(t, (size_t)needed + 1);
    va_start(args, format);
    vsnprintf(t->data + t->len, (size_t)needed + 1, format, args);
    va_end(args);
    t->len += (size_t)needed;
}

/* Cents as a JSON number with exactly two decimals (paycore/emulator/wire.py format_cents). */
static void text_cents(struct text *t, money cents)
{
    char digits[48];
    int n = 0;
    bool negative = cents < 0;
    unsigned __int128 magnitude = negative ? (unsigned __int128)(-(cents + 1)) + 1 : (unsigned __int128)cents;
    unsigned fraction = (unsigned)(magnitude % 100);
    magnitude /= 100;
    do {
        digits[n++] = (char)('0' + (int)(magnitude % 10));
        magnitude /= 10;
    } while (magnitude);
    if (negative)
        text_add(t, "-", 1);
    while (n)
        text_add(t, &digits[--n], 1);
    text_printf(t, ".%02u", fraction);
}

enum escaping { JSON_STRING_CONTENTS, PYTHON_REPR_CONTENTS };

/* Text inside the quotes of a JSON string as orjson writes it, or of a Python repr()
   quoted with quote. */
static void text_escaped(struct text *t, const char *s, size_t len, enum escaping how, char quote)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *named = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                            : how == JSON_STRING_CONTENTS && c == '\b' ? "\\b"
                            : how == JSON_STRING_CONTENTS && c == '\f' ? "\\f" : NULL;
        if (c == '\\' || c == (unsigned char)quote) {
            char escaped[2] = {'\\', (char)c};
            text_add(t, escaped, 2);
        } else if (named) {
            text_str(t, named);
        } else if (c < 0x20 || (how == PYTHON_REPR_CONTENTS && c == 0x7f)) {
            text_printf(t, how == JSON_STRING_CONTENTS ? "\\u%04x" : "\\x%02x", c);
        } else {
            text_add(t, &s[i], 1);
        }
    }
}

static void text_json_escaped(struct text *t, const char *s, size_t len)
{
    text_escaped(t, s, len, JSON_STRING_CONTENTS, '"');
}

/* Python's repr() of a str, for the messages that quote what was sent. */
static void text_repr(struct text *t, const char *s, size_t len)
{
    char quote = memchr(s, '\'', len) && !memchr(s, '"', len) ? '"' : '\'';
    text_add(t, &quote, 1);
    text_escaped(t, s, len, PYTHON_REPR_CONTENTS, quote);
    text_add(t, &quote, 1);
}

/* ---- timestamps (paycore/emulator/wire.py parse_timestamp) ---- */

enum timestamp_result { TIMESTAMP_OK, TIMESTAMP_NOT_ISO, TIMESTAMP_INVALID_DATE };

static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int64_t *m, int64_t *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = yoe + era * 400 + (*m <= 2);
}

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static bool digits(const char *s, int count, int64_t *value)
{
    *value = 0;
    for (int i = 0; i < count; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        *value = *value * 10 + (s[i] - '0');
    }
    return true;
}

/* Microseconds since the epoch of YYYY-MM-DDTHH:MM:SS[.f{1,9}][Z|±HH:MM]; no zone means
   UTC, digits beyond the microsecond are dropped. */
static enum timestamp_result parse_timestamp(const char *s, size_t len, int64_t *us)
{
    int64_t year, month, day, hour, minute, second, fraction_us = 0;
    if (len < 19 || !digits(s, 4, &year) || s[4] != '-' || !digits(s + 5, 2, &month) || s[7] != '-' ||
        !digits(s + 8, 2, &day) || s[10] != 'T' || !digits(s + 11, 2, &hour) || s[13] != ':' ||
        !digits(s + 14, 2, &minute) || s[16] != ':' || !digits(s + 17, 2, &second))
        return TIMESTAMP_NOT_ISO;
    size_t at = 19;
    if (at < len && s[at] == '.') {
        size_t start = ++at;
        while (at < len && s[at] >= '0' && s[at] <= '9')
            at++;
        size_t count = at - start;
        if (count < 1 || count > 9)
            return TIMESTAMP_NOT_ISO;
        for (size_t i = 0; i < 6; i++)
            fraction_us = fraction_us * 10 + (i < count ? s[start + i] - '0' : 0);
    }
    int64_t offset_s = 0;
    if (at < len && s[at] == 'Z') {
        at++;
    } else if (at < len && (s[at] == '+' || s[at] == '-')) {
        int64_t offset_hours, offset_minutes;
        if (len - at != 6 || !digits(s + at + 1, 2, &offset_hours) || s[at + 3] != ':' ||
            !digits(s + at + 4, 2, &offset_minutes))
            return TIMESTAMP_NOT_ISO;
        offset_s = (offset_hours * 3600 + offset_minutes * 60) * (s[at] == '+' ? 1 : -1);
        at += 6;
    }
    if (at != len)
        return TIMESTAMP_NOT_ISO;
    static const int month_days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (year < 1 || month < 1 || month > 12 || day < 1 ||
        day > month_days[month - 1] + (month == 2 && is_leap(year)) || hour > 23 || minute > 59 || second > 59)
        return TIMESTAMP_INVALID_DATE;
    int64_t seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset_s;
    *us = seconds * US_PER_S + fraction_us;
    return TIMESTAMP_OK;
}

/* The form paycore sends, 2025-07-15T12:34:56.789Z; false if us has sub-millisecond digits. */
static bool format_timestamp_ms(int64_t us, char out[25])
{
    if (us % 1000 != 0)
        return false;
    int64_t seconds = us >= 0 ? us / US_PER_S : (us - (US_PER_S - 1)) / US_PER_S;
    int64_t ms = (us - seconds * US_PER_S) / 1000;
    int64_t days = seconds >= 0 ? seconds / 86400 : (seconds - 86399) / 86400;
    int64_t in_day = seconds - days * 86400, y, m, d;
    civil_from_days(days, &y, &m, &d);
    if (y < 1 || y > 9999)
        return false;
    char formatted[64];
    snprintf(formatted, sizeof formatted, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", (int)y, (int)m, (int)d,
             (int)(in_day / 3600), (int)(in_day / 60 % 60), (int)(in_day % 60), (int)ms);
    memcpy(out, formatted, 25);
    return true;
}

/* ---- correlation ids ---- */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* 8-4-4-4-12 hex digits, either case, to 16 bytes. */
static bool parse_uuid(const char *s, size_t len, uint8_t id[16])
{
    if (len != 36)
        return false;
    int byte = 0;
    for (size_t i = 0; i < 36;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i++] != '-')
                return false;
            continue;
        }
        int high = hex_value(s[i]), low = hex_value(s[i + 1]);
        if (high < 0 || low < 0)
            return false;
        id[byte++] = (uint8_t)(high << 4 | low);
        i += 2;
    }
    return true;
}

static void format_uuid(const uint8_t id[16], char out[36])
{
    static const char hex[] = "0123456789abcdef";
    int at = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[at++] = '-';
        out[at++] = hex[id[i] >> 4];
        out[at++] = hex[id[i] & 15];
    }
}

/* ---- the payments ---- */

struct payment {
    uint8_t id[16];
    int64_t cents;
    int64_t requested_at_us;
};

struct timed {
    int64_t requested_at_us;
    int64_t cents;
};

/* A requestedAt that was not sent in the form format_timestamp_ms writes: kept as sent. */
struct irregular_text {
    uint32_t index;
    uint8_t len;
    char text[TIMESTAMP_TEXT_MAX];
};

static struct {
    struct payment *all; /* in arrival order */
    uint32_t count, capacity;
    uint64_t *slots;     /* hash (high 32 bits) | index + 1; 0 is free */
    uint64_t slot_mask;
    struct timed *ordered; /* by requestedAt */
    size_t ordered_len, ordered_capacity;
    money *block_cents;    /* per ORDERED_BLOCK entries of ordered */
    struct timed *recent;  /* arrived out of order, merged into ordered before a range summary */
    size_t recent_len, recent_capacity;
    struct irregular_text *irregular; /* by index */
    size_t irregular_len, irregular_capacity;
    money total_cents;
} store;

static uint64_t id_hash(const uint8_t id[16])
{
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    uint64_t h = (a ^ (b * UINT64_C(0x9e3779b97f4a7c15))) * UINT64_C(0xbf58476d1ce4e5b9);
    return h ^ (h >> 31);
}

static uint64_t slot_count_for(uint64_t payments)
{
    uint64_t slots = 1024;
    while (slots * MAX_LOAD_PERCENT / 100 < payments)
        slots *= 2;
    return slots;
}

static void store_allocate(uint64_t payments)
{
    uint64_t slots = slot_count_for(payments);
    store.slots = calloc(slots, sizeof *store.slots);
    store.slot_mask = slots - 1;
    store.capacity = (uint32_t)payments;
    store.all = must_realloc(NULL, store.capacity * sizeof *store.all);
    store.ordered_capacity = payments;
    store.ordered = must_realloc(NULL, store.ordered_capacity * sizeof *store.ordered);
    store.block_cents = calloc(store.ordered_capacity / ORDERED_BLOCK + 1, sizeof *store.block_cents);
    if (!store.slots || !store.block_cents) {
        fputs("processor: out of memory\n", stderr);
        exit(1);
    }
}

static void store_free(void)
{
    free(store.all);
    free(store.slots);
    free(store.ordered);
    free(store.block_cents);
    free(store.recent);
    free(store.irregular);
    memset(&store, 0, sizeof store);
}

/* The slot holding id, or the free slot where it would go. */
static uint64_t *find_slot(const uint8_t id[16], uint64_t hash)
{
    uint64_t tag = hash >> 32;
    for (uint64_t i = hash & store.slot_mask;; i = (i + 1) & store.slot_mask) {
        uint64_t slot = store.slots[i];
        if (slot == 0)
            return &store.slots[i];
        if (slot >> 32 == tag && memcmp(store.all[(uint32_t)slot - 1].id, id, 16) == 0)
            return &store.slots[i];
    }
}

static const struct payment *store_get(const uint8_t id[16])
{
    uint64_t slot = *find_slot(id, id_hash(id));
    return slot ? &store.all[(uint32_t)slot - 1] : NULL;
}

static void grow_slots(void)
{
    uint64_t *old = store.slots;
    uint64_t old_count = store.slot_mask + 1;
    store.slots = calloc(old_count * 2, sizeof *store.slots);
    if (!store.slots) {
        fputs("processor: out of memory\n", stderr);
        exit(1);
    }
    store.slot_mask = old_count * 2 - 1;
    for (uint64_t i = 0; i < old_count; i++)
        if (old[i])
            *find_slot(store.all[(uint32_t)old[i] - 1].id, id_hash(store.all[(uint32_t)old[i] - 1].id)) = old[i];
    free(old);
}

static void ordered_reserve(size_t entries)
{
    if (entries <= store.ordered_capacity)
        return;
    size_t old_blocks = store.ordered_capacity / ORDERED_BLOCK + 1;
    while (store.ordered_capacity < entries)
        store.ordered_capacity *= 2;
    size_t blocks = store.ordered_capacity / ORDERED_BLOCK + 1;
    store.ordered = must_realloc(store.ordered, store.ordered_capacity * sizeof *store.ordered);
    store.block_cents = must_realloc(store.block_cents, blocks * sizeof *store.block_cents);
    memset(store.block_cents + old_blocks, 0, (blocks - old_blocks) * sizeof *store.block_cents);
}

static int compare_timed(const void *a, const void *b)
{
    int64_t x = ((const struct timed *)a)->requested_at_us, y = ((const struct timed *)b)->requested_at_us;
    return (x > y) - (x < y);
}

/* First index of ordered whose key is > key (upper) or >= key (lower). */
static size_t ordered_bound(int64_t key, bool upper)
{
    size_t low = 0, high = store.ordered_len;
    while (low < high) {
        size_t middle = low + (high - low) / 2;
        int64_t k = store.ordered[middle].requested_at_us;
        if (k < key || (upper && k == key))
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

static void recount_blocks_from(size_t position)
{
    size_t first_block = position / ORDERED_BLOCK;
    size_t last_block = store.ordered_len ? (store.ordered_len - 1) / ORDERED_BLOCK : 0;
    for (size_t block = first_block; block <= last_block; block++) {
        money sum = 0;
        size_t end = (block + 1) * ORDERED_BLOCK < store.ordered_len ? (block + 1) * ORDERED_BLOCK : store.ordered_len;
        for (size_t i = block * ORDERED_BLOCK; i < end; i++)
            sum += store.ordered[i].cents;
        store.block_cents[block] = sum;
    }
}

/* Sorts the out-of-order arrivals and merges them in from the back: the cost is what
   lies after the first of them, little when they are only slightly late. */
static void merge_recent(void)
{
    if (store.recent_len == 0)
        return;
    qsort(store.recent, store.recent_len, sizeof *store.recent, compare_timed);
    size_t first = ordered_bound(store.recent[0].requested_at_us, true);
    ordered_reserve(store.ordered_len + store.recent_len);
    size_t i = store.ordered_len, j = store.recent_len, k = store.ordered_len + store.recent_len;
    while (j > 0) {
        if (i > first && store.ordered[i - 1].requested_at_us > store.recent[j - 1].requested_at_us)
            store.ordered[--k] = store.ordered[--i];
        else
            store.ordered[--k] = store.recent[--j];
    }
    store.ordered_len += store.recent_len;
    store.recent_len = 0;
    recount_blocks_from(first);
}

static void ordered_add(int64_t requested_at_us, int64_t cents)
{
    struct timed entry = {requested_at_us, cents};
    bool in_order = store.recent_len == 0 &&
                    (store.ordered_len == 0 || store.ordered[store.ordered_len - 1].requested_at_us <= requested_at_us);
    if (in_order) {
        ordered_reserve(store.ordered_len + 1);
        store.block_cents[store.ordered_len / ORDERED_BLOCK] += cents;
        store.ordered[store.ordered_len++] = entry;
        return;
    }
    if (store.recent_len == store.recent_capacity) {
        /* a bounded batch keeps each merge short */
        if (store.recent_capacity >= 65536) {
            merge_recent();
        } else {
            store.recent_capacity = store.recent_capacity ? store.recent_capacity * 2 : 1024;
            store.recent = must_realloc(store.recent, store.recent_capacity * sizeof *store.recent);
        }
    }
    store.recent[store.recent_len++] = entry;
}

/* Stores the payment unless its id is held already (false). */
static bool store_add(const uint8_t id[16], int64_t cents, int64_t requested_at_us, const char *text, size_t text_len)
{
    uint64_t hash = id_hash(id);
    uint64_t *slot = find_slot(id, hash);
    if (*slot)
        return false;
    if (store.count == UINT32_MAX - 1) {
        fputs("processor: payment table full\n", stderr);
        exit(1);
    }
    if ((uint64_t)(store.count + 1) * 100 > (store.slot_mask + 1) * MAX_LOAD_PERCENT) {
        grow_slots();
        slot = find_slot(id, hash);
    }
    if (store.count == store.capacity) {
        store.capacity = store.capacity < UINT32_MAX / 2 ? store.capacity * 2 : UINT32_MAX - 1;
        store.all = must_realloc(store.all, (size_t)store.capacity * sizeof *store.all);
    }
    uint32_t index = store.count++;
    struct payment *p = &store.all[index];
    memcpy(p->id, id, 16);
    p->cents = cents;
    p->requested_at_us = requested_at_us;
    *slot = (hash >> 32) << 32 | (uint64_t)(index + 1);

    char canonical[25];
    if (!format_timestamp_ms(requested_at_us, canonical) || text_len != 24 || memcmp(canonical, text, 24) != 0) {
        if (store.irregular_len == store.irregular_capacity) {
            store.irregular_capacity = store.irregular_capacity ? store.irregular_capacity * 2 : 64;
            store.irregular = must_realloc(store.irregular, store.irregular_capacity * sizeof *store.irregular);
        }
        struct irregular_text *kept = &store.irregular[store.irregular_len++];
        kept->index = index;
        kept->len = (uint8_t)text_len;
        memcpy(kept->text, text, text_len);
    }
    ordered_add(requested_at_us, cents);
    store.total_cents += cents;
    return true;
}

/* The requestedAt of a stored payment as it was sent. */
static size_t requested_at_text(const struct payment *p, char out[TIMESTAMP_TEXT_MAX])
{
    uint32_t index = (uint32_t)(p - store.all);
    size_t low = 0, high = store.irregular_len;
    while (low < high) {
        size_t middle = low + (high - low) / 2;
        if (store.irregular[middle].index < index)
            low = middle + 1;
        else
            high = middle;
    }
    if (low < store.irregular_len && store.irregular[low].index == index) {
        memcpy(out, store.irregular[low].text, store.irregular[low].len);
        return store.irregular[low].len;
    }
    char canonical[25];
    format_timestamp_ms(p->requested_at_us, canonical);
    memcpy(out, canonical, 24);
    return 24;
}

static money range_cents(size_t from, size_t to)
{
    money sum = 0;
    while (from < to && from % ORDERED_BLOCK != 0)
        sum += store.ordered[from++].cents;
    while (from + ORDERED_BLOCK <= to) {
        sum += store.block_cents[from / ORDERED_BLOCK];
        from += ORDERED_BLOCK;
    }
    while (from < to)
        sum += store.ordered[from++].cents;
    return sum;
}

/* Count and cents of the payments requested within [first, last]; NULL: unbounded. */
static void store_totals(const int64_t *first, const int64_t *last, uint64_t *count, money *cents)
{
    if (!first && !last) {
        *count = store.count;
        *cents = store.total_cents;
        return;
    }
    merge_recent();
    size_t from = first ? ordered_bound(*first, false) : 0;
    size_t to = last ? ordered_bound(*last, true) : store.ordered_len;
    if (from >= to) {
        *count = 0;
        *cents = 0;
        return;
    }
    *count = to - from;
    *cents = range_cents(from, to);
}

static void store_purge(void)
{
    store_free();
    store_allocate((uint64_t)config.expected_payments);
}

/* ---- JSON (strict, as Python's json module and orjson read it) ---- */

enum json_type { JSON_NONE, JSON_STRING, JSON_INTEGER, JSON_FRACTION, JSON_TRUE, JSON_FALSE, JSON_NULL,
                 JSON_OBJECT, JSON_ARRAY };

struct json_value {
    enum json_type type;
    const char *start, *end; /* the value's text (a string's between its quotes) */
};

struct json_parser {
    const char *p, *end;
    int depth;
};

static void skip_blanks(struct json_parser *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* One UTF-8 sequence (well-formed, shortest form, no surrogates) at p; its length or 0. */
static size_t utf8_sequence(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    size_t len;
    uint32_t code;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        code = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        code = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        code = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)(end - p) < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        code = code << 6 | (p[i] & 0x3f);
    }
    if ((len == 3 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff))) || (len == 4 && (code < 0x10000 || code > 0x10ffff)))
        return 0;
    return len;
}

static bool parse_string(struct json_parser *j, struct json_value *v)
{
    j->p++; /* the opening quote */
    v->type = JSON_STRING;
    v->start = j->p;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p;
        if (c == '"') {
            v->end = j->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            if (j->end - j->p < 2)
                return false;
            char e = j->p[1];
            if (e == 'u') {
                if (j->end - j->p < 6)
                    return false;
                for (int i = 2; i < 6; i++)
                    if (hex_value(j->p[i]) < 0)
                        return false;
                j->p += 6;
            } else if (e && strchr("\"\\/bfnrt", e)) {
                j->p += 2;
            } else {
                return false;
            }
            continue;
        }
        size_t len = utf8_sequence((const unsigned char *)j->p, (const unsigned char *)j->end);
        if (len == 0)
            return false;
        j->p += len;
    }
    return false;
}

static bool parse_number(struct json_parser *j, struct json_value *v)
{
    const char *p = j->p;
    v->start = p;
    v->type = JSON_INTEGER;
    if (p < j->end && *p == '-')
        p++;
    if (p >= j->end || *p < '0' || *p > '9')
        return false;
    if (*p == '0')
        p++;
    else
        while (p < j->end && *p >= '0' && *p <= '9')
            p++;
    if (p < j->end && *p == '.') {
        v->type = JSON_FRACTION;
        if (++p >= j->end || *p < '0' || *p > '9')
            return false;
        while (p < j->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < j->end && (*p == 'e' || *p == 'E')) {
        v->type = JSON_FRACTION;
        p++;
        if (p < j->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= j->end || *p < '0' || *p > '9')
            return false;
        while (p < j->end && *p >= '0' && *p <= '9')
            p++;
    }
    v->end = j->p = p;
    return true;
}

static bool parse_value(struct json_parser *j, struct json_value *v);

/* Calls member(name value, value, context) for each member of the object at p. */
typedef void (*member_fn)(const struct json_value *name, const struct json_value *value, void *context);

static bool parse_object(struct json_parser *j, member_fn member, void *context)
{
    j->p++;
    skip_blanks(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return true;
    }
    for (;;) {
        struct json_value name, value;
        if (j->p >= j->end || *j->p != '"' || !parse_string(j, &name))
            return false;
        skip_blanks(j);
        if (j->p >= j->end || *j->p != ':')
            return false;
        j->p++;
        if (!parse_value(j, &value))
            return false;
        if (member)
            member(&name, &value, context);
        skip_blanks(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            skip_blanks(j);
            continue;
        }
        if (j->p < j->end && *j->p == '}') {
            j->p++;
            return true;
        }
        return false;
    }
}

static bool parse_array(struct json_parser *j)
{
    j->p++;
    skip_blanks(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
        return true;
    }
    for (;;) {
        struct json_value value;
        if (!parse_value(j, &value))
            return false;
        skip_blanks(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == ']') {
            j->p++;
            return true;
        }
        return false;
    }
}

static bool parse_literal(struct json_parser *j, const char *word, enum json_type type, struct json_value *v)
{
    size_t len = strlen(word);
    if ((size_t)(j->end - j->p) < len || memcmp(j->p, word, len) != 0)
        return false;
    v->type = type;
    v->start = j->p;
    v->end = j->p += len;
    return true;
}

static bool parse_value(struct json_parser *j, struct json_value *v)
{
    skip_blanks(j);
    if (j->p >= j->end)
        return false;
    v->start = j->p;
    switch (*j->p) {
    case '"':
        return parse_string(j, v);
    case '{':
    case '[': {
        if (++j->depth > JSON_MAX_DEPTH)
            return false;
        bool object = *j->p == '{';
        bool ok = object ? parse_object(j, NULL, NULL) : parse_array(j);
        j->depth--;
        v->type = object ? JSON_OBJECT : JSON_ARRAY;
        v->end = j->p;
        return ok;
    }
    case 't':
        return parse_literal(j, "true", JSON_TRUE, v);
    case 'f':
        return parse_literal(j, "false", JSON_FALSE, v);
    case 'n':
        return parse_literal(j, "null", JSON_NULL, v);
    default:
        return parse_number(j, v);
    }
}

/* Parses a whole body that must be one JSON object, calling member for its members. */
static bool parse_json_object(const char *body, size_t len, member_fn member, void *context)
{
    struct json_parser j = {.p = body, .end = body + len};
    skip_blanks(&j);
    if (j.p >= j.end || *j.p != '{')
        return false;
    j.depth = 1;
    if (!parse_object(&j, member, context))
        return false;
    skip_blanks(&j);
    return j.p == j.end;
}

static void put_utf8(struct text *out, uint32_t code)
{
    char bytes[4];
    size_t len;
    if (code < 0x80) {
        bytes[0] = (char)code;
        len = 1;
    } else if (code < 0x800) {
        bytes[0] = (char)(0xc0 | code >> 6);
        bytes[1] = (char)(0x80 | (code & 0x3f));
        len = 2;
    } else if (code < 0x10000) {
        bytes[0] = (char)(0xe0 | code >> 12);
        bytes[1] = (char)(0x80 | ((code >> 6) & 0x3f));
        bytes[2] = (char)(0x80 | (code & 0x3f));
        len = 3;
    } else {
        bytes[0] = (char)(0xf0 | code >> 18);
        bytes[1] = (char)(0x80 | ((code >> 12) & 0x3f));
        bytes[2] = (char)(0x80 | ((code >> 6) & 0x3f));
        bytes[3] = (char)(0x80 | (code & 0x3f));
        len = 4;
    }
    text_add(out, bytes, len);
}

static uint32_t hex4(const char *s)
{
    uint32_t code = 0;
    for (int i = 0; i < 4; i++)
        code = code << 4 | (uint32_t)hex_value(s[i]);
    return code;
}

/* A validated string's contents with its escapes decoded (appended to out). */
static void decode_string(const struct json_value *v, struct text *out)
{
    for (const char *p = v->start; p < v->end;) {
        if (*p != '\\') {
            text_add(out, p++, 1);
            continue;
        }
        char e = p[1];
        if (e != 'u') {
            static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
            text_add(out, &to[strchr(from, e) - from], 1);
            p += 2;
            continue;
        }
        uint32_t code = hex4(p + 2);
        p += 6;
        if (code >= 0xd800 && code <= 0xdbff && v->end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
            uint32_t low = hex4(p + 2);
            if (low >= 0xdc00 && low <= 0xdfff) {
                code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                p += 6;
            }
        }
        put_utf8(out, code);
    }
}

static bool name_is(const struct json_value *name, const char *wanted)
{
    struct text decoded = {0};
    decode_string(name, &decoded);
    bool same = decoded.len == strlen(wanted) && memcmp(decoded.data, wanted, decoded.len) == 0;
    free(decoded.data);
    return same;
}

/* Python keeps the last of repeated names. */
struct wanted_member {
    const char *name;
    struct json_value value;
};

static void take_member(const struct json_value *name, const struct json_value *value, void *context)
{
    for (struct wanted_member *wanted = context; wanted->name; wanted++)
        if (name_is(name, wanted->name))
            wanted->value = *value;
}

/* Cents of a JSON number, rounded half up as Decimal.quantize(Decimal("0.01"), ROUND_HALF_UP)
   does; false when they do not fit in an int64. */
static bool number_cents(const struct json_value *v, int64_t *cents)
{
    const char *p = v->start, *end = v->end;
    bool negative = *p == '-';
    if (negative)
        p++;
    /* only the first 20 digits can matter: more than 19 kept ones do not fit */
    char significant[20];
    int64_t count = 0, fraction_digits = 0;
    bool in_fraction = false;
    for (; p < end && *p != 'e' && *p != 'E'; p++) {
        if (*p == '.') {
            in_fraction = true;
            continue;
        }
        if (in_fraction)
            fraction_digits++;
        if (count == 0 && *p == '0')
            continue;
        if (count < (int64_t)sizeof significant)
            significant[count] = *p;
        count++;
    }
    int64_t exponent = 0;
    if (p < end) {
        bool exponent_negative = *++p == '-';
        if (*p == '+' || *p == '-')
            p++;
        for (; p < end; p++)
            if (exponent < 1000000000)
                exponent = exponent * 10 + (*p - '0');
        if (exponent_negative)
            exponent = -exponent;
    }
    /* cents = the significant digits * 10^shift; keep of them stay, the next one rounds */
    int64_t keep = count + exponent - fraction_digits + 2;
    if (count == 0 || keep < 0) {
        *cents = 0;
        return true;
    }
    if (keep > 19)
        return false;
    uint64_t magnitude = 0;
    for (int64_t i = 0; i < keep; i++)
        magnitude = magnitude * 10 + (uint64_t)(i < count ? significant[i] - '0' : 0);
    if (keep < count && significant[keep] >= '5')
        magnitude++;
    if (magnitude > (uint64_t)INT64_MAX)
        return false;
    *cents = negative ? -(int64_t)magnitude : (int64_t)magnitude;
    return true;
}

/* A JSON integer that fits in an int64. */
static bool json_integer(const struct json_value *v, int64_t *value)
{
    if (v->type != JSON_INTEGER)
        return false;
    const char *p = v->start;
    bool negative = *p == '-';
    if (negative)
        p++;
    uint64_t magnitude = 0;
    for (; p < v->end; p++) {
        if (magnitude > (UINT64_MAX - (uint64_t)(*p - '0')) / 10)
            return false;
        magnitude = magnitude * 10 + (uint64_t)(*p - '0');
    }
    if (magnitude > (uint64_t)INT64_MAX + negative)
        return false;
    *value = negative ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
    return true;
}

/* ---- HTTP answers ---- */

struct answer {
    int status;
    const char *headers; /* extra header lines, each ending in CRLF */
    struct text body;
};

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    default: return "Internal Server Error";
    }
}

static void answer_body(struct answer *a, int status, const char *body)
{
    a->status = status;
    text_str(&a->body, body);
}

static void answer_message(struct answer *a, int status, const char *message)
{
    a->status = status;
    text_str(&a->body, "{\"message\":\"");
    text_json_escaped(&a->body, message, strlen(message));
    text_str(&a->body, "\"}");
}

/* 400 with a message that quotes what was sent: "<prefix><repr(sent)>". */
static void answer_quoting(struct answer *a, const char *prefix, const char *sent, size_t sent_len)
{
    struct text message = {0};
    text_str(&message, prefix);
    text_repr(&message, sent, sent_len);
    a->status = 400;
    text_str(&a->body, "{\"message\":\"");
    text_json_escaped(&a->body, message.data, message.len);
    text_str(&a->body, "\"}");
    free(message.data);
}

static void encode_answer(struct text *out, const struct answer *a, bool keep_alive)
{
    text_printf(out, "HTTP/1.1 %d %s\r\n%s", a->status, reason(a->status), a->headers ? a->headers : "");
    if (a->body.len)
        text_printf(out, "Content-Type: application/json\r\nContent-Length: %zu\r\n", a->body.len);
    else if (a->status != 204)
        text_str(out, "Content-Length: 0\r\n");
    if (!keep_alive)
        text_str(out, "Connection: close\r\n");
    text_str(out, "\r\n");
    text_add(out, a->body.data, a->body.len);
}

/* ---- connections, timers ---- */

struct pending_payment;

struct conn {
    int fd;
    uint32_t watching;
    struct text in;
    size_t in_start;          /* bytes of in already consumed */
    struct text out;
    size_t out_sent;
    struct pending_payment *awaited; /* a payment whose answer must go out before anything else */
    bool in_health_line;
    bool awaited_keep_alive;
    bool closing;             /* close once out is written */
    uint64_t discard_left;    /* an oversized body: bytes to swallow before the 413 */
};

struct parsed_payment {
    uint8_t id[16];
    int64_t cents;
    int64_t requested_at_us;
    char text[TIMESTAMP_TEXT_MAX];
    size_t text_len;
};

/* A payment holding (or waiting for) an in-flight slot. Its client may hang up
   meanwhile (conn NULL): it is processed all the same. */
struct pending_payment {
    struct conn *conn;
    struct parsed_payment payment;
    struct timer timer; /* while it holds an in-flight slot: when it is done */
    struct pending_payment *next_queued;
};

static int epoll_fd;

static struct timer_heap processing;
static long inflight;
static struct pending_payment *queued_head, *queued_tail;
static long queued;

static struct conn *health_line[MAX_HEALTH_WAITING];
static int health_line_len;
static bool health_started;
static int64_t health_origin_ns, health_last_window = -1;
static int64_t health_timer_ns, health_timer_window; /* 0: no timer */

static void serve(struct conn *c);
static void after_io(struct conn *c);

static void close_conn(struct conn *c)
{
    if (c->awaited)
        c->awaited->conn = NULL;
    for (int i = 0; i < health_line_len; i++)
        if (health_line[i] == c) {
            memmove(&health_line[i], &health_line[i + 1], (size_t)(health_line_len - i - 1) * sizeof *health_line);
            health_line_len--;
            break;
        }
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

static void send_answer(struct conn *c, struct answer *a, bool keep_alive)
{
    encode_answer(&c->out, a, keep_alive);
    free(a->body.data);
    a->body = (struct text){0};
    if (!keep_alive)
        c->closing = true;
}

/* An answer that waited (a delayed payment, a health check in line) goes out, and the
   requests pipelined behind it are served. */
static void deliver_awaited(struct conn *c, struct answer *a)
{
    c->awaited = NULL;
    c->in_health_line = false;
    send_answer(c, a, c->awaited_keep_alive);
    serve(c);
    after_io(c);
}

/* ---- endpoints ---- */

struct request {
    const char *method;
    size_t method_len;
    const char *path, *query; /* query NULL when absent */
    size_t path_len, query_len;
    const char *token;        /* X-Rinha-Token, NULL when absent */
    size_t token_len;
    const char *body;
    size_t body_len;
    bool keep_alive;
};

static void settle(const struct parsed_payment *p, struct answer *a)
{
    if (config.failing) {
        a->status = 500;
        return;
    }
    if (!store_add(p->id, p->cents, p->requested_at_us, p->text, p->text_len)) {
        char id[36];
        format_uuid(p->id, id);
        a->status = 422;
        text_str(&a->body, "{\"message\":\"Payment could not be processed. CorrelationId already exists: ");
        text_add(&a->body, id, 36);
        text_str(&a->body, "\"}");
        return;
    }
    answer_body(a, 200, "{\"message\":\"payment processed successfully\"}");
}

static void start_processing(struct pending_payment *p)
{
    timer_schedule(&processing, &p->timer, now_ns() + config.delay_ms * NS_PER_MS);
}

/* The slot goes to the first payment in line, or back to the pool. */
static void release_slot(void)
{
    if (queued_head) {
        struct pending_payment *next = queued_head;
        queued_head = next->next_queued;
        if (!queued_head)
            queued_tail = NULL;
        queued--;
        start_processing(next);
        return;
    }
    inflight--;
}

static void finish_processing(struct pending_payment *p)
{
    struct answer a = {0};
    settle(&p->payment, &a);
    release_slot();
    if (p->conn)
        deliver_awaited(p->conn, &a);
    free(a.body.data);
    free(p);
}

/* The checks and messages of paycore/emulator/wire.py decode_payment_request, in its order. */
static bool decode_payment(const struct request *r, struct parsed_payment *p, struct answer *a)
{
    struct wanted_member wanted[] = {{"correlationId", {0}}, {"amount", {0}}, {"requestedAt", {0}}, {NULL, {0}}};
    if (!parse_json_object(r->body, r->body_len, take_member, wanted)) {
        answer_message(a, 400, "body must be a JSON object");
        return false;
    }
    const struct json_value *id = &wanted[0].value, *amount = &wanted[1].value, *at = &wanted[2].value;
    if (at->type != JSON_STRING) {
        answer_message(a, 400, "requestedAt must be a string");
        return false;
    }
    struct text decoded = {0};
    bool valid_id = false;
    if (id->type == JSON_STRING) {
        decode_string(id, &decoded);
        valid_id = parse_uuid(decoded.data, decoded.len, p->id);
        free(decoded.data);
        decoded = (struct text){0};
    }
    if (!valid_id) {
        answer_message(a, 400, "correlationId must be a UUID");
        return false;
    }
    if (amount->type != JSON_INTEGER && amount->type != JSON_FRACTION) {
        answer_message(a, 400, "amount must be a number");
        return false;
    }
    if (!number_cents(amount, &p->cents)) {
        answer_message(a, 400, "amount is out of range");
        return false;
    }
    decode_string(at, &decoded);
    enum timestamp_result parsed = parse_timestamp(decoded.data ? decoded.data : "", decoded.len, &p->requested_at_us);
    if (parsed != TIMESTAMP_OK) {
        answer_quoting(a, parsed == TIMESTAMP_NOT_ISO ? "not an ISO-8601 timestamp: " : "not a valid date-time: ",
                       decoded.data ? decoded.data : "", decoded.len);
        free(decoded.data);
        return false;
    }
    memcpy(p->text, decoded.data, decoded.len);
    p->text_len = decoded.len;
    free(decoded.data);
    return true;
}

/* Answers at once (true) or leaves the connection awaiting the payment's answer (false). */
static bool post_payment(struct conn *c, const struct request *r, struct answer *a)
{
    struct parsed_payment payment;
    if (!decode_payment(r, &payment, a))
        return true;
    bool slot_free = inflight < config.max_inflight;
    if (!slot_free && queued >= config.max_queued) {
        a->headers = "Retry-After: 5\r\n";
        answer_body(a, 429, "{\"message\":\"too many payments in progress\"}");
        return true;
    }
    if (slot_free && config.delay_ms == 0) {
        settle(&payment, a);
        return true;
    }
    struct pending_payment *p = calloc(1, sizeof *p);
    if (!p) {
        a->status = 500;
        return true;
    }
    p->conn = c;
    p->payment = payment;
    p->timer.heap_index = -1;
    c->awaited = p;
    if (slot_free) {
        inflight++;
        start_processing(p);
    } else {
        if (queued_tail)
            queued_tail->next_queued = p;
        else
            queued_head = p;
        queued_tail = p;
        queued++;
    }
    return false;
}

static void get_payment(const struct request *r, struct answer *a)
{
    uint8_t id[16];
    if (!parse_uuid(r->path + 10, r->path_len - 10, id)) {
        answer_message(a, 400, "correlationId must be a UUID");
        return;
    }
    const struct payment *p = store_get(id);
    if (!p) {
        answer_message(a, 404, "not found");
        return;
    }
    char text_id[36], at[TIMESTAMP_TEXT_MAX];
    format_uuid(p->id, text_id);
    size_t at_len = requested_at_text(p, at);
    a->status = 200;
    text_str(&a->body, "{\"correlationId\":\"");
    text_add(&a->body, text_id, 36);
    text_str(&a->body, "\",\"amount\":");
    text_cents(&a->body, p->cents);
    text_str(&a->body, ",\"requestedAt\":\"");
    text_json_escaped(&a->body, at, at_len);
    text_str(&a->body, "\"}");
}

static void health_status(struct answer *a)
{
    a->status = 200;
    text_printf(&a->body, "{\"failing\":%s,\"minResponseTime\":%" PRId64 "}", config.failing ? "true" : "false",
                config.delay_ms);
}

static int64_t health_interval_ns(void)
{
    return (int64_t)(config.health_interval_s * NS_PER_S + 0.5);
}

static void schedule_health_window(void)
{
    health_timer_window = health_last_window + 1;
    health_timer_ns = health_origin_ns + health_timer_window * health_interval_ns();
    if (health_timer_ns == 0)
        health_timer_ns = 1;
}

/* paycore/emulator/health.py: one answer per window counted from the first call, the
   oldest of at most two waiting callers served first, others refused. */
static bool health(struct conn *c, struct answer *a)
{
    if (config.health_interval_s == 0) {
        health_status(a);
        return true;
    }
    int64_t now = now_ns();
    if (!health_started) {
        health_started = true;
        health_origin_ns = now;
    }
    int64_t window = (now - health_origin_ns) / health_interval_ns();
    if (health_line_len == 0 && window > health_last_window) {
        health_last_window = window;
        health_status(a);
        return true;
    }
    if (health_line_len >= MAX_HEALTH_WAITING) {
        static char retry_after[40];
        int whole = (int)config.health_interval_s;
        snprintf(retry_after, sizeof retry_after, "Retry-After: %d\r\n", whole + (config.health_interval_s > whole));
        a->headers = retry_after;
        answer_body(a, 429, "{\"message\":\"health check rate limit exceeded\"}");
        return true;
    }
    health_line[health_line_len++] = c;
    c->in_health_line = true;
    if (health_timer_ns == 0)
        schedule_health_window();
    return false;
}

static void open_health_window(void)
{
    int64_t window = health_timer_window;
    health_timer_ns = 0;
    if (health_line_len == 0)
        return;
    if (window > health_last_window) {
        health_last_window = window;
        struct conn *c = health_line[0];
        memmove(&health_line[0], &health_line[1], (size_t)(--health_line_len) * sizeof *health_line);
        struct answer a = {0};
        health_status(&a);
        deliver_awaited(c, &a);
    }
    if (health_line_len > 0)
        schedule_health_window();
}

/* %XX and '+' decoded, as urllib.parse.parse_qsl does. */
static void url_decode(const char *s, size_t len, struct text *out)
{
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '+') {
            text_add(out, " ", 1);
        } else if (s[i] == '%' && i + 2 < len && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
            char byte = (char)(hex_value(s[i + 1]) << 4 | hex_value(s[i + 2]));
            text_add(out, &byte, 1);
            i += 2;
        } else {
            text_add(out, &s[i], 1);
        }
    }
}

static void summary(const struct request *r, struct answer *a)
{
    struct text bounds[2] = {{0}, {0}}; /* from, to: the last non-empty value of each */
    const char *p = r->query, *end = r->query ? r->query + r->query_len : NULL;
    while (p && p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pair_end = amp ? amp : end;
        const char *equals = memchr(p, '=', (size_t)(pair_end - p));
        if (equals && equals + 1 < pair_end) {
            struct text name = {0};
            url_decode(p, (size_t)(equals - p), &name);
            int which = name.len == 4 && memcmp(name.data, "from", 4) == 0 ? 0
                        : name.len == 2 && memcmp(name.data, "to", 2) == 0 ? 1 : -1;
            if (which >= 0) {
                bounds[which].len = 0;
                url_decode(equals + 1, (size_t)(pair_end - equals - 1), &bounds[which]);
            }
            free(name.data);
        }
        p = pair_end + 1;
    }
    int64_t at[2];
    bool bounded[2] = {false, false};
    for (int i = 0; i < 2 && a->status == 0; i++) {
        if (bounds[i].len == 0)
            continue;
        enum timestamp_result parsed = parse_timestamp(bounds[i].data, bounds[i].len, &at[i]);
        if (parsed != TIMESTAMP_OK)
            answer_quoting(a, parsed == TIMESTAMP_NOT_ISO ? "not an ISO-8601 timestamp: " : "not a valid date-time: ",
                           bounds[i].data, bounds[i].len);
        bounded[i] = true;
    }
    free(bounds[0].data);
    free(bounds[1].data);
    if (a->status)
        return;
    uint64_t count;
    money cents;
    store_totals(bounded[0] ? &at[0] : NULL, bounded[1] ? &at[1] : NULL, &count, &cents);
    /* round(cents * fee) with Python's round: halves to even */
    money product = cents * config.fee_numerator;
    money magnitude = product < 0 ? -product : product;
    money fee = magnitude / config.fee_denominator, rest = magnitude % config.fee_denominator;
    if (rest * 2 > config.fee_denominator || (rest * 2 == config.fee_denominator && fee % 2 == 1))
        fee++;
    if (product < 0)
        fee = -fee;
    a->status = 200;
    text_str(&a->body, "{\"totalAmount\":");
    text_cents(&a->body, cents);
    text_printf(&a->body, ",\"totalRequests\":%" PRIu64 ",\"totalFee\":", count);
    text_cents(&a->body, fee);
    text_printf(&a->body, ",\"feePerTransaction\":%s}", config.fee_text);
}

static void set_token(const struct request *r, struct answer *a)
{
    struct wanted_member wanted[] = {{"token", {0}}, {NULL, {0}}};
    if (!parse_json_object(r->body, r->body_len, take_member, wanted)) {
        answer_message(a, 400, "body must be a JSON object");
        return;
    }
    if (wanted[0].value.type != JSON_STRING) {
        answer_message(a, 400, "token must be a str");
        return;
    }
    struct text token = {0};
    decode_string(&wanted[0].value, &token);
    free(config.token);
    config.token = token.data ? token.data : calloc(1, 1);
    config.token_len = token.len;
    a->status = 204;
}

static void set_delay(const struct request *r, struct answer *a)
{
    struct wanted_member wanted[] = {{"delay", {0}}, {NULL, {0}}};
    int64_t delay;
    bool parsed = parse_json_object(r->body, r->body_len, take_member, wanted);
    if (!parsed || (wanted[0].value.type == JSON_INTEGER && !json_integer(&wanted[0].value, &delay))) {
        answer_message(a, 400, "body must be a JSON object");
        return;
    }
    if (wanted[0].value.type != JSON_INTEGER) {
        answer_message(a, 400, "delay must be a int");
        return;
    }
    if (delay < 0 || delay > INT32_MAX) {
        answer_message(a, 400, "delay must be between 0 and 2147483647 ms");
        return;
    }
    a->status = 200;
    text_printf(&a->body, "{\"config\":\"delay\",\"was\":%" PRId64 ",\"is\":%" PRId64 "}", config.delay_ms, delay);
    config.delay_ms = delay;
}

static void set_failure(const struct request *r, struct answer *a)
{
    struct wanted_member wanted[] = {{"failure", {0}}, {NULL, {0}}};
    if (!parse_json_object(r->body, r->body_len, take_member, wanted)) {
        answer_message(a, 400, "body must be a JSON object");
        return;
    }
    enum json_type type = wanted[0].value.type;
    if (type != JSON_TRUE && type != JSON_FALSE) {
        answer_message(a, 400, "failure must be a boolean");
        return;
    }
    bool failing = type == JSON_TRUE;
    a->status = 200;
    text_printf(&a->body, "{\"config\":\"failure\",\"was\":%s,\"is\":%s}", config.failing ? "true" : "false",
                failing ? "true" : "false");
    config.failing = failing;
}

static void purge(const struct request *r, struct answer *a)
{
    (void)r;
    store_purge();
    answer_body(a, 200, "{\"message\":\"All payments purged.\"}");
}

enum route_kind { ROUTE_PAYMENTS, ROUTE_HEALTH, ROUTE_LOOKUP, ROUTE_ADMIN };

struct route {
    const char *path;
    const char *method;
    enum route_kind kind;
    void (*admin)(const struct request *, struct answer *);
};

static const struct route ROUTES[] = {
    {"/payments", "POST", ROUTE_PAYMENTS, NULL},
    {"/payments/service-health", "GET", ROUTE_HEALTH, NULL},
    {"/admin/payments-summary", "GET", ROUTE_ADMIN, summary},
    {"/admin/configurations/token", "PUT", ROUTE_ADMIN, set_token},
    {"/admin/configurations/delay", "PUT", ROUTE_ADMIN, set_delay},
    {"/admin/configurations/failure", "PUT", ROUTE_ADMIN, set_failure},
    {"/admin/purge-payments", "POST", ROUTE_ADMIN, purge},
};
static const struct route LOOKUP = {"/payments/{id}", "GET", ROUTE_LOOKUP, NULL};

static bool equals(const char *s, size_t len, const char *wanted)
{
    return len == strlen(wanted) && memcmp(s, wanted, len) == 0;
}

static const struct route *find_route(const struct request *r)
{
    for (size_t i = 0; i < sizeof ROUTES / sizeof ROUTES[0]; i++)
        if (equals(r->path, r->path_len, ROUTES[i].path))
            return &ROUTES[i];
    if (r->path_len > 10 && memcmp(r->path, "/payments/", 10) == 0 && !memchr(r->path + 10, '/', r->path_len - 10))
        return &LOOKUP;
    return NULL;
}

/* paycore/emulator/processor.py handle: path, then method, then token. */
static bool dispatch(struct conn *c, const struct request *r, struct answer *a)
{
    const struct route *route = find_route(r);
    if (!route) {
        answer_message(a, 404, "not found");
        return true;
    }
    if (!equals(r->method, r->method_len, route->method)) {
        static char allow[32];
        snprintf(allow, sizeof allow, "Allow: %s\r\n", route->method);
        a->headers = allow;
        answer_message(a, 405, "method not allowed");
        return true;
    }
    switch (route->kind) {
    case ROUTE_PAYMENTS:
        return post_payment(c, r, a);
    case ROUTE_HEALTH:
        return health(c, a);
    case ROUTE_LOOKUP:
        get_payment(r, a);
        return true;
    case ROUTE_ADMIN:
        if (!r->token || r->token_len != config.token_len || memcmp(r->token, config.token, r->token_len) != 0)
            answer_message(a, 401, "invalid or missing X-Rinha-Token");
        else
            route->admin(r, a);
        return true;
    }
    return true;
}

/* ---- HTTP requests ---- */

enum parse_result { PARSE_INCOMPLETE, PARSE_DONE, PARSE_MALFORMED, PARSE_TOO_LARGE };

/* The request at the start of data; *consumed is its length in bytes (head only, for a
   body too large to keep). */
static enum parse_result parse_request(const char *data, size_t len, struct request *r, size_t *consumed,
                                       uint64_t *body_length)
{
    const char *blank_line = memmem(data, len, "\r\n\r\n", 4);
    if (!blank_line)
        return len > HEAD_MAX ? PARSE_MALFORMED : PARSE_INCOMPLETE;
    size_t head_len = (size_t)(blank_line + 4 - data);
    const char *line_end = memchr(data, '\r', head_len);
    const char *space = memchr(data, ' ', (size_t)(line_end - data));
    if (!space || space == data)
        return PARSE_MALFORMED;
    for (const char *m = data; m < space; m++)
        if (*m < 'A' || *m > 'Z')
            return PARSE_MALFORMED;
    const char *target = space + 1;
    const char *target_end = memchr(target, ' ', (size_t)(line_end - target));
    if (!target_end || target_end == target || *target != '/' || line_end - target_end != 9 ||
        memcmp(target_end + 1, "HTTP/1.", 7) != 0 || (target_end[8] != '0' && target_end[8] != '1'))
        return PARSE_MALFORMED;
    for (const char *t = target; t < target_end; t++)
        if ((unsigned char)*t <= ' ' || *t == 0x7f)
            return PARSE_MALFORMED;
    *r = (struct request){.method = data, .method_len = (size_t)(space - data), .path = target};
    const char *fragment = memchr(target, '#', (size_t)(target_end - target));
    const char *target_stop = fragment ? fragment : target_end;
    const char *question = memchr(target, '?', (size_t)(target_stop - target));
    r->path_len = (size_t)((question ? question : target_stop) - target);
    if (question) {
        r->query = question + 1;
        r->query_len = (size_t)(target_stop - r->query);
    }
    bool http10 = target_end[8] == '0';
    bool close_asked = false, keep_alive_asked = false, has_length = false;
    uint64_t length = 0;
    const char *line = http_first_header_line(data, head_len);
    struct http_header header;
    int read;
    while ((read = http_next_header(&line, data + head_len, &header)) > 0) {
        if (header.name_len == 0)
            return PARSE_MALFORMED;
        if (http_header_is(&header, "content-length")) {
            uint64_t value;
            if (!http_parse_length(&header, &value) || (has_length && value != length))
                return PARSE_MALFORMED;
            length = value;
            has_length = true;
        } else if (http_header_is(&header, "transfer-encoding")) {
            return PARSE_MALFORMED;
        } else if (http_header_is(&header, "connection")) {
            close_asked |= http_has_token(header.value, header.value_end, "close");
            keep_alive_asked |= http_has_token(header.value, header.value_end, "keep-alive");
        } else if (http_header_is(&header, "x-rinha-token")) {
            r->token = header.value;
            r->token_len = (size_t)(header.value_end - header.value);
        }
    }
    if (read < 0)
        return PARSE_MALFORMED;
    r->keep_alive = http10 ? keep_alive_asked && !close_asked : !close_asked;
    *body_length = length;
    if (length > BODY_MAX) {
        *consumed = head_len;
        return PARSE_TOO_LARGE;
    }
    if (len - head_len < length)
        return PARSE_INCOMPLETE;
    r->body = data + head_len;
    r->body_len = (size_t)length;
    *consumed = head_len + (size_t)length;
    return PARSE_DONE;
}

static struct answer reject(int status, const char *message)
{
    struct answer a = {0};
    answer_message(&a, status, message);
    return a;
}

/* Serves the complete requests buffered, in order, until one must wait for its answer. */
static void serve(struct conn *c)
{
    while (!c->awaited && !c->in_health_line && !c->closing) {
        const char *data = c->in.data + c->in_start;
        size_t available = c->in.len - c->in_start;
        if (c->discard_left) {
            size_t take = available < c->discard_left ? available : (size_t)c->discard_left;
            c->in_start += take;
            c->discard_left -= take;
            if (c->discard_left)
                break;
            struct answer a = reject(413, "request body exceeds 1 MiB");
            send_answer(c, &a, false);
            break;
        }
        if (available == 0)
            break;
        struct request r;
        size_t consumed;
        uint64_t body_length;
        enum parse_result parsed = parse_request(data, available, &r, &consumed, &body_length);
        if (parsed == PARSE_INCOMPLETE)
            break;
        if (parsed == PARSE_MALFORMED) {
            struct answer a = reject(400, "malformed request");
            send_answer(c, &a, false);
            break;
        }
        c->in_start += consumed;
        if (parsed == PARSE_TOO_LARGE) {
            c->discard_left = BODY_MAX + 1;
            continue;
        }
        struct answer a = {0};
        if (dispatch(c, &r, &a))
            send_answer(c, &a, r.keep_alive);
        else
            c->awaited_keep_alive = r.keep_alive;
    }
    /* keep the unconsumed bytes at the front */
    if (c->in_start) {
        memmove(c->in.data, c->in.data + c->in_start, c->in.len - c->in_start);
        c->in.len -= c->in_start;
        c->in_start = 0;
    }
}

static bool flush(struct conn *c)
{
    if (!tcp_write_pending(c->fd, c->out.data, c->out.len, &c->out_sent))
        return false;
    if (c->out_sent == c->out.len)
        c->out.len = c->out_sent = 0;
    return true;
}

/* Writes what is ready, then watches for what comes next: writability while answers are
   unsent (no reading meanwhile), a hang-up while an answer is awaited, requests otherwise. */
static void after_io(struct conn *c)
{
    if (!flush(c)) {
        close_conn(c);
        return;
    }
    if (c->out.len == 0 && c->closing) {
        close_conn(c);
        return;
    }
    uint32_t wanted = c->out.len ? EPOLLOUT | EPOLLRDHUP
                      : (c->awaited || c->in_health_line) ? EPOLLRDHUP
                      : EPOLLIN | EPOLLRDHUP;
    if (wanted != c->watching) {
        struct epoll_event ev = {.events = wanted, .data.ptr = c};
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
        c->watching = wanted;
    }
}

static void on_connection(void *data, uint32_t events)
{
    struct conn *c = data;
    if (events & (EPOLLERR | EPOLLHUP) || ((events & EPOLLRDHUP) && (c->awaited || c->in_health_line))) {
        close_conn(c);
        return;
    }
    if (c->watching & EPOLLIN) {
        if (c->in.cap - c->in.len < IN_INITIAL / 2)
            text_reserve(&c->in, c->in.cap < IN_INITIAL ? IN_INITIAL : c->in.cap);
        ssize_t n = read(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            /* answers to what came before the hang-up still go out */
            serve(c);
            c->closing = true;
            after_io(c);
            return;
        }
        if (n > 0)
            c->in.len += (size_t)n;
    }
    serve(c);
    after_io(c);
}

static void accepted(int fd)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->watching = EPOLLIN | EPOLLRDHUP;
    struct epoll_event ev = {.events = c->watching, .data.ptr = c};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0)
        close_conn(c);
}

/* ---- set-up ---- */

/* The reference's start-up line: whoever starts the emulator reads the port from it. */
static void announce(int listener)
{
    char shown[64];
    int port = tcp_bound_address(listener, shown, sizeof shown);
    fprintf(stderr,
            "paycore emulator listening on http://%s:%d (fee %s, token %s, delay %" PRId64
            " ms, failure %s, health interval %g s)\n",
            shown, port, config.fee_text, config.token, config.delay_ms, config.failing ? "on" : "off",
            config.health_interval_s);
    fflush(stderr);
}

/* A fee such as 0.07: digits, optionally a point and up to 9 more. */
static bool parse_fee(const char *text)
{
    size_t whole = strspn(text, "0123456789");
    size_t fraction = text[whole] == '.' ? strspn(text + whole + 1, "0123456789") : 0;
    if (whole == 0 || whole > 9 || fraction > 9 || text[whole + (text[whole] == '.' ? 1 + fraction : 0)] != '\0' ||
        (text[whole] == '.' && fraction == 0))
        return false;
    int64_t numerator = 0, denominator = 1;
    for (size_t i = 0; i < whole; i++)
        numerator = numerator * 10 + (text[i] - '0');
    for (size_t i = 0; i < fraction; i++) {
        numerator = numerator * 10 + (text[whole + 1 + i] - '0');
        denominator *= 10;
    }
    config.fee_text = text;
    config.fee_numerator = numerator;
    config.fee_denominator = denominator;
    return true;
}

static bool parse_options(int argc, char **argv)
{
    static const struct option options[] = {
        {"host", required_argument, NULL, 'h'},         {"port", required_argument, NULL, 'p'},
        {"fee", required_argument, NULL, 'f'},          {"token", required_argument, NULL, 't'},
        {"delay", required_argument, NULL, 'd'},        {"failure", no_argument, NULL, 'F'},
        {"health-interval", required_argument, NULL, 'H'},
        {"max-inflight", required_argument, NULL, 'i'}, {"max-queued", required_argument, NULL, 'q'},
        {"expected-payments", required_argument, NULL, 'e'},
        {NULL, 0, NULL, 0},
    };
    const char *token = "123";
    int option, index = 0;
    while ((option = getopt_long(argc, argv, "", options, &index)) != -1) {
        bool valid = true;
        long value;
        switch (option) {
        case 'h': config.host = optarg; break;
        case 'p': valid = parse_long(optarg, 0, 65535, &config.port); break;
        case 'f': valid = parse_fee(optarg); break;
        case 't': token = optarg; break;
        case 'd': valid = parse_long(optarg, 0, INT32_MAX, &value); config.delay_ms = value; break;
        case 'F': config.failing = true; break;
        case 'H': valid = parse_double(optarg, 0, 1e6, &config.health_interval_s); break;
        case 'i': valid = parse_long(optarg, 1, 1000000, &config.max_inflight); break;
        case 'q': valid = parse_long(optarg, 0, 1000000, &config.max_queued); break;
        case 'e': valid = parse_long(optarg, 1, 1000000000, &config.expected_payments); break;
        default: return false;
        }
        if (!valid) {
            fprintf(stderr, "processor: invalid value for --%s: %s\n", options[index].name, optarg);
            return false;
        }
    }
    if (optind < argc)
        return false;
    config.token_len = strlen(token);
    config.token = must_realloc(NULL, config.token_len + 1);
    memcpy(config.token, token, config.token_len + 1);
    return true;
}

int main(int argc, char **argv)
{
    if (!parse_options(argc, argv)) {
        fputs("usage: processor [--host 127.0.0.1] [--port 8001] [--fee 0.07] [--token 123] [--delay MS]\n"
              "                 [--failure] [--health-interval 5 (0: no limit)] [--max-inflight 800]\n"
              "                 [--max-queued 500] [--expected-payments N]\n",
              stderr);
        return 2;
    }
    store_allocate((uint64_t)config.expected_payments);
    int signal_fd = stop_signal_fd(0);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (signal_fd < 0 || epoll_fd < 0) {
        perror("processor: epoll/signalfd");
        return 1;
    }
    char port[16];
    snprintf(port, sizeof port, "%ld", config.port);
    int listener = tcp_listen("processor", config.host, port);
    if (listener < 0)
        return 1;
    if (!tcp_server_watch(epoll_fd, listener, signal_fd)) {
        perror("processor: epoll_ctl");
        return 1;
    }
    announce(listener);
    for (;;) {
        int64_t next_ns = timer_first(&processing) ? timer_first(&processing)->due_ns : -1;
        if (health_timer_ns && (next_ns < 0 || health_timer_ns < next_ns))
            next_ns = health_timer_ns;
        struct timespec timeout;
        int status = tcp_server_wait("processor", epoll_fd, listener, timer_wait(next_ns, now_ns(), &timeout),
                                     accepted, on_connection);
        if (status >= 0)
            return status;
        int64_t now = now_ns();
        struct timer *due;
        while ((due = timer_first(&processing)) && due->due_ns <= now) {
            timer_cancel(&processing, due);
            finish_processing(container_of(due, struct pending_payment, timer));
        }
        if (health_timer_ns && health_timer_ns <= now)
            open_health_window();
    }
}
