/*
 * HTTP load generator for POST /payments replicating two k6 executors:
 *
 * - "ramping-vus" (closed loop, the default): virtual users (VUs) start on a
 *   linear ramp, each owns one keep-alive connection and loops request ->
 *   complete response -> think time.
 * - "constant-arrival-rate" (open loop, --rate): an iteration (one request)
 *   starts every 1/rate s whatever the answers, on an idle VU taken first in
 *   first out from a pool of --start-vus (k6's preAllocatedVUs) that grows up
 *   to --max-vus while all are busy; an iteration that finds none is dropped
 *   and counted, as k6 counts dropped_iterations. Each VU keeps its
 *   connection between iterations.
 *
 * Every request carries a fresh correlationId. Answers other than 2xx are
 * also counted by status and body (a 503 says why in its body).
 * --progress-ms prints running totals as JSON lines while it runs. With
 * --warmup the open loop runs that long first, unrecorded (but for a count
 * of its 2xx answers): connections are open and paths warm when it counts.
 *
 * Single-threaded, epoll, non-blocking sockets, no allocation after start-up:
 * the generator's own latency floor has to stay far below what it measures.
 *
 * Build: gcc -O2 -Wall -Wextra -o build/loadgen perf/loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_head.h"
#include "parse_number.h"
#include "stop_signals.h"
#include "timer_heap.h"

#define NS_PER_US 1000LL
#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL
#define HEAD_MAX 4096
#define MAX_EVENTS 256
#define UUID_LEN 36
/* Big enough that a full 300 s run (about 2 MB of rows) is written once, at exit. */
#define CSV_BUFFER_SIZE ((size_t)8 << 20)
#define CSV_ROW_MAX 64
/* what is kept of an answer's body when it is not a 2xx, to tell refusals apart */
#define BODY_KEPT 160
#define ANSWER_KINDS_MAX 16
#define MASK60 ((UINT64_C(1) << 60) - 1)

enum vu_state { VU_WAITING, VU_CONNECTING, VU_SENDING, VU_RECEIVING, VU_FINISHED };

struct response {
    size_t head_len;   /* bytes of the head buffered so far */
    bool head_done;
    int status;
    int64_t body_left; /* -1: the body runs until the server closes */
    bool close_after;
    size_t body_len;   /* bytes of body kept (answers other than 2xx) */
    char body[BODY_KEPT];
};

struct vu {
    int fd;
    enum vu_state state;
    uint32_t watching;    /* the epoll interest of fd */
    struct timer timer;   /* next iteration start, or the deadline of the one in flight */
    int64_t iteration_ns; /* iteration start, before any connect */
    bool new_connection;  /* this iteration opened the connection it uses */
    bool recorded;        /* this iteration was due after any warm-up */
    int64_t sent_ns;      /* immediately before the request's first write() */
    /* when the last bytes read arrived, on the monotonic clock: their read minus
       how long they waited by the kernel's receive timestamp (-1: no usable timestamp) */
    int64_t arrived_ns;
    size_t written;
    char *request;        /* this VU's copy: a partial write must not see another VU's UUID */
    struct response response;
    char head[HEAD_MAX];
};

struct options {
    const char *target;
    double duration_s;
    long max_vus;
    long start_vus;
    long timeout_ms;
    long think_ms;
    const char *amount;
    const char *path;
    const char *out;
    double rate;          /* iterations per second; 0: ramping VUs */
    double warmup_s;      /* open loop: unrecorded seconds before the duration */
    long progress_ms;     /* 0: no progress lines */
    const char *requested_at;
};

static struct options opt = {
    .start_vus = 1, .timeout_ms = 1500, .think_ms = 1000, .amount = "20.05", .path = "/payments",
};

static struct vu *vus;
static struct timer_heap timers;
static long finished_vus;
static int epoll_fd;

static struct sockaddr_storage target_addr;
static socklen_t target_addrlen;
static size_t request_len;
static size_t uuid_offset;

static int64_t origin_ns; /* where the recorded run starts, after any warm-up */
static int64_t first_arrival_ns;
static uint64_t warmup_ok_2xx;
static int64_t end_ns;
static int64_t timeout_ns;
static int64_t think_ns;

static uint64_t started, requests, ok_2xx, failed, other_status;

/* constant arrival rate: idle VUs in a first-in first-out ring */
static struct vu **idle;
static long idle_head, idle_len;
static long vus_used, busy_vus;
static uint64_t arrivals, dropped;
static int64_t next_arrival_ns, max_start_lag_ns;

/* answers other than 2xx, by status and body */
struct answer_kind {
    int status;
    size_t body_len;
    char body[BODY_KEPT];
    uint64_t count;
};
static struct answer_kind answer_kinds[ANSWER_KINDS_MAX];
static int answer_kinds_len;
static uint64_t answers_unsorted; /* beyond ANSWER_KINDS_MAX kinds */

/* the 2xx latencies since the last progress line */
static uint32_t *interval_counts;
static uint64_t interval_ok;
static int64_t next_progress_ns;
/* Exact latency histograms at 1 us resolution: a 2xx never takes longer than the timeout.
   A response is timed to when it arrived (the kernel's receive timestamp of its
   last bytes) and, apart, to when this process got round to reading it. */
static uint32_t *latency_counts;
static uint32_t *read_latency_counts;
static uint64_t unstamped;
static int64_t latency_slots;

static FILE *csv_file;
static char *csv;
static size_t csv_len;
static bool csv_error;

static uint64_t rng[4];
static uint64_t id_counter, id_offset, id_key;

static int64_t timespec_ns(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * NS_PER_S + ts->tv_nsec;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return timespec_ns(&ts);
}

/* The clock of SO_TIMESTAMPNS. It can be stepped (a VM's clock is), so it only
   measures the short wait of received bytes until their read; the request's
   lifetime is on the monotonic clock. */
static int64_t real_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return timespec_ns(&ts);
}

/* ---- correlation ids ---- */

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro256ss(void)
{
    uint64_t result = rotl(rng[1] * 5, 7) * 9;
    uint64_t t = rng[1] << 17;
    rng[2] ^= rng[0];
    rng[3] ^= rng[1];
    rng[1] ^= rng[2];
    rng[0] ^= rng[3];
    rng[2] ^= t;
    rng[3] = rotl(rng[3], 45);
    return result;
}

static void seed_ids(void)
{
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
    for (int i = 0; i < 4; i++)
        rng[i] = splitmix64(&seed);
    id_offset = splitmix64(&seed) & MASK60;
    id_key = splitmix64(&seed) & MASK60;
}

/* A bijection on 60-bit values (xorshifts and odd multipliers modulo 2^60). */
static uint64_t permute60(uint64_t x)
{
    x ^= x >> 30;
    x = (x * UINT64_C(0xbf58476d1ce4e5b9)) & MASK60;
    x ^= x >> 27;
    x = (x * UINT64_C(0x94d049bb133111eb)) & MASK60;
    return x ^ (x >> 31);
}

static void put_hex(char *out, uint64_t value, int digits)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--) {
        out[i] = hex[value & 15];
        value >>= 4;
    }
}

/*
 * A v4 UUID. Sixty of its random-looking bits are a keyed permutation of a
 * counter, so no two ids of a run can be equal (not merely improbably so);
 * the other 62 random bits come from xoshiro256**.
 */
static void write_uuid(char *out)
{
    uint64_t unique = permute60((id_offset + id_counter++) & MASK60) ^ id_key;
    uint64_t high = ((unique >> 12) << 16) | 0x4000 | (unique & 0xfff);
    uint64_t low = (xoshiro256ss() >> 2) | UINT64_C(0x8000000000000000);
    put_hex(out, high >> 32, 8);
    out[8] = '-';
    put_hex(out + 9, (high >> 16) & 0xffff, 4);
    out[13] = '-';
    put_hex(out + 14, high & 0xffff, 4);
    out[18] = '-';
    put_hex(out + 19, low >> 48, 4);
    out[23] = '-';
    put_hex(out + 24, low & UINT64_C(0xffffffffffff), 12);
}

/* ---- timers ---- */

static void schedule(struct vu *v, int64_t due_ns)
{
    timer_schedule(&timers, &v->timer, due_ns);
}

static void unschedule(struct vu *v)
{
    timer_cancel(&timers, &v->timer);
}

/* The VU whose timer is due first, or NULL. */
static struct vu *first_due(void)
{
    struct timer *first = timer_first(&timers);
    return first ? container_of(first, struct vu, timer) : NULL;
}

/* ---- results ---- */

static char *put_uint(char *out, uint64_t value)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        *out++ = digits[--n];
    return out;
}

static void csv_flush(void)
{
    if (csv_len && fwrite(csv, 1, csv_len, csv_file) != csv_len)
        csv_error = true;
    csv_len = 0;
}

static int64_t ns_to_us(int64_t ns)
{
    return (ns + NS_PER_US / 2) / NS_PER_US;
}

static void count_answer(int status, const char *body, size_t body_len)
{
    for (int i = 0; i < answer_kinds_len; i++) {
        struct answer_kind *kind = &answer_kinds[i];
        if (kind->status == status && kind->body_len == body_len && memcmp(kind->body, body, body_len) == 0) {
            kind->count++;
            return;
        }
    }
    if (answer_kinds_len == ANSWER_KINDS_MAX) {
        answers_unsorted++;
        return;
    }
    struct answer_kind *kind = &answer_kinds[answer_kinds_len++];
    kind->status = status;
    kind->body_len = body_len;
    memcpy(kind->body, body, body_len);
    kind->count = 1;
}

/* arrival_ns: from the request's write to the response's arrival, or -1 when unknown */
static void record(int64_t start_ns, int64_t done_ns, int64_t arrival_ns, int status, bool new_connection,
                   const struct response *response)
{
    int64_t read_latency_us = ns_to_us(done_ns - start_ns);
    /* without a usable timestamp the read time stands in */
    if (status != 0 && arrival_ns < 0) {
        unstamped++;
        arrival_ns = done_ns - start_ns;
    }
    int64_t latency_us = status ? ns_to_us(arrival_ns) : read_latency_us;
    requests++;
    if (status == 0) {
        failed++;
    } else if (status >= 200 && status < 300) {
        ok_2xx++;
        latency_counts[latency_us]++;
        read_latency_counts[read_latency_us]++;
        if (interval_counts) {
            interval_counts[latency_us]++;
            interval_ok++;
        }
    } else {
        other_status++;
        count_answer(status, response->body, response->body_len);
    }
    if (CSV_BUFFER_SIZE - csv_len < CSV_ROW_MAX)
        csv_flush();
    char *p = csv + csv_len;
    p = put_uint(p, (uint64_t)((start_ns - origin_ns + NS_PER_US / 2) / NS_PER_US));
    *p++ = ',';
    p = put_uint(p, (uint64_t)latency_us);
    *p++ = ',';
    p = put_uint(p, (uint64_t)status);
    *p++ = ',';
    p = put_uint(p, (uint64_t)read_latency_us);
    *p++ = ',';
    *p++ = new_connection ? '1' : '0';
    *p++ = '\n';
    csv_len = (size_t)(p - csv);
}

/* ---- virtual users ---- */

static void close_connection(struct vu *v)
{
    if (v->fd >= 0) {
        close(v->fd);
        v->fd = -1;
    }
}

static void finish_vu(struct vu *v)
{
    unschedule(v);
    close_connection(v);
    v->state = VU_FINISHED;
    finished_vus++;
}

/* Level-triggered interest: EPOLLOUT alone while connecting or mid-write (an early
 * answer must not make EPOLLIN spin), EPOLLIN otherwise. */
static void watch(struct vu *v, uint32_t events)
{
    if (v->watching == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = v};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, v->fd, &ev);
    v->watching = events;
}

static void end_request(struct vu *v, int64_t done_ns, int status)
{
    /* in flight, due_ns is the deadline: an answer completed after it is a timeout */
    if (done_ns > v->timer.due_ns)
        status = 0;
    /* a failure can happen before anything is written, so it is timed from the iteration start */
    int64_t arrival_ns = v->arrived_ns >= 0 ? v->arrived_ns - v->sent_ns : -1;
    if (v->recorded)
        record(status ? v->sent_ns : v->iteration_ns, done_ns, arrival_ns, status, v->new_connection, &v->response);
    else
        warmup_ok_2xx += status >= 200 && status < 300;
    if (status == 0 || v->response.close_after)
        close_connection(v);
    if (opt.rate > 0) {
        unschedule(v);
        v->state = VU_WAITING;
        idle[(idle_head + idle_len++) % opt.max_vus] = v;
        busy_vus--;
        return;
    }
    int64_t next_ns = done_ns + think_ns;
    if (next_ns >= end_ns) {
        finish_vu(v);
    } else {
        v->state = VU_WAITING;
        schedule(v, next_ns);
    }
}

static void continue_sending(struct vu *v)
{
    ssize_t n = write(v->fd, v->request + v->written, request_len - v->written);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
        end_request(v, now_ns(), 0);
        return;
    }
    if (n > 0)
        v->written += (size_t)n;
    if (v->written < request_len) {
        v->state = VU_SENDING;
        watch(v, EPOLLOUT);
        return;
    }
    v->state = VU_RECEIVING;
    watch(v, EPOLLIN);
}

static void send_request(struct vu *v)
{
    write_uuid(v->request + uuid_offset);
    v->written = 0;
    v->arrived_ns = -1;
    v->sent_ns = now_ns();
    continue_sending(v);
}

enum connect_result { CONNECT_FAILED, CONNECT_PENDING, CONNECT_DONE };

static enum connect_result open_connection(struct vu *v)
{
    int fd = socket(target_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return CONNECT_FAILED;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    bool pending = false;
    if (connect(fd, (const struct sockaddr *)&target_addr, target_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            close(fd);
            return CONNECT_FAILED;
        }
        pending = true;
    }
    struct epoll_event ev = {.events = pending ? EPOLLOUT : EPOLLIN, .data.ptr = v};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        return CONNECT_FAILED;
    }
    v->fd = fd;
    v->watching = ev.events;
    return pending ? CONNECT_PENDING : CONNECT_DONE;
}

static void start_iteration(struct vu *v, int64_t now, bool recorded)
{
    v->recorded = recorded;
    started += recorded;
    v->iteration_ns = now;
    v->response = (struct response){0};
    schedule(v, now + timeout_ns);
    v->new_connection = v->fd < 0;
    if (v->new_connection) {
        enum connect_result result = open_connection(v);
        if (result == CONNECT_FAILED) {
            end_request(v, now_ns(), 0);
            return;
        }
        if (result == CONNECT_PENDING) {
            v->state = VU_CONNECTING;
            return;
        }
    }
    send_request(v);
}

static void on_connect_ready(struct vu *v)
{
    int error = 0;
    socklen_t len = sizeof error;
    if (getsockopt(v->fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0 || error != 0) {
        end_request(v, now_ns(), 0);
        return;
    }
    send_request(v);
}

/* ---- response parsing ---- */

/* The status line and the headers that frame the body; head ends with the blank line. */
static bool parse_head(struct response *r, const char *head, size_t len)
{
    if (len < 12 || memcmp(head, "HTTP/1.", 7) != 0 || (head[7] != '0' && head[7] != '1') ||
        head[8] != ' ')
        return false;
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (head[i] < '0' || head[i] > '9')
            return false;
        status = status * 10 + (head[i] - '0');
    }
    /* 1xx interim answers are never solicited: no request carries Expect */
    if (status < 200)
        return false;
    r->status = status;
    r->close_after = head[7] == '0';
    int64_t content_length = -1;
    const char *line = http_first_header_line(head, len);
    struct http_header header;
    int read;
    while ((read = http_next_header(&line, head + len, &header)) > 0) {
        if (http_header_is(&header, "content-length")) {
            uint64_t length;
            if (!http_parse_length(&header, &length))
                return false;
            content_length = (int64_t)length;
        } else if (http_header_is(&header, "transfer-encoding")) {
            /* chunked framing is unsupported: the services measured always send Content-Length */
            return false;
        } else if (http_header_is(&header, "connection") &&
                   http_has_token(header.value, header.value_end, "close")) {
            r->close_after = true;
        }
    }
    if (read < 0)
        return false;
    if (status == 204 || status == 304) {
        r->body_left = 0;
    } else if (content_length >= 0) {
        r->body_left = content_length;
    } else {
        r->body_left = -1;
        r->close_after = true;
    }
    return true;
}

static void receive(struct vu *v)
{
    struct response *r = &v->response;
    /* once the head is parsed the buffer only counts body bytes, so it is reused from the start */
    char *into = r->head_done ? v->head : v->head + r->head_len;
    size_t room = r->head_done ? HEAD_MAX : HEAD_MAX - r->head_len;
    struct iovec buffer = {.iov_base = into, .iov_len = room};
    union {
        char space[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;
    struct msghdr message = {.msg_iov = &buffer, .msg_iovlen = 1,
                             .msg_control = control.space, .msg_controllen = sizeof control.space};
    ssize_t n = recvmsg(v->fd, &message, 0);
    int64_t done_ns = now_ns();
    int64_t read_real_ns = real_now_ns();
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec arrived;
            memcpy(&arrived, CMSG_DATA(c), sizeof arrived);
            /* a timestamp after the read: the realtime clock was stepped in between */
            int64_t waited_ns = read_real_ns - timespec_ns(&arrived);
            v->arrived_ns = waited_ns >= 0 ? done_ns - waited_ns : -1;
        }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            end_request(v, done_ns, 0);
        return;
    }
    if (n == 0) {
        bool ends_at_close = r->head_done && r->body_left < 0;
        end_request(v, done_ns, ends_at_close ? r->status : 0);
        return;
    }
    size_t body_bytes = (size_t)n;
    const char *body = into;
    if (!r->head_done) {
        size_t scan_from = r->head_len >= 3 ? r->head_len - 3 : 0;
        r->head_len += (size_t)n;
        const char *blank_line = memmem(v->head + scan_from, r->head_len - scan_from, "\r\n\r\n", 4);
        if (!blank_line) {
            if (r->head_len == HEAD_MAX)
                end_request(v, done_ns, 0);
            return;
        }
        size_t head_end = (size_t)(blank_line + 4 - v->head);
        if (!parse_head(r, v->head, head_end)) {
            end_request(v, done_ns, 0);
            return;
        }
        r->head_done = true;
        body_bytes = r->head_len - head_end;
        body = v->head + head_end;
    }
    if (r->body_left < 0)
        return;
    if ((int64_t)body_bytes > r->body_left) {
        /* bytes beyond the response would be taken for the next one */
        r->close_after = true;
        body_bytes = (size_t)r->body_left;
    }
    if (r->status < 200 || r->status >= 300) {
        size_t kept = body_bytes < BODY_KEPT - r->body_len ? body_bytes : BODY_KEPT - r->body_len;
        memcpy(r->body + r->body_len, body, kept);
        r->body_len += kept;
    }
    r->body_left -= (int64_t)body_bytes;
    if (r->body_left == 0)
        end_request(v, done_ns, r->status);
}

/* ---- event loop ---- */

static void on_event(struct vu *v)
{
    switch (v->state) {
    case VU_CONNECTING:
        on_connect_ready(v);
        break;
    case VU_SENDING:
        continue_sending(v);
        break;
    case VU_RECEIVING:
        receive(v);
        break;
    case VU_WAITING:
    case VU_FINISHED:
        /* an idle keep-alive connection only becomes ready when the server closed or broke it */
        close_connection(v);
        break;
    }
}

static void on_timer(struct vu *v, int64_t now)
{
    if (v->state != VU_WAITING)
        end_request(v, now, 0);
    else if (now >= end_ns) /* a wake-up due just before the end can be served just after it */
        finish_vu(v);
    else
        start_iteration(v, now, true);
}

static void stop_starting_iterations(int64_t now)
{
    end_ns = now;
    for (long i = 0; i < opt.max_vus; i++)
        if (vus[i].state == VU_WAITING)
            finish_vu(&vus[i]);
}

/* Open loop: the iterations due by now start, late ones as soon as they can. */
static void start_due_arrivals(void)
{
    for (;;) {
        int64_t now = now_ns();
        if (next_arrival_ns > now || next_arrival_ns >= end_ns)
            return;
        /* a late iteration is recorded or not by when it was due, not when it could start */
        int64_t due_ns = next_arrival_ns;
        if (now - due_ns > max_start_lag_ns)
            max_start_lag_ns = now - due_ns;
        arrivals++;
        next_arrival_ns = first_arrival_ns + (int64_t)((double)arrivals * NS_PER_S / opt.rate);
        struct vu *v = NULL;
        if (idle_len > 0) {
            v = idle[idle_head];
            idle_head = (idle_head + 1) % opt.max_vus;
            idle_len--;
        } else if (vus_used < opt.max_vus) {
            v = &vus[vus_used++];
        }
        if (!v) {
            dropped += due_ns >= origin_ns;
            continue;
        }
        busy_vus++;
        start_iteration(v, now, due_ns >= origin_ns);
    }
}

static bool all_done(int64_t now)
{
    if (opt.rate > 0)
        return now >= end_ns && busy_vus == 0;
    return finished_vus == opt.max_vus;
}

/* The next moment something is due (a VU's timer, the next arrival or the end of an
   open-loop run, a progress line), or -1. */
static int64_t next_due_ns(int64_t now)
{
    int64_t due = first_due() ? first_due()->timer.due_ns : -1;
    if (opt.rate > 0 && now < end_ns) {
        int64_t arrival_or_end = next_arrival_ns < end_ns ? next_arrival_ns : end_ns;
        if (due < 0 || arrival_or_end < due)
            due = arrival_or_end;
    }
    if (opt.progress_ms > 0 && (due < 0 || next_progress_ns < due))
        due = next_progress_ns;
    return due;
}

static void print_progress(int64_t now);

/* Runs until every VU is done (open loop: until the end and the last answer); a second
   SIGINT/SIGTERM abandons the requests in flight. */
static bool run(int signal_fd)
{
    struct epoll_event events[MAX_EVENTS];
    int signals = 0;
    for (;;) {
        int64_t now = now_ns();
        if (all_done(now))
            return true;
        /* VUs due within the same millisecond start apart, as k6's timers start them:
           bursts would inflate the tail being measured */
        struct timespec timeout;
        int n = epoll_pwait2(epoll_fd, events, MAX_EVENTS, timer_wait(next_due_ns(now), now, &timeout), NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return false;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr) {
                on_event(events[i].data.ptr);
                continue;
            }
            struct signalfd_siginfo info;
            if (read(signal_fd, &info, sizeof info) != (ssize_t)sizeof info)
                continue;
            if (++signals > 1)
                return true;
            stop_starting_iterations(now_ns());
        }
        struct vu *due;
        while ((due = first_due()) && due->timer.due_ns <= (now = now_ns()))
            on_timer(due, now);
        if (opt.rate > 0)
            start_due_arrivals();
        now = now_ns();
        if (opt.progress_ms > 0 && now >= next_progress_ns)
            print_progress(now);
    }
}

/* ---- set-up and report ---- */

static void usage(void)
{
    fputs("usage: loadgen --target HOST:PORT --duration SECONDS --max-vus N --out FILE.csv\n"
          "               [--start-vus 1] [--timeout-ms 1500] [--think-ms 1000]\n"
          "               [--rate PER_SECOND (open loop; --think-ms unused) [--warmup SECONDS]]\n"
          "               [--progress-ms MS]\n"
          "               [--amount 20.05] [--path /payments] [--requested-at ISO]\n",
          stderr);
}

/* A positive number of seconds or iterations per second, at most max. */
static bool parse_positive(const char *text, double max, double *out)
{
    return parse_double(text, 0, max, out) && *out > 0;
}

/* digits, optionally a point and more digits: it goes into the JSON body verbatim */
static bool is_amount(const char *text)
{
    size_t integer = strspn(text, "0123456789");
    if (integer == 0 || strlen(text) > 32)
        return false;
    if (text[integer] == '\0')
        return true;
    if (text[integer] != '.')
        return false;
    size_t fraction = strspn(text + integer + 1, "0123456789");
    return fraction > 0 && text[integer + 1 + fraction] == '\0';
}

/* printable ASCII without quotes or backslashes: it goes into the JSON body verbatim */
static bool is_plain_text(const char *text)
{
    if (strlen(text) == 0 || strlen(text) > 64)
        return false;
    for (; *text; text++)
        if (*text < ' ' || *text > '~' || *text == '"' || *text == '\\')
            return false;
    return true;
}

static bool is_path(const char *text)
{
    if (text[0] != '/' || strlen(text) > 2048)
        return false;
    for (; *text; text++)
        if (*text <= ' ' || *text > '~')
            return false;
    return true;
}

static bool parse_options(int argc, char **argv)
{
    static const struct option options[] = {
        {"target", required_argument, NULL, 't'},     {"duration", required_argument, NULL, 'd'},
        {"max-vus", required_argument, NULL, 'm'},    {"start-vus", required_argument, NULL, 's'},
        {"timeout-ms", required_argument, NULL, 'T'}, {"think-ms", required_argument, NULL, 'k'},
        {"amount", required_argument, NULL, 'a'},     {"path", required_argument, NULL, 'p'},
        {"out", required_argument, NULL, 'o'},        {"rate", required_argument, NULL, 'r'},
        {"progress-ms", required_argument, NULL, 'P'}, {"requested-at", required_argument, NULL, 'R'},
        {"warmup", required_argument, NULL, 'w'},
        {NULL, 0, NULL, 0},
    };
    int option, index = 0;
    while ((option = getopt_long(argc, argv, "", options, &index)) != -1) {
        bool valid = true;
        switch (option) {
        case 't': opt.target = optarg; break;
        case 'd': valid = parse_positive(optarg, 1e6, &opt.duration_s); break;
        case 'm': valid = parse_long(optarg, 1, 65535, &opt.max_vus); break;
        case 's': valid = parse_long(optarg, 0, 65535, &opt.start_vus); break;
        case 'T': valid = parse_long(optarg, 1, 60000, &opt.timeout_ms); break;
        case 'k': valid = parse_long(optarg, 0, 3600000, &opt.think_ms); break;
        case 'a': valid = is_amount(optarg); opt.amount = optarg; break;
        case 'p': valid = is_path(optarg); opt.path = optarg; break;
        case 'o': opt.out = optarg; break;
        case 'r': valid = parse_positive(optarg, 1e7, &opt.rate); break;
        case 'w': valid = parse_positive(optarg, 1e6, &opt.warmup_s); break;
        case 'P': valid = parse_long(optarg, 1, 3600000, &opt.progress_ms); break;
        case 'R': valid = is_plain_text(optarg); opt.requested_at = optarg; break;
        default: return false;
        }
        if (!valid) {
            fprintf(stderr, "loadgen: invalid value for --%s: %s\n", options[index].name, optarg);
            return false;
        }
    }
    if (optind < argc || !opt.target || !opt.out || opt.duration_s == 0 || opt.max_vus == 0) {
        fputs("loadgen: --target, --duration, --max-vus and --out are required\n", stderr);
        return false;
    }
    if (opt.warmup_s > 0 && opt.rate == 0) {
        fputs("loadgen: --warmup needs --rate\n", stderr);
        return false;
    }
    if (opt.start_vus > opt.max_vus) {
        fputs("loadgen: --start-vus exceeds --max-vus\n", stderr);
        return false;
    }
    return true;
}

static bool resolve_target(void)
{
    char host[256];
    const char *colon = strrchr(opt.target, ':');
    long port;
    if (!colon || (size_t)(colon - opt.target) >= sizeof host || !parse_long(colon + 1, 1, 65535, &port)) {
        fprintf(stderr, "loadgen: --target must be HOST:PORT, got %s\n", opt.target);
        return false;
    }
    memcpy(host, opt.target, (size_t)(colon - opt.target));
    host[colon - opt.target] = '\0';
    char *name = host;
    size_t name_len = strlen(host);
    if (name_len >= 2 && host[0] == '[' && host[name_len - 1] == ']') {
        host[name_len - 1] = '\0';
        name++;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *found;
    int rc = getaddrinfo(name, colon + 1, &hints, &found);
    if (rc != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s: %s\n", name, gai_strerror(rc));
        return false;
    }
    memcpy(&target_addr, found->ai_addr, found->ai_addrlen);
    target_addrlen = found->ai_addrlen;
    freeaddrinfo(found);
    return true;
}

/* One request text per VU; only the UUID changes between iterations. */
static char *build_requests(void)
{
    static const char body_start[] = "{\"correlationId\":\"";
    static const char placeholder[] = "00000000-0000-4000-8000-000000000000";
    char requested_at[96] = "";
    if (opt.requested_at)
        snprintf(requested_at, sizeof requested_at, ",\"requestedAt\":\"%s\"", opt.requested_at);
    size_t body_len = strlen(body_start) + UUID_LEN + strlen("\",\"amount\":") + strlen(opt.amount) +
                      strlen(requested_at) + 1;
    int head_len = snprintf(NULL, 0,
                            "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                            "Content-Length: %zu\r\n\r\n",
                            opt.path, opt.target, body_len);
    request_len = (size_t)head_len + body_len;
    uuid_offset = (size_t)head_len + strlen(body_start);
    char *all = malloc(request_len * (size_t)opt.max_vus + 1);
    if (!all)
        return NULL;
    snprintf(all, request_len + 1,
             "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n%s%s\",\"amount\":%s%s}",
             opt.path, opt.target, body_len, body_start, placeholder, opt.amount, requested_at);
    for (long i = 1; i < opt.max_vus; i++)
        memcpy(all + request_len * (size_t)i, all, request_len);
    return all;
}

/* The kernel turns receive timestamps on a moment after the first socket asks
   (from a work queue) and off when the last one closes. A loopback datagram
   socket that asks, kept open for the whole run, and a datagram that comes
   back stamped, make sure the first response of the run is stamped too.
   Returns the socket, or -1 if timestamps did not come on within a second. */
static int keep_receive_timestamps_on(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in self = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t self_len = sizeof self;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&self, sizeof self) < 0 ||
        getsockname(fd, (struct sockaddr *)&self, &self_len) < 0)
        goto failed;
    for (int attempt = 0; attempt < 1000; attempt++) {
        char byte = 0;
        union {
            char space[CMSG_SPACE(sizeof(struct timespec))];
            struct cmsghdr align;
        } control;
        struct iovec buffer = {.iov_base = &byte, .iov_len = 1};
        struct msghdr message = {.msg_iov = &buffer, .msg_iovlen = 1,
                                 .msg_control = control.space, .msg_controllen = sizeof control.space};
        if (sendto(fd, &byte, 1, 0, (struct sockaddr *)&self, self_len) != 1 ||
            recvmsg(fd, &message, 0) != 1)
            goto failed;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS)
                return fd;
        usleep(1000);
    }
failed:
    fputs("loadgen: no kernel receive timestamps; responses are timed when read\n", stderr);
    if (fd >= 0)
        close(fd);
    return -1;
}

static void raise_fd_limit(void)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

/* VU i >= start_vus joins when k6's linear ramp reaches i + 1 VUs. */
static void start_ramp(int64_t duration_ns)
{
    for (long i = 0; i < opt.max_vus; i++) {
        struct vu *v = &vus[i];
        int64_t offset_ns = 0;
        if (i >= opt.start_vus)
            offset_ns = (int64_t)((double)duration_ns * (double)(i - opt.start_vus + 1) /
                                  (double)(opt.max_vus - opt.start_vus));
        if (offset_ns >= duration_ns) {
            v->state = VU_FINISHED;
            finished_vus++;
        } else {
            v->state = VU_WAITING;
            schedule(v, origin_ns + offset_ns);
            vus_used++;
        }
    }
}

/* The pre-allocated VUs wait, without connections, for the first iterations. */
static void start_arrivals(void)
{
    for (long i = 0; i < opt.start_vus; i++)
        idle[idle_len++] = &vus[i];
    vus_used = opt.start_vus;
    next_arrival_ns = first_arrival_ns;
}

static double seconds(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

/* Nearest-rank percentiles over total 2xx latencies, as "<prefix>p50_us" and so on. */
static void print_percentiles(const char *prefix, const uint32_t *counts, uint64_t total)
{
    static const char *const names[] = {"p50_us", "p90_us", "p99_us", "p999_us", "max_us"};
    static const uint64_t permille[] = {500, 900, 990, 999, 1000};
    enum { COUNT = sizeof permille / sizeof permille[0] };
    int64_t values[COUNT];
    uint64_t seen = 0;
    int next = 0;
    for (int64_t us = 0; us < latency_slots && next < COUNT; us++) {
        seen += counts[us];
        while (next < COUNT && total > 0 && seen >= (total * permille[next] + 999) / 1000)
            values[next++] = us;
    }
    for (int k = 0; k < COUNT; k++) {
        if (total > 0)
            printf(",\"%s%s\":%" PRId64, prefix, names[k], values[k]);
        else
            printf(",\"%s%s\":null", prefix, names[k]);
    }
}

/* The answers other than 2xx, by status and body: ,"answers":[{"status":503,"body":"...","count":N}] */
static void print_answers(void)
{
    printf(",\"answers\":[");
    for (int i = 0; i < answer_kinds_len; i++) {
        const struct answer_kind *kind = &answer_kinds[i];
        printf("%s{\"status\":%d,\"body\":\"", i ? "," : "", kind->status);
        for (size_t k = 0; k < kind->body_len; k++) {
            unsigned char c = (unsigned char)kind->body[k];
            if (c == '"' || c == '\\')
                printf("\\%c", c);
            else if (c < ' ' || c > '~')
                printf("\\u%04x", c);
            else
                putchar(c);
        }
        printf("\",\"count\":%" PRIu64 "}", kind->count);
    }
    printf("],\"answers_unsorted\":%" PRIu64, answers_unsorted);
}

/* Counters common to progress lines and the summary. */
static void print_counters(int64_t elapsed_ns)
{
    printf("\"started\":%" PRIu64 ",\"requests\":%" PRIu64 ",\"ok_2xx\":%" PRIu64 ",\"failed\":%" PRIu64
           ",\"other_status\":%" PRIu64 ",\"dropped\":%" PRIu64 ",\"vus\":%ld,\"max_start_lag_us\":%" PRId64
           ",\"duration_s\":%.3f,\"warmup_ok_2xx\":%" PRIu64,
           started, requests, ok_2xx, failed, other_status, dropped, vus_used, ns_to_us(max_start_lag_ns),
           (double)elapsed_ns / NS_PER_S, warmup_ok_2xx);
    print_answers();
}

/* Running totals; the percentiles are of the 2xx answers since the last line. */
static void print_progress(int64_t now)
{
    printf("{\"progress\":true,");
    print_counters(now - origin_ns);
    print_percentiles("", interval_counts, interval_ok);
    printf("}\n");
    fflush(stdout);
    memset(interval_counts, 0, (size_t)latency_slots * sizeof *interval_counts);
    interval_ok = 0;
    next_progress_ns += opt.progress_ms * NS_PER_MS;
    if (next_progress_ns <= now)
        next_progress_ns = now + opt.progress_ms * NS_PER_MS;
}

/* origin_unix_ms: the start of the recorded run on the realtime clock, for asking the
   processors what they recorded since */
static void print_summary(int64_t elapsed_ns, int64_t origin_unix_ms)
{
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("{\"origin_unix_ms\":%" PRId64 ",", origin_unix_ms);
    print_counters(elapsed_ns);
    printf(",\"unstamped\":%" PRIu64 ",\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"max_rss_kb\":%ld",
           unstamped, seconds(usage.ru_utime), seconds(usage.ru_stime), usage.ru_maxrss);
    print_percentiles("", latency_counts, ok_2xx);
    print_percentiles("read_", read_latency_counts, ok_2xx);
    printf("}\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (!parse_options(argc, argv)) {
        usage();
        return 2;
    }
    if (!resolve_target())
        return 2;
    csv_file = fopen(opt.out, "w");
    if (!csv_file) {
        perror(opt.out);
        return 1;
    }
    timeout_ns = opt.timeout_ms * NS_PER_MS;
    think_ns = opt.think_ms * NS_PER_MS;
    latency_slots = opt.timeout_ms * 1000 + 1;
    char *request_texts = build_requests();
    vus = calloc((size_t)opt.max_vus, sizeof *vus);
    timer_heap_reserve(&timers, (int)opt.max_vus);
    latency_counts = calloc((size_t)latency_slots, sizeof *latency_counts);
    read_latency_counts = calloc((size_t)latency_slots, sizeof *read_latency_counts);
    csv = malloc(CSV_BUFFER_SIZE);
    idle = calloc((size_t)opt.max_vus, sizeof *idle);
    if (opt.progress_ms > 0)
        interval_counts = calloc((size_t)latency_slots, sizeof *interval_counts);
    if (!request_texts || !vus || !latency_counts || !read_latency_counts || !csv || !idle ||
        (opt.progress_ms > 0 && !interval_counts)) {
        fputs("loadgen: out of memory\n", stderr);
        return 1;
    }
    for (long i = 0; i < opt.max_vus; i++) {
        vus[i].fd = -1;
        vus[i].timer.heap_index = -1;
        vus[i].request = request_texts + request_len * (size_t)i;
    }

    raise_fd_limit();
    int timestamps_fd = keep_receive_timestamps_on();
    int signal_fd = stop_signal_fd(SFD_NONBLOCK);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event signal_event = {.events = EPOLLIN, .data.ptr = NULL};
    if (signal_fd < 0 || epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, signal_fd, &signal_event) < 0) {
        perror("loadgen: epoll/signalfd");
        return 1;
    }
    seed_ids();

    static const char header[] = "start_us,latency_us,status,read_latency_us,new_connection\n";
    memcpy(csv, header, sizeof header - 1);
    csv_len = sizeof header - 1;
    int64_t duration_ns = (int64_t)(opt.duration_s * NS_PER_S);
    first_arrival_ns = now_ns();
    origin_ns = first_arrival_ns + (int64_t)(opt.warmup_s * NS_PER_S);
    int64_t origin_unix_ms = (real_now_ns() + (origin_ns - now_ns())) / NS_PER_MS;
    end_ns = origin_ns + duration_ns;
    next_progress_ns = origin_ns + opt.progress_ms * NS_PER_MS;
    if (opt.rate > 0)
        start_arrivals();
    else
        start_ramp(duration_ns);
    bool completed = run(signal_fd);
    int64_t elapsed_ns = now_ns() - origin_ns;

    csv_flush();
    if (timestamps_fd >= 0)
        close(timestamps_fd);
    if (fclose(csv_file) != 0)
        csv_error = true;
    print_summary(elapsed_ns, origin_unix_ms);
    if (csv_error) {
        fprintf(stderr, "loadgen: writing %s failed\n", opt.out);
        return 1;
    }
    return completed ? 0 : 1;
}
