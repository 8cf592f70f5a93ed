/*
 * Calibration target for loadgen: the cheapest HTTP/1.1 keep-alive server that
 * still reads every request in full (head and Content-Length body, pipelined or
 * split across reads) and answers each with the same 202. A run against it
 * measures the generator's own latency floor.
 *
 * Build: gcc -O2 -Wall -Wextra -o build/constant_server perf/constant_server.c
 * Run:   constant_server --listen 127.0.0.1:PORT   (port 0: any free port)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "http_head.h"
#include "stop_signals.h"
#include "tcp_server.h"

#define IN_MAX 16384
#define OUT_MAX 16384

static const char RESPONSE[] = "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
#define RESPONSE_LEN (sizeof RESPONSE - 1)

struct conn {
    int fd;
    uint32_t watching;
    bool in_body;
    uint64_t body_left;
    size_t in_len;
    size_t out_len;
    size_t out_sent;
    char in[IN_MAX];
    char out[OUT_MAX];
};

static int epoll_fd;

/* The body length a request head announces; false for heads this server cannot frame. */
static bool body_length(const char *head, size_t len, uint64_t *length)
{
    const char *line = http_first_header_line(head, len);
    struct http_header header;
    int read;
    *length = 0;
    while ((read = http_next_header(&line, head + len, &header)) > 0) {
        if (http_header_is(&header, "transfer-encoding"))
            return false;
        if (http_header_is(&header, "content-length") && !http_parse_length(&header, length))
            return false;
    }
    return read == 0;
}

enum consumed { CONSUME_ERROR, CONSUME_DONE, CONSUME_OUTPUT_FULL };

/* Consumes the complete requests buffered, queueing one response each, until the
 * output has no room for another. */
static enum consumed consume_requests(struct conn *c)
{
    enum consumed result = CONSUME_OUTPUT_FULL;
    size_t pos = 0;
    while (c->out_len + RESPONSE_LEN <= OUT_MAX) {
        if (!c->in_body) {
            const char *blank_line = memmem(c->in + pos, c->in_len - pos, "\r\n\r\n", 4);
            if (!blank_line) {
                if (pos == 0 && c->in_len == IN_MAX)
                    return CONSUME_ERROR;
                result = CONSUME_DONE;
                break;
            }
            size_t head_end = (size_t)(blank_line + 4 - c->in);
            if (!body_length(c->in + pos, head_end - pos, &c->body_left))
                return CONSUME_ERROR;
            pos = head_end;
            c->in_body = true;
        }
        size_t available = c->in_len - pos;
        size_t take = c->body_left < available ? (size_t)c->body_left : available;
        pos += take;
        c->body_left -= take;
        if (c->body_left > 0) {
            result = CONSUME_DONE;
            break;
        }
        c->in_body = false;
        memcpy(c->out + c->out_len, RESPONSE, RESPONSE_LEN);
        c->out_len += RESPONSE_LEN;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return result;
}

static bool flush(struct conn *c)
{
    if (!tcp_write_pending(c->fd, c->out, c->out_len, &c->out_sent))
        return false;
    if (c->out_sent == c->out_len)
        c->out_len = c->out_sent = 0;
    return true;
}

static void drop(struct conn *c)
{
    close(c->fd);
    free(c);
}

/* Reads while output can drain; waits for writability only while responses are pending. */
static void on_connection(void *data, uint32_t events)
{
    (void)events; /* level-triggered: the state says what to do */
    struct conn *c = data;
    if (c->watching == EPOLLIN) {
        ssize_t n = read(c->fd, c->in + c->in_len, IN_MAX - c->in_len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            drop(c);
            return;
        }
        if (n > 0)
            c->in_len += (size_t)n;
    }
    for (;;) {
        enum consumed result = consume_requests(c);
        if (result == CONSUME_ERROR || !flush(c)) {
            drop(c);
            return;
        }
        if (result == CONSUME_DONE || c->out_len > 0)
            break;
    }
    uint32_t wanted = c->out_len > 0 ? EPOLLOUT : EPOLLIN;
    if (wanted != c->watching) {
        struct epoll_event ev = {.events = wanted, .data.ptr = c};
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
        c->watching = wanted;
    }
}

static void accepted(int fd)
{
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->watching = EPOLLIN;
    c->in_body = false;
    c->body_left = 0;
    c->in_len = c->out_len = c->out_sent = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0)
        drop(c);
}

static int open_listener(const char *address)
{
    char host[256];
    const char *colon = strrchr(address, ':');
    if (!colon || colon == address || (size_t)(colon - address) >= sizeof host || colon[1] == '\0') {
        fprintf(stderr, "constant_server: --listen must be HOST:PORT, got %s\n", address);
        return -1;
    }
    memcpy(host, address, (size_t)(colon - address));
    host[colon - address] = '\0';
    int fd = tcp_listen("constant_server", host, colon + 1);
    if (fd < 0)
        return -1;
    char shown[64];
    int port = tcp_bound_address(fd, shown, sizeof shown);
    fprintf(stderr, "listening on %s:%d\n", shown, port);
    return fd;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {{"listen", required_argument, NULL, 'l'}, {NULL, 0, NULL, 0}};
    const char *address = NULL;
    int option;
    while ((option = getopt_long(argc, argv, "", options, NULL)) != -1) {
        if (option != 'l') {
            address = NULL;
            break;
        }
        address = optarg;
    }
    if (!address || optind < argc) {
        fputs("usage: constant_server --listen HOST:PORT\n", stderr);
        return 2;
    }

    int signal_fd = stop_signal_fd(0);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (signal_fd < 0 || epoll_fd < 0) {
        perror("constant_server: epoll/signalfd");
        return 1;
    }
    int listener = open_listener(address);
    if (listener < 0)
        return 1;
    if (!tcp_server_watch(epoll_fd, listener, signal_fd)) {
        perror("constant_server: epoll_ctl");
        return 1;
    }
    for (;;) {
        int status = tcp_server_wait("constant_server", epoll_fd, listener, NULL, accepted, on_connection);
        if (status >= 0)
            return status;
    }
}
