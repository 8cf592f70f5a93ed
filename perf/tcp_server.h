/* The TCP side of the benchmark's servers (the constant-response server and the
   processor emulator): listening, the epoll loop's wait, taking connections,
   writing what is buffered.
   Header-only, like http_head.h; its includer defines _GNU_SOURCE (accept4). */
#ifndef PAYCORE_PERF_TCP_SERVER_H
#define PAYCORE_PERF_TCP_SERVER_H

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define TCP_SERVER_EVENTS 256

/* epoll data of the two descriptors of a server that are not connections */
static char tcp_server_listener_tag, tcp_server_stop_tag;

/* A non-blocking listener on host:port (port "0": any free one), or -1 after saying
   why on stderr, each line starting with who. */
static inline int tcp_listen(const char *who, const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *found;
    int rc = getaddrinfo(host, port, &hints, &found);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot resolve %s: %s\n", who, host, gai_strerror(rc));
        return -1;
    }
    int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, found->ai_addr, found->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
        fprintf(stderr, "%s: cannot listen on %s:%s: %s\n", who, host, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(found);
        return -1;
    }
    freeaddrinfo(found);
    return fd;
}

/* The port a listener is bound to; its host goes into shown as a URL writes it (an
   IPv6 address in brackets). */
static inline int tcp_bound_address(int listener, char *shown, size_t size)
{
    struct sockaddr_storage bound;
    socklen_t bound_len = sizeof bound;
    char address[INET6_ADDRSTRLEN];
    getsockname(listener, (struct sockaddr *)&bound, &bound_len);
    if (bound.ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&bound;
        inet_ntop(AF_INET6, &in6->sin6_addr, address, sizeof address);
        snprintf(shown, size, "[%s]", address);
        return ntohs(in6->sin6_port);
    }
    struct sockaddr_in *in4 = (struct sockaddr_in *)&bound;
    inet_ntop(AF_INET, &in4->sin_addr, address, sizeof address);
    snprintf(shown, size, "%s", address);
    return ntohs(in4->sin_port);
}

/* A waiting connection, non-blocking and with Nagle's delay off; -1 when none waits. */
static inline int tcp_accept(int listener)
{
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

/* Watches the listener and the descriptor a stop signal arrives on; false if epoll refused. */
static inline bool tcp_server_watch(int epoll_fd, int listener, int stop_fd)
{
    struct epoll_event listen_event = {.events = EPOLLIN, .data.ptr = &tcp_server_listener_tag};
    struct epoll_event stop_event = {.events = EPOLLIN, .data.ptr = &tcp_server_stop_tag};
    return epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &listen_event) == 0 &&
           epoll_ctl(epoll_fd, EPOLL_CTL_ADD, stop_fd, &stop_event) == 0;
}

/* One wait of a server's loop, up to timeout (NULL: no limit): each new connection goes
   to accepted(fd), each ready one to ready(its epoll data, its events). Returns -1 to go
   on, or the exit status: 0 after a stop signal, 1 if epoll failed (said on stderr). */
static inline int tcp_server_wait(const char *who, int epoll_fd, int listener, const struct timespec *timeout,
                                  void (*accepted)(int fd), void (*ready)(void *data, uint32_t events))
{
    struct epoll_event events[TCP_SERVER_EVENTS];
    int n = epoll_pwait2(epoll_fd, events, TCP_SERVER_EVENTS, timeout, NULL);
    if (n < 0 && errno != EINTR) {
        fprintf(stderr, "%s: epoll_wait: %s\n", who, strerror(errno));
        return 1;
    }
    for (int i = 0; i < n; i++) {
        void *data = events[i].data.ptr;
        if (data == &tcp_server_stop_tag)
            return 0;
        if (data == &tcp_server_listener_tag) {
            int fd;
            while ((fd = tcp_accept(listener)) >= 0)
                accepted(fd);
        } else {
            ready(data, events[i].events);
        }
    }
    return -1;
}

/* Writes data[*sent, len) until done or the socket is full; false if the connection broke. */
static inline bool tcp_write_pending(int fd, const char *data, size_t len, size_t *sent)
{
    while (*sent < len) {
        ssize_t n = write(fd, data + *sent, len - *sent);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN;
        }
        *sent += (size_t)n;
    }
    return true;
}

#endif
